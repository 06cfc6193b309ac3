//! Every metric family in one place, and the per-run [`Tally`] the hot path counts into.
//!
//! The hot path never touches Prometheus label maps: it counts into a [`Tally`] (plain
//! integers per pipeline), which is added to the registry once per batch.

use std::collections::BTreeMap;

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Counts of one pipeline.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PipelineTally {
    pub name: String,
    /// Decisions by kind: `applied`, `duplicate`, `stale`.
    pub decisions: BTreeMap<&'static str, u64>,
    /// Skipped records by reason: `tombstone`, `logical_message`.
    pub skipped: BTreeMap<&'static str, u64>,
    /// Business events by CloudEvents type.
    pub events: BTreeMap<String, u64>,
    /// DLQ records by reason.
    pub dlq: BTreeMap<&'static str, u64>,
    pub audit_records: u64,
}

impl PipelineTally {
    pub fn count_decision(&mut self, decision: &'static str) {
        *self.decisions.entry(decision).or_default() += 1;
    }

    pub fn count_skip(&mut self, reason: &'static str) {
        *self.skipped.entry(reason).or_default() += 1;
    }

    pub fn count_dlq(&mut self, reason: &'static str) {
        *self.dlq.entry(reason).or_default() += 1;
    }

    pub fn count_event(&mut self, event_type: &str) {
        match self.events.get_mut(event_type) {
            Some(count) => *count += 1,
            None => {
                self.events.insert(event_type.to_owned(), 1);
            }
        }
    }

    pub fn dlq_total(&self) -> u64 {
        self.dlq.values().sum()
    }

    pub fn events_total(&self) -> u64 {
        self.events.values().sum()
    }
}

/// Counts of a run (or of one batch).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub records_read: u64,
    /// Records whose topic no pipeline reads.
    pub unrouted: u64,
    /// Replay input lines that were not kcat records.
    pub malformed_lines: u64,
    pub pipelines: Vec<PipelineTally>,
}

impl Tally {
    /// The counts of pipeline `index`, created on first use.
    pub fn pipeline(&mut self, index: usize, name: &str) -> &mut PipelineTally {
        if self.pipelines.len() <= index {
            self.pipelines
                .resize_with(index + 1, PipelineTally::default);
        }
        let counts = &mut self.pipelines[index];
        if counts.name.is_empty() {
            counts.name = name.to_owned();
        }
        counts
    }

    /// Totals of one decision kind across pipelines.
    pub fn decisions(&self, decision: &str) -> u64 {
        self.pipelines
            .iter()
            .filter_map(|p| p.decisions.get(decision))
            .sum()
    }

    pub fn events_total(&self) -> u64 {
        self.pipelines.iter().map(PipelineTally::events_total).sum()
    }

    pub fn dlq_total(&self) -> u64 {
        self.pipelines.iter().map(PipelineTally::dlq_total).sum()
    }

    /// Adds another tally's counts (of the same pipelines) to this one.
    pub fn merge(&mut self, other: Tally) {
        self.records_read += other.records_read;
        self.unrouted += other.unrouted;
        self.malformed_lines += other.malformed_lines;
        for (index, counts) in other.pipelines.into_iter().enumerate() {
            let target = self.pipeline(index, &counts.name);
            for (key, value) in counts.decisions {
                *target.decisions.entry(key).or_default() += value;
            }
            for (key, value) in counts.skipped {
                *target.skipped.entry(key).or_default() += value;
            }
            for (key, value) in counts.events {
                *target.events.entry(key).or_default() += value;
            }
            for (key, value) in counts.dlq {
                *target.dlq.entry(key).or_default() += value;
            }
            target.audit_records += counts.audit_records;
        }
    }
}

/// The Prometheus families cdcflow exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
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
    /// Partitions of `cdcflow run` by rebalance event: `assigned`, `revoked`, `lost` (taken
    /// away without a clean revoke: a session timeout, a broker outage).
    pub partition_events: IntCounterVec,
    /// Errors librdkafka reported, by client (`consumer`, `producer`) and error code.
    pub client_errors: IntCounterVec,
    /// 1 while the consumer has a connection to at least one broker, 0 while none answers.
    pub brokers_reachable: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(vec.clone()))?;
                Ok(vec)
            };
        Ok(Metrics {
            records: counter(
                "cdcflow_records_total",
                "Input records read, by routing result (routed or unrouted).",
                &["result"],
            )?,
            decisions: counter(
                "cdcflow_decisions_total",
                "Changes by version-gate decision: applied, duplicate, stale.",
                &["pipeline", "decision"],
            )?,
            skipped: counter(
                "cdcflow_skipped_records_total",
                "Valid records without a row change (tombstones, logical messages).",
                &["pipeline", "reason"],
            )?,
            events: counter(
                "cdcflow_events_total",
                "Business events produced, by CloudEvents type.",
                &["pipeline", "type"],
            )?,
            dlq_records: counter(
                "cdcflow_dlq_records_total",
                "Records sent to the dead-letter topic, by reason.",
                &["pipeline", "reason"],
            )?,
            audit_records: counter(
                "cdcflow_audit_records_total",
                "Audit records written for dropped changes.",
                &["pipeline"],
            )?,
            batches: counter(
                "cdcflow_batches_total",
                "Batches of cdcflow run by outcome: committed, retried, refused.",
                &["result"],
            )?,
            last_commit_seconds: {
                let gauge = Gauge::new(
                    "cdcflow_last_commit_timestamp_seconds",
                    "Unix time of the last committed batch.",
                )?;
                registry.register(Box::new(gauge.clone()))?;
                gauge
            },
            batch_phase_seconds: {
                let histogram = HistogramVec::new(
                    HistogramOpts::new(
                        "cdcflow_batch_phase_seconds",
                        "Time per batch of cdcflow run in each phase: collect, process, deliver.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                    ]),
                    &["phase"],
                )?;
                registry.register(Box::new(histogram.clone()))?;
                histogram
            },
            partition_events: counter(
                "cdcflow_partition_events_total",
                "Input partitions by rebalance event: assigned, revoked, lost.",
                &["event"],
            )?,
            client_errors: counter(
                "cdcflow_kafka_client_errors_total",
                "Errors reported by librdkafka, by client and error code.",
                &["client", "code"],
            )?,
            brokers_reachable: {
                let gauge = IntGauge::new(
                    "cdcflow_kafka_brokers_reachable",
                    "1 while the consumer is connected to at least one broker, 0 otherwise.",
                )?;
                gauge.set(1);
                registry.register(Box::new(gauge.clone()))?;
                gauge
            },
            registry,
        })
    }

    /// Records how long a phase of one batch took.
    pub fn observe_phase(&self, phase: &str, started: std::time::Instant) {
        self.batch_phase_seconds
            .with_label_values(&[phase])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Adds a batch's counts.
    pub fn add(&self, tally: &Tally) {
        let routed = tally.records_read - tally.unrouted;
        self.records.with_label_values(&["routed"]).inc_by(routed);
        self.records
            .with_label_values(&["unrouted"])
            .inc_by(tally.unrouted);
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
        }
    }
}
