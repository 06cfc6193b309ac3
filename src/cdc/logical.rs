//! Connect and Debezium logical types, converted with the JsonConverter schema so that rules
//! compare real values: exact decimals become decimal text, epoch-based temporals become
//! ISO-8601 text. Without a schema nothing is converted (the types cannot be known).
//!
//! Sample field schemas, as the JsonConverter writes them:
//! ```json
//! {"type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal",
//!  "version":1,"parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"amount"}
//! {"type":"int64","optional":true,"name":"io.debezium.time.MicroTimestamp","version":1,
//!  "field":"created_at"}
//! ```

use std::fmt;

use base64::Engine as _;
use num_bigint::BigInt;
use serde_json::{Map, Value};

use super::error::DecodeError;
use super::time::{format_date, format_epoch_nanos_local, format_time};

const DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";
const CONNECT_DATE: &str = "org.apache.kafka.connect.data.Date";
const CONNECT_TIME: &str = "org.apache.kafka.connect.data.Time";
const CONNECT_TIMESTAMP: &str = "org.apache.kafka.connect.data.Timestamp";
const DEBEZIUM_DATE: &str = "io.debezium.time.Date";
/// `json` and `jsonb` columns: the document as JSON text.
const DEBEZIUM_JSON: &str = "io.debezium.data.Json";
const DEBEZIUM_TIME: &str = "io.debezium.time.Time";
const DEBEZIUM_MICRO_TIME: &str = "io.debezium.time.MicroTime";
const DEBEZIUM_NANO_TIME: &str = "io.debezium.time.NanoTime";
const DEBEZIUM_TIMESTAMP: &str = "io.debezium.time.Timestamp";
const DEBEZIUM_MICRO_TIMESTAMP: &str = "io.debezium.time.MicroTimestamp";
const DEBEZIUM_NANO_TIMESTAMP: &str = "io.debezium.time.NanoTimestamp";

/// Finds the schema of the envelope field `name` (`before`, `after`, `source`...) in an envelope
/// struct schema.
pub(crate) fn field_schema<'s>(struct_schema: &'s Value, name: &str) -> Option<&'s Value> {
    struct_schema
        .get("fields")?
        .as_array()?
        .iter()
        .find(|field| field.get("field").and_then(Value::as_str) == Some(name))
}

/// Converts, in place, every logical-typed field of `row` described by `schema` (a Connect
/// struct schema). `path` prefixes field names in errors (`after.amount`).
pub(crate) fn convert_row(
    row: &mut Map<String, Value>,
    schema: &Value,
    path: &str,
) -> Result<(), DecodeError> {
    convert_fields(row, schema, &FieldPath::Root(path))
}

/// Where a value sits in a record, put into words only when an error names it.
#[derive(Debug, Clone, Copy)]
enum FieldPath<'a> {
    Root(&'a str),
    Field(&'a FieldPath<'a>, &'a str),
    Item(&'a FieldPath<'a>, usize),
}

impl fmt::Display for FieldPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Root(name) => f.write_str(name),
            FieldPath::Field(parent, name) => write!(f, "{parent}.{name}"),
            FieldPath::Item(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

fn convert_fields(
    row: &mut Map<String, Value>,
    schema: &Value,
    path: &FieldPath<'_>,
) -> Result<(), DecodeError> {
    let Some(fields) = schema.get("fields").and_then(Value::as_array) else {
        return Ok(());
    };
    for field_schema in fields {
        let Some(name) = field_schema.get("field").and_then(Value::as_str) else {
            continue;
        };
        if let Some(value) = row.get_mut(name) {
            convert_value(value, field_schema, &FieldPath::Field(path, name))?;
        }
    }
    Ok(())
}

fn convert_value(
    value: &mut Value,
    schema: &Value,
    path: &FieldPath<'_>,
) -> Result<(), DecodeError> {
    if value.is_null() {
        return Ok(());
    }
    if schema.get("name").and_then(Value::as_str) == Some(DEBEZIUM_JSON) {
        // json and jsonb columns arrive as JSON text: rules want the document. Text that is
        // not JSON (Debezium's placeholder for an unchanged TOASTed value) stays text.
        if let Some(document) = value
            .as_str()
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
        {
            *value = document;
        }
        return Ok(());
    }
    if let Some(logical) = schema.get("name").and_then(Value::as_str)
        && let Some(converted) = convert_logical(value, schema, logical, path)?
    {
        *value = converted;
        return Ok(());
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("struct") => {
            if let Value::Object(row) = value {
                convert_fields(row, schema, path)?;
            }
        }
        Some("array") => {
            if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
                for (index, item) in items.iter_mut().enumerate() {
                    convert_value(item, item_schema, &FieldPath::Item(path, index))?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The converted value, or `None` when `logical` is not a type we convert.
fn convert_logical(
    value: &Value,
    schema: &Value,
    logical: &str,
    path: &FieldPath<'_>,
) -> Result<Option<Value>, DecodeError> {
    let text = match logical {
        DECIMAL => {
            let scale = schema
                .get("parameters")
                .and_then(|p| p.get("scale"))
                .and_then(|s| {
                    s.as_str()
                        .and_then(|s| s.parse::<i32>().ok())
                        .or(s.as_i64().map(|s| s as i32))
                })
                .ok_or_else(|| bad(path, "Decimal schema has no integer `parameters.scale`"))?;
            let encoded = value
                .as_str()
                .ok_or_else(|| bad(path, "Decimal value is not base64 text"))?;
            decimal_text(encoded, scale, path)?
        }
        VARIABLE_SCALE_DECIMAL => {
            let scale = value
                .get("scale")
                .and_then(Value::as_i64)
                .ok_or_else(|| bad(path, "VariableScaleDecimal has no integer `scale`"))?;
            let encoded = value
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(path, "VariableScaleDecimal has no base64 `value`"))?;
            let scale = i32::try_from(scale)
                .map_err(|_| bad(path, "VariableScaleDecimal scale is out of range"))?;
            decimal_text(encoded, scale, path)?
        }
        CONNECT_DATE | DEBEZIUM_DATE => format_date(integer(value, path)?),
        CONNECT_TIME | DEBEZIUM_TIME => format_time(integer(value, path)?, 1_000_000, 3),
        DEBEZIUM_MICRO_TIME => format_time(integer(value, path)?, 1_000, 6),
        DEBEZIUM_NANO_TIME => format_time(integer(value, path)?, 1, 9),
        CONNECT_TIMESTAMP => {
            let mut text =
                format_epoch_nanos_local(i128::from(integer(value, path)?) * 1_000_000, 3);
            // Connect's Timestamp is a UTC instant.
            text.push('Z');
            text
        }
        DEBEZIUM_TIMESTAMP => {
            format_epoch_nanos_local(i128::from(integer(value, path)?) * 1_000_000, 3)
        }
        DEBEZIUM_MICRO_TIMESTAMP => {
            format_epoch_nanos_local(i128::from(integer(value, path)?) * 1_000, 6)
        }
        DEBEZIUM_NANO_TIMESTAMP => format_epoch_nanos_local(i128::from(integer(value, path)?), 9),
        _ => return Ok(None),
    };
    Ok(Some(Value::String(text)))
}

fn integer(value: &Value, path: &(impl fmt::Display + ?Sized)) -> Result<i64, DecodeError> {
    value.as_i64().ok_or_else(|| DecodeError::WrongType {
        field: path.to_string(),
        expected: "integer",
        found: super::error::json_type_name(value),
    })
}

fn bad(path: &(impl fmt::Display + ?Sized), detail: &str) -> DecodeError {
    DecodeError::BadLogicalValue {
        field: path.to_string(),
        detail: detail.to_owned(),
    }
}

/// Largest decimal scale and unscaled size accepted: far beyond any database's DECIMAL
/// (Postgres allows 16,383 digits after the point), small enough that a hostile record cannot
/// make the text huge.
const MAX_DECIMAL_SCALE: i32 = 16_384;
const MAX_DECIMAL_BYTES: usize = 8_192;

/// Exact decimal text from a base64 big-endian two's-complement unscaled value and a scale.
pub(crate) fn decimal_text(
    encoded: &str,
    scale: i32,
    path: &(impl fmt::Display + ?Sized),
) -> Result<String, DecodeError> {
    if !(-MAX_DECIMAL_SCALE..=MAX_DECIMAL_SCALE).contains(&scale) {
        return Err(bad(path, &format!("Decimal scale {scale} is out of range")));
    }
    if encoded.len() > MAX_DECIMAL_BYTES * 4 / 3 + 4 {
        return Err(bad(path, "Decimal value is too long"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|error| bad(path, &format!("Decimal value is not valid base64: {error}")))?;
    let unscaled = BigInt::from_signed_bytes_be(&bytes);
    Ok(scale_digits(&unscaled.to_string(), scale))
}

/// Places the decimal point `scale` digits from the right of an integer's text.
fn scale_digits(integer_text: &str, scale: i32) -> String {
    let (sign, digits) = match integer_text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", integer_text),
    };
    if scale <= 0 {
        let zeros = "0".repeat(scale.unsigned_abs() as usize);
        return if digits == "0" {
            "0".to_owned()
        } else {
            format!("{sign}{digits}{zeros}")
        };
    }
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Connect Decimal bytes decode to the exact value, negative and small values included.
    #[test]
    fn decimals_are_exact() {
        // 19999 = 0x4E1F, scale 2 -> 199.99
        assert_eq!(decimal_text(&b64(&[0x4E, 0x1F]), 2, "f").unwrap(), "199.99");
        // -1 with scale 3 -> -0.001
        assert_eq!(decimal_text(&b64(&[0xFF]), 3, "f").unwrap(), "-0.001");
        assert_eq!(decimal_text(&b64(&[0x05]), 0, "f").unwrap(), "5");
        assert_eq!(decimal_text(&b64(&[0x05]), -2, "f").unwrap(), "500");
        // 2^80 does not fit in 64 bits and stays exact.
        let mut big = vec![0x01];
        big.extend([0u8; 10]);
        assert_eq!(
            decimal_text(&b64(&big), 4, "f").unwrap(),
            "120892581961462917470.6176"
        );
    }

    /// Hostile scales and sizes are rejected, not expanded into huge text.
    #[test]
    fn decimal_limits_hold() {
        assert!(decimal_text(&b64(&[1]), i32::MAX, "f").is_err());
        assert!(decimal_text(&b64(&[1]), -20_000, "f").is_err());
        assert!(decimal_text(&"A".repeat(20_000), 2, "f").is_err());
        assert_eq!(decimal_text(&b64(&[1]), 16_384, "f").unwrap().len(), 16_386);
    }

    /// Bad base64 in a Decimal names the field.
    #[test]
    fn bad_decimal_names_the_field() {
        let error = decimal_text("***", 2, "after.amount").unwrap_err();
        assert_eq!(error.reason(), "bad_logical_value");
        assert!(error.to_string().contains("after.amount"), "{error}");
    }

    /// Temporal logical types become ISO-8601 text with their own precision.
    #[test]
    fn temporal_types_become_iso_text() {
        let schema = json!({"type":"struct","fields":[
            {"field":"d","type":"int32","name":"io.debezium.time.Date"},
            {"field":"ts","type":"int64","name":"io.debezium.time.MicroTimestamp"},
            {"field":"cts","type":"int64","name":"org.apache.kafka.connect.data.Timestamp"},
            {"field":"t","type":"int64","name":"io.debezium.time.MicroTime"},
            {"field":"z","type":"string","name":"io.debezium.time.ZonedTimestamp"},
            {"field":"amount","type":"bytes","name":"org.apache.kafka.connect.data.Decimal",
             "parameters":{"scale":"2"}}
        ]});
        let mut row = json!({"d": 19_417, "ts": 1_700_000_000_123_456i64, "cts": 0,
            "t": 3_600_000_001i64, "z": "2023-11-14T22:13:20Z", "amount": b64(&[0x4E, 0x1F])})
        .as_object()
        .unwrap()
        .clone();
        convert_row(&mut row, &schema, "after").unwrap();
        assert_eq!(row["d"], "2023-03-01");
        assert_eq!(row["ts"], "2023-11-14T22:13:20.123456");
        assert_eq!(row["cts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(row["t"], "01:00:00.000001");
        assert_eq!(row["z"], "2023-11-14T22:13:20Z");
        assert_eq!(row["amount"], "199.99");
    }

    /// A temporal field holding text instead of an integer is a typed error naming it.
    #[test]
    fn wrong_temporal_type_names_the_field() {
        let schema = json!({"type":"struct","fields":[
            {"field":"d","type":"int32","name":"io.debezium.time.Date"}]});
        let mut row = json!({"d": "yesterday"}).as_object().unwrap().clone();
        let error = convert_row(&mut row, &schema, "after").unwrap_err();
        assert_eq!(
            error,
            DecodeError::WrongType {
                field: "after.d".into(),
                expected: "integer",
                found: "string"
            }
        );
    }
}
