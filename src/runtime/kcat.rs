//! The `kcat -C -J` JSON Lines format, read and written.
//!
//! One consumed record per line, as kcat writes it:
//! ```json
//! {"topic":"dbserver1.public.orders","partition":0,"offset":42,"tstype":"create",
//!  "ts":1700000000456,"broker":1,"headers":["traceparent","00-..."],
//!  "key":"{\"id\":1001}","payload":"{\"before\":null,\"after\":{...},\"op\":\"c\",...}"}
//! ```
//! `key` and `payload` are the message bytes as text, or null. kcat writes `headers` as a flat
//! array of alternating names and values; an object of name to value is accepted too. Bytes
//! that are not UTF-8 travel as base64 in `key_b64` / `payload_b64` (a cdcflow extension, so a
//! DLQ record of non-UTF-8 input can be replayed). cdcflow's output lines use the same format
//! plus `kind` (`event`, `dlq` or `audit`), so outputs can be replayed into another pipeline.

use std::io::Write;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::cdc::{Header, RawRecord};
use crate::engine::OutputRecord;

/// A replay input line that is not a kcat record.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct KcatLineError(String);

#[derive(Deserialize)]
struct KcatLine {
    topic: String,
    #[serde(default)]
    partition: Option<i32>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    key_b64: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default)]
    headers: Option<Value>,
    #[serde(default)]
    ts: Option<i64>,
}

/// Parses one line. `line_number` (1-based) stands in for a missing offset, so origins stay
/// unique within a file.
pub fn parse_kcat_line(line: &[u8], line_number: u64) -> Result<RawRecord, KcatLineError> {
    let parsed: KcatLine = serde_json::from_slice(line)
        .map_err(|error| KcatLineError(format!("not a kcat JSON record: {error}")))?;
    let key = bytes_field("key", parsed.key, parsed.key_b64)?;
    let value = bytes_field("payload", parsed.payload, parsed.payload_b64)?;
    let headers = match parsed.headers {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() % 2 != 0 {
                return Err(KcatLineError(
                    "`headers` must alternate names and values (an even number of items)".into(),
                ));
            }
            items
                .chunks(2)
                .map(|pair| header(&pair[0], &pair[1]))
                .collect::<Result<_, _>>()?
        }
        Some(Value::Object(map)) => map
            .iter()
            .map(|(name, value)| header(&Value::String(name.clone()), value))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(KcatLineError(
                "`headers` must be an array of alternating names and values".into(),
            ));
        }
    };
    Ok(RawRecord {
        topic: parsed.topic,
        partition: parsed.partition.unwrap_or(0),
        offset: parsed
            .offset
            .unwrap_or_else(|| i64::try_from(line_number).unwrap_or(i64::MAX)),
        key,
        value,
        headers,
        timestamp_ms: parsed.ts,
    })
}

fn bytes_field(
    name: &str,
    text: Option<String>,
    base64_text: Option<String>,
) -> Result<Option<Vec<u8>>, KcatLineError> {
    match (text, base64_text) {
        (Some(_), Some(_)) => Err(KcatLineError(format!(
            "both `{name}` and `{name}_b64` are set; keep one"
        ))),
        (Some(text), None) => Ok(Some(text.into_bytes())),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map(Some)
            .map_err(|error| KcatLineError(format!("`{name}_b64` is not base64: {error}"))),
        (None, None) => Ok(None),
    }
}

fn header(name: &Value, value: &Value) -> Result<Header, KcatLineError> {
    let name = name
        .as_str()
        .ok_or_else(|| KcatLineError("a header name is not a string".into()))?;
    let value = match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone().into_bytes()),
        _ => {
            return Err(KcatLineError(format!(
                "header `{name}` has a value that is neither a string nor null"
            )));
        }
    };
    Ok(Header {
        name: name.to_owned(),
        value,
    })
}

/// Writes one produced record as a kcat-style line.
pub fn write_output_line(out: &mut impl Write, record: &OutputRecord) -> std::io::Result<()> {
    let mut line = Map::new();
    line.insert("kind".into(), Value::String(record.kind.as_str().into()));
    line.insert("topic".into(), Value::String(record.topic.clone()));
    put_bytes(&mut line, "key", record.key.as_deref());
    let headers = record
        .headers
        .iter()
        .flat_map(|(name, value)| {
            [
                Value::String(name.clone()),
                Value::String(String::from_utf8_lossy(value).into_owned()),
            ]
        })
        .collect();
    line.insert("headers".into(), Value::Array(headers));
    put_bytes(&mut line, "payload", record.value.as_deref());
    serde_json::to_writer(&mut *out, &Value::Object(line))?;
    out.write_all(b"\n")
}

fn put_bytes(line: &mut Map<String, Value>, name: &str, bytes: Option<&[u8]>) {
    match bytes.map(std::str::from_utf8) {
        None => {
            line.insert(name.to_owned(), Value::Null);
        }
        Some(Ok(text)) => {
            line.insert(name.to_owned(), Value::String(text.to_owned()));
        }
        Some(Err(_)) => {
            line.insert(name.to_owned(), Value::Null);
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(bytes.unwrap_or_default());
            line.insert(format!("{name}_b64"), Value::String(encoded));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kcat's flat header array, null keys and payloads, and missing offsets are read as kcat
    /// writes them.
    #[test]
    fn reads_kcat_lines() {
        let line = br#"{"topic":"t","partition":2,"offset":7,"tstype":"create","ts":5,"broker":1,"headers":["a","1","b",null],"key":null,"payload":"{}"}"#;
        let record = parse_kcat_line(line, 1).unwrap();
        assert_eq!(record.topic, "t");
        assert_eq!((record.partition, record.offset), (2, 7));
        assert_eq!(record.key, None);
        assert_eq!(record.value.as_deref(), Some(&b"{}"[..]));
        assert_eq!(record.headers.len(), 2);
        assert_eq!(record.headers[1].value, None);
        let no_offset = parse_kcat_line(br#"{"topic":"t","payload":null}"#, 9).unwrap();
        assert_eq!(no_offset.offset, 9);
    }

    /// A line that is not a kcat record says why.
    #[test]
    fn rejects_bad_lines_with_reason() {
        assert!(
            parse_kcat_line(b"{not json", 1)
                .unwrap_err()
                .0
                .contains("not a kcat JSON record")
        );
        assert!(
            parse_kcat_line(br#"{"payload":"x"}"#, 1)
                .unwrap_err()
                .0
                .contains("topic")
        );
        assert!(
            parse_kcat_line(br#"{"topic":"t","headers":["a"]}"#, 1)
                .unwrap_err()
                .0
                .contains("alternate")
        );
    }

    /// Non-UTF-8 bytes round-trip through `payload_b64`.
    #[test]
    fn binary_payloads_round_trip() {
        let record = OutputRecord {
            kind: crate::engine::OutputKind::DeadLetter,
            topic: "dlq".into(),
            key: Some(b"k".to_vec()),
            headers: vec![],
            value: Some(vec![0xff, 0xfe, b'{']),
        };
        let mut out = Vec::new();
        write_output_line(&mut out, &record).unwrap();
        let back = parse_kcat_line(&out[..out.len() - 1], 1).unwrap();
        assert_eq!(back.value, record.value);
        assert_eq!(back.key, record.key);
    }
}
