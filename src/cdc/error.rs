//! Typed decode failures. Each names the field and the reason, and maps to a stable reason code
//! that DLQ headers and metrics use.

use thiserror::Error;

/// Why a record could not be decoded into a change. Every variant is a bad record: it goes to the
/// DLQ, it is counted, and processing continues.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("record is {size} bytes, over the limit of {limit} bytes (limits.max_record_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("{part} is not UTF-8: invalid byte at offset {valid_up_to}")]
    NotUtf8 {
        part: &'static str,
        valid_up_to: usize,
    },
    #[error("{part} is truncated JSON: input ends at line {line}, column {column}")]
    Truncated {
        part: &'static str,
        line: usize,
        column: usize,
    },
    #[error("{part} nests deeper than {limit} levels (limits.max_nesting_depth)")]
    TooDeep { part: &'static str, limit: usize },
    #[error("{part} is malformed JSON: {detail}")]
    Malformed { part: &'static str, detail: String },
    #[error("field `{field}` has the wrong type: expected {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("required field `{field}` is missing")]
    MissingField { field: String },
    #[error("unknown op `{op}`: expected one of c, u, d, r, t, m")]
    UnknownOp { op: String },
    #[error("record has no key and no key field {fields:?} in its row image")]
    MissingKey { fields: Vec<String> },
    #[error("field `{field}`: {detail}")]
    BadLogicalValue { field: String, detail: String },
}

impl DecodeError {
    /// A stable snake_case code for DLQ headers and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "record_too_large",
            DecodeError::NotUtf8 { .. } => "not_utf8",
            DecodeError::Truncated { .. } => "truncated_json",
            DecodeError::TooDeep { .. } => "nesting_too_deep",
            DecodeError::Malformed { .. } => "malformed_json",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::UnknownOp { .. } => "unknown_op",
            DecodeError::MissingKey { .. } => "missing_key",
            DecodeError::BadLogicalValue { .. } => "bad_logical_value",
        }
    }
}

/// The JSON type name of a value, for `WrongType` messages.
pub(crate) fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// The JSON type name of an unparsed value, from its first character.
pub(crate) fn raw_type_name(value: &serde_json::value::RawValue) -> &'static str {
    match value.get().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}
