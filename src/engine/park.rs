//! Parking: the per-entity order a pipeline with `dlq_policy = "park"` keeps across a dead
//! letter. Once a change of an entity is dead-lettered, the entity's later changes wait behind
//! it, in order, inside the entity's state (so they are as durable as the state: the store and
//! the changelog), until the dead-lettered change is replayed or discarded with `cdcflow dlq`.
//!
//! This module holds the data and its text form; the runtime decides when to park and release.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::cdc::{Header, Origin, RawRecord};

/// Header names of the records `cdcflow dlq` writes into an input topic.
pub mod replay_headers {
    /// The input record a change first failed at (`topic/partition/offset`): the blocker a
    /// replay releases.
    pub const ORIGIN: &str = "cdcflow.replay.origin";
    /// The DLQ record that was replayed or discarded (`topic/partition/offset`).
    pub const OF: &str = "cdcflow.replay.of";
    /// On a control record: what to do (`discard`).
    pub const CONTROL: &str = "cdcflow.control";
    /// On a control record: the pipeline and entity it is for.
    pub const PIPELINE: &str = "cdcflow.control.pipeline";
    pub const ENTITY: &str = "cdcflow.control.entity";
}

/// What a pipeline does with an entity's later changes once one is dead-lettered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqPolicy {
    /// Later changes are processed (the dead-lettered one can be replayed; the gate then
    /// finds it stale if a later change overtook it).
    #[default]
    Continue,
    /// Later changes wait behind the dead-lettered one until it is replayed or discarded.
    Park,
}

/// The changes an entity holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// The input record of the dead-lettered change the entity waits behind.
    pub blocker: Origin,
    /// The entity had no state before the blocker: its state record exists only to park.
    pub entity_absent: bool,
    /// Later changes of the entity, in input order.
    pub changes: Vec<RawRecord>,
}

/// The DLQ reason of a change that could not be parked: the entity holds as many as
/// `park_limit` already.
pub const PARK_LIMIT_REACHED: &str = "park_limit_reached";

/// A discard written by `cdcflow dlq discard`: releases the entity parked behind `origin`
/// without processing the dead-lettered change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard {
    pub origin: Origin,
    pub entity: String,
}

fn header_text<'a>(record: &'a RawRecord, name: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .rev()
        .find(|header| header.name == name)
        .and_then(|header| std::str::from_utf8(header.value.as_deref()?).ok())
}

/// Parses `topic/partition/offset` (topics may contain `/`: the last two parts are numbers).
pub fn parse_origin(text: &str) -> Option<Origin> {
    let (rest, offset) = text.rsplit_once('/')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    Some(Origin {
        topic: topic.to_owned(),
        partition: partition.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// The blocker a replayed record stands for (its `cdcflow.replay.origin`), if it is a replay.
pub fn replayed_origin(record: &RawRecord) -> Option<Origin> {
    header_text(record, replay_headers::ORIGIN).and_then(parse_origin)
}

/// The origin a failure of `record` blocks its entity behind: the first failure of the
/// change (a replay that fails again keeps its first origin).
pub fn first_origin(record: &RawRecord) -> Origin {
    replayed_origin(record).unwrap_or_else(|| record.origin())
}

/// Whether `record` is a control record of `cdcflow dlq`, not a change; the discard it asks
/// for when it names its entity and blocker.
pub fn control_record(record: &RawRecord) -> Option<Option<Discard>> {
    let action = header_text(record, replay_headers::CONTROL)?;
    if action != "discard" {
        return Some(None);
    }
    Some(
        replayed_origin(record)
            .zip(header_text(record, replay_headers::ENTITY))
            .map(|(origin, entity)| Discard {
                origin,
                entity: entity.to_owned(),
            }),
    )
}

#[derive(Serialize, Deserialize)]
struct StoredParked {
    blocker: String,
    #[serde(default)]
    entity_absent: bool,
    changes: Vec<StoredRecord>,
}

#[derive(Serialize, Deserialize)]
struct StoredRecord {
    topic: String,
    partition: i32,
    offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, Option<String>)>,
}

impl Parked {
    /// A new blocker with nothing parked yet.
    pub fn behind(blocker: Origin, entity_absent: bool) -> Arc<Parked> {
        Arc::new(Parked {
            blocker,
            entity_absent,
            changes: Vec::new(),
        })
    }

    /// The JSON text the store and the changelog keep (keys, values and header values in
    /// base64: records need not be UTF-8).
    pub fn to_json(&self) -> String {
        let stored = StoredParked {
            blocker: self.blocker.to_string(),
            entity_absent: self.entity_absent,
            changes: self
                .changes
                .iter()
                .map(|record| StoredRecord {
                    topic: record.topic.clone(),
                    partition: record.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key_b64: record.key.as_ref().map(|key| BASE64.encode(key)),
                    value_b64: record.value.as_ref().map(|value| BASE64.encode(value)),
                    headers: record
                        .headers
                        .iter()
                        .map(|h| (h.name.clone(), h.value.as_ref().map(|v| BASE64.encode(v))))
                        .collect(),
                })
                .collect(),
        };
        serde_json::to_string(&stored).unwrap_or_default()
    }

    /// Reads [`Parked::to_json`] back.
    pub fn from_json(text: &str) -> Result<Parked, String> {
        let stored: StoredParked = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let blocker = parse_origin(&stored.blocker)
            .ok_or_else(|| format!("blocker `{}` is not topic/partition/offset", stored.blocker))?;
        let bytes = |text: Option<String>| -> Result<Option<Vec<u8>>, String> {
            text.map(|text| BASE64.decode(text).map_err(|e| e.to_string()))
                .transpose()
        };
        let mut changes = Vec::with_capacity(stored.changes.len());
        for record in stored.changes {
            let mut headers = Vec::with_capacity(record.headers.len());
            for (name, value) in record.headers {
                headers.push(Header {
                    name,
                    value: bytes(value)?,
                });
            }
            changes.push(RawRecord {
                topic: record.topic,
                partition: record.partition,
                offset: record.offset,
                key: bytes(record.key_b64)?,
                value: bytes(record.value_b64)?,
                headers,
                timestamp_ms: record.timestamp_ms,
            });
        }
        Ok(Parked {
            blocker,
            entity_absent: stored.entity_absent,
            changes,
        })
    }

    /// With one more change parked behind the blocker.
    pub fn with(&self, record: &RawRecord) -> Arc<Parked> {
        let mut changes = Vec::with_capacity(self.changes.len() + 1);
        changes.extend(self.changes.iter().cloned());
        changes.push(record.clone());
        Arc::new(Parked {
            blocker: self.blocker.clone(),
            entity_absent: self.entity_absent,
            changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, headers: Vec<Header>) -> RawRecord {
        RawRecord {
            topic: "shop/orders".to_owned(),
            partition: 1,
            offset,
            key: Some(b"{\"id\":7}".to_vec()),
            value: Some(vec![0xff, 0x00, b'{']),
            headers,
            timestamp_ms: Some(42),
        }
    }

    fn header(name: &str, value: &str) -> Header {
        Header {
            name: name.to_owned(),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    /// Parked changes survive their text form byte for byte, binary values and null header
    /// values included.
    #[test]
    fn parked_changes_round_trip() {
        let mut first = record(5, vec![header("h", "v")]);
        first.headers.push(Header {
            name: "null".to_owned(),
            value: None,
        });
        let parked = Parked::behind(record(4, vec![]).origin(), true)
            .with(&first)
            .with(&record(6, vec![]));
        let back = Parked::from_json(&parked.to_json()).unwrap();
        assert_eq!(back, *parked);
        assert!(Parked::from_json(r#"{"blocker":"nope","changes":[]}"#).is_err());
    }

    /// A replay names the blocker it releases; a record that failed again after a replay
    /// keeps blocking behind its first failure; control records are told from changes.
    #[test]
    fn replays_and_controls_name_their_blocker() {
        let plain = record(9, vec![]);
        assert_eq!(replayed_origin(&plain), None);
        assert_eq!(first_origin(&plain), plain.origin());
        let replay = record(12, vec![header(replay_headers::ORIGIN, "shop/orders/1/4")]);
        let blocker = record(4, vec![]).origin();
        assert_eq!(replayed_origin(&replay), Some(blocker.clone()));
        assert_eq!(first_origin(&replay), blocker);
        assert_eq!(control_record(&plain), None);
        let discard = record(
            13,
            vec![
                header(replay_headers::CONTROL, "discard"),
                header(replay_headers::ORIGIN, "shop/orders/1/4"),
                header(replay_headers::ENTITY, "7"),
            ],
        );
        assert_eq!(
            control_record(&discard),
            Some(Some(Discard {
                origin: blocker,
                entity: "7".to_owned()
            }))
        );
        let unknown = record(14, vec![header(replay_headers::CONTROL, "explode")]);
        assert_eq!(control_record(&unknown), Some(None));
    }
}
