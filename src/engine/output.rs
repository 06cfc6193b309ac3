//! Records the core asks the runtime to publish: business events, DLQ and audit records.

use serde_json::json;

use super::failure::RecordFailure;
use crate::cdc::{Origin, RawRecord};

/// Header names cdcflow writes on DLQ records.
pub mod headers {
    pub const ERROR_REASON: &str = "cdcflow.error.reason";
    pub const ERROR_MESSAGE: &str = "cdcflow.error.message";
    pub const ERROR_STAGE: &str = "cdcflow.error.stage";
    pub const ERROR_TIME: &str = "cdcflow.error.time";
    pub const PIPELINE: &str = "cdcflow.pipeline";
    pub const ORIGIN_TOPIC: &str = "cdcflow.origin.topic";
    pub const ORIGIN_PARTITION: &str = "cdcflow.origin.partition";
    pub const ORIGIN_OFFSET: &str = "cdcflow.origin.offset";
    /// The entity's key, on failures after the key was read (`cdcflow dlq --key`, parking).
    pub const ENTITY: &str = "cdcflow.entity";
    /// Set when the original key and value were too large to keep: their size in bytes.
    pub const VALUE_DROPPED: &str = "cdcflow.value.dropped";
}

/// What an output record is, for routing, counting and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputKind {
    Event,
    DeadLetter,
    Audit,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Event => "event",
            OutputKind::DeadLetter => "dlq",
            OutputKind::Audit => "audit",
        }
    }
}

/// One record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub kind: OutputKind,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Option<Vec<u8>>,
}

impl OutputRecord {
    /// Bytes the record takes against a broker's message size limit.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
    }
}

/// A DLQ record: the original key, value and headers, plus headers naming the error. A value
/// that would take the record over `max_bytes` is dropped and its size named instead: the
/// record must still be producible (it may be here for being too large).
pub(crate) fn dead_letter(
    topic: &str,
    pipeline: &str,
    record: &RawRecord,
    failure: &RecordFailure,
    now_ms: i64,
    max_bytes: usize,
) -> OutputRecord {
    let mut record_headers: Vec<(String, Vec<u8>)> = record
        .headers
        .iter()
        .map(|header| {
            (
                header.name.clone(),
                header.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    record_headers.extend([
        (
            headers::ERROR_REASON.to_owned(),
            failure.reason.as_bytes().to_vec(),
        ),
        (
            headers::ERROR_MESSAGE.to_owned(),
            failure.message.as_bytes().to_vec(),
        ),
        (
            headers::ERROR_STAGE.to_owned(),
            failure.stage.as_str().as_bytes().to_vec(),
        ),
        (
            headers::ERROR_TIME.to_owned(),
            crate::cdc::format_epoch_millis(now_ms).into_bytes(),
        ),
        (headers::PIPELINE.to_owned(), pipeline.as_bytes().to_vec()),
        (
            headers::ORIGIN_TOPIC.to_owned(),
            record.topic.as_bytes().to_vec(),
        ),
        (
            headers::ORIGIN_PARTITION.to_owned(),
            record.partition.to_string().into_bytes(),
        ),
        (
            headers::ORIGIN_OFFSET.to_owned(),
            record.offset.to_string().into_bytes(),
        ),
    ]);
    let mut output = OutputRecord {
        kind: OutputKind::DeadLetter,
        topic: topic.to_owned(),
        key: record.key.clone(),
        headers: record_headers,
        value: record.value.clone(),
    };
    if output.size() > max_bytes {
        let original = record.payload_len();
        output.value = None;
        if output.size() > max_bytes {
            output.key = None;
        }
        output.headers.push((
            headers::VALUE_DROPPED.to_owned(),
            original.to_string().into_bytes(),
        ));
    }
    output
}

/// The facts of one dropped change, for the optional audit topic.
#[derive(Debug)]
pub(crate) struct DroppedChange<'a> {
    pub pipeline: &'a str,
    pub reason: &'a str,
    pub entity: &'a str,
    pub op: &'a str,
    pub stored_version: String,
    pub incoming_version: String,
    pub origin: Origin,
    pub now_ms: i64,
}

/// A small typed audit record for a dropped change, keyed by entity.
pub(crate) fn audit(topic: &str, drop: &DroppedChange<'_>) -> OutputRecord {
    let value = json!({
        "pipeline": drop.pipeline,
        "reason": drop.reason,
        "entity": drop.entity,
        "op": drop.op,
        "stored_version": drop.stored_version,
        "incoming_version": drop.incoming_version,
        "origin": {
            "topic": drop.origin.topic,
            "partition": drop.origin.partition,
            "offset": drop.origin.offset,
        },
        "time": crate::cdc::format_epoch_millis(drop.now_ms),
    });
    OutputRecord {
        kind: OutputKind::Audit,
        topic: topic.to_owned(),
        key: Some(drop.entity.as_bytes().to_vec()),
        headers: Vec::new(),
        value: Some(value.to_string().into_bytes()),
    }
}
