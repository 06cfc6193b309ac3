//! The consume loop: collect a batch (bounded by records, bytes and time), process it in the
//! lanes against the staged state, commit it with the configured protocol, then settle: the
//! committed states go behind to the store, a failed batch is rewound and retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};

use super::commit::{BatchFailure, Committer, is_fatal_consumer_error};
use super::error::ServiceError;
use super::rebalance::{AssignmentEvent, RebalanceContext, SharedWriteBehind, lock};
use super::records::{batch_span, next_offsets, raw_record, record_bytes};
use super::report::{Reporter, TopicPartition};
use super::service::ServiceOptions;
use crate::cdc::RawRecord;
use crate::config::DeliveryConfig;
use crate::metrics::Tally;
use crate::runtime::{
    BatchOutcome, BatchProcessor, Jitter, Lanes, Refusals, RetryLimit, RetryPolicy,
    SharedPipelines, Shutdown, now_ms,
};
use crate::store::{Checkpoint, StateStore};

/// Consecutive failed attempts at one batch, while the brokers are reachable, before the
/// service gives up: a batch that can never commit must stop the process loudly, not loop.
/// Attempts while no broker is reachable do not count: an outage is waited out.
pub(super) const MAX_BATCH_ATTEMPTS: u32 = 5;

/// The wait before retrying a failed batch.
pub(super) const BATCH_RETRY: RetryPolicy = RetryPolicy::new(
    Duration::from_millis(200),
    Duration::from_secs(10),
    RetryLimit::Forever,
)
.counted_as("batch");

/// A batch processed against the staged state, before its commit.
struct Processed {
    outcome: BatchOutcome,
    tally: Tally,
    /// The consumed offsets to commit.
    offsets: TopicPartitionList,
    records: usize,
    bytes: usize,
    /// When the batch's first record was fetched.
    first_fetched: Instant,
}

/// What one poll loop collected.
#[derive(Default)]
struct Collected {
    records: Vec<RawRecord>,
    bytes: usize,
    first_fetched: Option<Instant>,
    /// Partitions revoked while collecting (collection stops at a revocation).
    revoked: Vec<TopicPartition>,
}

pub(super) struct Worker<'a, S: StateStore> {
    pub options: &'a ServiceOptions,
    pub pipelines: &'a SharedPipelines,
    pub store: &'a Arc<S>,
    pub runtime: &'a tokio::runtime::Handle,
    pub consumer: &'a BaseConsumer<RebalanceContext<S>>,
    pub committer: Committer<'a, S>,
    pub reporter: &'a Reporter,
    pub shutdown: &'a Shutdown,
    pub lanes: Lanes,
    pub write_behind: SharedWriteBehind<S>,
    /// Records of the current batch whose outputs were refused for their size.
    pub refusals: Refusals,
    pub tally: Tally,
    pub last_report: Instant,
    /// Consecutive failed attempts at the current batch (counted while brokers are up).
    pub attempts: u32,
    /// Failed attempts in a row, counted or not: they set the backoff.
    pub failures: u32,
    pub jitter: Jitter,
    /// When the last batch began to collect: batches start at most once per
    /// `batch_max_wait`, like Kafka Streams' `commit.interval.ms`.
    pub last_batch_start: Option<Instant>,
}

impl<S: StateStore> Worker<'_, S> {
    /// The loop: collect a batch, process it against the staged state, commit it, settle.
    /// (Pipelining the commit of batch N with the processing of N+1 was measured: no gain on
    /// a CPU-bound 2-core machine, and ~50 MiB more peak memory for the second batch.)
    pub(super) fn run(&mut self) -> Result<(), ServiceError> {
        loop {
            self.options.health.beat();
            self.check_fatal_errors()?;
            let stopping = self.shutdown.is_requested();
            let Collected {
                mut records,
                bytes,
                first_fetched,
                revoked,
            } = if stopping {
                Collected::default()
            } else {
                let started = Instant::now();
                let collected = self.collect_batch()?;
                if !collected.records.is_empty() {
                    self.options.metrics.observe_phase("collect", started);
                }
                collected
            };
            if !revoked.is_empty() {
                self.partitions_revoked(&mut records, &revoked)?;
            }
            if stopping {
                self.options.health.set_stopping();
                return Ok(());
            }
            if records.is_empty() {
                continue;
            }
            if self.lanes.over_capacity() {
                // Entries are evicted only once the store holds every committed state, or a
                // later load would read older state.
                lock(&self.write_behind).flush()?;
                let evicted = self.lanes.evict();
                self.options.metrics.cache_evictions.inc_by(evicted as u64);
            }
            // Whatever the batch logs (a retry, a refusal) carries its pipelines, partitions
            // and offsets.
            let span = batch_span(self.pipelines, &records);
            let _in_batch = span.enter();
            let started = Instant::now();
            let first_fetched = first_fetched.unwrap_or(started);
            let processed = match self.process(records, bytes, first_fetched) {
                Ok(processed) => processed,
                Err(failure) => {
                    self.recover(failure)?;
                    continue;
                }
            };
            self.options.metrics.observe_phase("process", started);
            let started = Instant::now();
            let delivered = self
                .committer
                .deliver(&processed.outcome, &processed.offsets);
            self.options.metrics.observe_phase("deliver", started);
            self.settle(processed, delivered)?;
        }
    }

    /// A fatal error of either client (reported by librdkafka outside any call of ours)
    /// stops the service with its reason.
    fn check_fatal_errors(&self) -> Result<(), ServiceError> {
        if let Some((code, reason)) = self.consumer.client().fatal_error() {
            return Err(ServiceError::FatalClient {
                client: "consumer",
                code,
                reason,
            });
        }
        if let Some((code, reason)) = self.committer.producer.client().fatal_error() {
            return Err(match code {
                rdkafka::types::RDKafkaErrorCode::Fenced
                | rdkafka::types::RDKafkaErrorCode::ProducerFenced => {
                    ServiceError::Fenced(self.committer.transactional_id.to_owned())
                }
                code => ServiceError::FatalClient {
                    client: "producer",
                    code,
                    reason,
                },
            });
        }
        Ok(())
    }

    /// Applies a batch's commit result: the bookkeeping of a committed batch, or the recovery
    /// of a failed one.
    fn settle(
        &mut self,
        processed: Processed,
        delivered: Result<Vec<Checkpoint>, BatchFailure>,
    ) -> Result<(), ServiceError> {
        match self.finish_batch(processed, delivered) {
            Ok(()) => {
                self.attempts = 0;
                self.failures = 0;
                self.reporter.batch_committed(self.tally.records_read);
                self.report_progress();
                Ok(())
            }
            Err(failure) => self.recover(failure),
        }
    }

    fn report_progress(&mut self) {
        if self.last_report.elapsed() > Duration::from_secs(10) {
            self.last_report = Instant::now();
            tracing::info!(
                records = self.tally.records_read,
                applied = self.tally.decisions("applied"),
                duplicate = self.tally.decisions("duplicate"),
                stale = self.tally.decisions("stale"),
                events = self.tally.events_total(),
                dlq = self.tally.dlq_total(),
                "progress"
            );
        }
    }

    /// Polls until the batch is full (records or bytes), its time is up, shutdown is asked
    /// for, or partitions are revoked. At-least-once also closes a batch as soon as the
    /// records already fetched are drained: its batches cost no transaction, so waiting to fill
    /// one only adds latency. Exactly-once waits up to `batch_max_wait` to fill, since every
    /// batch pays a commit of a few broker round trips.
    fn collect_batch(&mut self) -> Result<Collected, ServiceError> {
        let kafka = &self.options.kafka;
        let started = Instant::now();
        // Exactly-once batches close on a cadence of one per batch_max_wait, counted from the
        // previous batch's start: processing and committing a batch use up its wait instead of
        // adding to it. A batch that starts late (its predecessor took longer than the wait)
        // takes what is already fetched and closes, so a backlog is worked off in batches as
        // large as under load, never one wait per batch. At-least-once always drains.
        let behind = self
            .last_batch_start
            .is_some_and(|previous| started >= previous + kafka.batch_max_wait);
        let deadline = match self.last_batch_start {
            Some(previous) if !behind => previous + kafka.batch_max_wait,
            _ => started + kafka.batch_max_wait,
        };
        self.last_batch_start = Some(started);
        let drain_only = kafka.delivery == DeliveryConfig::AtLeastOnce || behind;
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut first_fetched = None;
        let mut revoked = Vec::new();
        while records.len() < kafka.batch_max_records
            && bytes < kafka.batch_max_bytes
            && !self.shutdown.is_requested()
        {
            let now = Instant::now();
            if now >= deadline && !records.is_empty() {
                break;
            }
            let wait = if drain_only && !records.is_empty() {
                Duration::ZERO
            } else {
                deadline
                    .saturating_duration_since(now)
                    .clamp(Duration::from_millis(1), Duration::from_millis(100))
            };
            let drained = match self.consumer.poll(wait) {
                Some(Ok(message)) => {
                    first_fetched.get_or_insert_with(Instant::now);
                    let record = raw_record(&message);
                    bytes += record_bytes(&record);
                    records.push(record);
                    false
                }
                Some(Err(error)) if is_fatal_consumer_error(&error) => {
                    return Err(ServiceError::Kafka {
                        context: "the consumer cannot go on".to_owned(),
                        source: error,
                    });
                }
                Some(Err(error)) => {
                    self.reporter.consumer_error(&error);
                    false
                }
                None => true,
            };
            for event in self.consumer.context().take() {
                match event {
                    AssignmentEvent::Failed(failure) => return Err(failure),
                    AssignmentEvent::Revoked(partitions) => revoked.extend(partitions),
                }
            }
            // Revocations a poll reported are taken before the batch closes, so the caller
            // sees them together with the records.
            if !revoked.is_empty()
                || (now >= deadline && records.is_empty())
                || (drain_only && drained && !records.is_empty())
            {
                break;
            }
        }
        Ok(Collected {
            records,
            bytes,
            first_fetched,
            revoked,
        })
    }

    /// Decodes and applies a batch against the staged state.
    fn process(
        &mut self,
        records: Vec<RawRecord>,
        bytes: usize,
        first_fetched: Instant,
    ) -> Result<Processed, BatchFailure> {
        let offsets = next_offsets(&records);
        let record_count = records.len();
        let processor = BatchProcessor::new(self.pipelines).with_refusals(&self.refusals);
        let (outcome, tally) = self
            .lanes
            .process(
                records,
                &processor,
                self.store.as_ref(),
                self.runtime,
                now_ms(),
            )
            .map_err(|error| BatchFailure::Retry(format!("state store: {error}")))?;
        Ok(Processed {
            outcome,
            tally,
            offsets,
            records: record_count,
            bytes,
            first_fetched,
        })
    }

    /// After a batch's commit: on success its states go behind to the store; on failure the
    /// staged state is dropped and the refusals learnt.
    fn finish_batch(
        &mut self,
        processed: Processed,
        delivered: Result<Vec<Checkpoint>, BatchFailure>,
    ) -> Result<(), BatchFailure> {
        let Processed {
            outcome,
            tally,
            offsets,
            records: record_count,
            bytes,
            first_fetched,
        } = processed;
        let (changelog, retry) = match delivered {
            Ok(changelog) => (changelog, None),
            Err(BatchFailure::OffsetsUncommitted { reason, changelog }) => {
                (changelog, Some(reason))
            }
            Err(failure) => {
                // Staged state of the failed batch must not be seen by the next attempt; the
                // committed states still only in memory go to the store first, or the retry
                // would gate against older ones.
                lock(&self.write_behind)
                    .flush()
                    .map_err(|error| BatchFailure::Fatal(error.into()))?;
                self.lanes.clear();
                if let BatchFailure::Refused(refused) = &failure {
                    self.learn_refusals(&outcome, refused)
                        .map_err(BatchFailure::Fatal)?;
                }
                return Err(failure);
            }
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let next: Vec<String> = offsets
                .elements()
                .iter()
                .map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset()))
                .collect();
            tracing::debug!(
                ?next,
                records = record_count,
                uncommitted = retry.is_some(),
                "batch delivered"
            );
        }
        self.refusals.retain(|(_, origin), _| {
            offsets
                .find_partition(&origin.topic, origin.partition)
                .is_none_or(|next| match next.offset() {
                    Offset::Offset(next) => origin.offset >= next,
                    _ => true,
                })
        });
        let parking_changed = tally.pipelines.iter().any(|p| p.parking_transitions > 0);
        let mut write_behind = lock(&self.write_behind);
        write_behind
            .committed(outcome.writes, changelog, record_count)
            .map_err(|error| BatchFailure::Fatal(error.into()))?;
        // The parked-entity gauge counts the store: an entity parked or released is saved now,
        // not at the end of the write-behind window.
        if parking_changed {
            write_behind
                .save_soon()
                .map_err(|error| BatchFailure::Fatal(error.into()))?;
        }
        drop(write_behind);
        // Outputs were delivered either way: they count.
        let metrics = &self.options.metrics;
        metrics.add(&tally, now_ms());
        metrics.batch_records.observe(record_count as f64);
        metrics.batch_bytes.observe(bytes as f64);
        metrics
            .processing_latency
            .observe(first_fetched.elapsed().as_secs_f64());
        if retry.is_none() {
            self.reporter.offsets_committed(&offsets);
        }
        self.tally.merge(tally);
        match retry {
            // The states are kept (above); the retry finds its records already applied.
            Some(reason) => Err(BatchFailure::Retry(reason)),
            None => Ok(()),
        }
    }
}
