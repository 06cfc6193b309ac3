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
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::change::{Change, Op, source_transaction_id};
use super::error::{DecodeError, json_type_name, raw_type_name};
use super::key::EntityKey;
use super::logical::{convert_row, field_schema};
use super::record::RawRecord;
use super::schema_cache::SchemaCache;
use super::shallow::{FieldSelection, ShallowObject, selected_fields};

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
        let Some((payload, schema)) = self.split_value(text)? else {
            return Ok(Decoded::Skip(SkipReason::Tombstone));
        };
        let flattened = match self.format {
            EnvelopeFormat::Envelope => false,
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

/// The decoded parts of a value, before the key is attached.
struct Body<'t> {
    op: Op,
    before: Option<Map<String, Value>>,
    after: Option<Map<String, Value>>,
    /// The `after` object's own text, when it needed no conversion.
    after_json: Option<&'t str>,
    source: Map<String, Value>,
    ts_ms: Option<i64>,
    transaction_id: Option<String>,
}

/// Decodes the standard envelope; `None` for a logical decoding message.
fn envelope_body<'t>(
    payload: &ShallowObject<'t>,
    schema: Option<&Value>,
    source_fields: &FieldSelection,
) -> Result<Option<Body<'t>>, DecodeError> {
    let Some(op) = envelope_op(payload.get(OP))? else {
        return Ok(None);
    };
    let mut before = row(payload.get(BEFORE), BEFORE)?;
    let mut after = row(payload.get(AFTER), AFTER)?;
    if matches!(op, Op::Create | Op::Update | Op::Read) && after.is_none() {
        return Err(DecodeError::MissingField {
            field: AFTER.to_owned(),
        });
    }
    let mut after_json = payload.get(AFTER).map(RawValue::get);
    if let Some(schema) = schema {
        after_json = None;
        for (name, row) in [(BEFORE, &mut before), (AFTER, &mut after)] {
            if let (Some(row), Some(row_schema)) = (row.as_mut(), field_schema(schema, name)) {
                convert_row(row, row_schema, name)?;
            }
        }
    }
    let source = match payload.get(SOURCE).filter(|raw| raw.get() != "null") {
        None => Map::new(),
        Some(raw) if raw.get().starts_with('{') => selected_fields(raw.get(), source_fields)
            .map_err(|error| field_error(SOURCE, &error))?,
        Some(raw) => return Err(wrong_raw_type(SOURCE, "object or null", raw)),
    };
    let ts_ms = optional_i64(payload.get(TS_MS), TS_MS)?;
    let transaction_id = match payload.get(TRANSACTION) {
        Some(raw) if raw.get().starts_with('{') => {
            let block: Map<String, Value> = serde_json::from_str(raw.get())
                .map_err(|error| field_error(TRANSACTION, &error))?;
            block.get("id").and_then(super::change::scalar_text)
        }
        _ => None,
    };
    Ok(Some(Body {
        op,
        before,
        after_json: after_json.filter(|_| after.is_some()),
        after,
        source,
        ts_ms,
        transaction_id,
    }))
}

/// The envelope's `op`; `None` for a logical decoding message.
fn envelope_op(raw: Option<&RawValue>) -> Result<Option<Op>, DecodeError> {
    let missing = || DecodeError::MissingField {
        field: OP.to_owned(),
    };
    let raw = raw.ok_or_else(missing)?;
    // The one-letter codes as Debezium writes them, without building a string.
    if let Some(op) = raw
        .get()
        .strip_prefix('"')
        .and_then(|text| text.strip_suffix('"'))
        .and_then(Op::from_code)
    {
        return Ok(Some(op));
    }
    match parse_field(raw, OP)? {
        Value::Null => Err(missing()),
        Value::String(code) if code == Op::MESSAGE => Ok(None),
        Value::String(code) => Op::from_code(&code)
            .map(Some)
            .ok_or(DecodeError::UnknownOp { op: code }),
        other => Err(wrong_type(OP, "string", &other)),
    }
}

/// Decodes the flattened "new record state" form: the row plus `__`-prefixed metadata.
fn flattened_body<'t>(
    payload: ShallowObject<'t>,
    schema: Option<&Value>,
) -> Result<Body<'t>, DecodeError> {
    let mut row = Map::new();
    let mut source = Map::new();
    let mut op_code = None;
    let mut deleted = false;
    let mut ts_ms = None;
    for (name, raw) in payload.into_fields() {
        let value = parse_field(raw, &name)?;
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
            row.insert(name.into_owned(), value);
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
        after_json: None,
        source,
        ts_ms,
        transaction_id: None,
    })
}

/// One field's value, parsed. Its syntax was checked with the whole record, so what can fail
/// here is the nesting limit.
fn parse_field(raw: &RawValue, field: &str) -> Result<Value, DecodeError> {
    serde_json::from_str(raw.get()).map_err(|error| field_error(field, &error))
}

fn field_error(field: &str, error: &serde_json::Error) -> DecodeError {
    match classify_json_error("value", error) {
        DecodeError::Malformed { part, detail } => DecodeError::Malformed {
            part,
            detail: format!("in field `{field}`: {detail}"),
        },
        other => other,
    }
}

/// A row image: an object, or `None` for null or absent.
fn row(raw: Option<&RawValue>, field: &str) -> Result<Option<Map<String, Value>>, DecodeError> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) if raw.get().starts_with('{') => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|error| field_error(field, &error)),
        Some(raw) => Err(wrong_raw_type(field, "object or null", raw)),
    }
}

fn wrong_raw_type(field: &str, expected: &'static str, found: &RawValue) -> DecodeError {
    DecodeError::WrongType {
        field: field.to_owned(),
        expected,
        found: raw_type_name(found),
    }
}

fn optional_i64(raw: Option<&RawValue>, field: &str) -> Result<Option<i64>, DecodeError> {
    let Some(raw) = raw.filter(|raw| raw.get() != "null") else {
        return Ok(None);
    };
    if let Ok(number) = raw.get().parse() {
        return Ok(Some(number));
    }
    // Debezium's documentation shows some integers as numeric text; accept both.
    let value = parse_field(raw, field)?;
    integer_or_numeric_text(&value)
        .map(Some)
        .ok_or_else(|| wrong_type(field, "integer", &value))
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
