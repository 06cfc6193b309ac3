//! Topic set-up at start: input partition counts, changelog topics (compacted, co-partitioned
//! with the input) and output, DLQ and audit topics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;

use super::{ServiceError, changelog_topic, clients, kafka_error};
use crate::config::{KafkaConfig, TopicRoute};
use crate::engine::Pipeline;

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
    shutdown: &Arc<AtomicBool>,
) -> Result<Option<Topology>, ServiceError> {
    let probe: BaseConsumer = clients::admin(kafka)
        .create()
        .map_err(kafka_error("cannot create a Kafka client"))?;
    let Some(metadata) = wait_for_metadata(&probe, kafka, shutdown) else {
        return Ok(None);
    };
    let existing: BTreeMap<String, usize> = metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| (topic.name().to_owned(), topic.partitions().len()))
        .collect();

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
                return Err(ServiceError::Topology(format!(
                    "input topic `{topic}` of pipeline `{name}` does not exist on {}; create it \
                     (Debezium creates it with the first change) or fix pipeline.topics",
                    kafka.bootstrap_servers
                )));
            }
        }
        matched.sort();
        if matched.len() > 1 {
            // Entities are identified per pipeline by key alone, and changelog partition p
            // holds input partition p: two tables in one pipeline would collide on both.
            return Err(ServiceError::Topology(format!(
                "pipeline `{name}` matches {} topics ({}); cdcflow run needs one table per \
                 pipeline: split it into one pipeline per topic",
                matched.len(),
                matched
                    .iter()
                    .map(|(topic, _)| topic.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let Some(&(_, partitions)) = matched.first() else {
            return Err(ServiceError::Topology(format!(
                "pipeline `{name}` matches no existing topic; check pipeline.topics and topic_pattern"
            )));
        };
        if let Some((topic, count)) = matched.iter().find(|(_, count)| *count != partitions) {
            return Err(ServiceError::Topology(format!(
                "pipeline `{name}` reads topics with different partition counts (`{topic}` has \
                 {count}, `{}` has {partitions}); its changelog is co-partitioned with its input, \
                 so split it into one pipeline per partition count",
                matched[0].0
            )));
        }
        inputs.extend(matched.iter().map(|(topic, _)| (*topic).clone()));
        let changelog = changelog_topic(&kafka.group_id, name);
        match existing.get(&changelog) {
            Some(&count) if count != partitions => {
                return Err(ServiceError::Topology(format!(
                    "changelog topic `{changelog}` has {count} partitions but the input of \
                     pipeline `{name}` has {partitions}; they must match (partition p of the \
                     changelog holds the state of input partition p). Delete the changelog \
                     (state is rebuilt from new changes only) or restore the input's partition count"
                )));
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
        let resource = result.map_err(|code| {
            ServiceError::Topology(format!("cannot describe an output topic's config: {code}"))
        })?;
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

fn wait_for_metadata(
    probe: &BaseConsumer,
    kafka: &KafkaConfig,
    shutdown: &Arc<AtomicBool>,
) -> Option<Metadata> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match probe.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(metadata) => return Some(metadata),
            Err(error) => {
                tracing::warn!(
                    bootstrap = %kafka.bootstrap_servers,
                    %error,
                    retry_in = ?backoff,
                    "Kafka is not reachable yet; retrying"
                );
            }
        }
        let deadline = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < deadline {
            if shutdown.load(Ordering::SeqCst) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn create_topics(
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
            Err((name, code)) => {
                return Err(ServiceError::Topology(format!(
                    "cannot create topic `{name}`: {code}"
                )));
            }
        }
    }
    Ok(())
}
