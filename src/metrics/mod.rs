//! Every metric family cdcflow exports, declared in one place, and the per-run [`Tally`] the
//! hot path counts into.
//!
//! Label sets are bounded: pipelines, topics, partitions, reasons, event types and outcomes,
//! never entity keys or offsets. Names follow Prometheus conventions (`_total` counters, base
//! units `_seconds` and `_bytes`); `promtool check metrics` runs over a real exposition in the
//! integration tests, and the dashboard and alert rules are checked to name only families
//! declared here ([`Metrics::family_names`]).

mod edges;
mod tally;

use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{
    Counter, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub use edges::{IngressMetrics, PollMetrics, WebhookMetrics};
pub use tally::{PipelineTally, Tally};

/// Latency buckets, in seconds: from a millisecond to ten minutes (a restore or an outage).
const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

/// The version, commit and compiler of this build, from `build.rs`.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const BUILD_GIT_SHA: &str = env!("CDCFLOW_GIT_SHA");
pub const BUILD_RUSTC: &str = env!("CDCFLOW_RUSTC_VERSION");

/// The Prometheus families cdcflow exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// The name of every family, registered or not yet observed.
    names: Vec<String>,
    pub records: IntCounterVec,
    pub decisions: IntCounterVec,
    pub skipped: IntCounterVec,
    pub events: IntCounterVec,
    pub dlq_records: IntCounterVec,
    pub audit_records: IntCounterVec,
    /// Batches of `cdcflow run` by outcome: `committed`, `retried` (aborted or failed and
    /// rewound), `refused` (an output refused for its size; its record goes to the DLQ).
    pub batches: IntCounterVec,
    /// When the last batch committed: alert when it stops moving while input lags.
    pub last_commit_seconds: Gauge,
    /// Time per batch in each phase of `cdcflow run`: `collect` (polling, including waiting
    /// for input), `process` (decode, state, rules) and `deliver` (produce, commit). Their
    /// sums show where the time goes.
    pub batch_phase_seconds: HistogramVec,
    pub batch_records: Histogram,
    pub batch_bytes: Histogram,
    /// From a batch's first record fetched to the batch committed: the longest any record of
    /// the batch waited inside cdcflow.
    pub processing_latency: Histogram,
    /// From the source database's commit (`source.ts_ms`) to the applied change's batch
    /// committed, per applied change.
    pub end_to_end_latency: HistogramVec,
    /// Exactly-once transactions by outcome: `committed`, `aborted`.
    pub transactions: IntCounterVec,
    /// How long committing a batch took: the transaction commit (exactly-once) or the offset
    /// commit after the outputs were acknowledged (at-least-once).
    pub commit_seconds: Histogram,
    /// Partitions of `cdcflow run` by rebalance event: `assigned`, `revoked`, `lost` (taken
    /// away without a clean revoke: a session timeout, a broker outage).
    pub partition_events: IntCounterVec,
    /// Rebalances this instance took part in (each assignment change).
    pub rebalances: IntCounter,
    pub assigned_partitions: IntGauge,
    /// Records between the next record to process and the end of the partition (its last
    /// stable offset under read_committed).
    pub consumer_lag: IntGaugeVec,
    /// Records between the group's committed offset and the end of the partition: what a
    /// restart would process again or for the first time.
    pub committed_lag: IntGaugeVec,
    pub restore_records: IntCounterVec,
    pub restore_remaining: IntGaugeVec,
    pub restore_seconds: Counter,
    pub store_size_bytes: IntGauge,
    pub store_entities: IntGaugeVec,
    /// Entity look-ups by result: `hit` (the state cache held it), `miss` (loaded from the
    /// store).
    pub cache_requests: IntCounterVec,
    pub cache_evictions: IntCounter,
    /// Retries of transient failures by kind (`batch`, `rewind`, `init_transactions`,
    /// `committed_offsets`, `restore`).
    pub retries: IntCounterVec,
    pub producer_queue_messages: IntGauge,
    pub producer_queue_bytes: IntGauge,
    /// Errors librdkafka reported, by client (`consumer`, `producer`) and error code.
    pub client_errors: IntCounterVec,
    /// 1 while the consumer has a connection to at least one broker, 0 while none answers.
    pub brokers_reachable: IntGauge,
    /// 1 while `/readyz` answers 200.
    pub ready: IntGauge,
    /// Entities whose changes are parked behind a dead-lettered change (`dlq_policy = "park"`).
    pub parked_entities: IntGaugeVec,
    /// Changes parked behind a dead-lettered change, and parked changes later processed.
    pub parked_changes: IntCounterVec,
    pub unparked_changes: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// Outgoing webhook subscriptions.
    pub webhooks: WebhookMetrics,
    /// The webhook ingress.
    pub ingress: IngressMetrics,
    /// SQL polling sources.
    pub polls: PollMetrics,
}

/// Registers families and remembers their names.
struct Families {
    registry: Registry,
    names: Vec<String>,
}

impl Families {
    fn add<C: Collector + Clone + 'static>(&mut self, collector: C) -> prometheus::Result<C> {
        for desc in collector.desc() {
            self.names.push(desc.fq_name.clone());
        }
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntGaugeVec> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn int_gauge(&mut self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.add(IntGauge::new(name, help)?)
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
    ) -> prometheus::Result<Histogram> {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets),
        )?)
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let mut families = Families {
            registry: Registry::new(),
            names: Vec::new(),
        };
        let f = &mut families;
        let metrics = Metrics {
            records: f.counter(
                "cdcflow_records_total",
                "Input records read, by routing result (routed or unrouted).",
                &["result"],
            )?,
            decisions: f.counter(
                "cdcflow_decisions_total",
                "Changes by version-gate decision: applied, duplicate, stale.",
                &["pipeline", "decision"],
            )?,
            skipped: f.counter(
                "cdcflow_skipped_records_total",
                "Valid records without a row change (tombstones, logical messages).",
                &["pipeline", "reason"],
            )?,
            events: f.counter(
                "cdcflow_events_total",
                "Business events produced, by CloudEvents type.",
                &["pipeline", "type"],
            )?,
            dlq_records: f.counter(
                "cdcflow_dlq_records_total",
                "Records sent to the dead-letter topic, by reason.",
                &["pipeline", "reason"],
            )?,
            audit_records: f.counter(
                "cdcflow_audit_records_total",
                "Audit records written for dropped changes.",
                &["pipeline"],
            )?,
            batches: f.counter(
                "cdcflow_batches_total",
                "Batches of cdcflow run by outcome: committed, retried, refused.",
                &["result"],
            )?,
            last_commit_seconds: f.add(Gauge::new(
                "cdcflow_last_commit_timestamp_seconds",
                "Unix time of the last committed batch.",
            )?)?,
            batch_phase_seconds: f.add(HistogramVec::new(
                HistogramOpts::new(
                    "cdcflow_batch_phase_seconds",
                    "Time per batch of cdcflow run in each phase: collect, process, deliver.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ]),
                &["phase"],
            )?)?,
            batch_records: f.histogram(
                "cdcflow_batch_size_records",
                "Input records per committed batch.",
                prometheus::exponential_buckets(1.0, 4.0, 10)?,
            )?,
            batch_bytes: f.histogram(
                "cdcflow_batch_size_bytes",
                "Input bytes (keys, values, headers) per committed batch.",
                prometheus::exponential_buckets(1024.0, 4.0, 10)?,
            )?,
            processing_latency: f.histogram(
                "cdcflow_processing_latency_seconds",
                "From a batch's first record fetched to the batch committed.",
                LATENCY_BUCKETS.to_vec(),
            )?,
            end_to_end_latency: f.add(HistogramVec::new(
                HistogramOpts::new(
                    "cdcflow_end_to_end_latency_seconds",
                    "From the source database's commit (source.ts_ms) to the applied change's \
                     batch committed, per applied change.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["pipeline"],
            )?)?,
            transactions: f.counter(
                "cdcflow_transactions_total",
                "Kafka transactions of exactly-once batches by outcome: committed, aborted.",
                &["result"],
            )?,
            commit_seconds: f.histogram(
                "cdcflow_commit_duration_seconds",
                "Time to commit a batch: the transaction commit, or the offset commit after \
                 the outputs were acknowledged.",
                LATENCY_BUCKETS.to_vec(),
            )?,
            partition_events: f.counter(
                "cdcflow_partition_events_total",
                "Input partitions by rebalance event: assigned, revoked, lost.",
                &["event"],
            )?,
            rebalances: f.add(IntCounter::new(
                "cdcflow_rebalances_total",
                "Assignment changes (partitions assigned, revoked or lost) of this instance.",
            )?)?,
            assigned_partitions: f.int_gauge(
                "cdcflow_assigned_partitions",
                "Input partitions currently assigned to this instance.",
            )?,
            consumer_lag: f.gauge(
                "cdcflow_consumer_lag_records",
                "Records from the next one to process to the end of the partition (its last \
                 stable offset), per assigned input partition.",
                &["topic", "partition"],
            )?,
            committed_lag: f.gauge(
                "cdcflow_consumer_committed_lag_records",
                "Records from the group's committed offset to the end of the partition, per \
                 assigned input partition.",
                &["topic", "partition"],
            )?,
            restore_records: f.counter(
                "cdcflow_restore_records_total",
                "Changelog records restored into the local store.",
                &["pipeline"],
            )?,
            restore_remaining: f.gauge(
                "cdcflow_restore_remaining_records",
                "Changelog records still to restore before the assigned partitions are ready.",
                &["pipeline"],
            )?,
            restore_seconds: f.add(Counter::new(
                "cdcflow_restore_seconds_total",
                "Time spent restoring state from changelogs.",
            )?)?,
            store_size_bytes: f.int_gauge(
                "cdcflow_store_size_bytes",
                "Size on disk of the local state store (database and write-ahead log).",
            )?,
            store_entities: f.gauge(
                "cdcflow_store_entities",
                "Entities in the local state store.",
                &["pipeline"],
            )?,
            cache_requests: f.counter(
                "cdcflow_cache_requests_total",
                "Entity state look-ups by result: hit (in the cache), miss (loaded from the \
                 store).",
                &["result"],
            )?,
            cache_evictions: f.add(IntCounter::new(
                "cdcflow_cache_evictions_total",
                "Entity states evicted from the state cache.",
            )?)?,
            retries: f.counter(
                "cdcflow_retries_total",
                "Retries of transient failures, by kind: batch, rewind, init_transactions, \
                 committed_offsets.",
                &["kind"],
            )?,
            producer_queue_messages: f.int_gauge(
                "cdcflow_producer_queue_messages",
                "Messages waiting in the producer's queue (librdkafka msg_cnt).",
            )?,
            producer_queue_bytes: f.int_gauge(
                "cdcflow_producer_queue_bytes",
                "Bytes waiting in the producer's queue (librdkafka msg_size).",
            )?,
            client_errors: f.counter(
                "cdcflow_kafka_client_errors_total",
                "Errors reported by librdkafka, by client and error code.",
                &["client", "code"],
            )?,
            brokers_reachable: f.int_gauge(
                "cdcflow_kafka_brokers_reachable",
                "1 while the consumer is connected to at least one broker, 0 otherwise.",
            )?,
            ready: f.int_gauge(
                "cdcflow_ready",
                "1 while /readyz answers 200: assigned partitions restored, a broker \
                 reachable, no batch being retried.",
            )?,
            parked_entities: f.gauge(
                "cdcflow_parked_entities",
                "Entities whose changes wait behind a dead-lettered change (dlq_policy park).",
                &["pipeline"],
            )?,
            parked_changes: f.counter(
                "cdcflow_parked_changes_total",
                "Changes parked behind a dead-lettered change of their entity.",
                &["pipeline"],
            )?,
            unparked_changes: f.counter(
                "cdcflow_unparked_changes_total",
                "Parked changes processed after their entity's dead-lettered change was \
                 replayed or discarded.",
                &["pipeline"],
            )?,
            build_info: f.gauge(
                "cdcflow_build_info",
                "Always 1; the labels name the build: version, git commit, compiler.",
                &["version", "git_sha", "rustc"],
            )?,
            webhooks: WebhookMetrics::register(f)?,
            ingress: IngressMetrics::register(f)?,
            polls: PollMetrics::register(f)?,
            registry: families.registry.clone(),
            names: Vec::new(),
        };
        let metrics = Metrics {
            names: families.names,
            ..metrics
        };
        metrics.brokers_reachable.set(1);
        metrics
            .build_info
            .with_label_values(&[BUILD_VERSION, BUILD_GIT_SHA, BUILD_RUSTC])
            .set(1);
        // Outcomes alerts compare exist at 0 from the start: `increase()` over a series that
        // appears with its first failure would miss that failure.
        for result in ["committed", "retried", "refused"] {
            metrics.batches.with_label_values(&[result]).reset();
        }
        for result in ["committed", "aborted"] {
            metrics.transactions.with_label_values(&[result]).reset();
        }
        for result in ["hit", "miss"] {
            metrics.cache_requests.with_label_values(&[result]).reset();
        }
        for result in ["routed", "unrouted"] {
            metrics.records.with_label_values(&[result]).reset();
        }
        Ok(metrics)
    }

    /// Every family's name, whether it has been observed yet or not.
    pub fn family_names(&self) -> &[String] {
        &self.names
    }

    /// Creates each pipeline's series at 0, so that dashboards and `rate()` see a pipeline
    /// before its first record.
    pub fn register_pipelines<'a>(&self, pipelines: impl IntoIterator<Item = &'a str>) {
        for pipeline in pipelines {
            for decision in ["applied", "duplicate", "stale"] {
                self.decisions
                    .with_label_values(&[pipeline, decision])
                    .reset();
            }
            self.parked_entities.with_label_values(&[pipeline]).set(0);
            self.restore_remaining.with_label_values(&[pipeline]).set(0);
            self.restore_records.with_label_values(&[pipeline]).reset();
        }
    }

    /// Brings `cdcflow_retries_total` up to the process's retry counts (see
    /// [`crate::runtime::retry_counts`]); only this writes the family.
    pub fn sync_retries(&self, counts: &[(&str, u64)]) {
        for (kind, count) in counts {
            let counter = self.retries.with_label_values(&[kind]);
            counter.inc_by(count.saturating_sub(counter.get()));
        }
    }

    /// The local store's size and entities.
    pub fn store_stats(&self, stats: &crate::store::StoreStats) {
        self.store_size_bytes
            .set(i64::try_from(stats.size_bytes).unwrap_or(i64::MAX));
        for (pipeline, entities) in &stats.entities {
            self.store_entities
                .with_label_values(&[pipeline])
                .set(i64::try_from(*entities).unwrap_or(i64::MAX));
        }
        for (pipeline, parked) in &stats.parked_entities {
            self.parked_entities
                .with_label_values(&[pipeline])
                .set(i64::try_from(*parked).unwrap_or(i64::MAX));
        }
    }

    /// Records how long a phase of one batch took.
    pub fn observe_phase(&self, phase: &str, started: Instant) {
        self.batch_phase_seconds
            .with_label_values(&[phase])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Adds a committed batch's counts; `committed_ms` is when it committed (Unix ms), for
    /// the end-to-end latency.
    pub fn add(&self, tally: &Tally, committed_ms: i64) {
        let routed = tally.records_read - tally.unrouted;
        self.records.with_label_values(&["routed"]).inc_by(routed);
        self.records
            .with_label_values(&["unrouted"])
            .inc_by(tally.unrouted);
        self.cache_requests
            .with_label_values(&["hit"])
            .inc_by(tally.cache_hits);
        self.cache_requests
            .with_label_values(&["miss"])
            .inc_by(tally.cache_misses);
        for counts in &tally.pipelines {
            let name = counts.name.as_str();
            for (decision, count) in &counts.decisions {
                self.decisions
                    .with_label_values(&[name, decision])
                    .inc_by(*count);
            }
            for (reason, count) in &counts.skipped {
                self.skipped
                    .with_label_values(&[name, reason])
                    .inc_by(*count);
            }
            for (event_type, count) in &counts.events {
                self.events
                    .with_label_values(&[name, event_type.as_str()])
                    .inc_by(*count);
            }
            for (reason, count) in &counts.dlq {
                self.dlq_records
                    .with_label_values(&[name, reason])
                    .inc_by(*count);
            }
            if counts.audit_records > 0 {
                self.audit_records
                    .with_label_values(&[name])
                    .inc_by(counts.audit_records);
            }
            if counts.parked_changes > 0 {
                self.parked_changes
                    .with_label_values(&[name])
                    .inc_by(counts.parked_changes);
            }
            if counts.unparked_changes > 0 {
                self.unparked_changes
                    .with_label_values(&[name])
                    .inc_by(counts.unparked_changes);
            }
            if !counts.source_ts_ms.is_empty() {
                let latency = self.end_to_end_latency.with_label_values(&[name]);
                for source_ms in &counts.source_ts_ms {
                    // A source clock ahead of ours is not a negative latency.
                    latency.observe((committed_ms - source_ms).max(0) as f64 / 1000.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    /// Every declared family is listed, and the exposition of a fresh registry carries the
    /// build and the zero-valued outcome series alerts rely on.
    #[test]
    fn families_are_listed_and_outcomes_start_at_zero() {
        let metrics = Metrics::new().unwrap();
        let names = metrics.family_names();
        for name in [
            "cdcflow_consumer_lag_records",
            "cdcflow_end_to_end_latency_seconds",
            "cdcflow_build_info",
            "cdcflow_parked_entities",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
        metrics.register_pipelines(["orders"]);
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&metrics.registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains(r#"cdcflow_batches_total{result="retried"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cdcflow_decisions_total{decision="applied",pipeline="orders"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(&format!(r#"git_sha="{BUILD_GIT_SHA}""#)),
            "{text}"
        );
    }

    /// The end-to-end latency is observed per applied change, from its source commit time to
    /// the batch's commit; a source clock ahead of ours counts as zero.
    #[test]
    fn end_to_end_latency_is_observed_per_applied_change() {
        let metrics = Metrics::new().unwrap();
        let mut tally = Tally::default();
        let counts = tally.pipeline(0, "orders");
        counts.source_ts_ms.extend([1_000, 9_000, 12_000]);
        metrics.add(&tally, 10_000);
        let histogram = metrics.end_to_end_latency.with_label_values(&["orders"]);
        assert_eq!(histogram.get_sample_count(), 3);
        assert!((histogram.get_sample_sum() - 10.0).abs() < 1e-9);
    }
}
