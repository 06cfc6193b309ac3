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
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::change::{Change, Op, source_transaction_id};
use super::error::{DecodeError, json_type_name};
use super::key::EntityKey;
use super::logical::{convert_row, field_schema};
use super::record::RawRecord;
use super::schema_cache::SchemaCache;

const SCHEMA: &str = "schema";
const PAYLOAD: &str = "payload";
const OP: &str = "op";
const BEFORE: &str = "before";
const AFTER: &str = "after";
const SOURCE: &str = "source";
const TS_MS: &str = "ts_ms";
const TRANSACTION: &str = "transaction";
const FLAT_PREFIX: &str = "__";
const FLAT_OP: &str = "__op";
const FLAT_DELETED: &str = "__deleted";
const FLAT_SOURCE_PREFIX: &str = "__source_";
const FLAT_TS_MS: &str = "__ts_ms";

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
    schemas: SchemaCache,
}

impl Decoder {
    pub fn new(limits: DecodeLimits, format: EnvelopeFormat, key_fields: Vec<String>) -> Decoder {
        Decoder {
            limits,
            format,
            key_fields,
            schemas: SchemaCache::default(),
        }
    }
}

/// The JsonConverter wrapper with its schema left unparsed, to be looked up in the cache.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped<'a> {
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
    payload: Value,
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
        let (payload, schema) = match self.parse("value", value_bytes)? {
            (Value::Null, _) => return Ok(Decoded::Skip(SkipReason::Tombstone)),
            (Value::Object(payload), schema) => (payload, schema),
            (other, _) => {
                return Err(DecodeError::WrongType {
                    field: PAYLOAD.to_owned(),
                    expected: "object",
                    found: json_type_name(&other),
                });
            }
        };
        let flattened = match self.format {
            EnvelopeFormat::Envelope => false,
            EnvelopeFormat::Flattened => true,
            EnvelopeFormat::Auto => {
                !payload.contains_key(OP) && payload.keys().any(|k| k.starts_with(FLAT_PREFIX))
            }
        };
        let body = if flattened {
            flattened_body(payload, schema.as_deref())?
        } else {
            match envelope_body(payload, schema.as_deref())? {
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
            source: body.source,
            envelope_ts_ms: body.ts_ms,
            transaction_id,
        })))
    }

    fn entity_key(&self, record: &RawRecord, body: &Body) -> Result<EntityKey, DecodeError> {
        if body.op == Op::Truncate {
            return Ok(EntityKey::table());
        }
        if let Some(bytes) = record.key.as_deref().filter(|bytes| !bytes.is_empty()) {
            let (mut key, schema) = self.parse("key", bytes)?;
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

    /// Parses a key or value, splitting off the JsonConverter schema when it is there.
    fn parse(
        &self,
        part: &'static str,
        bytes: &[u8],
    ) -> Result<(Value, Option<Arc<Value>>), DecodeError> {
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
        if let Some(parsed) = self.parse_after_recent_schema(text) {
            return Ok(parsed);
        }
        // Only a value that opens with one of the wrapper's two fields is worth the borrowed
        // fast path; anything that is not exactly {schema, payload} parses as plain JSON.
        let opening = text.trim_start();
        if (opening.starts_with("{\"schema\"") || opening.starts_with("{\"payload\""))
            && let Ok(wrapped) = serde_json::from_str::<Wrapped<'_>>(text)
        {
            let schema = match wrapped.schema.filter(|raw| raw.get() != "null") {
                Some(raw) => Some(
                    self.schemas
                        .get(raw.get())
                        .map_err(|error| classify_json_error(part, &error))?,
                ),
                None => None,
            };
            return Ok((wrapped.payload, schema));
        }
        let value =
            serde_json::from_str(text).map_err(|error| classify_json_error(part, &error))?;
        let (value, schema) = unwrap_schema(value);
        Ok((value, schema.map(Arc::new)))
    }
}

impl Decoder {
    /// The wrapper as the JsonConverter writes it (`{"schema":S,"payload":P}`, compact) whose
    /// schema S is one seen recently: only P is parsed. `None` sends the text the general way,
    /// which also words any error.
    fn parse_after_recent_schema(&self, text: &str) -> Option<(Value, Option<Arc<Value>>)> {
        const OPENING: &str = "{\"schema\":";
        const BETWEEN: &str = ",\"payload\":";
        let rest = text.strip_prefix(OPENING)?;
        let (schema, length) = self.schemas.recent_prefix(rest)?;
        let payload = rest[length..]
            .strip_prefix(BETWEEN)?
            .trim_end()
            .strip_suffix('}')?;
        let payload = serde_json::from_str(payload).ok()?;
        Some((payload, Some(schema)))
    }
}

fn classify_json_error(part: &'static str, error: &serde_json::Error) -> DecodeError {
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

/// Splits the JsonConverter wrapper `{"schema": ..., "payload": ...}` when present.
fn unwrap_schema(value: Value) -> (Value, Option<Value>) {
    match value {
        Value::Object(mut map)
            if map.len() == 2 && map.contains_key(SCHEMA) && map.contains_key(PAYLOAD) =>
        {
            let schema = map.remove(SCHEMA).filter(|schema| !schema.is_null());
            let payload = map.remove(PAYLOAD).unwrap_or(Value::Null);
            (payload, schema)
        }
        other => (other, None),
    }
}

/// The decoded parts of a value, before the key is attached.
struct Body {
    op: Op,
    before: Option<Map<String, Value>>,
    after: Option<Map<String, Value>>,
    source: Map<String, Value>,
    ts_ms: Option<i64>,
    transaction_id: Option<String>,
}

/// Decodes the standard envelope; `None` for a logical decoding message.
fn envelope_body(
    mut payload: Map<String, Value>,
    schema: Option<&Value>,
) -> Result<Option<Body>, DecodeError> {
    let op = match payload.get(OP) {
        None | Some(Value::Null) => {
            return Err(DecodeError::MissingField {
                field: OP.to_owned(),
            });
        }
        Some(Value::String(code)) if code == Op::MESSAGE => return Ok(None),
        Some(Value::String(code)) => {
            Op::from_code(code).ok_or_else(|| DecodeError::UnknownOp { op: code.clone() })?
        }
        Some(other) => return Err(wrong_type(OP, "string", other)),
    };
    let mut before = take_row(&mut payload, BEFORE)?;
    let mut after = take_row(&mut payload, AFTER)?;
    if matches!(op, Op::Create | Op::Update | Op::Read) && after.is_none() {
        return Err(DecodeError::MissingField {
            field: AFTER.to_owned(),
        });
    }
    if let Some(schema) = schema {
        for (name, row) in [(BEFORE, &mut before), (AFTER, &mut after)] {
            if let (Some(row), Some(row_schema)) = (row.as_mut(), field_schema(schema, name)) {
                convert_row(row, row_schema, name)?;
            }
        }
    }
    let source = take_row(&mut payload, SOURCE)?.unwrap_or_default();
    let ts_ms = optional_i64(&payload, TS_MS)?;
    let transaction_id = match payload.get(TRANSACTION) {
        Some(Value::Object(block)) => block.get("id").and_then(super::change::scalar_text),
        _ => None,
    };
    Ok(Some(Body {
        op,
        before,
        after,
        source,
        ts_ms,
        transaction_id,
    }))
}

/// Decodes the flattened "new record state" form: the row plus `__`-prefixed metadata.
fn flattened_body(
    payload: Map<String, Value>,
    schema: Option<&Value>,
) -> Result<Body, DecodeError> {
    let mut row = Map::new();
    let mut source = Map::new();
    let mut op_code = None;
    let mut deleted = false;
    let mut ts_ms = None;
    for (name, value) in payload {
        if name == FLAT_OP {
            match value {
                Value::String(code) => op_code = Some(code),
                Value::Null => {}
                other => return Err(wrong_type(FLAT_OP, "string", &other)),
            }
        } else if name == FLAT_DELETED {
            deleted = match &value {
                Value::String(text) => text == "true",
                Value::Bool(flag) => *flag,
                Value::Null => false,
                other => return Err(wrong_type(FLAT_DELETED, "\"true\" or \"false\"", other)),
            };
        } else if name == FLAT_TS_MS {
            ts_ms = integer_or_numeric_text(&value);
        } else if let Some(field) = name.strip_prefix(FLAT_SOURCE_PREFIX) {
            source.insert(field.to_owned(), value);
        } else if let Some(field) = name.strip_prefix(FLAT_PREFIX) {
            // `add.fields=table,lsn` names source fields without the `source_` prefix.
            source.entry(field.to_owned()).or_insert(value);
        } else {
            row.insert(name, value);
        }
    }
    if let Some(schema) = schema {
        convert_row(&mut row, schema, "value")?;
    }
    let op = match op_code.as_deref() {
        Some(code) => Op::from_code(code).ok_or_else(|| DecodeError::UnknownOp {
            op: code.to_owned(),
        })?,
        // Without `__op` a rewritten delete is flagged by `__deleted`; anything else is an
        // upsert of the row.
        None if deleted => Op::Delete,
        None => Op::Update,
    };
    let (before, after) = if op == Op::Delete || deleted {
        (Some(row), None)
    } else {
        (None, Some(row))
    };
    let op = if deleted { Op::Delete } else { op };
    Ok(Body {
        op,
        before,
        after,
        source,
        ts_ms,
        transaction_id: None,
    })
}

fn take_row(
    payload: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<Map<String, Value>>, DecodeError> {
    match payload.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(row)) => Ok(Some(row)),
        Some(other) => Err(wrong_type(field, "object or null", &other)),
    }
}

fn optional_i64(payload: &Map<String, Value>, field: &str) -> Result<Option<i64>, DecodeError> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        // Debezium's documentation shows some integers as numeric text; accept both.
        Some(value) => integer_or_numeric_text(value)
            .map(Some)
            .ok_or_else(|| wrong_type(field, "integer", value)),
    }
}

fn wrong_type(field: &str, expected: &'static str, found: &Value) -> DecodeError {
    DecodeError::WrongType {
        field: field.to_owned(),
        expected,
        found: json_type_name(found),
    }
}

fn integer_or_numeric_text(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
}
