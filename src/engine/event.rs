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
use uuid::Uuid;

use super::output::{OutputKind, OutputRecord};

/// The namespace of every event id: UUIDv5 of a fixed URN, so ids never depend on a deployment.
static EVENT_NAMESPACE: LazyLock<Uuid> =
    LazyLock::new(|| Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:cdcflow:business-event"));

/// The deterministic event id: UUIDv5 of (pipeline, rule, entity key, version sequence). A
/// replay of the same change yields the same id, so any consumer can deduplicate.
pub fn event_id(pipeline: &str, rule: &str, entity_key: &str, sequence: &str) -> Uuid {
    let mut name =
        Vec::with_capacity(pipeline.len() + rule.len() + entity_key.len() + sequence.len() + 3);
    // The unit separator cannot appear in pipeline or rule names, so the fields never run into
    // each other.
    for (index, part) in [pipeline, rule, entity_key, sequence].iter().enumerate() {
        if index > 0 {
            name.push(0x1f);
        }
        name.extend_from_slice(part.as_bytes());
    }
    Uuid::new_v5(&EVENT_NAMESPACE, &name)
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
                serde_json::to_vec(&self.document(id)).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
