//! CloudEvents read back from Kafka, whichever mode cdcflow wrote them in: structured (the
//! value is the whole event) or binary (`ce_` headers, the data as value). A webhook
//! subscription delivers the structured form; a chain stage (`format = "cloudevents"`) turns
//! each event into a change: the entity is the upstream subject and the event's type, the
//! version the event's `sequence`, the row its `data`, and `source` its attributes.

use serde_json::{Map, Value, json};

use super::change::{Change, Op};
use super::error::{DecodeError, json_type_name as json_type};
use super::key::EntityKey;
use super::record::RawRecord;
use super::time::parse_rfc3339_millis;

/// The event a change came from, carried to the events it causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOrigin {
    /// Its id: the `causationid` of the events it causes.
    pub id: String,
    /// The upstream entity (`partitionkey`, else `subject`, else the record key): the
    /// subject and Kafka key of the events it causes, so a chain keeps per-entity order.
    pub subject: String,
}

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

/// The change a chain stage reads from an event record.
pub(super) fn event_change(record: &RawRecord, value: &[u8]) -> Result<Change, DecodeError> {
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .filter_map(|header| {
            header
                .value
                .as_deref()
                .map(|value| (header.name.as_str(), value))
        })
        .collect();
    let event = match record_event(value, &headers) {
        RecordEvent::Structured(event) | RecordEvent::Rebuilt(event) => event,
        RecordEvent::Opaque => {
            return Err(DecodeError::Malformed {
                part: "value",
                detail: "not a CloudEvent: the value is not JSON and there are no `ce_` headers"
                    .to_owned(),
            });
        }
    };
    let Value::Object(mut attributes) = event else {
        return Err(DecodeError::WrongType {
            field: "value".to_owned(),
            expected: "a CloudEvent object",
            found: json_type(&event),
        });
    };
    let text =
        |attributes: &Map<String, Value>, name: &str| -> Result<Option<String>, DecodeError> {
            match attributes.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) => Ok(Some(text.clone())),
                Some(other) => Err(DecodeError::WrongType {
                    field: name.to_owned(),
                    expected: "string",
                    found: json_type(other),
                }),
            }
        };
    let required = |attributes: &Map<String, Value>, name: &str| {
        text(attributes, name)?.ok_or_else(|| DecodeError::MissingField {
            field: name.to_owned(),
        })
    };
    required(&attributes, "specversion")?;
    let id = required(&attributes, "id")?;
    let event_type = required(&attributes, "type")?;
    let record_key = record
        .key
        .as_deref()
        .map(|key| String::from_utf8_lossy(key).into_owned());
    let subject = text(&attributes, "partitionkey")?
        .or(text(&attributes, "subject")?)
        .or(record_key)
        .unwrap_or_else(|| id.clone());
    // The chain's correlation id: carried from the first event that had one, else this one.
    let correlation = text(&attributes, "correlationid")?.unwrap_or_else(|| id.clone());
    let time_ms = text(&attributes, "time")?
        .as_deref()
        .and_then(parse_rfc3339_millis);
    let data = attributes.remove("data");
    attributes.remove("data_base64");
    let row = match data {
        Some(Value::Object(row)) => row,
        None | Some(Value::Null) => Map::new(),
        Some(other) => {
            let mut row = Map::new();
            row.insert("value".to_owned(), other);
            row
        }
    };
    Ok(Change {
        op: Op::Create,
        key: EntityKey::from_json(json!({"subject": subject, "type": event_type})),
        before: None,
        after: Some(row),
        after_json: None,
        source: attributes,
        envelope_ts_ms: time_ms,
        transaction_id: Some(correlation),
        event: Some(EventOrigin { id, subject }),
    })
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

    fn record(key: &str, value: &str, headers: &[(&str, &str)]) -> RawRecord {
        RawRecord {
            topic: "orders.events".to_owned(),
            partition: 0,
            offset: 7,
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(name, value)| crate::cdc::Header {
                    name: (*name).to_owned(),
                    value: Some(value.as_bytes().to_vec()),
                })
                .collect(),
            timestamp_ms: None,
        }
    }

    #[test]
    fn an_event_becomes_a_change_of_its_subject_and_type() {
        let value = r#"{"specversion":"1.0","id":"e1","source":"/cdcflow/pipelines/orders",
            "type":"com.example.OrderPaid","subject":"1001","partitionkey":"1001",
            "time":"2026-11-30T09:00:00.000Z","sequence":"0000000000000002",
            "correlationid":"tx-9","data":{"order_id":1001,"total":30}}"#;
        let change = event_change(&record("1001", value, &[]), value.as_bytes()).unwrap();
        assert_eq!(change.op, Op::Create);
        assert_eq!(
            change.key.fields(),
            &json!({"subject": "1001", "type": "com.example.OrderPaid"})
        );
        assert_eq!(
            change.after,
            Some(
                json!({"order_id": 1001, "total": 30})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
        assert_eq!(change.source["sequence"], "0000000000000002");
        assert!(!change.source.contains_key("data"));
        assert_eq!(change.transaction_id.as_deref(), Some("tx-9"));
        assert_eq!(change.envelope_ts_ms, Some(1_796_029_200_000));
        assert_eq!(
            change.event,
            Some(EventOrigin {
                id: "e1".to_owned(),
                subject: "1001".to_owned()
            })
        );
    }

    #[test]
    fn the_first_event_of_a_chain_starts_its_correlation() {
        let value = r#"{"specversion":"1.0","id":"e2","type":"T","data":5}"#;
        let change = event_change(&record("k9", value, &[]), value.as_bytes()).unwrap();
        assert_eq!(change.transaction_id.as_deref(), Some("e2"));
        assert_eq!(change.event.unwrap().subject, "k9");
        assert_eq!(change.after.unwrap()["value"], 5);
    }

    #[test]
    fn binary_events_and_bad_ones() {
        let binary = record(
            "7",
            r#"{"total": 1}"#,
            &[("ce_specversion", "1.0"), ("ce_id", "e3"), ("ce_type", "T")],
        );
        let change = event_change(&binary, br#"{"total": 1}"#).unwrap();
        assert_eq!(change.event.unwrap().id, "e3");
        let no_type = r#"{"specversion":"1.0","id":"e4"}"#;
        assert_eq!(
            event_change(&record("1", no_type, &[]), no_type.as_bytes()).unwrap_err(),
            DecodeError::MissingField {
                field: "type".to_owned()
            }
        );
        let not_json = record("1", "plain", &[]);
        assert!(matches!(
            event_change(&not_json, b"plain").unwrap_err(),
            DecodeError::Malformed { .. }
        ));
    }
}
