//! Bytes to [`Change`]: envelope detection, the schema wrapper, the flattened form and limits.
//!
//! A Debezium Postgres update without the JsonConverter schema wrapper:
//! ```json
//! {"before": null,
//!  "after": {"id": 1001, "status": "paid", "amount": "120.00"},
//!  "source": {"version": "2.7.0.Final", "connector": "postgresql", "name": "dbserver1",
//!             "ts_ms": 1700000000000, "snapshot": "false", "db": "shop", "schema": "public",
//!             "table": "orders", "txId": 771, "lsn": 24023928,
//!             "sequence": "[\"24023800\",\"24023928\"]"},
//!  "op": "u", "ts_ms": 1700000000456, "transaction": null}
//! ```
//! With the wrapper the same object sits under `payload`, beside its Connect `schema`. The
//! flattened form (ExtractNewRecordState with `add.fields=op,table,lsn,source.ts_ms` and
//! `delete.handling.mode=rewrite`) is the row itself plus `__op`, `__table`, `__lsn`,
//! `__source_ts_ms` and `__deleted`.

use std::sync::Arc;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

use super::body::{Body, envelope_body, flattened_body};
use super::change::{Change, Op, source_transaction_id};
use super::error::{DecodeError, json_type_name};
use super::key::EntityKey;
use super::logical::convert_row;
use super::record::RawRecord;
use super::schema_cache::SchemaCache;
use super::shallow::{FieldSelection, ShallowObject};

pub(super) const SCHEMA: &str = "schema";
pub(super) const PAYLOAD: &str = "payload";
pub(super) const OP: &str = "op";
pub(super) const BEFORE: &str = "before";
pub(super) const AFTER: &str = "after";
pub(super) const SOURCE: &str = "source";
pub(super) const TS_MS: &str = "ts_ms";
pub(super) const TRANSACTION: &str = "transaction";
pub(super) const FLAT_PREFIX: &str = "__";
pub(super) const FLAT_OP: &str = "__op";
pub(super) const FLAT_DELETED: &str = "__deleted";
pub(super) const FLAT_SOURCE_PREFIX: &str = "__source_";
pub(super) const FLAT_TS_MS: &str = "__ts_ms";

/// serde_json's own recursion limit: it returns an error, never overflows the stack.
const SERDE_DEPTH_LIMIT: usize = 128;

/// Size and shape limits that keep one hostile record from hurting the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Key plus value bytes above this are rejected before parsing.
    pub max_record_bytes: usize,
    /// JSON nesting beyond this is rejected. At 128 (the default) serde_json's own limit
    /// applies at no cost; a lower limit costs one scan of the bytes.
    pub max_nesting_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_record_bytes: 1024 * 1024,
            max_nesting_depth: SERDE_DEPTH_LIMIT,
        }
    }
}

/// Which value shape a pipeline's topics carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnvelopeFormat {
    /// The envelope if the value has `op`, the flattened form if it has `__` fields.
    #[default]
    Auto,
    Envelope,
    Flattened,
    /// CloudEvents, structured or binary: another pipeline's business events (a chain).
    CloudEvents,
}

/// What a record decodes to: a change, or something that is counted and skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Change(Box<Change>),
    Skip(SkipReason),
}

/// Records that are valid but carry no row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// A null value: the compaction tombstone Debezium writes after a delete.
    Tombstone,
    /// `op: m`, a logical decoding message.
    LogicalMessage,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Tombstone => "tombstone",
            SkipReason::LogicalMessage => "logical_message",
        }
    }
}

/// Decodes records of one pipeline.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    pub limits: DecodeLimits,
    pub format: EnvelopeFormat,
    /// Row fields that identify the entity when a record has no key.
    pub key_fields: Vec<String>,
    /// The `source` fields a change keeps: what the version, the transaction id and the
    /// rules read. The others are skipped unparsed.
    pub source_fields: FieldSelection,
    schemas: SchemaCache,
}

impl Decoder {
    pub fn new(limits: DecodeLimits, format: EnvelopeFormat, key_fields: Vec<String>) -> Decoder {
        Decoder {
            limits,
            format,
            key_fields,
            source_fields: FieldSelection::All,
            schemas: SchemaCache::default(),
        }
    }
}

impl Decoder {
    pub fn decode(&self, record: &RawRecord) -> Result<Decoded, DecodeError> {
        let size = record.payload_len();
        if size > self.limits.max_record_bytes {
            return Err(DecodeError::TooLarge {
                size,
                limit: self.limits.max_record_bytes,
            });
        }
        let Some(value_bytes) = record.value.as_deref().filter(|bytes| !bytes.is_empty()) else {
            return Ok(Decoded::Skip(SkipReason::Tombstone));
        };
        let text = self.checked_text("value", value_bytes)?;
        if self.format == EnvelopeFormat::CloudEvents {
            return super::cloudevent::event_change(record, value_bytes)
                .map(|change| Decoded::Change(Box::new(change)));
        }
        let Some((payload, schema)) = self.split_value(text)? else {
            return Ok(Decoded::Skip(SkipReason::Tombstone));
        };
        let flattened = match self.format {
            // CloudEvents were read above.
            EnvelopeFormat::Envelope | EnvelopeFormat::CloudEvents => false,
            EnvelopeFormat::Flattened => true,
            EnvelopeFormat::Auto => {
                !payload.contains(OP) && payload.names().any(|k| k.starts_with(FLAT_PREFIX))
            }
        };
        let body = if flattened {
            flattened_body(payload, schema.as_deref())?
        } else {
            match envelope_body(&payload, schema.as_deref(), &self.source_fields)? {
                Some(body) => body,
                None => return Ok(Decoded::Skip(SkipReason::LogicalMessage)),
            }
        };
        let key = self.entity_key(record, &body)?;
        let transaction_id = body
            .transaction_id
            .or_else(|| source_transaction_id(&body.source));
        Ok(Decoded::Change(Box::new(Change {
            op: body.op,
            key,
            before: body.before,
            after: body.after,
            after_json: body.after_json.map(Arc::from),
            source: body.source,
            envelope_ts_ms: body.ts_ms,
            transaction_id,
            event: None,
        })))
    }

    fn entity_key(&self, record: &RawRecord, body: &Body) -> Result<EntityKey, DecodeError> {
        if body.op == Op::Truncate {
            return Ok(EntityKey::table());
        }
        if let Some(bytes) = record.key.as_deref().filter(|bytes| !bytes.is_empty()) {
            let (mut key, schema) = self.parse_key(bytes)?;
            if let (Value::Object(fields), Some(schema)) = (&mut key, schema.as_deref()) {
                convert_row(fields, schema, "key")?;
            }
            if !key.is_null() {
                return Ok(EntityKey::from_json(key));
            }
        }
        body.after
            .as_ref()
            .or(body.before.as_ref())
            .filter(|_| !self.key_fields.is_empty())
            .and_then(|row| EntityKey::from_row(row, &self.key_fields))
            .ok_or_else(|| DecodeError::MissingKey {
                fields: self.key_fields.clone(),
            })
    }

    /// The bytes as text, within the nesting limit.
    fn checked_text<'b>(
        &self,
        part: &'static str,
        bytes: &'b [u8],
    ) -> Result<&'b str, DecodeError> {
        let text = std::str::from_utf8(bytes).map_err(|error| DecodeError::NotUtf8 {
            part,
            valid_up_to: error.valid_up_to(),
        })?;
        // serde_json stops at SERDE_DEPTH_LIMIT on its own; scan only for a tighter limit.
        if self.limits.max_nesting_depth < SERDE_DEPTH_LIMIT
            && exceeds_depth(bytes, self.limits.max_nesting_depth)
        {
            return Err(DecodeError::TooDeep {
                part,
                limit: self.limits.max_nesting_depth,
            });
        }
        Ok(text)
    }

    /// The value's payload read one level deep, with the JsonConverter schema when the value
    /// is wrapped; `None` for a JSON null.
    fn split_value<'t>(&self, text: &'t str) -> Result<Option<WrappedPayload<'t>>, DecodeError> {
        if let Some((payload, schema)) = self.payload_after_recent_schema(text)
            && let Ok(payload) = serde_json::from_str::<ShallowObject<'_>>(payload)
        {
            return Ok(Some((payload, Some(schema))));
        }
        let Some(top) = shallow_payload(text, text)? else {
            return Ok(None);
        };
        let Some(payload) = top.get(PAYLOAD).filter(|_| is_wrapper(&top)) else {
            return Ok(Some((top, None)));
        };
        let schema = self.cached_schema("value", top.get(SCHEMA))?;
        Ok(shallow_payload(payload.get(), text)?.map(|payload| (payload, schema)))
    }

    fn cached_schema(
        &self,
        part: &'static str,
        raw: Option<&RawValue>,
    ) -> Result<Option<Arc<Value>>, DecodeError> {
        raw.filter(|raw| raw.get() != "null")
            .map(|raw| {
                self.schemas
                    .get(raw.get())
                    .map_err(|error| classify_json_error(part, &error))
            })
            .transpose()
    }

    /// Parses a key, splitting off the JsonConverter schema when it is there.
    fn parse_key(&self, bytes: &[u8]) -> Result<(Value, Option<Arc<Value>>), DecodeError> {
        const PART: &str = "key";
        let text = self.checked_text(PART, bytes)?;
        if let Some((payload, schema)) = self.payload_after_recent_schema(text)
            && let Ok(payload) = serde_json::from_str(payload)
        {
            return Ok((payload, Some(schema)));
        }
        let opening = text.trim_start();
        if (opening.starts_with("{\"schema\"") || opening.starts_with("{\"payload\""))
            && let Ok(wrapped) = serde_json::from_str::<WrappedKey<'_>>(text)
        {
            return Ok((wrapped.payload, self.cached_schema(PART, wrapped.schema)?));
        }
        let value =
            serde_json::from_str(text).map_err(|error| classify_json_error(PART, &error))?;
        match value {
            Value::Object(mut map)
                if !map.is_empty()
                    && map.contains_key(PAYLOAD)
                    && map.keys().all(|name| name == SCHEMA || name == PAYLOAD) =>
            {
                let schema = match map.remove(SCHEMA).filter(|schema| !schema.is_null()) {
                    Some(schema) => Some(
                        self.schemas
                            .get(&schema.to_string())
                            .map_err(|error| classify_json_error(PART, &error))?,
                    ),
                    None => None,
                };
                Ok((map.remove(PAYLOAD).unwrap_or(Value::Null), schema))
            }
            other => Ok((other, None)),
        }
    }

    /// The payload text of the wrapper as the JsonConverter writes it
    /// (`{"schema":S,"payload":P}`, compact) whose schema S is one seen recently, found by
    /// comparing bytes instead of scanning S. `None` sends the text the general way, which
    /// also words any error.
    fn payload_after_recent_schema<'t>(&self, text: &'t str) -> Option<(&'t str, Arc<Value>)> {
        const OPENING: &str = "{\"schema\":";
        const BETWEEN: &str = ",\"payload\":";
        let rest = text.strip_prefix(OPENING)?;
        let (schema, length) = self.schemas.recent_prefix(rest)?;
        let payload = rest[length..]
            .strip_prefix(BETWEEN)?
            .trim_end()
            .strip_suffix('}')?;
        Some((payload, schema))
    }
}

/// A value's payload fields, with the Connect schema that describes them when there is one.
type WrappedPayload<'t> = (ShallowObject<'t>, Option<Arc<Value>>);

/// A key in the JsonConverter's wrapper, its schema left unparsed to be looked up in the cache.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedKey<'a> {
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
    payload: Value,
}

/// `{"schema": S, "payload": P}` or `{"payload": P}`: the JsonConverter's wrapper.
fn is_wrapper(object: &ShallowObject<'_>) -> bool {
    object.contains(PAYLOAD) && object.names().all(|name| name == SCHEMA || name == PAYLOAD)
}

/// A payload's fields; `None` for JSON null, an error for anything but an object. `whole` is
/// the record's text, parsed again only to word an error by its position in the record.
fn shallow_payload<'t>(
    text: &'t str,
    whole: &str,
) -> Result<Option<ShallowObject<'t>>, DecodeError> {
    if text.trim_start().starts_with('{') {
        return match serde_json::from_str(text) {
            Ok(object) => Ok(Some(object)),
            Err(error) => Err(classify_json_error(
                "value",
                &serde_json::from_str::<IgnoredAny>(whole)
                    .err()
                    .unwrap_or(error),
            )),
        };
    }
    match serde_json::from_str(text).map_err(|error| classify_json_error("value", &error))? {
        Value::Null => Ok(None),
        other => Err(DecodeError::WrongType {
            field: PAYLOAD.to_owned(),
            expected: "object",
            found: json_type_name(&other),
        }),
    }
}

pub(super) fn classify_json_error(part: &'static str, error: &serde_json::Error) -> DecodeError {
    if error.classify() == serde_json::error::Category::Eof {
        DecodeError::Truncated {
            part,
            line: error.line(),
            column: error.column(),
        }
    } else if error.to_string().starts_with("recursion limit exceeded") {
        DecodeError::TooDeep {
            part,
            limit: SERDE_DEPTH_LIMIT,
        }
    } else {
        DecodeError::Malformed {
            part,
            detail: error.to_string(),
        }
    }
}

/// Scans for bracket nesting deeper than `limit`, outside strings, without parsing.
fn exceeds_depth(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}
