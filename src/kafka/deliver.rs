//! `cdcflow deliver`: one outgoing webhook subscription. Its own consumer group reads the
//! business-event topics (Kafka is the outbox); each event is POSTed, signed, in per-entity
//! order ([`crate::webhook::Schedule`]), retried by [`crate::webhook::next_step`], and after
//! the last attempt written to the subscription's DLQ topic. Offsets are committed only past
//! events delivered or dead-lettered: a crash delivers again (same `webhook-id`), never skips.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header as KafkaHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::commit::is_fatal_consumer_error;
use super::error::{ServiceError, kafka_error};
use super::{admin, clients};
use crate::cdc::{RecordEvent, record_event};
use crate::config::{KafkaConfig, WebhookConfig};
use crate::runtime::now_ms;
use crate::webhook::client::{Delivery, WebhookClient};
use crate::webhook::{
    Abandoned, EventFilter, Next, Queued, RetryPolicy, Schedule, SigningSecret, next_step,
};

/// The consumer's context: revoked partitions are handed to the loop, which drops their
/// events (the partition's new owner delivers them from the committed offset).
#[derive(Default)]
struct DeliverContext {
    revoked: std::sync::Mutex<Vec<(String, i32)>>,
}

impl rdkafka::ClientContext for DeliverContext {}

impl rdkafka::consumer::ConsumerContext for DeliverContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(partitions) = rebalance {
            let mut revoked = self
                .revoked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            revoked.extend(
                partitions
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_owned(), element.partition())),
            );
        }
    }
}

/// The media type of a structured CloudEvent.
const STRUCTURED: &str = "application/cloudevents+json";

/// How often delivered progress is committed.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// One event waiting for its delivery.
#[derive(Debug, Clone)]
struct Pending {
    id: String,
    body: Vec<u8>,
    content_type: String,
    key: Option<Vec<u8>>,
    /// Attempts made so far, and when the first was.
    attempts: u32,
    first_attempt: Option<Instant>,
}

/// A subscription ready to run.
#[derive(Debug)]
pub struct Subscription {
    pub config: WebhookConfig,
    pub secrets: Vec<SigningSecret>,
    /// The compiled `when`, if any.
    pub filter: Option<EventFilter>,
    pub metrics: crate::metrics::Metrics,
}

/// The outcome label of an attempt.
fn outcome(result: &crate::webhook::AttemptResult) -> &'static str {
    use crate::webhook::AttemptResult;
    match result {
        AttemptResult::Answered { status, .. } => match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            429 => "429",
            500..=599 => "5xx",
            _ => "4xx",
        },
        AttemptResult::TimedOut => "timeout",
        AttemptResult::Unreachable(_) => "unreachable",
    }
}

/// Whether an attempt's result shows the endpoint up: it answered, and not with a status that
/// says it is overloaded or failing (5xx, 429, 408).
fn endpoint_answers(result: &crate::webhook::AttemptResult) -> bool {
    use crate::webhook::AttemptResult;
    matches!(result, AttemptResult::Answered { status, .. } if !matches!(status, 408 | 429 | 500..=599))
}

/// Runs one subscription until `shutdown` completes; commits what was delivered first.
pub async fn deliver(
    kafka: &KafkaConfig,
    subscription: Subscription,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let config = &subscription.config;
    let group = config.group_id(&kafka.group_id);
    let mut consumer_config = clients::group_consumer(kafka);
    // Inside `cdcflow run` the pipelines create their event topics as the subscription
    // starts: a topic missing at the first metadata request is found at the next refresh.
    consumer_config
        .set("group.id", &group)
        .set("topic.metadata.refresh.interval.ms", "10000");
    let consumer: StreamConsumer<DeliverContext> = consumer_config
        .create_with_context(DeliverContext::default())
        .map_err(kafka_error("cannot create the webhook consumer"))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(kafka_error(format!("cannot subscribe to {topics:?}")))?;
    let dlq: FutureProducer = clients::idempotent_producer(kafka)
        .create()
        .map_err(kafka_error("cannot create the webhook DLQ producer"))?;
    let client = WebhookClient::new(
        subscription.secrets.clone(),
        config.timeout,
        config.max_in_flight,
    )
    .map_err(|error| ServiceError::Webhook(error.to_string()))?;
    let policy = RetryPolicy {
        initial_backoff: config.initial_backoff,
        max_backoff: config.max_backoff,
        max_attempts: config.max_attempts,
        max_age: config.max_age,
    };
    let dlq_topic = config.dlq_topic();
    // The DLQ topic exists before the first delivery can fail: cdcflow's clients never create
    // topics by producing to them.
    let handle = tokio::runtime::Handle::current();
    let (admin_kafka, topic) = (kafka.clone(), dlq_topic.clone());
    tokio::task::spawn_blocking(move || {
        admin::create_topics(&admin_kafka, &[(topic, 1, false)], &handle)
    })
    .await
    .map_err(|error| {
        ServiceError::Webhook(format!("creating the DLQ topic panicked: {error}"))
    })??;
    // Outcome series exist at 0 from the start, so an alert's `increase()` sees the first one.
    let webhooks = &subscription.metrics.webhooks;
    for outcome in ["2xx", "3xx", "4xx", "429", "5xx", "timeout", "unreachable"] {
        webhooks
            .attempts
            .with_label_values(&[config.name.as_str(), outcome])
            .reset();
    }
    for reason in [
        "rejected",
        "attempts_exhausted",
        "max_age_exceeded",
        "filter_error",
    ] {
        webhooks
            .dlq_records
            .with_label_values(&[config.name.as_str(), reason])
            .reset();
    }
    tracing::info!(subscription = %config.name, %group, url = %config.url, "webhook delivery started");

    let mut schedule: Schedule<Pending> = Schedule::new(config.max_in_flight, config.max_queued);
    let mut attempts = tokio::task::JoinSet::new();
    let mut jitter = crate::runtime::Jitter::new();
    let mut last_commit = Instant::now();
    let mut committed: HashMap<(String, i32), i64> = HashMap::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let revoked = std::mem::take(
            &mut *consumer
                .context()
                .revoked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for partition in revoked {
            schedule.revoke(&partition);
            committed.remove(&partition);
        }
        for event in schedule.take_ready(now_ms()) {
            let client = client.clone();
            let url = config.url.clone();
            attempts.spawn(async move {
                let started = Instant::now();
                let timestamp = now_ms() / 1000;
                let delivery = Delivery {
                    id: &event.item.id,
                    timestamp,
                    body: &event.item.body,
                    content_type: &event.item.content_type,
                };
                let result = client.attempt(&url, &delivery).await;
                (event, result, started.elapsed())
            });
        }
        let wake = schedule
            .next_due()
            .map_or(Duration::from_millis(200), |at| {
                Duration::from_millis((at - now_ms()).clamp(1, 200) as u64)
            });
        tokio::select! {
            () = &mut shutdown => break,
            received = consumer.recv(), if schedule.has_room() => match received {
                Ok(message) => {
                    if let Err(refused) = take(&mut schedule, &message, config, subscription.filter.as_ref()) {
                        // The condition cannot be decided for this event: the DLQ keeps it,
                        // and the subscription goes on.
                        let (refused, why) = *refused;
                        tracing::warn!(id = %refused.item.id, %why, "webhook `when` failed; to the DLQ");
                        let abandoned = Abandoned {
                            reason: "filter_error",
                            attempts: 0,
                            last_status: None,
                            last_error: why,
                        };
                        dead_letter(&dlq, &dlq_topic, &config.name, &refused, &refused.item, &abandoned).await?;
                        subscription
                            .metrics
                            .webhooks.dlq_records
                            .with_label_values(&[config.name.as_str(), abandoned.reason])
                            .inc();
                        schedule.pass(refused.partition, refused.offset);
                    }
                }
                Err(source) if is_fatal_consumer_error(&source) => {
                    return Err(ServiceError::Kafka {
                        context: "the webhook consumer cannot go on".to_owned(),
                        source,
                    });
                }
                // A topic not created yet, a broker restarting: librdkafka goes on by itself.
                Err(error) => tracing::warn!(%error, "webhook consumer error; continuing"),
            },
            Some(joined) = attempts.join_next() => {
                let (event, result, took) = joined.map_err(|error| ServiceError::Webhook(format!("a delivery attempt panicked: {error}")))?;
                let metrics = &subscription.metrics;
                let name = config.name.as_str();
                let outcome = outcome(&result);
                metrics.webhooks.attempts.with_label_values(&[name, outcome]).inc();
                metrics.webhooks.attempt_seconds.with_label_values(&[name]).observe(took.as_secs_f64());
                metrics
                    .webhooks.endpoint_up
                    .with_label_values(&[name])
                    .set(i64::from(endpoint_answers(&result)));
                if !schedule.head_is(&event.entity, &event.partition, event.offset) {
                    // Its partition was revoked while the attempt ran.
                    continue;
                }
                let mut item = event.item.clone();
                item.attempts += 1;
                let first = *item.first_attempt.get_or_insert_with(Instant::now);
                match next_step(&policy, &result, item.attempts, first.elapsed(), now_ms() / 1000, jitter.fraction()) {
                    Next::Delivered => schedule.finished(&event.entity),
                    Next::RetryIn(wait) => {
                        tracing::debug!(id = %item.id, attempts = item.attempts, ?wait, ?result, "webhook attempt failed; retrying");
                        schedule.update_head(&event.entity, item);
                        schedule.retry_at(&event.entity, now_ms() + wait.as_millis() as i64);
                    }
                    Next::DeadLetter(abandoned) => {
                        tracing::warn!(id = %item.id, reason = abandoned.reason, attempts = abandoned.attempts, "webhook delivery abandoned; to the DLQ");
                        dead_letter(&dlq, &dlq_topic, &config.name, &event, &item, &abandoned).await?;
                        metrics
                            .webhooks.dlq_records
                            .with_label_values(&[name, abandoned.reason])
                            .inc();
                        schedule.finished(&event.entity);
                    }
                }
            }
            () = tokio::time::sleep(wake) => {}
        }
        let name = config.name.as_str();
        let metrics = &subscription.metrics;
        metrics
            .webhooks
            .queued
            .with_label_values(&[name])
            .set(schedule.len() as i64);
        metrics
            .webhooks
            .retries_pending
            .with_label_values(&[name])
            .set(schedule.waiting_retries() as i64);
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit(&consumer, &schedule, &mut committed, CommitMode::Async)?;
            last_commit = Instant::now();
        }
    }
    // The last commit completes before the consumer leaves the group.
    commit(&consumer, &schedule, &mut committed, CommitMode::Sync)?;
    tracing::info!(subscription = %config.name, "webhook delivery stopped");
    Ok(())
}

/// Queues a consumed event; one the subscription does not want is finished at once. An event
/// its `when` cannot be decided for is handed back with why.
fn take<M: Message>(
    schedule: &mut Schedule<Pending>,
    message: &M,
    config: &WebhookConfig,
    filter: Option<&EventFilter>,
) -> Result<(), Box<(Queued<Pending>, String)>> {
    let header = |name: &str| {
        message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|header| header.key.eq_ignore_ascii_case(name))
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        })
    };
    let record_headers: Vec<(&str, &[u8])> = message.headers().map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .filter_map(|header| header.value.map(|value| (header.key, value)))
            .collect()
    });
    let payload = message.payload().unwrap_or_default();
    // The receiver always gets the structured CloudEvent, also from binary-mode topics.
    let (structured, body, content_type) = match record_event(payload, &record_headers) {
        RecordEvent::Structured(event) => (
            Some(event),
            payload.to_vec(),
            header("content-type").unwrap_or_else(|| STRUCTURED.to_owned()),
        ),
        RecordEvent::Rebuilt(event) => (
            Some(event.clone()),
            event.to_string().into_bytes(),
            STRUCTURED.to_owned(),
        ),
        RecordEvent::Opaque => (
            None,
            payload.to_vec(),
            header("content-type").unwrap_or_else(|| STRUCTURED.to_owned()),
        ),
    };
    let attribute = |name: &str| {
        structured
            .as_ref()
            .and_then(|event| event.get(name))
            .and_then(|value| value.as_str())
            .map(str::to_owned)
    };
    let id = attribute("id").unwrap_or_else(|| {
        format!(
            "{}-{}-{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
    });
    let event_type = attribute("type").unwrap_or_default();
    let entity = message.key().map_or_else(
        || format!("{}/{}", message.partition(), message.offset()),
        |key| String::from_utf8_lossy(key).into_owned(),
    );
    let queued = Queued {
        partition: (message.topic().to_owned(), message.partition()),
        offset: message.offset(),
        entity,
        item: Pending {
            id,
            body,
            content_type,
            key: message.key().map(<[u8]>::to_vec),
            attempts: 0,
            first_attempt: None,
        },
    };
    let types = &config.event_types;
    let wanted = (types.is_empty() || types.contains(&event_type))
        && match (filter, &structured) {
            (None, _) => true,
            (Some(filter), Some(event)) => match filter.matches(event) {
                Ok(wanted) => wanted,
                Err(error) => return Err(Box::new((queued, error.to_string()))),
            },
            (Some(_), None) => {
                return Err(Box::new((
                    queued,
                    "`when` needs a CloudEvent: this value is not JSON and has no `ce_` headers"
                        .to_owned(),
                )));
            }
        };
    if wanted {
        schedule.push(queued);
    } else {
        schedule.pass(queued.partition, queued.offset);
    }
    Ok(())
}

/// Commits, per partition, the offset up to which every event is finished.
fn commit(
    consumer: &StreamConsumer<DeliverContext>,
    schedule: &Schedule<Pending>,
    committed: &mut HashMap<(String, i32), i64>,
    mode: CommitMode,
) -> Result<(), ServiceError> {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in schedule.committable() {
        if committed.get(&(topic.clone(), partition)) == Some(&offset) {
            continue;
        }
        list.add_partition_offset(&topic, partition, Offset::Offset(offset))
            .map_err(kafka_error("cannot build the offsets to commit"))?;
        committed.insert((topic, partition), offset);
    }
    if list.count() > 0 {
        consumer
            .commit(&list, mode)
            .map_err(kafka_error("cannot commit the delivered offsets"))?;
    }
    Ok(())
}

/// Writes an abandoned event to the subscription's DLQ, with why.
async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    subscription: &str,
    event: &Queued<Pending>,
    item: &Pending,
    abandoned: &Abandoned,
) -> Result<(), ServiceError> {
    let status = abandoned
        .last_status
        .map_or_else(String::new, |status| status.to_string());
    let offset = event.offset.to_string();
    let partition = event.partition.1.to_string();
    let attempts = abandoned.attempts.to_string();
    let headers = [
        ("cdcflow.webhook.subscription", subscription),
        ("cdcflow.webhook.reason", abandoned.reason),
        ("cdcflow.webhook.attempts", attempts.as_str()),
        ("cdcflow.webhook.last_status", status.as_str()),
        ("cdcflow.webhook.last_error", abandoned.last_error.as_str()),
        ("cdcflow.webhook.id", item.id.as_str()),
        ("cdcflow.origin.topic", event.partition.0.as_str()),
        ("cdcflow.origin.partition", partition.as_str()),
        ("cdcflow.origin.offset", offset.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(KafkaHeader {
            key,
            value: Some(value),
        })
    });
    let mut record = FutureRecord::to(topic).payload(&item.body).headers(headers);
    if let Some(key) = &item.key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(source, _)| ServiceError::Kafka {
            context: format!("cannot write to the webhook DLQ `{topic}`"),
            source,
        })?;
    Ok(())
}
