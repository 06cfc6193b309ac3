//! Dead letters as the operator sees them: a DLQ record read back ([`DeadLetter`]), the
//! filters of `cdcflow dlq list|replay|discard` ([`DlqFilter`]), and the records those
//! commands write back into a pipeline's input ([`Reinjection`]).
//!
//! A replay writes the original record back to the partition it came from, with its original
//! key, value and headers: the pipeline then processes it like any other change, behind the
//! same version gate, so a change already applied (by an earlier replay, or because a later
//! change of the entity overtook it) emits nothing. A discard writes a control record that
//! releases the entity's parked changes without processing the dead-lettered one.

use thiserror::Error;

use crate::cdc::{Header, Origin, RawRecord, parse_rfc3339_millis};
use crate::engine::output_headers as headers;
pub use crate::engine::park::{parse_origin, replay_headers};

/// One record of a DLQ topic, with its cdcflow headers read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Where the DLQ record is: `dlq-topic/partition/offset`.
    pub location: Origin,
    /// When it was dead-lettered (the DLQ record's Kafka timestamp).
    pub timestamp_ms: Option<i64>,
    pub pipeline: String,
    pub reason: String,
    pub stage: String,
    pub message: String,
    /// The input record that failed.
    pub origin: Origin,
    /// The first input record of a change that failed again after a replay: the one an entity
    /// is parked behind.
    pub first_origin: Origin,
    /// The entity's key, when the failure came after the key was read.
    pub entity: Option<String>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Set when the DLQ record had to drop the original key and value (too large).
    pub value_dropped: Option<String>,
    /// The input record's own headers (cdcflow's removed, its replay markers kept).
    pub original_headers: Vec<Header>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DlqError {
    #[error("DLQ record {location} has no `{header}` header: it was not written by cdcflow")]
    MissingHeader {
        location: Origin,
        header: &'static str,
    },
    #[error("DLQ record {location}: header `{header}` holds `{value}`, not {expected}")]
    BadHeader {
        location: Origin,
        header: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "DLQ record {location} cannot be replayed: its original key and value ({size} bytes) were \
         too large to keep; re-send the change from the source (or Debezium) instead"
    )]
    ValueDropped { location: Origin, size: String },
    #[error(
        "`--{option}`: `{value}` is not a time; give RFC 3339 (2026-11-30T05:00:00Z), epoch \
         milliseconds, or an age such as 90s, 30m, 12h, 7d"
    )]
    BadTime { option: &'static str, value: String },
}

fn header_text(record: &RawRecord, name: &str) -> Option<String> {
    // The last one wins: a record dead-lettered again after a replay carries its first
    // failure's headers too.
    record
        .headers
        .iter()
        .rev()
        .find(|header| header.name == name)
        .map(|header| {
            String::from_utf8_lossy(header.value.as_deref().unwrap_or_default()).into_owned()
        })
}

impl DeadLetter {
    /// Reads a DLQ record's cdcflow headers.
    pub fn from_record(record: &RawRecord) -> Result<DeadLetter, DlqError> {
        let location = record.origin();
        let required = |header: &'static str| {
            header_text(record, header).ok_or_else(|| DlqError::MissingHeader {
                location: location.clone(),
                header,
            })
        };
        let number = |header: &'static str| -> Result<i64, DlqError> {
            let value = required(header)?;
            value.parse().map_err(|_| DlqError::BadHeader {
                location: location.clone(),
                header,
                value,
                expected: "a number",
            })
        };
        let origin = Origin {
            topic: required(headers::ORIGIN_TOPIC)?,
            partition: i32::try_from(number(headers::ORIGIN_PARTITION)?).map_err(|_| {
                DlqError::BadHeader {
                    location: location.clone(),
                    header: headers::ORIGIN_PARTITION,
                    value: required(headers::ORIGIN_PARTITION).unwrap_or_default(),
                    expected: "a partition number",
                }
            })?,
            offset: number(headers::ORIGIN_OFFSET)?,
        };
        let first_origin = match header_text(record, replay_headers::ORIGIN) {
            Some(text) => parse_origin(&text).ok_or_else(|| DlqError::BadHeader {
                location: location.clone(),
                header: replay_headers::ORIGIN,
                value: text,
                expected: "topic/partition/offset",
            })?,
            None => origin.clone(),
        };
        let original_headers = record
            .headers
            .iter()
            .filter(|header| {
                !header.name.starts_with("cdcflow.") || header.name == replay_headers::ORIGIN
            })
            .cloned()
            .collect();
        Ok(DeadLetter {
            timestamp_ms: record.timestamp_ms,
            pipeline: required(headers::PIPELINE)?,
            reason: required(headers::ERROR_REASON)?,
            stage: header_text(record, headers::ERROR_STAGE).unwrap_or_default(),
            message: header_text(record, headers::ERROR_MESSAGE).unwrap_or_default(),
            origin,
            first_origin,
            entity: header_text(record, headers::ENTITY),
            key: record.key.clone(),
            value: record.value.clone(),
            value_dropped: header_text(record, headers::VALUE_DROPPED),
            original_headers,
            location,
        })
    }

    /// The original key as text (lossy for binary keys).
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|key| String::from_utf8_lossy(key).into_owned())
    }

    /// The original record, back to the partition it came from, marked as a replay of this
    /// dead letter.
    pub fn replay(&self) -> Result<Reinjection, DlqError> {
        if let Some(size) = &self.value_dropped {
            return Err(DlqError::ValueDropped {
                location: self.location.clone(),
                size: size.clone(),
            });
        }
        let mut headers: Vec<(String, Vec<u8>)> = self
            .original_headers
            .iter()
            .filter(|header| header.name != replay_headers::ORIGIN)
            .map(|header| {
                (
                    header.name.clone(),
                    header.value.clone().unwrap_or_default(),
                )
            })
            .collect();
        headers.push(self.marker(replay_headers::ORIGIN, &self.first_origin.to_string()));
        headers.push(self.marker(replay_headers::OF, &self.location.to_string()));
        Ok(Reinjection {
            topic: self.origin.topic.clone(),
            partition: self.origin.partition,
            key: self.key.clone(),
            value: self.value.clone(),
            headers,
        })
    }

    /// A control record that releases the entity parked behind this dead letter without
    /// processing it. Its value is never null: a null value would be a tombstone to a
    /// compacted input topic.
    pub fn discard(&self) -> Reinjection {
        let first = self.first_origin.to_string();
        let value = serde_json::json!({
            "cdcflow.control": "discard",
            "pipeline": self.pipeline,
            "entity": self.entity,
            "origin": first,
            "dead_letter": self.location.to_string(),
        });
        let mut headers = vec![
            self.marker(replay_headers::CONTROL, "discard"),
            self.marker(replay_headers::ORIGIN, &first),
            self.marker(replay_headers::OF, &self.location.to_string()),
            self.marker(replay_headers::PIPELINE, &self.pipeline),
        ];
        if let Some(entity) = &self.entity {
            headers.push(self.marker(replay_headers::ENTITY, entity));
        }
        Reinjection {
            topic: self.origin.topic.clone(),
            partition: self.origin.partition,
            key: self.key.clone(),
            value: Some(value.to_string().into_bytes()),
            headers,
        }
    }

    fn marker(&self, name: &str, value: &str) -> (String, Vec<u8>) {
        (name.to_owned(), value.as_bytes().to_vec())
    }

    /// One JSON object for `cdcflow dlq list --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dlq": self.location.to_string(),
            "time": self.timestamp_ms.map(crate::cdc::format_epoch_millis),
            "pipeline": self.pipeline,
            "reason": self.reason,
            "stage": self.stage,
            "message": self.message,
            "origin": self.origin.to_string(),
            "first_origin": self.first_origin.to_string(),
            "entity": self.entity,
            "key": self.key_text(),
            "value_dropped": self.value_dropped.is_some(),
        })
    }
}

/// A record `cdcflow dlq` writes into an input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reinjection {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Which dead letters a `cdcflow dlq` command takes. Every set filter must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    pub pipeline: Option<String>,
    pub reason: Option<String>,
    /// The entity key (as cdcflow writes it: `42`, or sorted compact JSON for a composite
    /// key) or the record's raw Kafka key text.
    pub key: Option<String>,
    /// Dead-lettered at or after / before, epoch ms.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// The DLQ record's own location, `topic/partition/offset`.
    pub location: Option<Origin>,
}

impl DlqFilter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let time = letter.timestamp_ms;
        self.pipeline.as_ref().is_none_or(|p| *p == letter.pipeline)
            && self.reason.as_ref().is_none_or(|r| *r == letter.reason)
            && self.key.as_ref().is_none_or(|key| {
                letter.entity.as_ref() == Some(key) || letter.key_text().as_ref() == Some(key)
            })
            && self
                .since_ms
                .is_none_or(|since| time.is_some_and(|time| time >= since))
            && self
                .until_ms
                .is_none_or(|until| time.is_some_and(|time| time < until))
            && self
                .location
                .as_ref()
                .is_none_or(|at| *at == letter.location)
    }
}

/// A time option: RFC 3339, epoch milliseconds, or an age before `now_ms` (`90s`, `30m`,
/// `12h`, `7d`).
pub fn parse_time(option: &'static str, value: &str, now_ms: i64) -> Result<i64, DlqError> {
    let bad = || DlqError::BadTime {
        option,
        value: value.to_owned(),
    };
    if let Some(millis) = parse_rfc3339_millis(value) {
        return Ok(millis);
    }
    if let Ok(millis) = value.parse::<i64>() {
        return Ok(millis);
    }
    let unit_ms = match value.chars().last() {
        Some('s') => 1_000,
        Some('m') => 60_000,
        Some('h') => 3_600_000,
        Some('d') => 86_400_000,
        _ => return Err(bad()),
    };
    let amount: i64 = value[..value.len() - 1].parse().map_err(|_| bad())?;
    Ok(now_ms - amount.checked_mul(unit_ms).ok_or_else(bad)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> Header {
        Header {
            name: name.to_owned(),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn dead_letter_record(extra: Vec<Header>) -> RawRecord {
        let mut headers = vec![header("traceparent", "00-abc-01")];
        headers.extend(extra);
        headers.extend([
            header(headers::ERROR_REASON, "rule_error"),
            header(headers::ERROR_MESSAGE, "no such key: total"),
            header(headers::ERROR_STAGE, "rule"),
            header(headers::PIPELINE, "orders"),
            header(headers::ORIGIN_TOPIC, "shop.public.orders"),
            header(headers::ORIGIN_PARTITION, "2"),
            header(headers::ORIGIN_OFFSET, "41"),
            header(headers::ENTITY, "1001"),
        ]);
        RawRecord {
            topic: "orders.dlq".to_owned(),
            partition: 0,
            offset: 7,
            key: Some(br#"{"id":1001}"#.to_vec()),
            value: Some(br#"{"op":"u"}"#.to_vec()),
            headers,
            timestamp_ms: Some(1_000),
        }
    }

    /// A replay is the original record, to its original partition, with its own headers and
    /// the replay markers; cdcflow's error headers are not carried back.
    #[test]
    fn a_replay_restores_the_original_record() {
        let letter = DeadLetter::from_record(&dead_letter_record(vec![])).unwrap();
        assert_eq!(letter.origin.to_string(), "shop.public.orders/2/41");
        assert_eq!(letter.first_origin, letter.origin);
        let replay = letter.replay().unwrap();
        assert_eq!(
            (replay.topic.as_str(), replay.partition),
            ("shop.public.orders", 2)
        );
        assert_eq!(replay.key.as_deref(), Some(&br#"{"id":1001}"#[..]));
        assert_eq!(replay.value.as_deref(), Some(&br#"{"op":"u"}"#[..]));
        let names: Vec<&str> = replay.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["traceparent", replay_headers::ORIGIN, replay_headers::OF]
        );
        assert_eq!(replay.headers[1].1, b"shop.public.orders/2/41");
        assert_eq!(replay.headers[2].1, b"orders.dlq/0/7");
    }

    /// A change that failed again after a replay keeps pointing at its first failure, so the
    /// entity parked behind that one is released by the next replay.
    #[test]
    fn a_second_failure_keeps_the_first_origin() {
        let record = dead_letter_record(vec![header(
            replay_headers::ORIGIN,
            "shop.public.orders/2/5",
        )]);
        let letter = DeadLetter::from_record(&record).unwrap();
        assert_eq!(letter.first_origin.offset, 5);
        let replay = letter.replay().unwrap();
        let origins: Vec<&[u8]> = replay
            .headers
            .iter()
            .filter(|(n, _)| n == replay_headers::ORIGIN)
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(origins, [&b"shop.public.orders/2/5"[..]]);
        let discard = letter.discard();
        assert!(discard.value.is_some(), "never a tombstone");
        assert!(
            discard
                .headers
                .contains(&(replay_headers::CONTROL.to_owned(), b"discard".to_vec()))
        );
    }

    /// Records that are not cdcflow's dead letters, and dead letters without their value, say
    /// so instead of being replayed half.
    #[test]
    fn foreign_and_stripped_records_are_refused() {
        let mut foreign = dead_letter_record(vec![]);
        foreign.headers.retain(|h| h.name != headers::PIPELINE);
        assert!(matches!(
            DeadLetter::from_record(&foreign),
            Err(DlqError::MissingHeader {
                header: headers::PIPELINE,
                ..
            })
        ));
        let stripped = dead_letter_record(vec![header(headers::VALUE_DROPPED, "2000000")]);
        let letter = DeadLetter::from_record(&stripped).unwrap();
        assert!(matches!(
            letter.replay(),
            Err(DlqError::ValueDropped { .. })
        ));
    }

    /// Filters combine; the key matches the entity key or the raw Kafka key.
    #[test]
    fn filters_combine() {
        let letter = DeadLetter::from_record(&dead_letter_record(vec![])).unwrap();
        let all = DlqFilter::default();
        assert!(all.matches(&letter));
        let by = |filter: DlqFilter| filter.matches(&letter);
        assert!(by(DlqFilter {
            key: Some("1001".into()),
            ..all.clone()
        }));
        assert!(by(DlqFilter {
            key: Some(r#"{"id":1001}"#.into()),
            ..all.clone()
        }));
        assert!(!by(DlqFilter {
            key: Some("1002".into()),
            ..all.clone()
        }));
        assert!(by(DlqFilter {
            reason: Some("rule_error".into()),
            pipeline: Some("orders".into()),
            ..all.clone()
        }));
        assert!(!by(DlqFilter {
            pipeline: Some("customers".into()),
            ..all.clone()
        }));
        assert!(by(DlqFilter {
            since_ms: Some(1_000),
            until_ms: Some(1_001),
            ..all.clone()
        }));
        assert!(!by(DlqFilter {
            since_ms: Some(1_001),
            ..all.clone()
        }));
        assert!(!by(DlqFilter {
            until_ms: Some(1_000),
            ..all.clone()
        }));
    }

    #[test]
    fn times_are_absolute_epoch_or_ages() {
        let now = 10_000_000;
        assert_eq!(parse_time("since", "90s", now), Ok(now - 90_000));
        assert_eq!(parse_time("since", "2d", now), Ok(now - 172_800_000));
        assert_eq!(parse_time("since", "1234", now), Ok(1234));
        assert_eq!(parse_time("since", "1970-01-01T00:00:01Z", now), Ok(1000));
        assert!(parse_time("since", "soon", now).is_err());
        assert_eq!(
            parse_origin("a/b/3/17"),
            Some(Origin {
                topic: "a/b".into(),
                partition: 3,
                offset: 17
            })
        );
    }
}
