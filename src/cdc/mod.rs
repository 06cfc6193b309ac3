//! Debezium decoding: Kafka record bytes in, a [`Change`] out.
//!
//! This module owns the wire format (the Debezium envelope, the JsonConverter `schema`/`payload`
//! wrapper, the flattened "new record state" form and Connect logical types). It never does I/O,
//! never imports rdkafka, sqlx or tokio, and reports every problem as a typed [`DecodeError`]
//! that names the field and the reason, so that the caller can send the record to a DLQ.

mod body;
mod change;
mod cloudevent;
mod decode;
mod error;
mod key;
mod logical;
mod record;
mod schema_cache;
mod shallow;
mod time;

pub use change::{CHANGE_SOURCE_FIELDS, Change, Op};
pub use cloudevent::{EventOrigin, RecordEvent, record_event};
pub use decode::{DecodeLimits, Decoded, Decoder, EnvelopeFormat, SkipReason};
pub use error::DecodeError;
pub use key::EntityKey;
pub use record::{Header, Origin, OriginRef, RawRecord};
pub use shallow::{FieldSelection, selected_fields};
pub(crate) use time::days_from_civil;
pub use time::{format_epoch_millis, format_epoch_nanos_local, parse_rfc3339_millis};
