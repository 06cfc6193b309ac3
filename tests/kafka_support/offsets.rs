//! Offsets read by clients that never join the group, so looking causes no rebalance: a
//! group's committed offsets, end offsets (high watermarks), records past the last stable
//! offset, and the bounded waits on them. Every wait here polls with a deadline and panics
//! naming what it waited for; none is a bare sleep.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::*;

/// How often the bounded waits look again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Whether `condition` holds within `timeout`, looked at every [`POLL_INTERVAL`].
pub(super) fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until `condition` holds, looking every 100 ms; panics naming `what` (the condition,
/// e.g. "the group has committed every input record") after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, condition),
        "waited {timeout:?} in vain until {what}"
    );
}

/// A client that only reads offsets: it never subscribes, so it never joins `group`.
pub(super) fn offset_reader(isolation: &str, group: Option<&str>) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap())
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false");
    if let Some(group) = group {
        config.set("group.id", group);
    }
    config.create().expect("consumer")
}

/// The partitions of `topic`; panics when it has none (it does not exist).
fn partitions_of(reader: &BaseConsumer, topic: &str) -> Vec<i32> {
    let metadata = reader
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|topic| topic.partitions())
        .map(|partition| partition.id())
        .collect();
    assert!(!partitions.is_empty(), "topic `{topic}` has no partitions");
    partitions
}

/// How long a read of committed offsets retries while the broker withholds them: offsets
/// committed by a transaction still open are unstable until it ends, at the latest after the
/// 10 s `transaction_timeout` of [`shop_config`].
const UNSTABLE_OFFSETS_PATIENCE: Duration = Duration::from_secs(15);

/// A group's committed offsets and the end offsets of one topic it reads, read by clients
/// that never join the group, so looking causes no rebalance.
pub struct GroupOffsets {
    group: String,
    topic: String,
    partitions: Vec<i32>,
    /// read_committed, so librdkafka asks for stable offsets only (KIP-447): offsets of an
    /// open transaction come back as UNSTABLE_OFFSET_COMMIT, never as a guess.
    committed_reader: BaseConsumer,
    /// read_uncommitted, so its end offsets are the high watermarks, not the last stable
    /// offsets.
    end_reader: BaseConsumer,
}

impl GroupOffsets {
    pub fn new(group: &str, topic: &str) -> GroupOffsets {
        let committed_reader = offset_reader("read_committed", Some(group));
        GroupOffsets {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: partitions_of(&committed_reader, topic),
            committed_reader,
            end_reader: offset_reader("read_uncommitted", None),
        }
    }

    /// One look at the committed offsets: an error while any is unstable (waits take that
    /// for "not yet"). Partitions without a commit are absent.
    pub fn try_committed(&self) -> KafkaResult<BTreeMap<i32, i64>> {
        let mut list = TopicPartitionList::new();
        for &partition in &self.partitions {
            list.add_partition(&self.topic, partition);
        }
        let committed = self
            .committed_reader
            .committed_offsets(list, Duration::from_secs(5))?;
        let mut offsets = BTreeMap::new();
        for element in committed.elements() {
            element.error()?;
            if let Offset::Offset(offset) = element.offset() {
                offsets.insert(element.partition(), offset);
            }
        }
        Ok(offsets)
    }

    /// The committed offset per partition (absent: nothing committed), retrying while an
    /// open transaction keeps them unstable.
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        let deadline = Instant::now() + UNSTABLE_OFFSETS_PATIENCE;
        loop {
            match self.try_committed() {
                Ok(offsets) => return offsets,
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Err(error) => panic!(
                    "cannot read the offsets group `{}` committed on `{}` within \
                     {UNSTABLE_OFFSETS_PATIENCE:?}: {error}",
                    self.group, self.topic
                ),
            }
        }
    }

    /// The high watermark per partition.
    pub fn end(&self) -> BTreeMap<i32, i64> {
        self.try_end().unwrap_or_else(|error| {
            panic!("cannot read the end offsets of `{}`: {error}", self.topic)
        })
    }

    fn try_end(&self) -> KafkaResult<BTreeMap<i32, i64>> {
        high_watermarks(&self.end_reader, &self.topic, &self.partitions)
    }

    /// Waits until the committed offsets add up to `at_least`.
    pub fn wait_for_committed(&self, at_least: i64, timeout: Duration) {
        let mut committed = BTreeMap::new();
        let reached = poll_until(timeout, || {
            // Unstable offsets (an open transaction) are a "not yet", not a failure.
            if let Ok(offsets) = self.try_committed() {
                committed = offsets;
            }
            committed.values().sum::<i64>() >= at_least
        });
        assert!(
            reached,
            "group `{}` committed {} records of `{}` within {timeout:?}, not {at_least} \
             (per partition: {committed:?})",
            self.group,
            committed.values().sum::<i64>(),
            self.topic
        );
    }

    /// Waits until the committed offset of every partition is its end offset.
    pub fn wait_caught_up(&self, timeout: Duration) {
        let (mut committed, mut end) = (BTreeMap::new(), BTreeMap::new());
        let caught_up = poll_until(timeout, || {
            let (Ok(now_committed), Ok(now_end)) = (self.try_committed(), self.try_end()) else {
                return false;
            };
            (committed, end) = (now_committed, now_end);
            end.iter()
                .all(|(partition, last)| committed.get(partition).copied().unwrap_or(0) == *last)
        });
        assert!(
            caught_up,
            "group `{}` did not catch up with `{}` within {timeout:?}: committed {committed:?}, \
             end offsets {end:?}",
            self.group, self.topic
        );
    }
}

/// The high watermark per partition. `reader` must read uncommitted: librdkafka asks for the
/// end offsets with the consumer's isolation level, and read_committed ones are the last
/// stable offsets.
fn high_watermarks(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
) -> KafkaResult<BTreeMap<i32, i64>> {
    partitions
        .iter()
        .map(|&partition| {
            let (_, high) = reader.fetch_watermarks(topic, partition, Duration::from_secs(5))?;
            Ok((partition, high))
        })
        .collect()
}

/// The offsets `group` committed per partition of `topic` (read_committed; partitions
/// without a commit are absent), retrying while an open transaction keeps them unstable (up
/// to 15 s).
pub fn committed_offsets(group: &str, topic: &str) -> BTreeMap<i32, i64> {
    GroupOffsets::new(group, topic).committed()
}

/// The high watermark per partition of `topic`.
pub fn end_offsets(topic: &str) -> BTreeMap<i32, i64> {
    let reader = offset_reader("read_uncommitted", None);
    high_watermarks(&reader, topic, &partitions_of(&reader, topic))
        .unwrap_or_else(|error| panic!("cannot read the end offsets of `{topic}`: {error}"))
}

/// Waits until the offsets `group` committed on `topic` add up to `at_least`.
pub fn wait_for_committed(group: &str, topic: &str, at_least: i64, timeout: Duration) {
    GroupOffsets::new(group, topic).wait_for_committed(at_least, timeout);
}

/// Waits until `group` has committed every record of `topic`: committed offset = end offset
/// on every partition.
pub fn wait_caught_up(group: &str, topic: &str, timeout: Duration) {
    GroupOffsets::new(group, topic).wait_caught_up(timeout);
}

/// Readers of `topic`'s end offsets: read_uncommitted sees records of open transactions,
/// read_committed stops at the last stable offset.
pub struct TransactionProbe {
    topic: String,
    uncommitted: BaseConsumer,
    committed: BaseConsumer,
    partitions: Vec<i32>,
}

impl TransactionProbe {
    pub fn new(topic: &str) -> TransactionProbe {
        let committed = offset_reader("read_committed", None);
        TransactionProbe {
            topic: topic.to_owned(),
            uncommitted: offset_reader("read_uncommitted", None),
            partitions: partitions_of(&committed, topic),
            committed,
        }
    }

    /// Whether a partition holds records past its last stable offset: records of an open
    /// transaction, or of one whose commit markers are still being written.
    pub fn records_past_stable_offset(&self) -> bool {
        let end = |consumer: &BaseConsumer, partition: i32| {
            consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
                .map_or(0, |(_, high)| high)
        };
        self.partitions
            .iter()
            .any(|&partition| end(&self.uncommitted, partition) > end(&self.committed, partition))
    }
}
