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

use serde_json::{Map, Value};
use uuid::Uuid;

use super::output::{OutputKind, OutputRecord};
use super::version::Version;

/// The namespace of every event id: UUIDv5 of a fixed URN, so ids never depend on a deployment.
static EVENT_NAMESPACE: LazyLock<Uuid> =
    LazyLock::new(|| Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:cdcflow:business-event"));

/// The deterministic event id: UUIDv5 of (pipeline, rule, entity key, version). A replay of the
/// same change yields the same id, so any consumer can deduplicate.
pub fn event_id(pipeline: &str, rule: &str, entity_key: &str, version: &Version) -> Uuid {
    let sequence = version.sequence();
    let mut name =
        Vec::with_capacity(pipeline.len() + rule.len() + entity_key.len() + sequence.len() + 3);
    // The unit separator cannot appear in pipeline or rule names, so the fields never run into
    // each other.
    for (index, part) in [pipeline, rule, entity_key, &sequence].iter().enumerate() {
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

/// One derived business event.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessEvent {
    pub id: Uuid,
    pub source: String,
    pub event_type: String,
    pub subject: String,
    pub time: Option<String>,
    pub data: Value,
    pub entity_version: String,
    pub sequence: String,
    pub partition_key: String,
    pub causation_id: String,
    pub correlation_id: Option<String>,
}

impl BusinessEvent {
    /// The context attributes and extensions, in CloudEvents names, without `data`.
    fn attributes(&self) -> Vec<(&'static str, String)> {
        let mut attributes = vec![
            ("specversion", "1.0".to_owned()),
            ("id", self.id.to_string()),
            ("source", self.source.clone()),
            ("type", self.event_type.clone()),
            ("subject", self.subject.clone()),
        ];
        if let Some(time) = &self.time {
            attributes.push(("time", time.clone()));
        }
        attributes.extend([
            ("entityversion", self.entity_version.clone()),
            ("sequence", self.sequence.clone()),
            ("partitionkey", self.partition_key.clone()),
            ("causationid", self.causation_id.clone()),
        ]);
        if let Some(correlation) = &self.correlation_id {
            attributes.push(("correlationid", correlation.clone()));
        }
        attributes
    }

    /// The structured-mode JSON document.
    pub fn to_json(&self) -> Value {
        let mut document = Map::new();
        for (name, value) in self.attributes() {
            document.insert(name.to_owned(), Value::String(value));
        }
        document.insert(
            "datacontenttype".to_owned(),
            Value::String("application/json".to_owned()),
        );
        document.insert("data".to_owned(), self.data.clone());
        Value::Object(document)
    }

    /// The Kafka record for this event, keyed by entity so order per entity holds downstream.
    pub fn to_output(&self, topic: &str, mode: EventMode) -> OutputRecord {
        let (headers, value) = match mode {
            EventMode::Structured => (
                vec![(
                    "content-type".to_owned(),
                    b"application/cloudevents+json; charset=UTF-8".to_vec(),
                )],
                self.to_json().to_string().into_bytes(),
            ),
            EventMode::Binary => {
                let mut headers: Vec<(String, Vec<u8>)> = self
                    .attributes()
                    .into_iter()
                    .map(|(name, value)| (format!("ce_{name}"), value.into_bytes()))
                    .collect();
                headers.push(("content-type".to_owned(), b"application/json".to_vec()));
                (headers, self.data.to_string().into_bytes())
            }
        };
        OutputRecord {
            kind: OutputKind::Event,
            topic: topic.to_owned(),
            key: Some(self.partition_key.clone().into_bytes()),
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
        let version = Version::new(vec![10, 20]);
        let id = event_id("orders", "paid", "1001", &version);
        assert_eq!(id, event_id("orders", "paid", "1001", &version));
        assert_eq!(id.get_version_num(), 5);
        assert_ne!(id, event_id("orders", "shipped", "1001", &version));
        assert_ne!(id, event_id("orders", "paid", "1002", &version));
        assert_ne!(
            id,
            event_id("orders", "paid", "1001", &Version::new(vec![10, 21]))
        );
        // Field boundaries matter: ("ab","c") and ("a","bc") differ.
        assert_ne!(
            event_id("ab", "c", "k", &version),
            event_id("a", "bc", "k", &version)
        );
    }
}
