//! Runtime events of `cdcflow run`: one typed function per event, each logging it and
//! counting it, so that the log and the metrics never disagree. Also the librdkafka client
//! context that turns the clients' own reports (errors, statistics) into such events.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
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

/// What the service reports to: its metrics and its health.
#[derive(Debug, Clone)]
pub(super) struct Reporter {
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

impl Reporter {
    pub(super) fn partitions_assigned(&self, partitions: &[TopicPartition]) {
        tracing::info!(partitions = ?PartitionList(partitions), "partitions assigned; restoring their state");
        self.count_partitions("assigned", partitions.len());
    }

    pub(super) fn partitions_revoked(&self, partitions: &[TopicPartition], lost: bool) {
        tracing::info!(partitions = ?PartitionList(partitions), lost, "partitions revoked");
        self.count_partitions(if lost { "lost" } else { "revoked" }, partitions.len());
    }

    pub(super) fn rebalance_error(&self, error: &str, partitions: &[TopicPartition]) {
        tracing::warn!(%error, partitions = ?PartitionList(partitions), "rebalance error; dropping the assignment");
        self.count_partitions("lost", partitions.len());
    }

    fn count_partitions(&self, event: &str, count: usize) {
        self.metrics
            .partition_events
            .with_label_values(&[event])
            .inc_by(count as u64);
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
}

impl ClientReports {
    pub(super) fn new(client: &'static str, reporter: Reporter) -> ClientReports {
        ClientReports {
            client,
            reporter,
            reachable: AtomicBool::new(true),
        }
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

/// The part of librdkafka's statistics that says which brokers are connected.
#[derive(Deserialize)]
struct BrokerStatistics {
    #[serde(default)]
    brokers: std::collections::HashMap<String, BrokerState>,
}

#[derive(Deserialize)]
struct BrokerState {
    nodeid: i32,
    state: String,
}

/// Whether librdkafka's statistics JSON shows a broker connection that is up. Bootstrap
/// entries (node id -1) are not brokers of the cluster yet.
fn any_broker_up(statistics: &[u8]) -> Option<bool> {
    let parsed: BrokerStatistics = serde_json::from_slice(statistics).ok()?;
    Some(
        parsed
            .brokers
            .values()
            .any(|broker| broker.nodeid >= 0 && broker.state == "UP"),
    )
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
        if let Some(up) = any_broker_up(statistics) {
            self.brokers_reachable(up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected broker counts; bootstrap entries and brokers being reconnected do not.
    #[test]
    fn reachability_comes_from_connected_cluster_brokers() {
        let up =
            br#"{"name":"c","brokers":{"127.0.0.1:9092/bootstrap":{"nodeid":-1,"state":"INIT"},
            "127.0.0.1:9092/1":{"nodeid":1,"state":"UP","rtt":{}}},"topics":{}}"#;
        assert_eq!(any_broker_up(up), Some(true));
        let down = br#"{"brokers":{"127.0.0.1:9092/bootstrap":{"nodeid":-1,"state":"UP"},
            "127.0.0.1:9092/1":{"nodeid":1,"state":"TRY_CONNECT"}}}"#;
        assert_eq!(any_broker_up(down), Some(false));
        assert_eq!(any_broker_up(b"not json"), None);
    }
}
