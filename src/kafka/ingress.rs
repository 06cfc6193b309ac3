//! The ingress's writer: one idempotent producer (acks=all), and a push is answered only
//! once its record is acknowledged.

use std::time::Duration;

use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::clients;
use super::error::{ServiceError, kafka_error};
use crate::config::KafkaConfig;

/// Where an accepted push was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Clone)]
pub struct IngressProducer {
    producer: FutureProducer,
}

impl std::fmt::Debug for IngressProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressProducer").finish_non_exhaustive()
    }
}

impl IngressProducer {
    /// `produce_timeout` bounds librdkafka's own retries (`message.timeout.ms`): past it the
    /// push is answered 503 and the sender retries with the same request id.
    pub fn new(kafka: &KafkaConfig, produce_timeout: Duration) -> Result<Self, ServiceError> {
        let mut config = clients::idempotent_producer(kafka);
        config
            .set(
                "message.timeout.ms",
                produce_timeout.as_millis().to_string(),
            )
            .set("linger.ms", "2");
        let producer = config
            .create()
            .map_err(kafka_error("cannot create the ingress producer"))?;
        Ok(IngressProducer { producer })
    }

    /// Writes one record and waits for the broker's acknowledgement.
    pub async fn write(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Written, ServiceError> {
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(KafkaHeader {
                    key,
                    value: Some(*value),
                })
            });
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .headers(headers);
        // The queue wait is bounded by `message.timeout.ms`, like the delivery itself.
        let delivery = self
            .producer
            .send(record, rdkafka::util::Timeout::Never)
            .await
            .map_err(|(source, _)| ServiceError::Kafka {
                context: format!("cannot write the push to `{topic}`"),
                source,
            })?;
        Ok(Written {
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }
}
