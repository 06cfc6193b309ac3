//! The CloudEvent a business-event record carries, whichever mode cdcflow wrote it in:
//! structured (the value is the whole event) or binary (`ce_` headers and the data as value).
//! A subscription always delivers the structured form, so a receiver sees one shape.

use serde_json::{Map, Value};

/// What a record holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordEvent {
    /// The value is the structured event.
    Structured(Value),
    /// Binary mode, rebuilt as the structured event.
    Rebuilt(Value),
    /// Neither: the value is not JSON and there are no `ce_` headers.
    Opaque,
}

/// Reads the event from a record's value and headers (names compared case-insensitively).
pub fn record_event(value: &[u8], headers: &[(&str, &[u8])]) -> RecordEvent {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    };
    if header("ce_specversion").is_none() {
        return serde_json::from_slice(value).map_or(RecordEvent::Opaque, RecordEvent::Structured);
    }
    let mut event = Map::new();
    for (key, bytes) in headers {
        if let Some(attribute) = key
            .get(..3)
            .filter(|prefix| prefix.eq_ignore_ascii_case("ce_"))
            .map(|_| key[3..].to_ascii_lowercase())
        {
            event.insert(
                attribute,
                Value::String(String::from_utf8_lossy(bytes).into_owned()),
            );
        }
    }
    if let Some(content_type) = header("content-type") {
        event.insert("datacontenttype".to_owned(), Value::String(content_type));
    }
    let data = serde_json::from_slice(value)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(value).into_owned()));
    event.insert("data".to_owned(), data);
    RecordEvent::Rebuilt(Value::Object(event))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_structured_value_is_the_event() {
        let value = br#"{"specversion":"1.0","id":"e1","type":"T","data":{"a":1}}"#;
        assert_eq!(
            record_event(value, &[("content-type", b"application/cloudevents+json")]),
            RecordEvent::Structured(
                json!({"specversion":"1.0","id":"e1","type":"T","data":{"a":1}})
            )
        );
        assert_eq!(record_event(b"not json", &[]), RecordEvent::Opaque);
    }

    #[test]
    fn binary_mode_is_rebuilt_from_the_headers() {
        let headers: [(&str, &[u8]); 5] = [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"e2"),
            ("CE_TYPE", b"com.example.OrderPaid"),
            ("content-type", b"application/json"),
            ("cdcflow.pipeline", b"orders"),
        ];
        assert_eq!(
            record_event(br#"{"total": 30}"#, &headers),
            RecordEvent::Rebuilt(json!({
                "specversion": "1.0", "id": "e2", "type": "com.example.OrderPaid",
                "datacontenttype": "application/json", "data": {"total": 30},
            }))
        );
    }
}
