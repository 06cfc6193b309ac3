//! The consume loop: collect a batch (bounded by records, bytes and time), process it in the
//! lanes against the staged state, commit it with the configured protocol, then settle: the
//! committed states go behind to the store, a failed batch is rewound and retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};

use super::commit::{BatchFailure, Committer, is_fatal_consumer_error};
use super::error::{ServiceError, kafka_error};
use super::produce::RefusedOutput;
use super::rebalance::{
    AssignmentEvent, RebalanceContext, SharedWriteBehind, committed_positions,
    first_partition_error, lock,
};
use super::report::{Reporter, TopicPartition};
use super::service::ServiceOptions;
use crate::cdc::{Header, RawRecord};
use crate::config::DeliveryConfig;
use crate::engine::{OutputKind, RecordFailure, Stage};
use crate::metrics::Tally;
use crate::runtime::{
    Attempt, BatchOutcome, BatchProcessor, Jitter, Lanes, OutputOrigin, Refusal, Refusals,
    RetryError, RetryLimit, RetryPolicy, SharedPipelines, Shutdown, now_ms, retry,
};
use crate::store::{Checkpoint, StateStore};

/// Consecutive failed attempts at one batch, while the brokers are reachable, before the
/// service gives up: a batch that can never commit must stop the process loudly, not loop.
/// Attempts while no broker is reachable do not count: an outage is waited out.
const MAX_BATCH_ATTEMPTS: u32 = 5;

/// The wait before retrying a failed batch.
const BATCH_RETRY: RetryPolicy = RetryPolicy::new(
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

    /// Drops what the batch held of revoked partitions; what was committed goes to the store,
    /// so a later reassignment restores on top of it; cached state of partitions another
    /// instance may now change is dropped.
    fn partitions_revoked(
        &mut self,
        records: &mut Vec<RawRecord>,
        revoked: &[TopicPartition],
    ) -> Result<(), ServiceError> {
        let is_revoked = |topic: &str, partition: i32| {
            revoked
                .iter()
                .any(|tp| tp.topic == topic && tp.partition == partition)
        };
        records.retain(|record| !is_revoked(&record.topic, record.partition));
        self.refusals
            .retain(|(_, origin), _| !is_revoked(&origin.topic, origin.partition));
        lock(&self.write_behind).flush()?;
        self.lanes.clear();
        // A batch being retried may have belonged to them; the next one tells.
        self.options.health.set_failing(false);
        self.attempts = 0;
        self.failures = 0;
        // Revoked and assigned back within one poll: the assignment positioned the partition
        // at its committed offset, but the poll may already have handed out (and the batch
        // just dropped) records from there. Position it again so none is skipped.
        let assignment = self
            .consumer
            .assignment()
            .map_err(kafka_error("cannot read the assignment"))?;
        let mut returned = TopicPartitionList::new();
        for element in assignment.elements() {
            if is_revoked(element.topic(), element.partition()) {
                returned.add_partition(element.topic(), element.partition());
            }
        }
        if returned.count() > 0 {
            tracing::info!(
                partitions = returned.count(),
                "partitions came back in the same poll; repositioning them"
            );
            self.seek_committed(&returned)?;
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

    /// Rewinds after a failed batch, or stops for a fatal failure or too many attempts.
    fn recover(&mut self, failure: BatchFailure) -> Result<(), ServiceError> {
        match failure {
            BatchFailure::Fatal(error) => Err(error),
            // Each refusal sends one more record (or a smaller DLQ record) to the DLQ, so
            // these retries end; they do not count against the attempts.
            BatchFailure::Refused(refused) => {
                self.reporter.batch_refused(refused.len());
                self.rewind()
            }
            BatchFailure::Retry(reason) | BatchFailure::OffsetsUncommitted { reason, .. } => {
                let counted = self.options.health.brokers_reachable();
                if counted {
                    self.attempts += 1;
                }
                self.failures += 1;
                self.reporter.batch_retried(&reason, self.failures, counted);
                if self.attempts >= MAX_BATCH_ATTEMPTS {
                    return Err(ServiceError::BatchKeepsFailing {
                        attempts: self.attempts,
                        reason,
                    });
                }
                self.rewind()?;
                let wait = BATCH_RETRY.delay(self.failures - 1, &mut self.jitter);
                // A stop request ends the wait; the loop then stops with nothing committed.
                let _ = self.shutdown.sleep(wait);
                Ok(())
            }
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
        lock(&self.write_behind)
            .committed(outcome.writes, changelog, record_count)
            .map_err(|error| BatchFailure::Fatal(error.into()))?;
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

    /// Remembers which records' outputs were refused, so the next attempt sends them to the
    /// DLQ; a DLQ record refused once is sent again without the original key and value, and
    /// refused again it stops the service (the DLQ topic cannot take even the headers).
    fn learn_refusals(
        &mut self,
        outcome: &BatchOutcome,
        refused: &[RefusedOutput],
    ) -> Result<(), ServiceError> {
        for RefusedOutput { index, error } in refused {
            let (Some(output), Some(OutputOrigin { pipeline, origin })) = (
                outcome.outputs.get(*index),
                outcome.output_origins.get(*index),
            ) else {
                // Refused retries do not count against the attempts: never loop on one that
                // cannot be attributed.
                return Err(ServiceError::UnattributableRefusal { index: *index });
            };
            let topic = &output.topic;
            let size = output.size();
            let refusal = self
                .refusals
                .entry((*pipeline, origin.clone()))
                .or_insert(Refusal {
                    failure: None,
                    strip_dead_letter: false,
                });
            match output.kind {
                OutputKind::DeadLetter => {
                    if refusal.strip_dead_letter {
                        return Err(ServiceError::DeadLetterRefused {
                            topic: topic.clone(),
                            origin: origin.clone(),
                            size,
                            code: *error,
                        });
                    }
                    refusal.strip_dead_letter = true;
                }
                OutputKind::Event | OutputKind::Audit => {
                    tracing::warn!(%origin, %topic, size, %error, "output refused as too large; the record goes to the DLQ");
                    refusal.failure.get_or_insert_with(|| RecordFailure {
                        stage: Stage::Output,
                        reason: "output_refused",
                        message: format!(
                            "`{topic}` refused this record's {} ({size} bytes): {error}; \
                             raise max.message.bytes on `{topic}` (and the producer's \
                             message.max.bytes) or set limits.max_output_bytes below them",
                            output.kind.as_str()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Positions every assigned partition at its committed offset, after dropping the staged
    /// state. While no broker is reachable the rewind is retried, not fatal: an outage is
    /// waited out with readiness false.
    fn rewind(&mut self) -> Result<(), ServiceError> {
        lock(&self.write_behind).flush()?;
        self.lanes.clear();
        let health = Arc::clone(&self.options.health);
        let policy = RetryPolicy::new(
            Duration::from_millis(500),
            Duration::from_secs(10),
            RetryLimit::Forever,
        )
        .counted_as("rewind");
        let rewound = retry(
            "rewinding to the committed offsets",
            policy,
            self.shutdown,
            || {
                // Waiting out an outage is progress, not a stuck loop.
                health.beat();
                let assignment = self
                    .consumer
                    .assignment()
                    .map_err(kafka_error("cannot read the assignment"))
                    .map_err(Attempt::Permanent)?;
                self.seek_committed(&assignment).map_err(|error| {
                    if health.brokers_reachable() {
                        Attempt::Permanent(error)
                    } else {
                        Attempt::Transient(error)
                    }
                })
            },
        );
        match rewound {
            Ok(()) => Ok(()),
            // Nothing of the failed batch was committed; the loop stops next.
            Err(RetryError::Stopped) => Ok(()),
            // A rewind that does not land would let the next commit skip the aborted batch:
            // fatal, and a restart resumes from the committed offsets.
            Err(RetryError::Failed { error, .. }) => Err(error),
        }
    }

    /// Positions `partitions` at their (stable) committed offsets.
    fn seek_committed(&self, partitions: &TopicPartitionList) -> Result<(), ServiceError> {
        if partitions.count() == 0 {
            return Ok(());
        }
        let positioned = committed_positions(
            self.consumer,
            partitions,
            self.options.kafka.transaction_timeout * 3,
            self.shutdown,
        )?;
        let sought = self
            .consumer
            .seek_partitions(positioned, Duration::from_secs(10))
            .map_err(kafka_error("cannot rewind to the committed offsets"))?;
        first_partition_error(&sought, "cannot rewind to the committed offset")
    }
}

/// The span of one batch: the pipelines that read it and, per partition, its first and last
/// offsets (`orders/0@120..359`).
fn batch_span(pipelines: &SharedPipelines, records: &[RawRecord]) -> tracing::Span {
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
fn next_offsets(records: &[RawRecord]) -> TopicPartitionList {
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
fn record_bytes(record: &RawRecord) -> usize {
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
