//! Runtime events of `cdcflow run`: one typed function per event, each logging it and
//! counting it, so that the log and the metrics never disagree. Also the librdkafka client
//! context that turns the clients' own reports (errors, statistics) into such events.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::runtime::{Health, now_ms};

/// One input partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Partitions as the log shows them: `[("topic", 0), ("topic", 3)]`. Tests and operators
/// search for this form.
pub(super) struct PartitionList<'a>(pub &'a [TopicPartition]);

impl fmt::Debug for PartitionList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|tp| (&tp.topic, tp.partition)))
            .finish()
    }
}

/// The group's committed offset of each assigned input partition, as this instance last
/// committed (or found) it. Exactly-once commits offsets through the producer, so librdkafka's
/// consumer statistics never see them: the committed lag is computed from these.
pub(super) type CommittedOffsets = Arc<Mutex<HashMap<TopicPartition, i64>>>;

/// What the service reports to: its metrics, its health, and the committed offsets the lag
/// is measured from.
#[derive(Debug, Clone)]
pub(super) struct Reporter {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub committed: CommittedOffsets,
}

impl Reporter {
    pub(super) fn new(metrics: Metrics, health: Arc<Health>) -> Reporter {
        Reporter {
            metrics,
            health,
            committed: Arc::default(),
        }
    }

    pub(super) fn partitions_assigned(&self, partitions: &[TopicPartition]) {
        tracing::info!(partitions = ?PartitionList(partitions), "partitions assigned; restoring their state");
        self.count_partitions("assigned", partitions.len());
        self.metrics
            .assigned_partitions
            .add(partitions.len() as i64);
    }

    pub(super) fn partitions_revoked(&self, partitions: &[TopicPartition], lost: bool) {
        tracing::info!(partitions = ?PartitionList(partitions), lost, "partitions revoked");
        self.count_partitions(if lost { "lost" } else { "revoked" }, partitions.len());
        self.forget_partitions(partitions);
    }

    pub(super) fn rebalance_error(&self, error: &str, partitions: &[TopicPartition]) {
        tracing::warn!(%error, partitions = ?PartitionList(partitions), "rebalance error; dropping the assignment");
        self.count_partitions("lost", partitions.len());
        self.forget_partitions(partitions);
    }

    fn forget_partitions(&self, partitions: &[TopicPartition]) {
        let metrics = &self.metrics;
        let assigned = (metrics.assigned_partitions.get() - partitions.len() as i64).max(0);
        metrics.assigned_partitions.set(assigned);
        let mut committed = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for partition in partitions {
            committed.remove(partition);
        }
    }

    fn count_partitions(&self, event: &str, count: usize) {
        self.metrics.rebalances.inc();
        self.metrics
            .partition_events
            .with_label_values(&[event])
            .inc_by(count as u64);
    }

    /// The committed offsets of partitions (after a commit, or found at assignment); logical
    /// offsets (the beginning of a partition never committed) are not positions to measure
    /// from.
    pub(super) fn offsets_committed(&self, offsets: &TopicPartitionList) {
        let mut committed = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for element in offsets.elements() {
            if let Offset::Offset(offset) = element.offset() {
                let partition = TopicPartition {
                    topic: element.topic().to_owned(),
                    partition: element.partition(),
                };
                committed.insert(partition, offset);
            }
        }
    }

    pub(super) fn batch_committed(&self, records_total: u64) {
        tracing::debug!(records_total, "batch committed");
        let metrics = &self.metrics;
        metrics.batches.with_label_values(&["committed"]).inc();
        metrics.last_commit_seconds.set(now_ms() as f64 / 1000.0);
        self.health.set_failing(false);
    }

    pub(super) fn batch_retried(&self, reason: &str, attempt: u32, counted: bool) {
        tracing::warn!(%reason, attempt, counted, "batch aborted; rewinding to the committed offsets");
        self.metrics.batches.with_label_values(&["retried"]).inc();
        crate::runtime::count_retry("batch");
        self.health.set_failing(true);
    }

    pub(super) fn batch_refused(&self, outputs: usize) {
        tracing::warn!(
            outputs,
            "outputs refused as too large; their records go to the DLQ, retrying the batch"
        );
        self.metrics.batches.with_label_values(&["refused"]).inc();
    }

    pub(super) fn consumer_error(&self, error: &KafkaError) {
        tracing::warn!(%error, "consumer error; continuing");
        self.count_client_error("consumer", error);
    }

    fn count_client_error(&self, client: &str, error: &KafkaError) {
        let code = error
            .rdkafka_error_code()
            .map_or_else(|| "other".to_owned(), |code| format!("{code:?}"));
        self.metrics
            .client_errors
            .with_label_values(&[client, &code])
            .inc();
    }
}

/// The librdkafka context of cdcflow's clients: errors are logged and counted, and the
/// consumer's statistics tell whether any broker is reachable (for `/readyz`).
#[derive(Debug)]
pub(super) struct ClientReports {
    client: &'static str,
    reporter: Reporter,
    /// Whether the last statistics (or error) said a broker was reachable.
    reachable: AtomicBool,
    /// The partitions whose lag series the last statistics set, to remove those no longer
    /// assigned.
    lag_series: Mutex<HashSet<TopicPartition>>,
}

impl ClientReports {
    pub(super) fn new(client: &'static str, reporter: Reporter) -> ClientReports {
        ClientReports {
            client,
            reporter,
            reachable: AtomicBool::new(true),
            lag_series: Mutex::default(),
        }
    }

    /// Sets the lag gauges of the assigned partitions the statistics list, and removes those
    /// of partitions no longer assigned.
    fn report_lag(&self, partitions: Vec<PartitionLag>) {
        let metrics = &self.reporter.metrics;
        let committed = self
            .reporter
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut current = HashSet::with_capacity(partitions.len());
        for lag in partitions {
            let committed_offset = committed.get(&lag.partition).copied();
            let Some(measured) = lag.measure(committed_offset) else {
                continue;
            };
            let labels = [
                lag.partition.topic.as_str(),
                &lag.partition.partition.to_string(),
            ];
            metrics
                .consumer_lag
                .with_label_values(&labels)
                .set(measured.processing);
            metrics
                .committed_lag
                .with_label_values(&labels)
                .set(measured.committed);
            current.insert(lag.partition);
        }
        let mut previous = self
            .lag_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in previous.difference(&current) {
            let labels = [gone.topic.as_str(), &gone.partition.to_string()];
            let _ = metrics.consumer_lag.remove_label_values(&labels);
            let _ = metrics.committed_lag.remove_label_values(&labels);
        }
        *previous = current;
    }

    fn brokers_reachable(&self, reachable: bool) {
        if self.reachable.swap(reachable, Ordering::SeqCst) != reachable {
            if reachable {
                tracing::info!(client = self.client, "Kafka brokers reachable again");
            } else {
                tracing::warn!(client = self.client, "no Kafka broker is reachable");
            }
        }
        // Only the consumer's view decides readiness: it is the client always in use.
        if self.client == "consumer" {
            self.reporter.health.set_brokers_reachable(reachable);
            self.reporter
                .metrics
                .brokers_reachable
                .set(i64::from(reachable));
        }
    }
}

/// The parts of librdkafka's statistics cdcflow reads: which brokers are connected, the
/// producer's queue, and each consumed partition's offsets.
#[derive(Deserialize)]
struct ClientStatistics {
    #[serde(default)]
    brokers: HashMap<String, BrokerState>,
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
    /// Messages and bytes in the producer's queues.
    msg_cnt: Option<i64>,
    msg_size: Option<i64>,
}

#[derive(Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<String, PartitionStatistics>,
}

#[derive(Deserialize)]
struct PartitionStatistics {
    partition: i32,
    /// Whether the application assigned the partition.
    #[serde(default)]
    desired: bool,
    /// The offset after the last record handed to the application (-1 when none).
    #[serde(default = "unknown_offset")]
    app_offset: i64,
    #[serde(default = "unknown_offset")]
    committed_offset: i64,
    /// The last stable offset: the end of the partition under read_committed.
    #[serde(default = "unknown_offset")]
    ls_offset: i64,
}

fn unknown_offset() -> i64 {
    -1
}

/// One assigned partition's offsets from the statistics.
#[derive(Debug, PartialEq, Eq)]
struct PartitionLag {
    partition: TopicPartition,
    app_offset: i64,
    committed_offset: i64,
    end_offset: i64,
}

#[derive(Debug, PartialEq, Eq)]
struct MeasuredLag {
    processing: i64,
    committed: i64,
}

impl PartitionLag {
    /// The lags, once the partition's end is known. `committed` is what this instance
    /// committed or found at assignment; without it the statistics' committed offset (the
    /// consumer's own view) stands in. A partition never committed lags by its whole length
    /// from its start, which the statistics do not give: its lag is the processing lag.
    fn measure(&self, committed: Option<i64>) -> Option<MeasuredLag> {
        if self.end_offset < 0 {
            return None;
        }
        let committed = committed
            .filter(|offset| *offset >= 0)
            .or(Some(self.committed_offset).filter(|offset| *offset >= 0));
        let next = Some(self.app_offset)
            .filter(|offset| *offset >= 0)
            .or(committed);
        let processing = next.map_or(0, |next| (self.end_offset - next).max(0));
        let committed = committed.map_or(processing, |committed| {
            (self.end_offset - committed).max(processing)
        });
        Some(MeasuredLag {
            processing,
            committed,
        })
    }
}

/// The assigned partitions' offsets in librdkafka's statistics (partition -1 is librdkafka's
/// internal "unassigned" entry).
fn partition_lags(statistics: &ClientStatistics) -> Vec<PartitionLag> {
    let mut lags = Vec::new();
    for (topic, topic_statistics) in &statistics.topics {
        for partition in topic_statistics.partitions.values() {
            if partition.partition < 0 || !partition.desired {
                continue;
            }
            lags.push(PartitionLag {
                partition: TopicPartition {
                    topic: topic.clone(),
                    partition: partition.partition,
                },
                app_offset: partition.app_offset,
                committed_offset: partition.committed_offset,
                end_offset: partition.ls_offset,
            });
        }
    }
    lags
}

#[derive(Deserialize)]
struct BrokerState {
    nodeid: i32,
    state: String,
}

/// Whether librdkafka's statistics show a broker connection that is up. Bootstrap entries
/// (node id -1) are not brokers of the cluster yet.
fn any_broker_up(statistics: &ClientStatistics) -> bool {
    statistics
        .brokers
        .values()
        .any(|broker| broker.nodeid >= 0 && broker.state == "UP")
}

impl ClientContext for ClientReports {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.brokers_reachable(false);
        }
        tracing::warn!(client = self.client, %error, reason, "Kafka client error");
        self.reporter.count_client_error(self.client, &error);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(statistics) = serde_json::from_slice::<ClientStatistics>(statistics) else {
            return;
        };
        self.brokers_reachable(any_broker_up(&statistics));
        let metrics = &self.reporter.metrics;
        if self.client == "producer" {
            metrics
                .producer_queue_messages
                .set(statistics.msg_cnt.unwrap_or(0));
            metrics
                .producer_queue_bytes
                .set(statistics.msg_size.unwrap_or(0));
        } else {
            self.report_lag(partition_lags(&statistics));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected broker counts; bootstrap entries and brokers being reconnected do not.
    #[test]
    fn reachability_comes_from_connected_cluster_brokers() {
        let parse = |text: &str| serde_json::from_str::<ClientStatistics>(text).unwrap();
        let up = parse(
            r#"{"name":"c","brokers":{"127.0.0.1:9092/bootstrap":{"nodeid":-1,"state":"INIT"},
            "127.0.0.1:9092/1":{"nodeid":1,"state":"UP","rtt":{}}},"topics":{}}"#,
        );
        assert!(any_broker_up(&up));
        let down = parse(
            r#"{"brokers":{"127.0.0.1:9092/bootstrap":{"nodeid":-1,"state":"UP"},
            "127.0.0.1:9092/1":{"nodeid":1,"state":"TRY_CONNECT"}}}"#,
        );
        assert!(!any_broker_up(&down));
    }

    /// Lag comes from the assigned partitions' last stable offsets: the processing lag from
    /// the next record to hand out, the committed lag from what this instance committed
    /// (the statistics' own committed offset only when it knows none). Unassigned entries and
    /// partitions whose end is unknown yet are left out.
    #[test]
    fn lag_is_measured_from_the_last_stable_offset() {
        let statistics: ClientStatistics = serde_json::from_str(
            r#"{"brokers":{},"topics":{"orders":{"partitions":{
              "0":{"partition":0,"desired":true,"app_offset":90,"committed_offset":40,"ls_offset":100},
              "1":{"partition":1,"desired":true,"app_offset":-1,"committed_offset":-1001,"ls_offset":-1},
              "2":{"partition":2,"desired":false,"app_offset":5,"committed_offset":5,"ls_offset":9},
              "-1":{"partition":-1,"desired":false,"app_offset":-1,"committed_offset":-1,"ls_offset":-1}}}}}"#,
        )
        .unwrap();
        let lags = partition_lags(&statistics);
        assert_eq!(lags.len(), 2, "{lags:?}");
        let zero = lags
            .iter()
            .find(|lag| lag.partition.partition == 0)
            .unwrap();
        assert_eq!(
            zero.measure(Some(80)),
            Some(MeasuredLag {
                processing: 10,
                committed: 20
            })
        );
        assert_eq!(
            zero.measure(None),
            Some(MeasuredLag {
                processing: 10,
                committed: 60
            })
        );
        let one = lags
            .iter()
            .find(|lag| lag.partition.partition == 1)
            .unwrap();
        assert_eq!(one.measure(Some(3)), None);
    }
}
