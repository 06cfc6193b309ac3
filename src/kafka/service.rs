//! The entry of `cdcflow run`: prepares the topics, creates the clients, joins the group and
//! runs the consume loop until shutdown; then finishes, leaves the group and reports.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;

use super::admin;
use super::clients;
use super::commit::Committer;
use super::consume::Worker;
use super::error::{ServiceError, kafka_error};
use super::features::ClientLibrary;
use super::produce::Producer;
use super::rebalance::{RebalanceContext, lock};
use super::report::{ClientReports, Reporter};
use super::restore::ChangelogRestorer;
use crate::config::{DeliveryConfig, KafkaConfig};
use crate::metrics::{Metrics, Tally};
use crate::runtime::{
    Attempt, Health, Jitter, Lanes, Refusals, RetryError, RetryLimit, RetryPolicy, SharedPipelines,
    Shutdown, retry,
};
use crate::store::{StateStore, WriteBehind};

/// Settings of the service beyond the pipelines, and what it reports to.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub kafka: KafkaConfig,
    pub cache_entries: usize,
    pub flush_records: usize,
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

/// `init_transactions` at start: patient with a coordinator that is not ready yet.
const INIT_TRANSACTIONS: RetryPolicy = RetryPolicy::new(
    Duration::from_millis(500),
    Duration::from_secs(10),
    RetryLimit::Forever,
)
.counted_as("init_transactions");

/// Runs the service until `shutdown` completes (SIGTERM in `cdcflow run`; any future in
/// tests); returns after the last batch is committed and the group is left. Blocks: call it
/// from a thread of its own (librdkafka's transactional and commit calls block).
pub fn run_service<S: StateStore>(
    options: ServiceOptions,
    pipelines: SharedPipelines,
    store: Arc<S>,
    runtime: tokio::runtime::Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let shutdown = Shutdown::from_future(&runtime, shutdown);
    let kafka = &options.kafka;
    ClientLibrary::linked().check(kafka)?;
    let Some(topology) = admin::prepare(kafka, &pipelines, &runtime, &shutdown)? else {
        return Ok(());
    };
    let instance = kafka.instance_id.clone().unwrap_or_else(host_name);
    let transactional_id = format!("{}-{}", kafka.group_id, instance);
    let reporter = Reporter::new(options.metrics.clone(), Arc::clone(&options.health));
    options
        .metrics
        .register_pipelines(pipelines.iter().map(|(_, pipeline)| pipeline.name()));

    let producer: Producer = clients::producer(
        kafka,
        &transactional_id,
        topology.smallest_max_message_bytes,
    )
    .create_with_context(ClientReports::new("producer", reporter.clone()))
    .map_err(kafka_error("cannot create the Kafka producer"))?;
    if kafka.delivery == DeliveryConfig::ExactlyOnce {
        // Fences this instance's previous incarnation and aborts its open transaction, before
        // any state is restored.
        match init_transactions(&producer, kafka, &transactional_id, &shutdown) {
            Err(ServiceError::Interrupted) => return Ok(()),
            other => other?,
        }
    }
    let restorer = ChangelogRestorer::new(
        kafka,
        &pipelines,
        &topology.changelogs,
        Arc::clone(&store),
        runtime.clone(),
        reporter.clone(),
    );
    let write_behind = Arc::new(Mutex::new(WriteBehind::new(
        Arc::clone(&store),
        runtime.clone(),
        options.flush_records,
    )));
    let context = RebalanceContext {
        restorer,
        reporter: reporter.clone(),
        reports: ClientReports::new("consumer", reporter.clone()),
        write_behind: Arc::clone(&write_behind),
        events: Mutex::new(Vec::new()),
        patience: kafka.transaction_timeout * 3,
        shutdown: shutdown.clone(),
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

    let mut worker = Worker {
        options: &options,
        pipelines: &pipelines,
        store: &store,
        runtime: &runtime,
        consumer: &consumer,
        committer: Committer {
            options: &options,
            pipelines: &pipelines,
            topology: &topology,
            runtime: &runtime,
            producer: &producer,
            consumer: &consumer,
            transactional_id: &transactional_id,
        },
        reporter: &reporter,
        shutdown: &shutdown,
        lanes: Lanes::per_core(pipelines.len(), options.cache_entries),
        write_behind: Arc::clone(&write_behind),
        refusals: Refusals::new(),
        tally: Tally::default(),
        last_report: Instant::now(),
        last_batch_start: None,
        attempts: 0,
        failures: 0,
        jitter: Jitter::new(),
    };
    let result = worker.run();
    let flushed = lock(&write_behind).flush().map_err(ServiceError::from);
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
    producer: &Producer,
    kafka: &KafkaConfig,
    transactional_id: &str,
    shutdown: &Shutdown,
) -> Result<(), ServiceError> {
    let what = format!("init_transactions for `{transactional_id}`");
    retry(&what, INIT_TRANSACTIONS, shutdown, || {
        producer
            .init_transactions(kafka.transaction_timeout * 2)
            .map_err(|error| match &error {
                KafkaError::Transaction(rd_error) if rd_error.is_retriable() => {
                    Attempt::Transient(error)
                }
                _ => Attempt::Permanent(error),
            })
    })
    .map_err(|failure| match failure {
        RetryError::Failed { error, .. } => ServiceError::Kafka {
            context: format!("cannot initialise transactions for `{transactional_id}`"),
            source: error,
        },
        RetryError::Stopped => ServiceError::Interrupted,
    })
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
