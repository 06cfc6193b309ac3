//! What the consume loop reads off a Kafka message, and what it says about a batch of them:
//! owned records, their size, the offsets to commit, the batch's log span.

use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::cdc::{Header, RawRecord};
use crate::runtime::SharedPipelines;

/// The span of one batch: the pipelines that read it and, per partition, its first and last
/// offsets (`orders/0@120..359`).
pub(super) fn batch_span(pipelines: &SharedPipelines, records: &[RawRecord]) -> tracing::Span {
    let mut ranges: std::collections::BTreeMap<(&str, i32), (i64, i64)> =
        std::collections::BTreeMap::new();
    // Records of a partition come in runs: one map look-up per run, not per record.
    for run in records.chunk_by(|a, b| a.partition == b.partition && a.topic == b.topic) {
        let (first, last) = (&run[0], &run[run.len() - 1]);
        let range = ranges
            .entry((&first.topic, first.partition))
            .or_insert((first.offset, last.offset));
        range.0 = range.0.min(first.offset);
        range.1 = range.1.max(last.offset);
    }
    let offsets = ranges
        .iter()
        .map(|((topic, partition), (first, last))| format!("{topic}/{partition}@{first}..{last}"))
        .collect::<Vec<_>>()
        .join(",");
    let pipelines = pipelines
        .iter()
        .filter(|(route, _)| ranges.keys().any(|(topic, _)| route.matches(topic)))
        .map(|(_, pipeline)| pipeline.name())
        .collect::<Vec<_>>()
        .join(",");
    tracing::info_span!(
        "batch",
        pipelines = %pipelines,
        partitions = ranges.len(),
        offsets = %offsets,
        records = records.len()
    )
}

/// The offset after the last record of each partition in the batch.
pub(super) fn next_offsets(records: &[RawRecord]) -> TopicPartitionList {
    let mut next: std::collections::HashMap<(&str, i32), i64> = std::collections::HashMap::new();
    for record in records {
        let slot = next
            .entry((&record.topic, record.partition))
            .or_insert(record.offset + 1);
        *slot = (*slot).max(record.offset + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    list
}

/// What a record costs in memory while its batch is collected: key, value and headers.
pub(super) fn record_bytes(record: &RawRecord) -> usize {
    record.key.as_ref().map_or(0, Vec::len)
        + record.value.as_ref().map_or(0, Vec::len)
        + record
            .headers
            .iter()
            .map(|header| header.name.len() + header.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

pub(super) fn raw_record<M: Message>(message: &M) -> RawRecord {
    RawRecord {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| Header {
                        name: header.key.to_owned(),
                        value: header.value.map(<[u8]>::to_vec),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        timestamp_ms: message.timestamp().to_millis(),
    }
}
