//! The config of cdcflow's HTTP edges: outgoing webhook subscriptions (`[[webhook]]`) and the
//! webhook ingress (`[ingress]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::security::Secret;
use super::{ConfigError, invalid, is_identifier};

/// `[[webhook]]`: a subscription that POSTs business events to an endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the subscription: its consumer group, DLQ topic and metrics.
    pub name: String,
    /// Business-event topics to deliver.
    pub topics: Vec<String>,
    /// The endpoint (http or https).
    pub url: String,
    /// Standard Webhooks secrets (`whsec_...`), the current one first; every one signs during
    /// a rotation.
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// An environment variable holding the secrets, space-separated.
    #[serde(default)]
    pub secrets_env: Option<String>,
    /// Only these CloudEvents types (default: every event of the topics).
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Only events for which this CEL condition holds; `event` is the CloudEvent
    /// (`event.type`, `event.data.total > 100`). Default: every event.
    #[serde(default)]
    pub when: Option<String>,
    /// One attempt's limit, connecting and answering. Default 10 s.
    #[serde(default = "default_webhook_timeout", with = "super::duration")]
    pub timeout: Duration,
    /// Attempts in all before the DLQ. Default 300: with the default backoff (waits of 5 to
    /// 10 min once doubled up) that lasts past `max_age`, so an endpoint that is down is
    /// retried for a day.
    #[serde(default = "default_webhook_max_attempts")]
    pub max_attempts: u32,
    /// From the first attempt, how long an event may take before the DLQ. Default 24 h.
    #[serde(default = "default_webhook_max_age", with = "super::duration")]
    pub max_age: Duration,
    /// The first wait between attempts; it doubles up to `max_backoff`. Default 1 s.
    #[serde(default = "default_webhook_initial_backoff", with = "super::duration")]
    pub initial_backoff: Duration,
    /// Default 10 min.
    #[serde(default = "default_webhook_max_backoff", with = "super::duration")]
    pub max_backoff: Duration,
    /// Requests at once. Default 32.
    #[serde(default = "default_webhook_max_in_flight")]
    pub max_in_flight: usize,
    /// Events held in memory (the consumer pauses beyond). Default 10,000.
    #[serde(default = "default_webhook_max_queued")]
    pub max_queued: usize,
    /// Dead-letter topic. Default `cdcflow.webhook-dlq.<name>`.
    #[serde(default)]
    pub dlq_topic: Option<String>,
}

impl WebhookConfig {
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("cdcflow.webhook-dlq.{}", self.name))
    }

    /// The subscription's own consumer group: `<kafka.group_id>.webhook.<name>`.
    pub fn group_id(&self, kafka_group: &str) -> String {
        format!("{kafka_group}.webhook.{}", self.name)
    }
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_webhook_max_attempts() -> u32 {
    300
}
fn default_webhook_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_webhook_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_webhook_max_backoff() -> Duration {
    Duration::from_secs(600)
}
fn default_webhook_max_in_flight() -> usize {
    32
}
fn default_webhook_max_queued() -> usize {
    10_000
}

/// `[ingress]`: an HTTP endpoint that takes pushed changes or events and writes each once to
/// Kafka, deduplicated by request id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Address and port to listen on. Default `0.0.0.0:8090`; port 0 picks a free port.
    #[serde(default = "default_ingress_listen")]
    pub listen: SocketAddr,
    /// Where processed request ids are kept: `postgres://...` (shared by every instance behind
    /// a load balancer) or `sqlite://path` (one instance). Default: `ingress.db` beside
    /// `state.path`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Connections to the database. Default 16 (PostgreSQL); SQLite writes through one.
    #[serde(default = "default_ingress_pool_size")]
    pub pool_size: u32,
    /// Standard Webhooks secrets (`whsec_...`); a push must be signed with one of them.
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// An environment variable holding the secrets, space-separated.
    #[serde(default)]
    pub secrets_env: Option<String>,
    /// Accept pushes without a signature. Default false: a config without secrets is refused.
    #[serde(default)]
    pub allow_unsigned: bool,
    /// How far `webhook-timestamp` may be from now, either way. Default 5 min.
    #[serde(default = "default_ingress_tolerance", with = "super::duration")]
    pub timestamp_tolerance: Duration,
    /// Largest body accepted (413 beyond). Default 1 MiB.
    #[serde(default = "default_ingress_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a request id is remembered. Default 24 h (a sender's retries must end sooner).
    #[serde(default = "default_ingress_retention", with = "super::duration")]
    pub retention: Duration,
    /// How long a push may wait for Kafka's acknowledgement before it is answered 503.
    /// Default 10 s.
    #[serde(default = "default_ingress_produce_timeout", with = "super::duration")]
    pub produce_timeout: Duration,
    /// The paths pushes are taken on.
    #[serde(rename = "route", default)]
    pub routes: Vec<IngressRoute>,
}

/// `[[ingress.route]]`: one path, one topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRoute {
    /// The URL path, e.g. `/orders`.
    pub path: String,
    /// The topic each accepted push is written to.
    pub topic: String,
    /// The body's fields that identify the entity; dotted paths reach nested fields
    /// (`data.order_id`). The Kafka key is a JSON object of them, as Debezium writes keys.
    pub key: Vec<String>,
}

impl IngressConfig {
    /// The database URL, defaulted beside the state store.
    pub fn database_url(&self, state_path: &std::path::Path) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            let dir = state_path
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from);
            format!("sqlite://{}", dir.join("ingress.db").display())
        })
    }
}

fn default_ingress_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8090))
}
fn default_ingress_pool_size() -> u32 {
    16
}
fn default_ingress_tolerance() -> Duration {
    Duration::from_secs(300)
}
fn default_ingress_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_ingress_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_ingress_produce_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Names, topics and limits of the subscriptions; the `when` conditions compile.
pub(super) fn validate_webhooks(webhooks: &[WebhookConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (index, webhook) in webhooks.iter().enumerate() {
        let at = |key: &str| format!("webhook[{index}].{key}");
        if !is_identifier(&webhook.name) {
            return Err(invalid(
                at("name"),
                format!(
                    "`{}` is not a valid name: use letters, digits, `_`, `-` and `.`",
                    webhook.name
                ),
            ));
        }
        if !names.insert(webhook.name.as_str()) {
            return Err(invalid(
                at("name"),
                format!(
                    "subscription `{}` is defined twice; names must be unique",
                    webhook.name
                ),
            ));
        }
        if webhook.topics.is_empty() {
            return Err(invalid(
                at("topics"),
                "the subscription reads no topic: name the business-event topics to deliver",
            ));
        }
        if !(webhook.url.starts_with("http://") || webhook.url.starts_with("https://")) {
            return Err(invalid(
                at("url"),
                format!("`{}` is not an http:// or https:// URL", webhook.url),
            ));
        }
        for (key, value) in [
            ("max_attempts", webhook.max_attempts as usize),
            ("max_in_flight", webhook.max_in_flight),
            ("max_queued", webhook.max_queued),
        ] {
            if value == 0 {
                return Err(invalid(at(key), "must be at least 1"));
            }
        }
        if webhook.max_queued < webhook.max_in_flight {
            return Err(invalid(
                at("max_queued"),
                "must be at least max_in_flight: the events in flight are held too",
            ));
        }
        if webhook.initial_backoff.is_zero() || webhook.max_backoff < webhook.initial_backoff {
            return Err(invalid(
                at("max_backoff"),
                "initial_backoff must be above 0 and max_backoff at least initial_backoff",
            ));
        }
        if let Some(when) = &webhook.when {
            crate::webhook::EventFilter::compile(when)
                .map_err(|error| invalid(at("when"), error.to_string()))?;
        }
    }
    Ok(())
}

/// Routes, limits and the database scheme of `[ingress]`.
pub(super) fn validate_ingress(ingress: &IngressConfig) -> Result<(), ConfigError> {
    if ingress.routes.is_empty() {
        return Err(invalid(
            "ingress.route",
            "the ingress has no route: add [[ingress.route]] with a path, a topic and key fields",
        ));
    }
    if ingress.secrets.is_empty() && ingress.secrets_env.is_none() && !ingress.allow_unsigned {
        return Err(invalid(
            "ingress.secrets",
            "pushes must be signed: set secrets (or secrets_env) to the senders' `whsec_` \
             secrets, or allow_unsigned = true behind a gateway that authenticates them",
        ));
    }
    if ingress.pool_size == 0 {
        return Err(invalid("ingress.pool_size", "must be at least 1"));
    }
    if ingress.max_body_bytes == 0 {
        return Err(invalid("ingress.max_body_bytes", "must be at least 1"));
    }
    if ingress.retention.is_zero() {
        return Err(invalid(
            "ingress.retention",
            "must be above 0: it is how long a sender's retries are recognised",
        ));
    }
    if ingress.produce_timeout.is_zero() {
        return Err(invalid("ingress.produce_timeout", "must be above 0"));
    }
    if let Some(url) = &ingress.database_url {
        let known = ["postgres://", "postgresql://", "sqlite:"];
        if !known.iter().any(|scheme| url.starts_with(scheme)) {
            return Err(invalid(
                "ingress.database_url",
                "use postgres://user:password@host/db (shared by instances) or sqlite://path",
            ));
        }
    }
    let mut paths = std::collections::HashSet::new();
    for (index, route) in ingress.routes.iter().enumerate() {
        let at = |key: &str| format!("ingress.route[{index}].{key}");
        if !route.path.starts_with('/') {
            return Err(invalid(
                at("path"),
                format!("`{}` must start with `/`", route.path),
            ));
        }
        if !paths.insert(route.path.as_str()) {
            return Err(invalid(
                at("path"),
                format!("`{}` is routed twice; paths must be unique", route.path),
            ));
        }
        if route.topic.trim().is_empty() {
            return Err(invalid(at("topic"), "name the topic pushes are written to"));
        }
        if route.key.is_empty() || route.key.iter().any(|field| field.trim().is_empty()) {
            return Err(invalid(
                at("key"),
                "name the body's fields that identify the entity, e.g. key = [\"id\"]",
            ));
        }
        // The key object names each field by its last segment: two alike would collide.
        let mut names = std::collections::HashSet::new();
        for field in &route.key {
            let name = field.rsplit('.').next().unwrap_or(field);
            if !names.insert(name) {
                return Err(invalid(
                    at("key"),
                    format!(
                        "two key fields end in `{name}`; the Kafka key names each field by its \
                         last segment, so they must differ"
                    ),
                ));
            }
        }
    }
    Ok(())
}
