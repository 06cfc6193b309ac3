//! Business events as CloudEvents 1.0, with deterministic ids.
//!
//! A structured-mode event as written to Kafka (the record value):
//! ```json
//! {"specversion":"1.0","id":"5b1c...","source":"/cdcflow/pipelines/orders",
//!  "type":"com.example.order.paid","subject":"1001","time":"2023-11-14T22:13:20.000Z",
//!  "datacontenttype":"application/json","data":{"order_id":1001,"amount":"120.00"},
//!  "entityversion":"24023800.24023928","sequence":"00000000016e9378.00000000016e93f8",
//!  "partitionkey":"1001","causationid":"dbserver1.public.orders/0/42","correlationid":"771"}
//! ```

use std::sync::LazyLock;

use serde::Serialize;
use serde_json::Value;
use sha1::{Digest, Sha1};
use uuid::Uuid;

use super::output::{OutputKind, OutputRecord};

/// The namespace of every event id: UUIDv5 of a fixed URN, so ids never depend on a deployment.
static EVENT_NAMESPACE: LazyLock<Uuid> =
    LazyLock::new(|| Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:cdcflow:business-event"));

/// The deterministic event id: UUIDv5 of (pipeline, rule, entity key, version sequence). A
/// replay of the same change yields the same id, so any consumer can deduplicate.
pub fn event_id(pipeline: &str, rule: &str, entity_key: &str, sequence: &str) -> Uuid {
    // UUIDv5 by hand: the same bytes as `Uuid::new_v5`, with a SHA-1 that uses the CPU's SHA
    // instructions where it has them (ids cost a third of an event's time without them).
    // The unit separator cannot appear in pipeline or rule names, so the fields never run into
    // each other.
    let mut hasher = Sha1::new();
    hasher.update(EVENT_NAMESPACE.as_bytes());
    for (index, part) in [pipeline, rule, entity_key, sequence].iter().enumerate() {
        if index > 0 {
            hasher.update([0x1f]);
        }
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// How events are laid out in Kafka records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventMode {
    /// The whole CloudEvent as the JSON value (`application/cloudevents+json`).
    #[default]
    Structured,
    /// `data` as the value, attributes as `ce_` headers (the CloudEvents Kafka binding).
    Binary,
}

/// One derived business event, borrowing its attributes from the change it came from: a
/// record's events share them, and only the serialised output is allocated.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessEvent<'a> {
    pub id: Uuid,
    pub source: &'a str,
    pub event_type: &'a str,
    pub subject: &'a str,
    pub time: Option<&'a str>,
    pub data: Value,
    pub entity_version: &'a str,
    pub sequence: &'a str,
    pub partition_key: &'a str,
    pub causation_id: &'a str,
    pub correlation_id: Option<&'a str>,
    /// Fields the connector did not deliver (Debezium's unavailable-value placeholder) and
    /// cdcflow had no stored value for: absent from the images the rules saw. Written as the
    /// `unavailablefields` extension, comma-separated, only when not empty.
    pub unavailable_fields: &'a [String],
}

/// The structured-mode document, borrowed from an event for serialisation.
#[derive(Serialize)]
struct Document<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    datacontenttype: &'static str,
    data: &'a Value,
    entityversion: &'a str,
    sequence: &'a str,
    partitionkey: &'a str,
    causationid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailablefields: Option<String>,
}

impl BusinessEvent<'_> {
    fn document<'d>(&'d self, id: &'d str) -> Document<'d> {
        Document {
            specversion: "1.0",
            id,
            source: self.source,
            event_type: self.event_type,
            subject: self.subject,
            time: self.time,
            datacontenttype: "application/json",
            data: &self.data,
            entityversion: self.entity_version,
            sequence: self.sequence,
            partitionkey: self.partition_key,
            causationid: self.causation_id,
            correlationid: self.correlation_id,
            unavailablefields: self.unavailable_fields_text(),
        }
    }

    /// The `unavailablefields` extension: the names, comma-separated; none when empty.
    fn unavailable_fields_text(&self) -> Option<String> {
        (!self.unavailable_fields.is_empty()).then(|| self.unavailable_fields.join(","))
    }

    /// The structured-mode JSON document.
    pub fn to_json(&self) -> Value {
        let id = self.id.to_string();
        serde_json::to_value(self.document(&id)).unwrap_or(Value::Null)
    }

    /// The structured CloudEvent, written field by field in [`Document`]'s order: the same
    /// bytes as serialising it, without escaping the many strings that need none.
    fn structured_json(&self, id: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        out.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":");
        write_json_str(&mut out, id);
        out.extend_from_slice(b",\"source\":");
        write_json_str(&mut out, self.source);
        out.extend_from_slice(b",\"type\":");
        write_json_str(&mut out, self.event_type);
        out.extend_from_slice(b",\"subject\":");
        write_json_str(&mut out, self.subject);
        if let Some(time) = self.time {
            out.extend_from_slice(b",\"time\":");
            write_json_str(&mut out, time);
        }
        out.extend_from_slice(b",\"datacontenttype\":\"application/json\",\"data\":");
        // Writing a `Value` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &self.data);
        out.extend_from_slice(b",\"entityversion\":");
        write_json_str(&mut out, self.entity_version);
        out.extend_from_slice(b",\"sequence\":");
        write_json_str(&mut out, self.sequence);
        out.extend_from_slice(b",\"partitionkey\":");
        write_json_str(&mut out, self.partition_key);
        out.extend_from_slice(b",\"causationid\":");
        write_json_str(&mut out, self.causation_id);
        if let Some(correlation) = self.correlation_id {
            out.extend_from_slice(b",\"correlationid\":");
            write_json_str(&mut out, correlation);
        }
        if let Some(fields) = self.unavailable_fields_text() {
            out.extend_from_slice(b",\"unavailablefields\":");
            write_json_str(&mut out, &fields);
        }
        out.push(b'}');
        out
    }

    /// The Kafka record for this event, keyed by entity so order per entity holds downstream.
    pub fn to_output(&self, topic: &str, mode: EventMode) -> OutputRecord {
        let mut id_buffer = Uuid::encode_buffer();
        let id: &str = self.id.hyphenated().encode_lower(&mut id_buffer);
        let (headers, value) = match mode {
            EventMode::Structured => (
                vec![(
                    "content-type".to_owned(),
                    b"application/cloudevents+json; charset=UTF-8".to_vec(),
                )],
                // Serialising borrowed strings and a JSON value into a Vec cannot fail.
                self.structured_json(id),
            ),
            EventMode::Binary => {
                let mut headers = vec![
                    ("ce_specversion".to_owned(), b"1.0".to_vec()),
                    ("ce_id".to_owned(), id.as_bytes().to_vec()),
                    ("ce_source".to_owned(), self.source.as_bytes().to_vec()),
                    ("ce_type".to_owned(), self.event_type.as_bytes().to_vec()),
                    ("ce_subject".to_owned(), self.subject.as_bytes().to_vec()),
                ];
                if let Some(time) = self.time {
                    headers.push(("ce_time".to_owned(), time.as_bytes().to_vec()));
                }
                headers.extend([
                    (
                        "ce_entityversion".to_owned(),
                        self.entity_version.as_bytes().to_vec(),
                    ),
                    ("ce_sequence".to_owned(), self.sequence.as_bytes().to_vec()),
                    (
                        "ce_partitionkey".to_owned(),
                        self.partition_key.as_bytes().to_vec(),
                    ),
                    (
                        "ce_causationid".to_owned(),
                        self.causation_id.as_bytes().to_vec(),
                    ),
                ]);
                if let Some(correlation) = self.correlation_id {
                    headers.push((
                        "ce_correlationid".to_owned(),
                        correlation.as_bytes().to_vec(),
                    ));
                }
                if let Some(fields) = self.unavailable_fields_text() {
                    headers.push(("ce_unavailablefields".to_owned(), fields.into_bytes()));
                }
                headers.push(("content-type".to_owned(), b"application/json".to_vec()));
                (headers, serde_json::to_vec(&self.data).unwrap_or_default())
            }
        };
        OutputRecord {
            kind: OutputKind::Event,
            topic: topic.to_owned(),
            key: Some(self.partition_key.as_bytes().to_vec()),
            headers,
            value: Some(value),
        }
    }
}

/// A JSON string literal; text without quotes, backslashes or control characters (nearly all)
/// is copied as it is.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .any(|byte| byte < 0x20 || byte == b'"' || byte == b'\\')
    {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(out, text);
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event<'a>(
        text: &'a str,
        data: Value,
        correlation: Option<&'a str>,
        fields: &'a [String],
    ) -> BusinessEvent<'a> {
        BusinessEvent {
            id: event_id("p", "r", text, "1"),
            source: text,
            event_type: "com.example.Paid",
            subject: text,
            time: Some("2024-11-25T10:01:00.000Z"),
            data,
            entity_version: "0000000000000001",
            sequence: "0000000000000001",
            partition_key: text,
            causation_id: text,
            correlation_id: correlation,
            unavailable_fields: fields,
        }
    }

    proptest! {
        /// The hand-written structured event is byte for byte what serde writes, for any text.
        #[test]
        fn structured_json_is_the_serialised_document(
            text in "\\PC{0,12}|[\\x00-\\x7f]{0,12}",
            number in any::<i64>(),
            correlation in proptest::option::of("[a-z\"]{0,4}"),
            fields in prop::collection::vec("[a-z\\\\]{1,4}", 0..3),
        ) {
            let mut event = event(
                &text,
                serde_json::json!({"n": number, "t": text}),
                correlation.as_deref(),
                &fields,
            );
            if number % 2 != 0 {
                event.time = None;
            }
            let id = event.id.to_string();
            let expected = serde_json::to_vec(&event.document(&id)).unwrap();
            prop_assert_eq!(
                String::from_utf8(event.structured_json(&id)).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }

    proptest! {
        /// The hand-made UUIDv5 is the uuid crate's, over the parts joined by 0x1f.
        #[test]
        fn event_ids_are_uuid_v5_of_the_joined_parts(parts in prop::array::uniform4("\\PC{0,8}")) {
            let joined = parts.join("\u{1f}");
            prop_assert_eq!(
                event_id(&parts[0], &parts[1], &parts[2], &parts[3]),
                Uuid::new_v5(&EVENT_NAMESPACE, joined.as_bytes())
            );
        }
    }

    /// The same (pipeline, rule, key, version) always gives the same id; any difference changes it.
    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        let version = "000000000000000a.0000000000000014";
        let id = event_id("orders", "paid", "1001", version);
        assert_eq!(id, event_id("orders", "paid", "1001", version));
        assert_eq!(id.get_version_num(), 5);
        assert_ne!(id, event_id("orders", "shipped", "1001", version));
        assert_ne!(id, event_id("orders", "paid", "1002", version));
        assert_ne!(
            id,
            event_id(
                "orders",
                "paid",
                "1001",
                "000000000000000a.0000000000000015"
            )
        );
        // Field boundaries matter: ("ab","c") and ("a","bc") differ.
        assert_ne!(
            event_id("ab", "c", "k", version),
            event_id("a", "bc", "k", version)
        );
    }
}
