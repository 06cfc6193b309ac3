//! A SQL poll as a Kafka source: the changed rows of a table go to a topic, and the cursor
//! after them goes to the compacted cursor topic in the same transaction, so that a crash
//! repeats a page at most (the pipeline's version gate drops the repeat) and never skips one.
//!
//! **One owner.** Every instance that runs a poll joins the poll's own consumer group
//! (`<group_id>.poll.<name>`) on the cursor topic, which has one partition: the group assigns
//! it to one member, and that member polls. On taking over, the owner's producer initialises
//! the poll's fixed transactional id, which fences the previous owner (a zombie's commit
//! fails) and completes or aborts its open transaction; only then is the cursor read back.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use thiserror::Error;

use super::error::{ServiceError, kafka_error};
use super::{admin, clients, tools};
use crate::config::{KafkaConfig, PollConfig, cursor_topic};
use crate::metrics::PollMetrics;
use crate::poll::{
    AdaptiveInterval, Cursor, PollDatabase, PollError, PollResult, RecordError, RecordShape,
};

/// How long a once-only poll waits to be given the poll before it gives up.
const OWNERSHIP_WAIT: Duration = Duration::from_secs(30);
/// How often the owner checks the group (and shutdown) while it waits between polls.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum PollRunError {
    #[error(transparent)]
    Kafka(#[from] ServiceError),
    #[error(transparent)]
    Database(#[from] PollError),
    #[error("poll `{poll}` of table `{table}`: {source}")]
    Record {
        table: String,
        poll: String,
        #[source]
        source: RecordError,
    },
    #[error(
        "poll `{poll}`: the cursor record in `{topic}` is unreadable ({detail}); delete it to poll from the start"
    )]
    Cursor {
        poll: String,
        topic: String,
        detail: String,
    },
    #[error("poll `{poll}`: cannot write a page to Kafka: {reason}")]
    Write { poll: String, reason: String },
    #[error(
        "poll `{poll}`: the cursor topic `{topic}` could not be read to its end ({detail}); \
         retrying, since resuming from an older cursor would repeat rows"
    )]
    CursorUnread {
        poll: String,
        topic: String,
        detail: String,
    },
    #[error(
        "poll `{poll}` is owned by another running instance (group `{group}`); stop it, or let \
         it poll"
    )]
    Owned { poll: String, group: String },
}

/// A poll to run: continuously, or once up to the horizon (`cdcflow poll --once`).
#[derive(Debug)]
pub struct PollRun {
    pub config: PollConfig,
    pub metrics: PollMetrics,
    pub once: bool,
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollSummary {
    pub polls: u64,
    pub rows: u64,
}

/// The state of an owner: its producer and where it resumes.
struct Owner {
    producer: FutureProducer,
    cursor: Option<Cursor>,
}

/// Creates the topics every poll needs: its output topic and the shared cursor topic.
pub async fn create_poll_topics(
    kafka: &KafkaConfig,
    polls: &[PollConfig],
) -> Result<(), ServiceError> {
    let mut topics = vec![(cursor_topic(&kafka.group_id), 1, true)];
    topics.extend(
        polls
            .iter()
            .map(|poll| (poll.topic(), kafka.topic_partitions, false)),
    );
    let (kafka, handle) = (kafka.clone(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || admin::create_topics(&kafka, &topics, &handle))
        .await
        .map_err(|error| ServiceError::Webhook(format!("creating poll topics panicked: {error}")))?
}

pub async fn run_poll(
    kafka: &KafkaConfig,
    run: PollRun,
    shutdown: impl Future<Output = ()>,
) -> Result<PollSummary, PollRunError> {
    let config = &run.config;
    let name = config.name.as_str();
    let metrics = &run.metrics;
    metrics.zero(name);
    tokio::pin!(shutdown);
    // A database that is down at start is waited for (continuously); a table or column that
    // is not there is a config error and stops.
    let database = loop {
        match PollDatabase::connect(config).await {
            Ok(database) => break database,
            Err(error @ PollError::Database { .. }) if !run.once => {
                metrics.polls.with_label_values(&[name, "error"]).inc();
                tracing::warn!(poll = name, %error, "cannot reach the database; retrying");
                tokio::select! {
                    () = &mut shutdown => return Ok(PollSummary::default()),
                    () = tokio::time::sleep(config.max_interval) => {}
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    if config.soft_delete_column.is_none() {
        tracing::warn!(
            poll = name,
            table = %config.table,
            "deletes are not seen: rows deleted from the table stay in the pipeline's state \
             (set deletes = \"soft\" and soft_delete_column to see soft deletes)"
        );
    }
    let group = config.group_id(&kafka.group_id);
    let cursors = cursor_topic(&kafka.group_id);
    let consumer: BaseConsumer = clients::poll_owner_consumer(kafka, &group)
        .create()
        .map_err(kafka_error("cannot create the poll's group member"))?;
    consumer
        .subscribe(&[cursors.as_str()])
        .map_err(kafka_error(format!("cannot subscribe to `{cursors}`")))?;
    let shape = RecordShape {
        cursor_column: config.cursor_column.clone(),
        key: config.key.clone(),
        soft_delete_column: config.soft_delete_column.clone(),
    };
    let topic = config.topic();
    let mut interval = AdaptiveInterval::new(config.min_interval, config.max_interval);
    metrics
        .interval_seconds
        .with_label_values(&[name])
        .set(interval.current().as_secs_f64());
    let mut owner: Option<Owner> = None;
    let mut jitter = crate::runtime::Jitter::new();
    let mut summary = PollSummary::default();
    let started = tokio::time::Instant::now();
    let mut next_poll = tokio::time::Instant::now();
    tracing::info!(poll = name, %group, %topic, "poll started");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(TICK) => {}
        }
        // Serves the group's rebalances; the records of the cursor topic are not needed.
        while consumer.poll(Duration::ZERO).is_some() {}
        let owned = consumer
            .assignment()
            .map(|assignment| assignment.count() > 0)
            .unwrap_or(false);
        if !owned {
            if owner.take().is_some() {
                tracing::info!(poll = name, "no longer owns the poll");
            }
            metrics.owner.with_label_values(&[name]).set(0);
            if run.once && started.elapsed() > OWNERSHIP_WAIT {
                return Err(PollRunError::Owned {
                    poll: name.to_owned(),
                    group,
                });
            }
            continue;
        }
        if tokio::time::Instant::now() < next_poll {
            continue;
        }
        if owner.is_none() {
            match take_over(kafka, name, &cursors).await {
                Ok(taken) => {
                    owner = Some(taken);
                    metrics.owner.with_label_values(&[name]).set(1);
                }
                Err(error @ PollRunError::Cursor { .. }) => return Err(error),
                Err(error) if run.once => return Err(error),
                Err(error) => {
                    metrics.polls.with_label_values(&[name, "error"]).inc();
                    tracing::warn!(poll = name, %error, "cannot take the poll over; retrying");
                    next_poll = tokio::time::Instant::now() + interval.jittered(jitter.fraction());
                    continue;
                }
            }
        }
        let Some(current) = owner.as_mut() else {
            continue;
        };
        let target = Target {
            name,
            table: &config.table,
            topic: &topic,
            cursors: &cursors,
        };
        let result = poll_once(&database, current, &shape, &target, metrics).await;
        summary.polls += 1;
        let outcome = match result {
            Ok(rows) => {
                summary.rows += rows as u64;
                let outcome = PollResult::of(rows, config.page_size);
                metrics
                    .polls
                    .with_label_values(&[name, outcome_label(outcome)])
                    .inc();
                metrics.rows.with_label_values(&[name]).inc_by(rows as u64);
                outcome
            }
            Err(Failure::Stop(error)) => return Err(error),
            Err(Failure::Database(error)) if run.once => return Err(error.into()),
            Err(Failure::Database(error)) => {
                metrics.polls.with_label_values(&[name, "error"]).inc();
                tracing::warn!(poll = name, %error, "poll failed; retrying after the interval");
                PollResult::Empty
            }
            Err(Failure::Kafka(reason)) if run.once => {
                return Err(PollRunError::Write {
                    poll: name.to_owned(),
                    reason,
                });
            }
            Err(Failure::Kafka(reason)) => {
                metrics.polls.with_label_values(&[name, "error"]).inc();
                tracing::warn!(poll = name, %reason, "writing a page failed; the owner starts over");
                // The producer may be fenced or in an abortable state: a fresh one aborts
                // what is open and re-reads the cursor of the last committed page.
                owner = None;
                PollResult::Empty
            }
        };
        if run.once && outcome != PollResult::FullPage && owner.is_some() {
            break;
        }
        interval.after(outcome);
        if run.once && outcome == PollResult::FullPage {
            // A backfill reads its pages back to back.
            next_poll = tokio::time::Instant::now();
            continue;
        }
        metrics
            .interval_seconds
            .with_label_values(&[name])
            .set(interval.current().as_secs_f64());
        next_poll = tokio::time::Instant::now() + interval.jittered(jitter.fraction());
    }
    metrics.owner.with_label_values(&[name]).set(0);
    consumer.unsubscribe();
    database.close().await;
    tracing::info!(
        poll = name,
        polls = summary.polls,
        rows = summary.rows,
        "poll stopped"
    );
    Ok(summary)
}

fn outcome_label(result: PollResult) -> &'static str {
    match result {
        PollResult::FullPage => "full",
        PollResult::Some => "partial",
        PollResult::Empty => "empty",
    }
}

enum Failure {
    Stop(PollRunError),
    Database(PollError),
    Kafka(String),
}

/// Becomes the owner: fences the previous one, then reads the cursor it committed.
async fn take_over(kafka: &KafkaConfig, name: &str, cursors: &str) -> Result<Owner, PollRunError> {
    let transactional_id = format!("{}.poll.{name}", kafka.group_id);
    let producer: FutureProducer = clients::poll_producer(kafka, &transactional_id)
        .create()
        .map_err(kafka_error("cannot create the poll's producer"))?;
    let (init, timeout) = (producer.clone(), kafka.transaction_timeout * 3);
    tokio::task::spawn_blocking(move || init.init_transactions(timeout))
        .await
        .map_err(|error| ServiceError::Webhook(format!("the poll's start panicked: {error}")))?
        .map_err(kafka_error(format!(
            "cannot initialise transactions of `{transactional_id}`"
        )))?;
    let (kafka, topic, key) = (kafka.clone(), cursors.to_owned(), name.to_owned());
    let (last, summary) = tokio::task::spawn_blocking(move || {
        let mut last = None;
        tools::read_topics(&kafka, std::slice::from_ref(&topic), |record| {
            if record.key.as_deref() == Some(key.as_bytes()) {
                last = Some(record.value.unwrap_or_default());
            }
            ControlFlow::Continue(())
        })
        .map(|summary| (last, summary))
    })
    .await
    .map_err(|error| ServiceError::Webhook(format!("reading the cursor panicked: {error}")))??;
    // A cursor read short of the end (another poll's transaction open on the shared topic, or
    // the topic missing) would resume from an older cursor: try again later instead.
    if !summary.incomplete.is_empty() || !summary.missing_topics.is_empty() {
        return Err(PollRunError::CursorUnread {
            poll: name.to_owned(),
            topic: cursors.to_owned(),
            detail: if summary.missing_topics.is_empty() {
                format!("{:?} not read to the end", summary.incomplete)
            } else {
                "the topic does not exist".to_owned()
            },
        });
    }
    let cursor = match last.filter(|value| !value.is_empty()) {
        None => None,
        Some(value) => Some(serde_json::from_slice::<Cursor>(&value).map_err(|error| {
            PollRunError::Cursor {
                poll: name.to_owned(),
                topic: cursors.to_owned(),
                detail: error.to_string(),
            }
        })?),
    };
    tracing::info!(poll = name, ?cursor, "owns the poll");
    Ok(Owner { producer, cursor })
}

/// One poll: reads a page below the horizon and writes it with the cursor after it, in one
/// transaction. Returns the rows written.
/// What a poll writes where.
struct Target<'a> {
    name: &'a str,
    table: &'a str,
    topic: &'a str,
    cursors: &'a str,
}

async fn poll_once(
    database: &PollDatabase,
    owner: &mut Owner,
    shape: &RecordShape,
    target: &Target<'_>,
    metrics: &PollMetrics,
) -> Result<usize, Failure> {
    let Target {
        name,
        table,
        topic,
        cursors,
    } = *target;
    let horizon = database.horizon().await.map_err(Failure::Database)?;
    metrics
        .horizon_lag_seconds
        .with_label_values(&[name])
        .set((horizon.now_ms - horizon.at_ms) as f64 / 1000.0);
    let rows = database
        .page(&horizon, owner.cursor.as_ref())
        .await
        .map_err(Failure::Database)?;
    if rows.is_empty() {
        report_cursor_lag(metrics, name, &horizon, owner.cursor.as_ref());
        return Ok(0);
    }
    let count = rows.len();
    let mut records = Vec::with_capacity(count);
    for row in rows {
        records.push(shape.record(row).map_err(|source| {
            Failure::Stop(PollRunError::Record {
                table: table.to_owned(),
                poll: name.to_owned(),
                source,
            })
        })?);
    }
    let cursor = records.last().map(|record| record.cursor.clone());
    let cursor_value =
        serde_json::to_vec(&cursor).map_err(|error| Failure::Kafka(error.to_string()))?;
    let producer = &owner.producer;
    producer
        .begin_transaction()
        .map_err(|error| Failure::Kafka(format!("cannot begin a transaction: {error}")))?;
    let mut deliveries = Vec::with_capacity(count + 1);
    for record in &records {
        deliveries.push(
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(&record.key)
                        .payload(&record.value),
                )
                .map_err(|(error, _)| Failure::Kafka(format!("cannot queue a row: {error}")))?,
        );
    }
    deliveries.push(
        producer
            .send_result(FutureRecord::to(cursors).key(name).payload(&cursor_value))
            .map_err(|(error, _)| Failure::Kafka(format!("cannot queue the cursor: {error}")))?,
    );
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => {
                return Err(Failure::Kafka(format!("a row was refused: {error}")));
            }
            Err(_) => return Err(Failure::Kafka("a delivery was cancelled".to_owned())),
        }
    }
    let committing = producer.clone();
    tokio::task::spawn_blocking(move || committing.commit_transaction(Duration::from_secs(30)))
        .await
        .map_err(|error| Failure::Kafka(format!("the commit panicked: {error}")))?
        .map_err(|error| Failure::Kafka(format!("cannot commit: {error}")))?;
    owner.cursor = cursor;
    report_cursor_lag(metrics, name, &horizon, owner.cursor.as_ref());
    Ok(count)
}

fn report_cursor_lag(
    metrics: &PollMetrics,
    name: &str,
    horizon: &crate::poll::Horizon,
    cursor: Option<&Cursor>,
) {
    if let Some(ts_ms) = cursor.and_then(|cursor| cursor.ts_ms) {
        metrics
            .cursor_lag_seconds
            .with_label_values(&[name])
            .set((horizon.now_ms - ts_ms) as f64 / 1000.0);
    }
}
