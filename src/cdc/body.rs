//! The two value layouts a change comes in, read into a [`Body`]: the standard envelope
//! (`before`, `after`, `source`, `op`, `ts_ms`, `transaction`) and the flattened "new record
//! state" (the row plus `__op`, `__deleted`, `__source_*`), with the field errors both share.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::change::Op;
use super::decode::{
    AFTER, BEFORE, FLAT_DELETED, FLAT_OP, FLAT_PREFIX, FLAT_SOURCE_PREFIX, FLAT_TS_MS, OP, SOURCE,
    TRANSACTION, TS_MS, classify_json_error,
};
use super::error::{DecodeError, json_type_name, raw_type_name};
use super::logical::{convert_row, field_schema};
use super::shallow::{FieldSelection, ShallowObject, selected_fields};

/// The decoded parts of a value, before the key is attached.
pub(super) struct Body<'t> {
    pub(super) op: Op,
    pub(super) before: Option<Map<String, Value>>,
    pub(super) after: Option<Map<String, Value>>,
    /// The `after` object's own text, when it needed no conversion.
    pub(super) after_json: Option<&'t str>,
    pub(super) source: Map<String, Value>,
    pub(super) ts_ms: Option<i64>,
    pub(super) transaction_id: Option<String>,
}

/// Decodes the standard envelope; `None` for a logical decoding message.
pub(super) fn envelope_body<'t>(
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
pub(super) fn flattened_body<'t>(
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
