//! Produce bookkeeping: sending a batch's outputs and changelog records, and reading their
//! delivery reports back into changelog offsets, refused outputs or a failure.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::commit::{BatchFailure, Committer, classify};
use super::report::ClientReports;
use crate::engine::OutputRecord;
use crate::store::{Checkpoint, StateStore, StateWrite, changelog};

/// cdcflow's producer: its client context logs and counts librdkafka's errors.
pub(super) type Producer = FutureProducer<ClientReports>;

/// A changelog record to write: the pipeline's index and the state.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChangelogRecord<'a> {
    pub pipeline: usize,
    pub write: &'a StateWrite,
}

/// What a produced record was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Produced {
    /// An output (event, DLQ or audit record), by its index in the batch's outputs.
    Output(usize),
    Changelog,
}

/// A record handed to the producer, and where it went.
struct Sent<T> {
    produced: Produced,
    topic: String,
    partition: i32,
    delivery: T,
}

/// What a delivery future resolved to.
type DeliveryReport = <DeliveryFuture as Future>::Output;

/// One output refused for its size.
#[derive(Debug)]
pub(super) struct RefusedOutput {
    pub index: usize,
    pub error: RDKafkaErrorCode,
}

/// Deliveries of one batch.
#[derive(Default)]
pub(super) struct Deliveries {
    pending: Vec<Sent<DeliveryFuture>>,
    reported: Vec<Sent<DeliveryReport>>,
    /// Outputs the producer refused before sending them.
    pub refused: Vec<RefusedOutput>,
}

/// Why one record could not be handed to the producer.
enum SendError {
    /// Too large for the producer's `message.max.bytes`.
    Refused(RDKafkaErrorCode),
    Failed(BatchFailure),
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

impl<S: StateStore> Committer<'_, S> {
    /// Sends outputs and changelog records; returns what is in flight and what the producer
    /// refused as too large.
    pub(super) fn send_all(
        &self,
        outputs: &[OutputRecord],
        changelog_records: &[ChangelogRecord<'_>],
    ) -> Result<Deliveries, BatchFailure> {
        let mut deliveries = Deliveries {
            pending: Vec::with_capacity(outputs.len() + changelog_records.len()),
            ..Deliveries::default()
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
                Ok(delivery) => deliveries.pending.push(Sent {
                    produced: Produced::Output(index),
                    topic: output.topic.clone(),
                    partition: -1,
                    delivery,
                }),
                Err(SendError::Refused(error)) => {
                    deliveries.refused.push(RefusedOutput { index, error });
                }
                Err(SendError::Failed(failure)) => return Err(failure),
            }
        }
        for ChangelogRecord { pipeline, write } in changelog_records {
            let topic = &self.topology.changelogs[*pipeline];
            let value = changelog::encode(&write.state);
            let record = FutureRecord::to(topic)
                .partition(write.partition)
                .key(write.entity.as_bytes())
                .payload(&value[..]);
            let delivery = self.send(record).map_err(|error| match error {
                SendError::Failed(failure) => failure,
                SendError::Refused(code) => BatchFailure::Retry(format!(
                    "a changelog record of `{topic}` was refused: {code}; raise the topic's \
                     max.message.bytes above the largest row image"
                )),
            })?;
            deliveries.pending.push(Sent {
                produced: Produced::Changelog,
                topic: topic.clone(),
                partition: write.partition,
                delivery,
            });
        }
        Ok(deliveries)
    }

    /// Hands one record to the producer. A full producer queue is back-pressure, not an
    /// error: wait for deliveries to make room, bounded by the transaction timeout.
    fn send(&self, mut record: FutureRecord<'_, [u8], [u8]>) -> Result<DeliveryFuture, SendError> {
        let deadline = Instant::now() + self.options.kafka.transaction_timeout;
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
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

    /// Waits for the delivery reports of a transaction before its commit. The first failed
    /// report ends the wait, as a failure: an abort follows, and purges what is still queued.
    pub(super) fn await_until_failure(
        &self,
        deliveries: &mut Deliveries,
    ) -> Result<(), BatchFailure> {
        while let Some(sent) = deliveries.pending.pop() {
            let report = self.runtime.block_on(sent.delivery);
            let failure = match &report {
                Ok(Ok(_)) => None,
                // A fenced producer is fatal, whichever call reports it.
                Ok(Err((error, _))) => {
                    Some(classify("delivery", error.clone(), self.transactional_id))
                }
                Err(_) => Some(BatchFailure::Retry("a delivery was cancelled".to_owned())),
            };
            deliveries.reported.push(Sent {
                produced: sent.produced,
                topic: sent.topic,
                partition: sent.partition,
                delivery: report,
            });
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Ok(())
    }

    /// Waits for every delivery still pending.
    pub(super) fn await_all(&self, deliveries: &mut Deliveries) {
        for sent in deliveries.pending.drain(..) {
            let report = self.runtime.block_on(sent.delivery);
            deliveries.reported.push(Sent {
                produced: sent.produced,
                topic: sent.topic,
                partition: sent.partition,
                delivery: report,
            });
        }
    }

    /// Waits for every delivery; returns the changelog offsets, or the refused outputs, or
    /// the first other failure.
    pub(super) fn await_deliveries(
        &self,
        mut deliveries: Deliveries,
    ) -> Result<Vec<Checkpoint>, BatchFailure> {
        self.await_all(&mut deliveries);
        self.delivered(deliveries)
    }

    /// The outcome of reported deliveries: the changelog offsets, or the refused outputs, or
    /// the first other failure (a fatal one first of all).
    pub(super) fn delivered(
        &self,
        deliveries: Deliveries,
    ) -> Result<Vec<Checkpoint>, BatchFailure> {
        debug_assert!(deliveries.pending.is_empty(), "every delivery is reported");
        let mut offsets = Vec::new();
        let mut refused = deliveries.refused;
        let mut failure: Option<BatchFailure> = None;
        for Sent {
            produced,
            topic,
            partition,
            delivery,
        } in deliveries.reported
        {
            match delivery {
                Ok(Ok(delivery)) => {
                    if produced == Produced::Changelog {
                        offsets.push(Checkpoint {
                            topic,
                            partition: delivery.partition,
                            offset: delivery.offset,
                        });
                    }
                }
                Ok(Err((error, _))) => match (produced, is_size_refusal(&error)) {
                    (Produced::Output(index), Some(error)) => {
                        refused.push(RefusedOutput { index, error });
                    }
                    _ => {
                        let classified = classify(
                            &format!("delivery to `{topic}` (partition {partition})"),
                            error,
                            self.transactional_id,
                        );
                        if matches!(classified, BatchFailure::Fatal(_)) || failure.is_none() {
                            failure = Some(classified);
                        }
                    }
                },
                Err(_) => {
                    failure.get_or_insert_with(|| {
                        BatchFailure::Retry(format!("delivery to `{topic}` was cancelled"))
                    });
                }
            }
        }
        if let Some(fatal @ BatchFailure::Fatal(_)) = failure {
            return Err(fatal);
        }
        if !refused.is_empty() {
            return Err(BatchFailure::Refused(refused));
        }
        match failure {
            Some(failure) => Err(failure),
            None => Ok(offsets),
        }
    }
}
