//! Topic set-up at start: input partition counts, changelog topics (compacted, co-partitioned
//! with the input) and output, DLQ and audit topics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;

use super::error::{ServiceError, kafka_error};
use super::{changelog_topic, clients};
use crate::config::{KafkaConfig, TopicRoute};
use crate::engine::Pipeline;
use crate::runtime::{Attempt, RetryError, RetryLimit, RetryPolicy, Shutdown, retry};

/// What the service consumes and where each pipeline's changelog lives.
#[derive(Debug, Clone)]
pub(super) struct Topology {
    /// Input topics to subscribe to.
    pub inputs: Vec<String>,
    /// Per pipeline (by index): its changelog topic.
    pub changelogs: Vec<String>,
    /// The smallest `max.message.bytes` among the topics cdcflow writes, if any is known: the
    /// producer's batches must stay under it (see [`clients::producer`]).
    pub smallest_max_message_bytes: Option<usize>,
}

/// Waits for the broker (retrying with capped backoff), then creates or validates topics.
pub(super) fn prepare(
    kafka: &KafkaConfig,
    pipelines: &[(TopicRoute, Pipeline)],
    runtime: &tokio::runtime::Handle,
    shutdown: &Shutdown,
) -> Result<Option<Topology>, ServiceError> {
    let probe: BaseConsumer<ProbeContext> = clients::admin(kafka)
        .create_with_context(ProbeContext::default())
        .map_err(kafka_error("cannot create a Kafka client"))?;
    let Some(metadata) = wait_for_metadata(&probe, kafka, shutdown)? else {
        return Ok(None);
    };
    let mut existing: BTreeMap<String, usize> = metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| (topic.name().to_owned(), topic.partitions().len()))
        .collect();
    // A chain in one config: a stage's input is an earlier stage's event topic. Those are
    // created first, so that the stage finds its input like any other.
    let chained: Vec<(String, i32, bool)> = pipelines
        .iter()
        .flat_map(|(_, pipeline)| {
            pipeline
                .settings()
                .rules
                .specs()
                .map(|rule| rule.topic.clone())
        })
        .filter(|topic| !existing.contains_key(topic))
        .filter(|topic| pipelines.iter().any(|(route, _)| route.matches(topic)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|topic| (topic, kafka.topic_partitions, false))
        .collect();
    if !chained.is_empty() {
        create_topics(kafka, &chained, runtime)?;
        for (topic, partitions, _) in chained {
            existing.insert(topic, partitions as usize);
        }
    }

    let mut inputs = BTreeSet::new();
    let mut changelogs = Vec::new();
    let mut to_create: Vec<(String, i32, bool)> = Vec::new();
    for (route, pipeline) in pipelines {
        let name = pipeline.name();
        let mut matched: Vec<(&String, usize)> = existing
            .iter()
            .filter(|(topic, _)| !topic.starts_with("__") && route.matches(topic))
            .map(|(topic, count)| (topic, *count))
            .collect();
        for topic in &route.topics {
            if !existing.contains_key(topic) {
                return Err(ServiceError::MissingInput {
                    topic: topic.clone(),
                    pipeline: name.to_owned(),
                    bootstrap: kafka.bootstrap_servers.clone(),
                });
            }
        }
        matched.sort();
        if matched.len() > 1 {
            // Entities are identified per pipeline by key alone, and changelog partition p
            // holds input partition p: two tables in one pipeline would collide on both.
            return Err(ServiceError::SeveralInputs {
                pipeline: name.to_owned(),
                topics: matched.iter().map(|(topic, _)| (*topic).clone()).collect(),
            });
        }
        let Some(&(input, partitions)) = matched.first() else {
            return Err(ServiceError::NoInput {
                pipeline: name.to_owned(),
            });
        };
        let key_fields = &pipeline.settings().decoder.key_fields;
        if !key_fields.is_empty() && partitions > 1 {
            return Err(ServiceError::EntitiesSpanPartitions {
                pipeline: name.to_owned(),
                key_fields: key_fields.clone(),
                topic: input.clone(),
                partitions,
            });
        }
        inputs.extend(matched.iter().map(|(topic, _)| (*topic).clone()));
        let changelog = changelog_topic(&kafka.group_id, name);
        match existing.get(&changelog) {
            Some(&count) if count != partitions => {
                return Err(ServiceError::ChangelogPartitions {
                    changelog,
                    count,
                    pipeline: name.to_owned(),
                    partitions,
                });
            }
            Some(_) => {}
            None => to_create.push((changelog.clone(), partitions as i32, true)),
        }
        changelogs.push(changelog);
        let settings = pipeline.settings();
        let outputs = settings
            .rules
            .specs()
            .map(|rule| rule.topic.clone())
            .chain([settings.dlq_topic.clone()])
            .chain(settings.audit_topic.clone());
        for topic in outputs {
            if !existing.contains_key(&topic)
                && !to_create.iter().any(|(name, _, _)| *name == topic)
            {
                to_create.push((topic, kafka.topic_partitions, false));
            }
        }
    }
    if !to_create.is_empty() {
        create_topics(kafka, &to_create, runtime)?;
    }
    let written: BTreeSet<&str> = changelogs
        .iter()
        .map(String::as_str)
        .chain(pipelines.iter().flat_map(|(_, pipeline)| {
            let settings = pipeline.settings();
            settings
                .rules
                .specs()
                .map(|rule| rule.topic.as_str())
                .chain([settings.dlq_topic.as_str()])
                .chain(settings.audit_topic.as_deref())
        }))
        .collect();
    // Without the limits (no DescribeConfigs permission, say) the producer keeps its default
    // batch size; only a topic limit below it would then refuse batches of small records.
    let smallest_max_message_bytes = smallest_max_message_bytes(kafka, &written, runtime)
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read max.message.bytes of the output topics; keeping the producer's batch size");
            None
        });
    Ok(Some(Topology {
        inputs: inputs.into_iter().collect(),
        changelogs,
        smallest_max_message_bytes,
    }))
}

/// The smallest `max.message.bytes` of `topics`. The broker applies the limit to a whole
/// record batch, so the producer's `batch.size` must not exceed it: otherwise small records
/// batched together are refused as one, and only a record that is itself too large should be.
fn smallest_max_message_bytes(
    kafka: &KafkaConfig,
    topics: &BTreeSet<&str>,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<usize>, ServiceError> {
    let admin: AdminClient<DefaultClientContext> = clients::admin(kafka)
        .create()
        .map_err(kafka_error("cannot create the Kafka admin client"))?;
    let resources: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|topic| ResourceSpecifier::Topic(topic))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = runtime
        .block_on(admin.describe_configs(resources.iter(), &options))
        .map_err(kafka_error("cannot describe the output topics"))?;
    let mut smallest: Option<usize> = None;
    for result in results {
        let resource = result.map_err(ServiceError::DescribeConfigs)?;
        let limit = resource
            .get("max.message.bytes")
            .and_then(|entry| entry.value.as_deref())
            .and_then(|value| value.parse::<usize>().ok());
        if let Some(limit) = limit {
            smallest = Some(smallest.map_or(limit, |current| current.min(limit)));
        }
    }
    Ok(smallest)
}

/// The cluster's metadata, once the brokers answer; `None` when shutdown comes first, and an
/// error at once when they refuse this client (credentials, certificates).
fn wait_for_metadata(
    probe: &BaseConsumer<ProbeContext>,
    kafka: &KafkaConfig,
    shutdown: &Shutdown,
) -> Result<Option<Metadata>, ServiceError> {
    let what = format!("reaching Kafka at {}", kafka.bootstrap_servers);
    let outcome = retry(&what, WAIT_FOR_BROKERS, shutdown, || {
        let fetched = probe.fetch_metadata(None, Duration::from_secs(5));
        // Serves the error callbacks, which say why a connection was refused.
        let _ = probe.poll(Duration::ZERO);
        match (fetched, probe.context().refusal()) {
            (Ok(metadata), _) => Ok(metadata),
            (Err(_), Some(refusal)) => Err(Attempt::Permanent(ProbeFailure::Refused(refusal))),
            (Err(error), None) => Err(Attempt::Transient(ProbeFailure::Unreachable(error))),
        }
    });
    match outcome {
        Ok(metadata) => Ok(Some(metadata)),
        Err(RetryError::Failed {
            error: ProbeFailure::Refused((code, reason)),
            ..
        }) => Err(ServiceError::ConnectionRefused {
            bootstrap: kafka.bootstrap_servers.clone(),
            code,
            reason,
        }),
        Err(_) => Ok(None),
    }
}

/// Why a metadata request failed: the brokers are not reachable yet (worth waiting for), or
/// they refused this client.
#[derive(Debug)]
enum ProbeFailure {
    Unreachable(KafkaError),
    Refused(Refusal),
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeFailure::Unreachable(error) => write!(f, "{error}"),
            ProbeFailure::Refused((code, reason)) => write!(f, "{reason} ({code:?})"),
        }
    }
}

/// Why the probe could not connect, when retrying cannot help: what the broker or the TLS
/// handshake refused.
type Refusal = (RDKafkaErrorCode, String);

/// The start-up probe's context: it keeps the first refusal that only a config change can
/// fix (credentials, certificates), so that start-up stops with it instead of retrying.
#[derive(Debug, Default)]
struct ProbeContext {
    refused: Mutex<Option<Refusal>>,
}

impl ProbeContext {
    fn refusal(&self) -> Option<Refusal> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error while reaching the brokers");
        if let Some(code @ (RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) =
            error.rdkafka_error_code()
        {
            self.refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(|| (code, reason.to_owned()));
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Waiting for the brokers at start: patient, and never more than 30 s between tries.
const WAIT_FOR_BROKERS: RetryPolicy = RetryPolicy::new(
    Duration::from_millis(500),
    Duration::from_secs(30),
    RetryLimit::Forever,
)
.counted_as("wait_for_brokers");

pub(super) fn create_topics(
    kafka: &KafkaConfig,
    topics: &[(String, i32, bool)],
    runtime: &tokio::runtime::Handle,
) -> Result<(), ServiceError> {
    let admin: AdminClient<DefaultClientContext> = clients::admin(kafka)
        .create()
        .map_err(kafka_error("cannot create the Kafka admin client"))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions, compacted)| {
            let topic = NewTopic::new(
                name,
                *partitions,
                TopicReplication::Fixed(kafka.replication_factor),
            );
            if *compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = runtime
        .block_on(admin.create_topics(new_topics.iter(), &options))
        .map_err(kafka_error("cannot create topics"))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(ServiceError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}
