//! The decoded row change.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::key::EntityKey;

/// Debezium operation codes (`payload.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Create,
    Update,
    Delete,
    /// `r`: a snapshot read.
    Read,
    /// `t`: a table truncate; it carries no key and no images.
    Truncate,
}

impl Op {
    pub const CREATE: &'static str = "c";
    pub const UPDATE: &'static str = "u";
    pub const DELETE: &'static str = "d";
    pub const READ: &'static str = "r";
    pub const TRUNCATE: &'static str = "t";
    /// `m`: a logical decoding message; not a row change.
    pub const MESSAGE: &'static str = "m";

    pub fn code(self) -> &'static str {
        match self {
            Op::Create => Self::CREATE,
            Op::Update => Self::UPDATE,
            Op::Delete => Self::DELETE,
            Op::Read => Self::READ,
            Op::Truncate => Self::TRUNCATE,
        }
    }

    pub fn from_code(code: &str) -> Option<Op> {
        match code {
            Self::CREATE => Some(Op::Create),
            Self::UPDATE => Some(Op::Update),
            Self::DELETE => Some(Op::Delete),
            Self::READ => Some(Op::Read),
            Self::TRUNCATE => Some(Op::Truncate),
            _ => None,
        }
    }
}

/// One decoded row change. Images are JSON objects whose logical types are already converted
/// (exact decimals as text, dates and times as ISO-8601 text).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub op: Op,
    pub key: EntityKey,
    pub before: Option<Map<String, Value>>,
    pub after: Option<Map<String, Value>>,
    /// `after` as the record's own JSON text, when it needed no conversion (no Connect
    /// schema): the entity's next stored image, without serialising the map again.
    pub after_json: Option<Arc<str>>,
    /// The `source` block (for the flattened form, rebuilt from the `__source_*` fields).
    pub source: Map<String, Value>,
    /// Envelope `ts_ms` (when Debezium processed the change), if present.
    pub envelope_ts_ms: Option<i64>,
    /// The source transaction id: the envelope's `transaction.id` block (written with
    /// `provide.transaction.metadata`), else the connector's `txId`, `gtid` or `xid`. For a
    /// CloudEvents input, the chain's correlation id.
    pub transaction_id: Option<String>,
    /// For a CloudEvents input (a chain stage), the event the change is.
    pub event: Option<super::EventOrigin>,
}

impl Change {
    /// The source database's commit time (`source.ts_ms`), falling back to the envelope's.
    pub fn source_ts_ms(&self) -> Option<i64> {
        self.source
            .get("ts_ms")
            .and_then(|value| {
                value
                    .as_i64()
                    .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
            })
            .or(self.envelope_ts_ms)
    }

    /// The newest row image this change carries: `after`, or `before` for a delete.
    pub fn latest_image(&self) -> Option<&Map<String, Value>> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// The `source` fields a change reads for itself: its commit time and transaction id.
pub const CHANGE_SOURCE_FIELDS: [&str; 5] = ["ts_ms", "txId", "gtid", "xid", "txid"];
const TRANSACTION_ID_FIELDS: [&str; 4] = ["txId", "gtid", "xid", "txid"];

/// The transaction id a connector puts in its `source` block, if any.
pub(crate) fn source_transaction_id(source: &Map<String, Value>) -> Option<String> {
    TRANSACTION_ID_FIELDS
        .iter()
        .find_map(|name| source.get(*name))
        .and_then(scalar_text)
}

/// Text of a scalar JSON value (`"a"` -> `a`, `5` -> `5`), `None` for null or containers.
pub(crate) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
