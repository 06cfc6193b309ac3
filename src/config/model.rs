//! The config file's shape. Every field is documented for users; `schemas/config.schema.json`
//! mirrors it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::duration;
use super::endpoints::{IngressConfig, WebhookConfig};
use super::poll::{PollConfig, ReconcileConfig};
use super::security::{ClientSecurity, SecurityConfig};
use crate::cdc::{DecodeLimits, EnvelopeFormat};
use crate::engine::{Connector, EventMode, PayloadSpec, RuleSpec, VersionSource, VersionSpec};

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where entity state lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Limits that protect the process from hostile records.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How business events are written.
    #[serde(default)]
    pub events: EventsConfig,
    /// Settings of `cdcflow replay`.
    #[serde(default)]
    pub replay: ReplayConfig,
    /// Settings of `cdcflow run` (the Kafka consumer-group service).
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The HTTP endpoint of `cdcflow run`: metrics and health.
    #[serde(default)]
    pub http: HttpConfig,
    /// The pipelines: one per source table (or group of topics).
    #[serde(rename = "pipeline", default)]
    pub pipelines: Vec<PipelineConfig>,
    /// Outgoing webhook subscriptions (`cdcflow run` or `cdcflow deliver`).
    #[serde(rename = "webhook", default)]
    pub webhooks: Vec<WebhookConfig>,
    /// The webhook ingress (`cdcflow run` or `cdcflow ingress`).
    #[serde(default)]
    pub ingress: Option<IngressConfig>,
    /// SQL polling sources (`cdcflow run` or `cdcflow poll`).
    #[serde(rename = "poll", default)]
    pub polls: Vec<PollConfig>,
}

/// `[state]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// SQLite file holding per-entity state; created if missing. Default `cdcflow-state.db`.
    #[serde(default = "default_state_path")]
    pub path: PathBuf,
    /// Entity states kept in memory in front of the store. Default 100,000.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Records between state saves; an entity changed many times in a window is written
    /// once. A crash repeats at most this window's outputs (with the same event ids).
    /// Default 100,000: a save rewrites every table page its window touched, so with many
    /// entities a larger window costs barely more to save than a small one (replay bench,
    /// 100,000 entities: 25,000 -> 88k records/s, 250,000 -> 111k). With the Kafka service
    /// the save runs behind processing, and a window's states are held twice while it does.
    #[serde(default = "default_flush_records")]
    pub flush_records: usize,
}

fn default_flush_records() -> usize {
    100_000
}

fn default_state_path() -> PathBuf {
    PathBuf::from("cdcflow-state.db")
}

fn default_cache_entries() -> usize {
    100_000
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: default_state_path(),
            cache_entries: default_cache_entries(),
            flush_records: default_flush_records(),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Records whose key plus value exceed this many bytes go to the DLQ. Default 1 MiB
    /// (Kafka's default `message.max.bytes` is about the same).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// JSON nested deeper than this goes to the DLQ. Default and maximum 128 (serde_json's own
    /// limit, checked at no cost); a lower limit costs one scan of each record.
    #[serde(default = "default_max_nesting_depth")]
    pub max_nesting_depth: usize,
    /// A change whose event record would exceed this many bytes goes to the DLQ
    /// (`output_too_large`) instead of failing at the broker. Default 1,000,000, librdkafka's
    /// default `message.max.bytes`.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
}

fn default_max_record_bytes() -> usize {
    DecodeLimits::default().max_record_bytes
}

fn default_max_nesting_depth() -> usize {
    DecodeLimits::default().max_nesting_depth
}

fn default_max_output_bytes() -> usize {
    1_000_000
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_record_bytes: default_max_record_bytes(),
            max_nesting_depth: default_max_nesting_depth(),
            max_output_bytes: default_max_output_bytes(),
        }
    }
}

impl LimitsConfig {
    pub fn to_decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_record_bytes: self.max_record_bytes,
            max_nesting_depth: self.max_nesting_depth,
        }
    }
}

/// `[events]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// `structured` (default: the whole CloudEvent as JSON value) or `binary` (`data` as the
    /// value, attributes as `ce_` headers).
    #[serde(default)]
    pub mode: EventModeConfig,
    /// CloudEvents `source` prefix; the pipeline name is appended. Default `/cdcflow/pipelines`.
    #[serde(default = "default_source_prefix")]
    pub source_prefix: String,
}

fn default_source_prefix() -> String {
    "/cdcflow/pipelines".to_owned()
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            mode: EventModeConfig::default(),
            source_prefix: default_source_prefix(),
        }
    }
}

/// CloudEvents content mode.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventModeConfig {
    #[default]
    Structured,
    Binary,
}

impl EventModeConfig {
    pub fn to_mode(self) -> EventMode {
        match self {
            EventModeConfig::Structured => EventMode::Structured,
            EventModeConfig::Binary => EventMode::Binary,
        }
    }
}

/// `[replay]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// Records per batch: one state transaction per batch. Default 5,000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    5_000
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            batch_size: default_batch_size(),
        }
    }
}

/// `[[pipeline]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name; part of event ids, so renaming a pipeline changes its ids.
    pub name: String,
    /// Input topics, e.g. `["dbserver1.public.orders"]`.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regex matched against whole topic names, in addition to `topics`.
    #[serde(default)]
    pub topic_pattern: Option<String>,
    /// `auto` (default), `envelope`, `flattened`, or `cloudevents` (another pipeline's events).
    #[serde(default)]
    pub format: FormatConfig,
    /// Row fields that identify the entity when a record has no key.
    #[serde(default)]
    pub key_fields: Vec<String>,
    /// How versions are read.
    #[serde(default)]
    pub version: VersionConfig,
    /// Dead-letter topic. Default `cdcflow.dlq.<name>`.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// Topic that receives one small record per dropped (duplicate or stale) change. Off by
    /// default.
    #[serde(default)]
    pub audit_topic: Option<String>,
    /// What happens to an entity's later changes once one of its changes is dead-lettered:
    /// `continue` (default: they are processed) or `park` (they wait behind it, in order and
    /// durably, until `cdcflow dlq replay` or `cdcflow dlq discard` releases it).
    #[serde(default)]
    pub dlq_policy: crate::engine::DlqPolicy,
    /// With `dlq_policy = "park"`: the most changes one entity parks; a change beyond it
    /// goes to the DLQ with reason `park_limit_reached` (parked changes travel inside the
    /// entity's changelog record, which must stay under the topic's max.message.bytes).
    /// Default 100.
    #[serde(default = "default_park_limit")]
    pub park_limit: usize,
    /// The Debezium connector's `unavailable.value.placeholder` (what an unchanged TOASTed
    /// column carries with Postgres' REPLICA IDENTITY DEFAULT). A field holding it (as text,
    /// base64 or hex bytes, or an array of it) takes the entity's stored value before rules
    /// run; without one it is left out and named in the event's `unavailablefields`. Default
    /// `__debezium_unavailable_value`.
    #[serde(default)]
    pub unavailable_value_placeholder: Option<String>,
    /// The source of truth `cdcflow reconcile` compares the pipeline's state with.
    #[serde(default)]
    pub reconcile: Option<ReconcileConfig>,
    /// The rules that derive business events.
    #[serde(rename = "rule", default)]
    pub rules: Vec<RuleConfig>,
}

fn default_park_limit() -> usize {
    100
}

impl PipelineConfig {
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("cdcflow.dlq.{}", self.name))
    }
}

/// The value layout of a pipeline's topics.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FormatConfig {
    #[default]
    Auto,
    Envelope,
    Flattened,
    /// Another pipeline's business events (a chain stage).
    Cloudevents,
}

impl FormatConfig {
    pub fn to_format(self) -> EnvelopeFormat {
        match self {
            FormatConfig::Auto => EnvelopeFormat::Auto,
            FormatConfig::Envelope => EnvelopeFormat::Envelope,
            FormatConfig::Flattened => EnvelopeFormat::Flattened,
            FormatConfig::Cloudevents => EnvelopeFormat::CloudEvents,
        }
    }
}

/// `[pipeline.version]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VersionConfig {
    /// `source_position` (default), `column` or `ts_ms`.
    #[serde(default)]
    pub by: VersionBy,
    /// The integer version column, with `by = "column"`.
    #[serde(default)]
    pub column: Option<String>,
    /// With `by = "source_position"`: `postgresql`, `mysql`, `mariadb`, `sqlserver` or
    /// `oracle`. Default: read `source.connector` of each record.
    #[serde(default)]
    pub connector: Option<ConnectorConfig>,
    /// An integer column that orders snapshot reads of one entity, which share a position.
    #[serde(default)]
    pub snapshot_column: Option<String>,
}

impl VersionConfig {
    pub fn to_spec(&self) -> VersionSpec {
        let source = match self.by {
            VersionBy::SourcePosition => {
                VersionSource::SourcePosition(self.connector.map(ConnectorConfig::to_connector))
            }
            VersionBy::Column => VersionSource::Column(self.column.clone().unwrap_or_default()),
            VersionBy::TsMs => VersionSource::TsMs,
        };
        VersionSpec {
            source,
            snapshot_column: self.snapshot_column.clone(),
        }
    }
}

/// Where versions come from.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VersionBy {
    #[default]
    SourcePosition,
    Column,
    TsMs,
}

/// Connectors with a known position order.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConnectorConfig {
    Postgresql,
    Mysql,
    Mariadb,
    Sqlserver,
    Oracle,
}

impl ConnectorConfig {
    fn to_connector(self) -> Connector {
        match self {
            ConnectorConfig::Postgresql => Connector::Postgres,
            ConnectorConfig::Mysql | ConnectorConfig::Mariadb => Connector::MySql,
            ConnectorConfig::Sqlserver => Connector::SqlServer,
            ConnectorConfig::Oracle => Connector::Oracle,
        }
    }
}

/// `[[pipeline.rule]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique within the pipeline; part of event ids.
    pub name: String,
    /// CEL condition over `op`, `before`, `after`, `previous`, `old`, `key`, `source`.
    pub when: String,
    /// CloudEvents `type`, e.g. `com.example.order.paid`.
    pub event_type: String,
    /// Output topic.
    pub topic: String,
    /// `data` of the event: a table of field = CEL expression, or one CEL expression. Default:
    /// the newest row image.
    #[serde(default)]
    pub payload: Option<PayloadConfig>,
}

/// A payload mapping.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PayloadConfig {
    Expression(String),
    Fields(BTreeMap<String, String>),
}

impl RuleConfig {
    pub fn to_spec(&self) -> RuleSpec {
        RuleSpec {
            name: self.name.clone(),
            when: self.when.clone(),
            event_type: self.event_type.clone(),
            topic: self.topic.clone(),
            payload: match &self.payload {
                None => PayloadSpec::Row,
                Some(PayloadConfig::Expression(source)) => PayloadSpec::Expression(source.clone()),
                Some(PayloadConfig::Fields(fields)) => PayloadSpec::Fields(
                    fields
                        .iter()
                        .map(|(name, source)| (name.clone(), source.clone()))
                        .collect(),
                ),
            },
        }
    }
}

/// `[http]`: `/metrics`, `/healthz` and `/readyz` of `cdcflow run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve the endpoint at all. Default true.
    #[serde(default = "default_http_enabled")]
    pub enabled: bool,
    /// Address and port to listen on. Default `0.0.0.0:9464` (reachable by Prometheus and
    /// Kubernetes probes); port 0 picks a free port, logged at start.
    #[serde(default = "default_http_listen")]
    pub listen: std::net::SocketAddr,
}

fn default_http_enabled() -> bool {
    true
}
fn default_http_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 9464))
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: default_http_enabled(),
            listen: default_http_listen(),
        }
    }
}

/// `[kafka]`: the consumer-group service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Brokers to bootstrap from. Default `127.0.0.1:9092`.
    #[serde(default = "default_bootstrap_servers")]
    pub bootstrap_servers: String,
    /// Consumer group; also the prefix of changelog topics and transactional ids. Default
    /// `cdcflow`.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// This instance's stable name (a StatefulSet pod name, say): its transactional id is
    /// `<group_id>-<instance_id>`, so a restart fences its previous incarnation. Default: the
    /// host name. Two instances on one host need distinct ids.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// `exactly_once` (default: Kafka transactions) or `at_least_once`.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Most records in one batch (one transaction). Default 10,000: a transaction costs a few
    /// broker round trips, so larger batches amortise them.
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// Most bytes (keys, values and headers) in one batch: bounds memory however large the
    /// records are. Default 32 MiB.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// The exactly-once commit cadence, e.g. `"100ms"`: a batch closes one wait after the
    /// previous batch started, as `commit.interval.ms` does for Kafka Streams; one that starts
    /// late takes the records already fetched and closes. Default 100 ms: the transaction's
    /// fixed cost (a few broker round trips) stays small beside 100 ms of records, and output
    /// is visible within about one wait. At-least-once closes a batch as soon as the records
    /// already fetched are drained.
    #[serde(default = "default_batch_max_wait", with = "duration")]
    pub batch_max_wait: std::time::Duration,
    /// `transaction.timeout.ms`: keep it modest, an open transaction of a dead instance blocks
    /// read_committed readers until it expires. Default 10 s.
    #[serde(default = "default_transaction_timeout", with = "duration")]
    pub transaction_timeout: std::time::Duration,
    /// How long SIGTERM may take to finish the batch, commit and leave the group. Default 30 s.
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: std::time::Duration,
    /// Partitions of output, DLQ and audit topics cdcflow creates. Default 1.
    #[serde(default = "default_topic_partitions")]
    pub topic_partitions: i32,
    /// Replication factor of topics cdcflow creates (changelogs included). Default 1.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// `[kafka.security]`: TLS and SASL, for every client cdcflow opens.
    #[serde(default)]
    pub security: SecurityConfig,
    /// The security settings with their secrets read (at load, from the environment or
    /// files).
    #[serde(skip)]
    pub client_security: ClientSecurity,
    /// librdkafka consumer properties passed through (e.g. `"session.timeout.ms" = "10000"`).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka producer properties passed through (e.g. `"compression.type" = "zstd"`).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

fn default_bootstrap_servers() -> String {
    "127.0.0.1:9092".to_owned()
}
fn default_group_id() -> String {
    "cdcflow".to_owned()
}
fn default_batch_max_records() -> usize {
    10_000
}
fn default_batch_max_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_batch_max_wait() -> std::time::Duration {
    std::time::Duration::from_millis(100)
}
fn default_transaction_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_shutdown_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}
fn default_topic_partitions() -> i32 {
    1
}
fn default_replication_factor() -> i32 {
    1
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: default_bootstrap_servers(),
            group_id: default_group_id(),
            instance_id: None,
            delivery: DeliveryConfig::default(),
            batch_max_records: default_batch_max_records(),
            batch_max_bytes: default_batch_max_bytes(),
            batch_max_wait: default_batch_max_wait(),
            transaction_timeout: default_transaction_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            topic_partitions: default_topic_partitions(),
            replication_factor: default_replication_factor(),
            security: SecurityConfig::default(),
            client_security: ClientSecurity::default(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// Delivery guarantee of `cdcflow run`.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryConfig {
    /// Outputs, changelog, DLQ records and consumed offsets commit in one Kafka transaction.
    #[default]
    ExactlyOnce,
    /// Outputs durable, then state, then offsets: a crash can repeat an event (same id).
    AtLeastOnce,
}
