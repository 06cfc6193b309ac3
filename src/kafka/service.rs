//! The consume-process-produce loop of `cdcflow run`.
//!
//! Exactly-once, per batch: process (staging state in the cache), then one transaction holds
//! the outputs, DLQ and audit records, the changelog records and the consumed offsets (sent
//! with fresh group metadata). Only after the commit does the state count as applied: it goes
//! to the unsaved set that the store writes behind, in large batches, with the changelog
//! checkpoint. An abort discards the staged state and rewinds to the committed offsets.
//!
//! At-least-once, per batch: outputs are produced and delivered, then changelog records, then
//! offsets are committed. A crash can repeat an output (same event id), never lose one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::admin::{self, Topology};
use super::restore::ChangelogRestorer;
use super::{ServiceError, clients, kafka_error};
use crate::cdc::{Header, RawRecord};
use crate::config::{DeliveryConfig, KafkaConfig};
use crate::engine::{OutputKind, OutputRecord, RecordFailure, Stage};
use crate::metrics::{Metrics, Tally};
use crate::runtime::{
    BatchOutcome, BatchProcessor, Health, Refusal, Refusals, SharedPipelines, StateCache, now_ms,
};
use crate::store::{Checkpoint, StateStore, StateWrite, StoreError, changelog};

/// Settings of the service beyond the pipelines, and what it reports to.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub kafka: KafkaConfig,
    pub cache_entries: usize,
    pub flush_records: usize,
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

/// Consecutive aborted attempts at one batch before the service gives up: a batch that can
/// never commit must stop the process loudly, not loop.
const MAX_BATCH_ATTEMPTS: u32 = 5;

/// What the rebalance callback tells the loop.
#[derive(Debug)]
enum AssignmentEvent {
    Revoked(Vec<(String, i32)>),
    Failed(String),
}

/// The store save running in the background, if any: the worker writes committed state
/// behind, and a restore must not start before it lands (it could overwrite restored state
/// with older state of a partition that came back).
#[derive(Clone)]
struct SaveInFlight {
    handle: Arc<Mutex<Option<SaveTask>>>,
    runtime: tokio::runtime::Handle,
}

type SaveTask = tokio::task::JoinHandle<Result<(), StoreError>>;

impl SaveInFlight {
    fn new(runtime: tokio::runtime::Handle) -> SaveInFlight {
        SaveInFlight {
            handle: Arc::default(),
            runtime,
        }
    }

    fn start<S: StateStore>(
        &self,
        store: &Arc<S>,
        writes: Vec<StateWrite>,
        checkpoints: Vec<Checkpoint>,
    ) {
        let store = Arc::clone(store);
        let task = self
            .runtime
            .spawn(async move { store.save(writes, checkpoints).await });
        *self.handle.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
    }

    /// Waits for the save in flight, if any.
    fn finish(&self) -> Result<(), ServiceError> {
        let task = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(task) = task else {
            return Ok(());
        };
        self.runtime
            .block_on(task)
            .map_err(|error| {
                ServiceError::Topology(format!("the background store save failed: {error}"))
            })?
            .map_err(ServiceError::from)
    }
}

struct RebalanceContext<S> {
    restorer: ChangelogRestorer<S>,
    health: Arc<Health>,
    saving: SaveInFlight,
    events: Mutex<Vec<AssignmentEvent>>,
    /// How long to wait for committed offsets to become stable.
    patience: Duration,
}

impl<S> RebalanceContext<S> {
    fn push(&self, event: AssignmentEvent) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    fn take(&self) -> Vec<AssignmentEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<S: StateStore> RebalanceContext<S> {
    /// Takes over assigned partitions: stable offsets, then their state, then the assignment.
    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &TopicPartitionList,
        list: &[(String, i32)],
        cooperative: bool,
    ) -> Result<(), String> {
        self.saving
            .finish()
            .map_err(|failure| failure.to_string())?;
        // Stable committed offsets first: they wait for a transaction the partitions' previous
        // owner still has open (a zombie may yet commit it), and only once it is resolved does
        // the changelog hold every state those offsets stand for.
        let positioned = committed_positions(consumer, partitions, self.patience)
            .map_err(|failure| failure.to_string())?;
        self.restorer
            .restore(list)
            .map_err(|failure| failure.to_string())?;
        let result = if cooperative {
            consumer.incremental_assign(&positioned)
        } else {
            consumer.assign(&positioned)
        };
        result.map_err(|failure| format!("cannot assign {list:?}: {failure}"))
    }
}

impl<S: StateStore> ClientContext for RebalanceContext<S> {}

impl<S: StateStore> ConsumerContext for RebalanceContext<S> {
    /// Assign: read the partitions' stable committed offsets, restore their state from the
    /// changelog, then position each partition at its committed offset explicitly (prefetched
    /// records of an earlier assignment must not be handed out again). Revoke: tell the loop,
    /// which drops what it holds of them.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let list: Vec<(String, i32)> = partitions
            .elements()
            .iter()
            .map(|element| (element.topic().to_owned(), element.partition()))
            .collect();
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(partitions = ?list, "partitions assigned; restoring their state");
                self.health.set_restoring(true);
                let assigned = self.assign(consumer, partitions, &list, cooperative);
                self.health.set_restoring(false);
                match assigned {
                    Ok(()) => self.health.set_joined(true),
                    Err(failure) => self.push(AssignmentEvent::Failed(failure)),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?list, lost = consumer.assignment_lost(), "partitions revoked");
                self.push(AssignmentEvent::Revoked(list));
                let result = if cooperative {
                    consumer.incremental_unassign(partitions)
                } else {
                    consumer.unassign()
                };
                if let Err(failure) = result {
                    tracing::warn!(%failure, "unassign failed");
                }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; dropping the assignment");
                let _ = consumer.unassign();
                self.push(AssignmentEvent::Revoked(list));
            }
        }
    }
}

/// The partitions with their committed offsets (or the beginning for a new group).
fn committed_positions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &TopicPartitionList,
    patience: Duration,
) -> Result<TopicPartitionList, ServiceError> {
    // Offsets committed by a transaction still open (a dead or stopped instance's) are
    // unstable: the broker withholds them until that transaction ends, at the latest after
    // transaction.timeout.ms. Retry until then rather than give up or guess.
    let deadline = Instant::now() + patience;
    let committed = loop {
        match consumer.committed_offsets(partitions.clone(), Duration::from_secs(10)) {
            Ok(committed) if committed.elements().iter().all(|e| e.error().is_ok()) => {
                break committed;
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tracing::warn!(
                    "committed offsets are not stable yet (an open transaction?); retrying"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(committed) => break committed,
            Err(error) => {
                return Err(ServiceError::Kafka {
                    context: "cannot read the committed offsets".to_owned(),
                    source: error,
                });
            }
        }
    };
    let mut positioned = TopicPartitionList::new();
    first_partition_error(&committed, "cannot read the committed offset")?;
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(offset) if offset >= 0 => Offset::Offset(offset),
            _ => Offset::Beginning,
        };
        positioned
            .add_partition_offset(element.topic(), element.partition(), offset)
            .map_err(kafka_error("cannot build the assignment"))?;
    }
    Ok(positioned)
}

/// A changelog partition and the offset a record was written at.
type ChangelogOffset = ((String, i32), i64);

/// How a failed batch is handled.
enum BatchFailure {
    /// Abort (if a transaction is open), rewind to the committed offsets, try again.
    Retry(String),
    /// Outputs the producer or the broker refused as too large (by index in the batch's
    /// outputs): their records go to the DLQ on the next attempt.
    Refused(Vec<RefusedOutput>),
    /// At-least-once: outputs and changelog records were delivered but the offset commit
    /// failed (it may even have landed). The batch's state is durable in the changelog, so it
    /// is kept; the batch is then retried from the committed offsets.
    OffsetsUncommitted {
        reason: String,
        changelog_offsets: Vec<ChangelogOffset>,
    },
    Fatal(ServiceError),
}

/// One output refused for its size.
struct RefusedOutput {
    index: usize,
    error: RDKafkaErrorCode,
}

/// Whether a produce error says the record itself is too large. The producer's `batch.size`
/// stays under every written topic's `max.message.bytes`, so the broker refuses a batch only
/// for a record that is too large on its own.
fn is_size_refusal(error: &KafkaError) -> Option<RDKafkaErrorCode> {
    match error {
        KafkaError::MessageProduction(
            code @ (RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge),
        ) => Some(*code),
        _ => None,
    }
}

/// Deliveries in flight for one batch.
#[derive(Default)]
struct Deliveries {
    /// (output index, or `None` for a changelog record; topic; partition; delivery).
    pending: Vec<(
        Option<usize>,
        String,
        i32,
        rdkafka::producer::DeliveryFuture,
    )>,
    /// Deliveries with their report, in the same form.
    reported: Vec<(Option<usize>, String, i32, DeliveryReport)>,
    /// Outputs the producer refused before sending them.
    refused: Vec<RefusedOutput>,
}

/// What a delivery future resolved to.
type DeliveryReport = <rdkafka::producer::DeliveryFuture as Future>::Output;

fn classify(context: &str, error: KafkaError, transactional_id: &str) -> BatchFailure {
    if let KafkaError::Transaction(rd_error) = &error {
        if matches!(
            rd_error.code(),
            RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced
        ) {
            return BatchFailure::Fatal(ServiceError::Fenced(transactional_id.to_owned()));
        }
        if rd_error.is_fatal() {
            return BatchFailure::Fatal(ServiceError::Kafka {
                context: context.to_owned(),
                source: error,
            });
        }
        if rd_error.txn_requires_abort() || rd_error.is_retriable() {
            return BatchFailure::Retry(format!("{context}: {error}"));
        }
        // librdkafka's rule: an unclassified transactional error is fatal.
        return BatchFailure::Fatal(ServiceError::Kafka {
            context: context.to_owned(),
            source: error,
        });
    }
    match error {
        // rust-rdkafka's commit_transaction flushes first and reports a flush timeout as a
        // flush error, not a transaction error.
        KafkaError::Flush(_) | KafkaError::MessageProduction(_) | KafkaError::ConsumerCommit(_) => {
            BatchFailure::Retry(format!("{context}: {error}"))
        }
        other => BatchFailure::Fatal(ServiceError::Kafka {
            context: context.to_owned(),
            source: other,
        }),
    }
}

/// Runs the service until `shutdown` is set; returns after the last batch is committed and the
/// group is left.
pub fn run_service<S: StateStore>(
    options: ServiceOptions,
    pipelines: SharedPipelines,
    store: Arc<S>,
    runtime: tokio::runtime::Handle,
    shutdown: Arc<AtomicBool>,
) -> Result<(), ServiceError> {
    let kafka = &options.kafka;
    let Some(topology) = admin::prepare(kafka, &pipelines, &runtime, &shutdown)? else {
        return Ok(());
    };
    let instance = kafka.instance_id.clone().unwrap_or_else(host_name);
    let transactional_id = format!("{}-{}", kafka.group_id, instance);
    let exactly_once = kafka.delivery == DeliveryConfig::ExactlyOnce;

    let producer: FutureProducer = clients::producer(
        kafka,
        &transactional_id,
        topology.smallest_max_message_bytes,
    )
    .create()
    .map_err(kafka_error("cannot create the Kafka producer"))?;
    if exactly_once {
        // Fences this instance's previous incarnation and aborts its open transaction, before
        // any state is restored.
        init_transactions(&producer, kafka, &transactional_id, &shutdown)?;
    }
    let restorer = ChangelogRestorer::new(
        kafka,
        &pipelines,
        &topology.changelogs,
        Arc::clone(&store),
        runtime.clone(),
    );
    let saving = SaveInFlight::new(runtime.clone());
    let context = RebalanceContext {
        restorer,
        health: Arc::clone(&options.health),
        saving: saving.clone(),
        events: Mutex::new(Vec::new()),
        patience: kafka.transaction_timeout * 3,
    };
    let consumer: BaseConsumer<RebalanceContext<S>> = clients::group_consumer(kafka)
        .create_with_context(context)
        .map_err(kafka_error("cannot create the Kafka consumer"))?;
    let inputs: Vec<&str> = topology.inputs.iter().map(String::as_str).collect();
    consumer
        .subscribe(&inputs)
        .map_err(kafka_error(format!("cannot subscribe to {inputs:?}")))?;
    tracing::info!(
        group = %kafka.group_id,
        %transactional_id,
        delivery = ?kafka.delivery,
        inputs = ?topology.inputs,
        "cdcflow run started"
    );

    // One lane per core: partitions are processed in parallel, each strictly in order.
    let lanes = std::thread::available_parallelism().map_or(2, |cores| cores.get().clamp(1, 8));
    let delivery = Delivery {
        options: &options,
        pipelines: &pipelines,
        topology: &topology,
        runtime: &runtime,
        producer: &producer,
        consumer: &consumer,
        transactional_id: &transactional_id,
    };
    let mut worker = Worker {
        options: &options,
        pipelines: &pipelines,
        store: &store,
        runtime: &runtime,
        consumer: &consumer,
        delivery,
        caches: (0..lanes)
            .map(|_| StateCache::new(pipelines.len(), options.cache_entries / lanes))
            .collect(),
        unsaved: HashMap::new(),
        checkpoints: HashMap::new(),
        refusals: Refusals::new(),
        saving,
        unsaved_records: 0,
        tally: Tally::default(),
        last_report: Instant::now(),
    };
    let result = worker.run(&shutdown);
    let flushed = worker.flush_store();
    let tally = std::mem::take(&mut worker.tally);
    drop(worker);
    leave_group(consumer, kafka.shutdown_timeout);
    // Nothing is in flight: every batch committed or aborted before the loop returned.
    let _ = producer.flush(Duration::from_secs(5));
    tracing::info!(
        records = tally.records_read,
        events = tally.events_total(),
        dlq = tally.dlq_total(),
        "cdcflow run stopped"
    );
    result.and(flushed)
}

fn init_transactions(
    producer: &FutureProducer,
    kafka: &KafkaConfig,
    transactional_id: &str,
    shutdown: &AtomicBool,
) -> Result<(), ServiceError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match producer.init_transactions(kafka.transaction_timeout * 2) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(error))
                if error.is_retriable() && !shutdown.load(Ordering::SeqCst) =>
            {
                tracing::warn!(%transactional_id, %error, retry_in = ?backoff, "init_transactions failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(error) => {
                return Err(ServiceError::Kafka {
                    context: format!("cannot initialise transactions for `{transactional_id}`"),
                    source: error,
                });
            }
        }
    }
}

/// Leaves the group: dropping the consumer closes it (revoking its partitions), which can
/// hang on an unreachable broker (rust-rdkafka 509), so it runs on a bounded thread.
fn leave_group<C: ConsumerContext + 'static>(consumer: BaseConsumer<C>, timeout: Duration) {
    let (done, finished) = std::sync::mpsc::channel();
    let closer = std::thread::spawn(move || {
        consumer.unsubscribe();
        drop(consumer);
        let _ = done.send(());
    });
    if finished.recv_timeout(timeout).is_err() {
        tracing::warn!(
            ?timeout,
            "leaving the consumer group did not finish in time; exiting anyway"
        );
    } else {
        let _ = closer.join();
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "cdcflow".to_owned())
}

/// What a commit needs: the producer and what a commit reads.
struct Delivery<'a, S: StateStore> {
    options: &'a ServiceOptions,
    pipelines: &'a SharedPipelines,
    topology: &'a Topology,
    runtime: &'a tokio::runtime::Handle,
    producer: &'a FutureProducer,
    consumer: &'a BaseConsumer<RebalanceContext<S>>,
    transactional_id: &'a str,
}

/// A batch processed against the staged state, before its commit.
struct Processed {
    outcome: BatchOutcome,
    tally: Tally,
    /// The consumed offsets to commit.
    offsets: TopicPartitionList,
    records: usize,
}

/// What one poll loop collected.
#[derive(Default)]
struct Collected {
    records: Vec<RawRecord>,
    /// Partitions revoked while collecting (collection stops at a revocation).
    revoked: Vec<(String, i32)>,
}

struct Worker<'a, S: StateStore> {
    options: &'a ServiceOptions,
    pipelines: &'a SharedPipelines,
    store: &'a Arc<S>,
    runtime: &'a tokio::runtime::Handle,
    consumer: &'a BaseConsumer<RebalanceContext<S>>,
    delivery: Delivery<'a, S>,
    /// One state cache per processing lane.
    caches: Vec<StateCache>,
    /// Committed states not yet in the store, one per entity.
    unsaved: HashMap<(String, String), StateWrite>,
    /// The last committed changelog offset per changelog partition.
    checkpoints: HashMap<(String, i32), i64>,
    /// Records of the current batch whose outputs were refused for their size.
    refusals: Refusals,
    /// The store save running behind the processing.
    saving: SaveInFlight,
    unsaved_records: usize,
    tally: Tally,
    last_report: Instant,
}

impl<S: StateStore> Worker<'_, S> {
    /// The loop: collect a batch, process it against the staged state, commit it, settle.
    /// (Pipelining the commit of batch N with the processing of N+1 was measured: no gain on
    /// a CPU-bound 2-core machine, and ~50 MiB more peak memory for the second batch.)
    fn run(&mut self, shutdown: &AtomicBool) -> Result<(), ServiceError> {
        let mut attempts = 0u32;
        loop {
            let stopping = shutdown.load(Ordering::SeqCst);
            let Collected {
                mut records,
                revoked,
            } = if stopping {
                Collected::default()
            } else {
                let started = Instant::now();
                let collected = self.collect_batch(shutdown)?;
                if !collected.records.is_empty() {
                    self.options.metrics.observe_phase("collect", started);
                }
                collected
            };
            if !revoked.is_empty() {
                let is_revoked = |topic: &str, partition: i32| {
                    revoked.iter().any(|(t, p)| t == topic && *p == partition)
                };
                records.retain(|record| !is_revoked(&record.topic, record.partition));
                self.refusals
                    .retain(|(_, origin), _| !is_revoked(&origin.topic, origin.partition));
                // What was committed for those partitions goes to the store now, so a later
                // reassignment restores on top of it; cached state of partitions another
                // instance may now change is dropped.
                self.flush_store()?;
                self.clear_caches();
                // A batch being retried may have belonged to them; the next one tells.
                self.options.health.set_failing(false);
            }
            if stopping {
                self.options.health.set_stopping();
                return Ok(());
            }
            if records.is_empty() {
                continue;
            }
            if self.caches_over_capacity() {
                // Entries are dropped only once the store holds every committed state, or a
                // later load would read older state.
                self.flush_store()?;
                self.clear_caches();
            }
            let started = Instant::now();
            let processed = match self.process(records) {
                Ok(processed) => processed,
                Err(failure) => {
                    self.recover(failure, &mut attempts)?;
                    continue;
                }
            };
            self.options.metrics.observe_phase("process", started);
            let started = Instant::now();
            let delivered = self
                .delivery
                .deliver(&processed.outcome, &processed.offsets);
            self.options.metrics.observe_phase("deliver", started);
            self.settle(processed, delivered, &mut attempts)?;
        }
    }

    /// Applies a batch's commit result: the bookkeeping of a committed batch, or the recovery
    /// of a failed one.
    fn settle(
        &mut self,
        processed: Processed,
        delivered: Result<Vec<ChangelogOffset>, BatchFailure>,
        attempts: &mut u32,
    ) -> Result<(), ServiceError> {
        match self.finish_batch(processed, delivered) {
            Ok(()) => {
                *attempts = 0;
                let metrics = &self.options.metrics;
                metrics.batches.with_label_values(&["committed"]).inc();
                tracing::debug!(records_total = self.tally.records_read, "batch committed");
                metrics.last_commit_seconds.set(now_ms() as f64 / 1000.0);
                self.options.health.set_failing(false);
                self.report_progress();
                Ok(())
            }
            Err(failure) => self.recover(failure, attempts),
        }
    }

    /// Rewinds after a failed batch, or stops for a fatal failure or too many attempts.
    fn recover(&mut self, failure: BatchFailure, attempts: &mut u32) -> Result<(), ServiceError> {
        match failure {
            BatchFailure::Fatal(error) => Err(error),
            // Each refusal sends one more record (or a smaller DLQ record) to the DLQ, so
            // these retries end; they do not count against the attempts.
            BatchFailure::Refused(refused) => {
                self.options
                    .metrics
                    .batches
                    .with_label_values(&["refused"])
                    .inc();
                tracing::warn!(
                    outputs = refused.len(),
                    "outputs refused as too large; their records go to the DLQ, retrying the batch"
                );
                self.rewind()
            }
            BatchFailure::Retry(reason) | BatchFailure::OffsetsUncommitted { reason, .. } => {
                *attempts += 1;
                self.options
                    .metrics
                    .batches
                    .with_label_values(&["retried"])
                    .inc();
                self.options.health.set_failing(true);
                if *attempts >= MAX_BATCH_ATTEMPTS {
                    return Err(ServiceError::Topology(format!(
                        "a batch failed {attempts} times in a row, last: {reason}; stopping \
                         rather than retrying forever (check broker limits such as \
                         message.max.bytes, and the broker's health)"
                    )));
                }
                tracing::warn!(%reason, attempt = *attempts, "batch aborted; rewinding to the committed offsets");
                self.rewind()?;
                std::thread::sleep(Duration::from_millis(200 * u64::from(*attempts)));
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

    /// Polls until the batch is full, its time is up, shutdown is asked for, or partitions
    /// are revoked.
    fn collect_batch(&mut self, shutdown: &AtomicBool) -> Result<Collected, ServiceError> {
        let kafka = &self.options.kafka;
        let deadline = Instant::now() + kafka.batch_max_wait;
        let mut records = Vec::new();
        let mut revoked = Vec::new();
        while records.len() < kafka.batch_max_records && !shutdown.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline && !records.is_empty() {
                break;
            }
            let wait = deadline
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), Duration::from_millis(100));
            match self.consumer.poll(wait) {
                Some(Ok(message)) => records.push(raw_record(&message)),
                Some(Err(error)) => tracing::warn!(%error, "consumer error; continuing"),
                None => {}
            }
            for event in self.consumer.context().take() {
                match event {
                    AssignmentEvent::Failed(reason) => return Err(ServiceError::Topology(reason)),
                    AssignmentEvent::Revoked(partitions) => revoked.extend(partitions),
                }
            }
            if !revoked.is_empty() || (now >= deadline && records.is_empty()) {
                break;
            }
        }
        Ok(Collected { records, revoked })
    }

    /// Decodes and applies a batch against the staged state.
    fn process(&mut self, records: Vec<RawRecord>) -> Result<Processed, BatchFailure> {
        let offsets = next_offsets(&records);
        let record_count = records.len();
        let (outcome, tally) = self
            .process_lanes(records)
            .map_err(|error| BatchFailure::Retry(format!("state store: {error}")))?;
        Ok(Processed {
            outcome,
            tally,
            offsets,
            records: record_count,
        })
    }

    /// After a batch's commit: on success its states join the unsaved set (written behind);
    /// on failure the staged state is dropped and the refusals learnt.
    fn finish_batch(
        &mut self,
        processed: Processed,
        delivered: Result<Vec<ChangelogOffset>, BatchFailure>,
    ) -> Result<(), BatchFailure> {
        let Processed {
            outcome,
            tally,
            offsets,
            records: record_count,
        } = processed;
        let (changelog_offsets, retry) = match delivered {
            Ok(offsets) => (offsets, None),
            Err(BatchFailure::OffsetsUncommitted {
                reason,
                changelog_offsets,
            }) => (changelog_offsets, Some(reason)),
            Err(failure) => {
                // Staged state of the failed batch must not be seen by the next attempt; the
                // committed states still only in memory go to the store first, or the retry
                // would gate against older ones.
                self.flush_store().map_err(BatchFailure::Fatal)?;
                self.clear_caches();
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
        for ((topic, partition), offset) in changelog_offsets {
            let slot = self.checkpoints.entry((topic, partition)).or_insert(offset);
            *slot = (*slot).max(offset);
        }
        for write in outcome.writes {
            self.unsaved
                .insert((write.pipeline.clone(), write.entity.clone()), write);
        }
        self.unsaved_records += record_count;
        // Outputs were delivered either way: they count.
        self.options.metrics.add(&tally);
        self.tally.merge(tally);
        if let Some(reason) = retry {
            // The states are kept (above); the retry finds its records already applied.
            return Err(BatchFailure::Retry(reason));
        }
        if self.unsaved_records >= self.options.flush_records {
            self.save_behind().map_err(BatchFailure::Fatal)?;
        }
        Ok(())
    }

    /// Processes a batch in parallel lanes: each partition belongs to one lane (partition
    /// modulo the lane count) with its own state cache, so partitions run in parallel and
    /// each partition strictly in order. Entities never cross partitions (the record key is
    /// the entity), so lanes share no state.
    fn process_lanes(
        &mut self,
        records: Vec<RawRecord>,
    ) -> Result<(BatchOutcome, Tally), StoreError> {
        let lanes = self.caches.len();
        let mut by_lane: Vec<Vec<RawRecord>> = (0..lanes).map(|_| Vec::new()).collect();
        for record in records {
            by_lane[record.partition.unsigned_abs() as usize % lanes].push(record);
        }
        let processor = BatchProcessor::new(self.pipelines).with_refusals(&self.refusals);
        let (store, runtime, now) = (self.store.as_ref(), self.runtime, now_ms());
        let results: Vec<Result<(BatchOutcome, Tally), StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = by_lane
                .into_iter()
                .zip(self.caches.iter_mut())
                .filter(|(lane, _)| !lane.is_empty())
                .map(|(lane, cache)| {
                    let processor = &processor;
                    scope.spawn(move || {
                        let mut tally = Tally::default();
                        runtime
                            .block_on(
                                processor.process_in_chunks(lane, cache, store, &mut tally, now),
                            )
                            .map(|outcome| (outcome, tally))
                    })
                })
                .collect();
            handles
                .into_iter()
                // A panic in a lane is a bug: surface it on the service thread.
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut merged = BatchOutcome::default();
        let mut tally = Tally::default();
        for result in results {
            let (outcome, lane_tally) = result?;
            merged.append(outcome);
            tally.merge(lane_tally);
        }
        Ok((merged, tally))
    }

    fn clear_caches(&mut self) {
        self.caches.iter_mut().for_each(StateCache::clear);
    }

    fn caches_over_capacity(&self) -> bool {
        self.caches.iter().any(StateCache::over_capacity)
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
            let (Some(output), Some((pipeline, origin))) = (
                outcome.outputs.get(*index),
                outcome.output_origins.get(*index),
            ) else {
                // Refused retries do not count against the attempts: never loop on one that
                // cannot be attributed.
                return Err(ServiceError::Topology(format!(
                    "a refused output (#{index}) has no input record; stopping"
                )));
            };
            let topic = &output.topic;
            let size = output.size();
            let slot = self.refusals.entry((*pipeline, origin.clone()));
            match output.kind {
                OutputKind::DeadLetter => {
                    let refusal = slot.or_insert(Refusal {
                        failure: None,
                        strip_dead_letter: false,
                    });
                    if refusal.strip_dead_letter {
                        return Err(ServiceError::Topology(format!(
                            "the DLQ topic `{topic}` refused the dead letter of {origin} even \
                             without its original key and value ({size} bytes): {error}; \
                             raise max.message.bytes on `{topic}`"
                        )));
                    }
                    refusal.strip_dead_letter = true;
                }
                OutputKind::Event | OutputKind::Audit => {
                    tracing::warn!(%origin, %topic, size, %error, "output refused as too large; the record goes to the DLQ");
                    let refusal = slot.or_insert(Refusal {
                        failure: None,
                        strip_dead_letter: false,
                    });
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

    /// Positions every assigned partition at its committed offset.
    fn rewind(&mut self) -> Result<(), ServiceError> {
        self.flush_store()?;
        self.clear_caches();
        let assignment = self
            .consumer
            .assignment()
            .map_err(kafka_error("cannot read the assignment"))?;
        if assignment.count() == 0 {
            return Ok(());
        }
        // A rewind that does not land would let the next commit skip the aborted batch: any
        // failure here is fatal, and a restart resumes from the committed offsets.
        let positioned = committed_positions(
            self.consumer,
            &assignment,
            self.options.kafka.transaction_timeout * 3,
        )?;
        let sought = self
            .consumer
            .seek_partitions(positioned, Duration::from_secs(10))
            .map_err(kafka_error("cannot rewind to the committed offsets"))?;
        first_partition_error(&sought, "cannot rewind to the committed offset")
    }

    /// Writes committed states and changelog checkpoints to the store and waits for it (and
    /// for any save in flight).
    fn flush_store(&mut self) -> Result<(), ServiceError> {
        self.saving.finish()?;
        let (writes, checkpoints) = self.take_unsaved();
        if writes.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        self.runtime
            .block_on(self.store.save(writes, checkpoints))?;
        Ok(())
    }

    /// Starts writing committed states and checkpoints to the store in the background, after
    /// the previous save (one in flight at a time keeps saves in order and memory bounded).
    fn save_behind(&mut self) -> Result<(), ServiceError> {
        self.saving.finish()?;
        let (writes, checkpoints) = self.take_unsaved();
        if !writes.is_empty() || !checkpoints.is_empty() {
            self.saving.start(self.store, writes, checkpoints);
        }
        Ok(())
    }

    fn take_unsaved(&mut self) -> (Vec<StateWrite>, Vec<Checkpoint>) {
        self.unsaved_records = 0;
        let writes = std::mem::take(&mut self.unsaved).into_values().collect();
        let checkpoints = std::mem::take(&mut self.checkpoints)
            .into_iter()
            .map(|((topic, partition), offset)| Checkpoint {
                topic,
                partition,
                offset,
            })
            .collect();
        (writes, checkpoints)
    }
}

impl<S: StateStore> Delivery<'_, S> {
    /// Commits a processed batch in the configured delivery mode; returns the changelog
    /// offsets written.
    fn deliver(
        &self,
        outcome: &BatchOutcome,
        offsets: &TopicPartitionList,
    ) -> Result<Vec<ChangelogOffset>, BatchFailure> {
        let changelog_records: Vec<(usize, &StateWrite)> = outcome
            .writes
            .iter()
            .filter_map(|write| {
                let index = self
                    .pipelines
                    .iter()
                    .position(|(_, p)| p.name() == write.pipeline)?;
                Some((index, write))
            })
            .collect();
        let delivered = if self.options.kafka.delivery == DeliveryConfig::ExactlyOnce {
            self.commit_transactionally(&outcome.outputs, &changelog_records, offsets)
        } else {
            self.commit_at_least_once(&outcome.outputs, &changelog_records, offsets)
        };
        match delivered {
            // Without the topics' limits the producer's batches were not capped, so the broker
            // may have refused a whole batch of small records: no record can be blamed.
            Err(BatchFailure::Refused(_)) if self.topology.smallest_max_message_bytes.is_none() => {
                Err(BatchFailure::Retry(
                    "outputs refused as too large, and the topics' max.message.bytes could not \
                     be read at start (DescribeConfigs), so the record at fault is unknown; \
                     grant DescribeConfigs on the output topics or raise their limits"
                        .to_owned(),
                ))
            }
            other => other,
        }
    }

    /// One transaction: outputs, changelog records, consumed offsets. Returns the changelog
    /// offsets written.
    fn commit_transactionally(
        &self,
        outputs: &[OutputRecord],
        changelog_records: &[(usize, &StateWrite)],
        offsets: &TopicPartitionList,
    ) -> Result<Vec<ChangelogOffset>, BatchFailure> {
        let id = self.transactional_id;
        self.producer
            .begin_transaction()
            .map_err(|error| classify("begin_transaction", error, id))?;
        let mut in_flight = None;
        let committed = self
            .send_all(outputs, changelog_records)
            .and_then(|deliveries| {
                let deliveries = in_flight.insert(deliveries);
                if !deliveries.refused.is_empty() {
                    return Err(BatchFailure::Retry(
                        "the producer refused an output as too large".to_owned(),
                    ));
                }
                let metadata = self.consumer.group_metadata().ok_or_else(|| {
                    BatchFailure::Fatal(ServiceError::Topology(
                        "the consumer has no group metadata".to_owned(),
                    ))
                })?;
                self.producer
                    .send_offsets_to_transaction(
                        offsets,
                        &metadata,
                        self.options.kafka.transaction_timeout,
                    )
                    .map_err(|error| classify("send_offsets_to_transaction", error, id))?;
                // Every report is awaited here, not by commit_transaction: rust-rdkafka's
                // commit first flushes by polling in 100 ms steps that never end early, which
                // cost a whole step per batch (about 95 ms of every 10,000-record batch in the
                // Kafka bench).
                self.await_reports(deliveries)?;
                self.await_drained()?;
                self.commit_with_retries()
            });
        match committed {
            Ok(()) => self.delivered(in_flight.unwrap_or_default()),
            Err(BatchFailure::Retry(reason)) => {
                self.producer
                    .abort_transaction(self.options.kafka.transaction_timeout * 2)
                    .map_err(|error| match classify("abort_transaction", error, id) {
                        BatchFailure::Fatal(fatal) => BatchFailure::Fatal(fatal),
                        BatchFailure::Retry(again) => BatchFailure::Fatal(ServiceError::Topology(
                            format!("abort_transaction failed: {again}"),
                        )),
                        BatchFailure::Refused(_) | BatchFailure::OffsetsUncommitted { .. } => {
                            BatchFailure::Fatal(ServiceError::Topology(
                                "abort_transaction failed".to_owned(),
                            ))
                        }
                    })?;
                // After the abort every delivery has its report: refusals among them say
                // which records go to the DLQ on the next attempt.
                match in_flight.map(|mut deliveries| {
                    self.await_all(&mut deliveries);
                    self.delivered(deliveries)
                }) {
                    Some(Err(BatchFailure::Refused(refused))) => {
                        Err(BatchFailure::Refused(refused))
                    }
                    _ => Err(BatchFailure::Retry(reason)),
                }
            }
            Err(other) => Err(other),
        }
    }

    /// Waits for the delivery reports of a transaction before its commit. The first failed
    /// report ends the wait, as a retry: an abort follows, and purges what is still queued.
    fn await_reports(&self, deliveries: &mut Deliveries) -> Result<(), BatchFailure> {
        while let Some((output, topic, partition, future)) = deliveries.pending.pop() {
            let report = self.runtime.block_on(future);
            let failed = !matches!(report, Ok(Ok(_)));
            deliveries.reported.push((output, topic, partition, report));
            if failed {
                return Err(BatchFailure::Retry(
                    "a delivery of the transaction failed".to_owned(),
                ));
            }
        }
        Ok(())
    }

    /// Waits until librdkafka has released every delivered message, so that the flush at the
    /// start of commit_transaction finds nothing outstanding.
    fn await_drained(&self) -> Result<(), BatchFailure> {
        let deadline = Instant::now() + self.options.kafka.transaction_timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(BatchFailure::Retry(
                    "the producer still held delivered messages at the transaction timeout"
                        .to_owned(),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// `commit_transaction`, called again after a retriable error (a timed-out commit may be
    /// called again, librdkafka 2.0 and later); an abort while a commit is still in progress
    /// would fail.
    fn commit_with_retries(&self) -> Result<(), BatchFailure> {
        const COMMIT_ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            let error = match self
                .producer
                .commit_transaction(self.options.kafka.transaction_timeout * 2)
            {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let retriable = match &error {
                KafkaError::Transaction(rd_error) => {
                    rd_error.is_retriable() && !rd_error.txn_requires_abort()
                }
                KafkaError::Flush(_) => true,
                _ => false,
            };
            if !retriable || attempt >= COMMIT_ATTEMPTS {
                return Err(classify("commit_transaction", error, self.transactional_id));
            }
            tracing::warn!(%error, attempt, "commit_transaction did not finish; calling it again");
            attempt += 1;
        }
    }

    /// Outputs delivered, then changelog records delivered, then offsets committed.
    fn commit_at_least_once(
        &self,
        outputs: &[OutputRecord],
        changelog_records: &[(usize, &StateWrite)],
        offsets: &TopicPartitionList,
    ) -> Result<Vec<ChangelogOffset>, BatchFailure> {
        let output_deliveries = self.send_all(outputs, &[])?;
        self.await_deliveries(output_deliveries)?;
        let changelog_deliveries = self.send_all(&[], changelog_records)?;
        let changelog_offsets = self.await_deliveries(changelog_deliveries)?;
        match self.consumer.commit(offsets, CommitMode::Sync) {
            Ok(()) => Ok(changelog_offsets),
            Err(error) => match classify("commit offsets", error, self.transactional_id) {
                BatchFailure::Retry(reason) => Err(BatchFailure::OffsetsUncommitted {
                    reason,
                    changelog_offsets,
                }),
                other => Err(other),
            },
        }
    }

    /// Sends outputs and changelog records; returns what is in flight and what the producer
    /// refused as too large.
    fn send_all(
        &self,
        outputs: &[OutputRecord],
        changelog_records: &[(usize, &StateWrite)],
    ) -> Result<Deliveries, BatchFailure> {
        let mut deliveries = Deliveries {
            pending: Vec::with_capacity(outputs.len() + changelog_records.len()),
            reported: Vec::new(),
            refused: Vec::new(),
        };
        for (index, output) in outputs.iter().enumerate() {
            let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
            for (name, value) in &output.headers {
                headers = headers.insert(KafkaHeader {
                    key: name,
                    value: Some(value),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&output.topic).headers(headers);
            if let Some(key) = &output.key {
                record = record.key(key);
            }
            if let Some(value) = &output.value {
                record = record.payload(value);
            }
            match self.send(record) {
                Ok(future) => {
                    deliveries
                        .pending
                        .push((Some(index), output.topic.clone(), -1, future));
                }
                Err(SendError::Refused(error)) => {
                    deliveries.refused.push(RefusedOutput { index, error });
                }
                Err(SendError::Failed(failure)) => return Err(failure),
            }
        }
        for (pipeline, write) in changelog_records {
            let topic = &self.topology.changelogs[*pipeline];
            let value = changelog::encode(&write.state);
            let record = FutureRecord::to(topic)
                .partition(write.partition)
                .key(write.entity.as_bytes())
                .payload(&value[..]);
            let future = self.send(record).map_err(|error| match error {
                SendError::Failed(failure) => failure,
                SendError::Refused(code) => BatchFailure::Retry(format!(
                    "a changelog record of `{topic}` was refused: {code}; raise the topic's \
                     max.message.bytes above the largest row image"
                )),
            })?;
            deliveries
                .pending
                .push((None, topic.clone(), write.partition, future));
        }
        Ok(deliveries)
    }

    fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
    ) -> Result<rdkafka::producer::DeliveryFuture, SendError> {
        // A full producer queue is back-pressure: wait for deliveries, bounded.
        let deadline = Instant::now() + self.options.kafka.transaction_timeout;
        loop {
            match self.producer.send_result(record) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if Instant::now() < deadline =>
                {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => {
                    return Err(match is_size_refusal(&error) {
                        Some(code) => SendError::Refused(code),
                        None => {
                            SendError::Failed(classify("produce", error, self.transactional_id))
                        }
                    });
                }
            }
        }
    }

    /// Waits for every delivery still pending.
    fn await_all(&self, deliveries: &mut Deliveries) {
        for (output, topic, partition, future) in deliveries.pending.drain(..) {
            let report = self.runtime.block_on(future);
            deliveries.reported.push((output, topic, partition, report));
        }
    }

    /// Waits for every delivery; returns the changelog offsets, or the refused outputs, or
    /// the first other failure.
    fn await_deliveries(
        &self,
        mut deliveries: Deliveries,
    ) -> Result<Vec<ChangelogOffset>, BatchFailure> {
        self.await_all(&mut deliveries);
        self.delivered(deliveries)
    }

    /// The outcome of reported deliveries: the changelog offsets, or the refused outputs, or
    /// the first other failure.
    fn delivered(&self, deliveries: Deliveries) -> Result<Vec<ChangelogOffset>, BatchFailure> {
        debug_assert!(deliveries.pending.is_empty(), "every delivery is reported");
        let mut offsets = Vec::new();
        let mut refused = deliveries.refused;
        let mut failure = None;
        for (output, topic, partition, report) in deliveries.reported {
            match report {
                Ok(Ok(delivery)) => {
                    if output.is_none() {
                        offsets.push(((topic, delivery.partition), delivery.offset));
                    }
                }
                Ok(Err((error, _))) => match (output, is_size_refusal(&error)) {
                    (Some(index), Some(error)) => refused.push(RefusedOutput { index, error }),
                    _ => {
                        failure.get_or_insert_with(|| {
                            format!("delivery to `{topic}` (partition {partition}) failed: {error}")
                        });
                    }
                },
                Err(_) => {
                    failure.get_or_insert_with(|| format!("delivery to `{topic}` was cancelled"));
                }
            }
        }
        if !refused.is_empty() {
            return Err(BatchFailure::Refused(refused));
        }
        match failure {
            Some(reason) => Err(BatchFailure::Retry(reason)),
            None => Ok(offsets),
        }
    }
}

/// The first per-partition error of a partition list, as ``<what>: `topic` partition p``.
fn first_partition_error(list: &TopicPartitionList, what: &str) -> Result<(), ServiceError> {
    for element in list.elements() {
        if let Err(error) = element.error() {
            return Err(ServiceError::Kafka {
                context: format!(
                    "{what}: `{}` partition {}",
                    element.topic(),
                    element.partition()
                ),
                source: error,
            });
        }
    }
    Ok(())
}

/// Why one record could not be handed to the producer.
enum SendError {
    /// Too large for the producer's `message.max.bytes`.
    Refused(RDKafkaErrorCode),
    Failed(BatchFailure),
}

/// The offset after the last record of each partition in the batch.
fn next_offsets(records: &[RawRecord]) -> TopicPartitionList {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
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

fn raw_record<M: Message>(message: &M) -> RawRecord {
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
