//! The typed configuration: one TOML file, environment overrides, validation that names the key
//! and the fix, and compilation into [`Pipeline`]s.
//!
//! Unknown keys are errors. Environment variables `CDCFLOW__<SECTION>__<KEY>=value` override
//! a key (`CDCFLOW__STATE__PATH=/var/lib/cdcflow/state.db`); the value is read as a TOML value
//! when it parses as one, else as text.

mod chains;
mod duration;
mod endpoints;
mod model;
mod poll;
mod security;

pub use security::{
    ClientSecurity, Protocol, SaslMechanism, Secret, SecurityConfig, SecurityError,
};

use std::collections::HashSet;
use std::path::Path;

use regex::Regex;
use thiserror::Error;

use crate::cdc::{CHANGE_SOURCE_FIELDS, Decoder, FieldSelection};
use crate::engine::{
    CompiledRules, Pipeline, PipelineSettings, RuleCompileError, UnavailablePlaceholder,
    VERSION_SOURCE_FIELDS,
};

pub use model::{
    Config, DeliveryConfig, EventsConfig, FormatConfig, HttpConfig, KafkaConfig, LimitsConfig,
    PayloadConfig, PipelineConfig, ReplayConfig, RuleConfig, StateConfig, VersionBy, VersionConfig,
};

pub use endpoints::{IngressConfig, IngressRoute, WebhookConfig};
pub use poll::{DeletesConfig, PollConfig, ReconcileConfig, cursor_topic};

/// librdkafka properties the runtime manages to keep its guarantees, each with what to do
/// instead; a pass-through of one of them is a config error naming the key and the fix.
pub const MANAGED_PROPERTIES: [(&str, &str); 15] = [
    ("bootstrap.servers", "set kafka.bootstrap_servers instead"),
    ("group.id", "set kafka.group_id instead"),
    (
        "transactional.id",
        "it is `<kafka.group_id>-<kafka.instance_id>`: set kafka.instance_id instead",
    ),
    (
        "transaction.timeout.ms",
        "set kafka.transaction_timeout instead",
    ),
    (
        "enable.auto.commit",
        "cdcflow commits offsets itself, only past processed records; delete it",
    ),
    (
        "enable.auto.offset.store",
        "cdcflow commits offsets itself, only past processed records; delete it",
    ),
    (
        "auto.offset.reset",
        "a new group starts from the earliest offset so that no backlog is skipped; delete it",
    ),
    (
        "isolation.level",
        "cdcflow reads read_committed so that aborted records never count; delete it",
    ),
    (
        "partition.assignment.strategy",
        "cdcflow uses cooperative-sticky (mixing assignors in a group breaks rebalances); delete it",
    ),
    (
        "max.poll.interval.ms",
        "cdcflow restores state inside the rebalance callback and sets it to 300000; to \
         shorten batches lower kafka.batch_max_records or kafka.batch_max_wait instead",
    ),
    (
        "enable.partition.eof",
        "the consume loop must not see end-of-partition events; delete it",
    ),
    (
        "enable.idempotence",
        "the producer is always idempotent (transactions need it); delete it",
    ),
    (
        "acks",
        "the idempotent producer needs acks=all, which cdcflow sets; delete it",
    ),
    (
        "statistics.interval.ms",
        "cdcflow reads librdkafka's statistics every second for /readyz; delete it",
    ),
    (
        "group.protocol",
        "cdcflow runs the classic group protocol with its rebalance callback; delete it",
    ),
];

/// librdkafka properties `[kafka.security]` sets for every client; a pass-through of one of
/// them is a config error naming what to set instead.
pub const SECURITY_PROPERTIES: [(&str, &str); 11] = [
    (
        "security.protocol",
        "set kafka.security.protocol instead: every client gets it",
    ),
    (
        "sasl.mechanism",
        "set kafka.security.sasl_mechanism instead",
    ),
    (
        "sasl.mechanisms",
        "set kafka.security.sasl_mechanism instead",
    ),
    ("sasl.username", "set kafka.security.username instead"),
    (
        "sasl.password",
        "keep it out of the config: set kafka.security.password_env or password_file",
    ),
    ("ssl.ca.location", "set kafka.security.ca_file instead"),
    (
        "ssl.certificate.location",
        "set kafka.security.cert_file instead",
    ),
    ("ssl.key.location", "set kafka.security.key_file instead"),
    (
        "ssl.key.password",
        "keep it out of the config: set kafka.security.key_password_env or key_password_file",
    ),
    (
        "ssl.endpoint.identification.algorithm",
        "set kafka.security.verify_hostname instead",
    ),
    (
        "sasl.kerberos.principal",
        "set kafka.security.kerberos_principal instead",
    ),
];

/// Prefix of environment overrides; `__` separates key segments.
pub const ENV_PREFIX: &str = "CDCFLOW__";

/// Why a config cannot be used. Each message names the key and what would be valid.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file `{path}` is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment override `{variable}`: {message}")]
    Override { variable: String, message: String },
    #[error(transparent)]
    Rule(#[from] RuleCompileError),
}

/// A TOML syntax error by line and column, without the excerpt of the file toml quotes: the
/// line could hold a secret.
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
            format!("line {line}, column {column}: {}", error.message())
        }
        None => error.message().to_owned(),
    }
}

fn no_pipeline() -> ConfigError {
    invalid(
        "pipeline",
        "no pipeline is defined; add a [[pipeline]] table with a name, topics and rules",
    )
}

impl Config {
    /// For the commands that run pipelines: at least one must be defined.
    pub fn require_pipelines(&self) -> Result<(), ConfigError> {
        if self.pipelines.is_empty() {
            Err(no_pipeline())
        } else {
            Ok(())
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Which input topics a pipeline reads.
#[derive(Debug, Clone)]
pub struct TopicRoute {
    pub topics: HashSet<String>,
    pub pattern: Option<Regex>,
}

impl TopicRoute {
    pub fn matches(&self, topic: &str) -> bool {
        self.topics.contains(topic) || self.pattern.as_ref().is_some_and(|re| re.is_match(topic))
    }
}

impl Config {
    /// Reads, overrides from the process environment, and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses config text with the given environment; `origin` names the text in errors.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: origin.to_owned(),
            message: syntax_message(text, &error),
        })?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        for (variable, value) in &env {
            if let Some(path) = variable.strip_prefix(ENV_PREFIX) {
                apply_override(&mut table, variable, path, value)?;
            }
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|error| {
                let key = error.path().to_string();
                invalid(key, error.into_inner().to_string())
            })?;
        config.validate()?;
        config.kafka.client_security = config
            .kafka
            .security
            .resolve(|name| {
                env.iter()
                    .find(|(variable, _)| variable == name)
                    .map(|(_, value)| value.clone())
            })
            .map_err(|error| invalid(error.key, error.message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // A config of webhook subscriptions or an ingress alone serves `cdcflow deliver`,
        // `cdcflow ingress` or `cdcflow run`; `replay` and `check` ask for pipelines
        // (`require_pipelines`).
        if self.pipelines.is_empty()
            && self.webhooks.is_empty()
            && self.ingress.is_none()
            && self.polls.is_empty()
        {
            return Err(no_pipeline());
        }
        poll::validate_polls(&self.polls)?;
        poll::validate_reconciles(&self.pipelines)?;
        chains::reject_loops(&self.pipelines)?;
        endpoints::validate_webhooks(&self.webhooks)?;
        if let Some(ingress) = &self.ingress {
            endpoints::validate_ingress(ingress)?;
        }
        if !(1..=128).contains(&self.limits.max_nesting_depth) {
            return Err(invalid(
                "limits.max_nesting_depth",
                format!(
                    "{} is out of range: use 1 to 128",
                    self.limits.max_nesting_depth
                ),
            ));
        }
        if self.limits.max_output_bytes == 0 {
            return Err(invalid("limits.max_output_bytes", "must be at least 1"));
        }
        if self.limits.max_record_bytes == 0 {
            return Err(invalid("limits.max_record_bytes", "must be at least 1"));
        }
        if self.state.flush_records == 0 {
            return Err(invalid("state.flush_records", "must be at least 1"));
        }
        if self.replay.batch_size == 0 {
            return Err(invalid("replay.batch_size", "must be at least 1"));
        }
        self.validate_kafka()?;
        let mut names = HashSet::new();
        for (index, pipeline) in self.pipelines.iter().enumerate() {
            let at = |key: &str| format!("pipeline[{index}].{key}");
            if pipeline.park_limit == 0 {
                return Err(invalid(
                    at("park_limit"),
                    "must be at least 1 (it only matters with dlq_policy = \"park\")",
                ));
            }
            if !is_identifier(&pipeline.name) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "`{}` is not a valid name: use letters, digits, `_`, `-` and `.`",
                        pipeline.name
                    ),
                ));
            }
            if !names.insert(pipeline.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "pipeline `{}` is defined twice; names must be unique",
                        pipeline.name
                    ),
                ));
            }
            if pipeline
                .unavailable_value_placeholder
                .as_deref()
                .is_some_and(str::is_empty)
            {
                return Err(invalid(
                    at("unavailable_value_placeholder"),
                    "must not be empty: every empty text would count as unavailable; use the \
                     connector's unavailable.value.placeholder",
                ));
            }
            if pipeline.topics.is_empty() && pipeline.topic_pattern.is_none() {
                return Err(invalid(
                    at("topics"),
                    "the pipeline reads no topic: set `topics = [\"server.schema.table\"]` or `topic_pattern`",
                ));
            }
            if let Some(pattern) = &pipeline.topic_pattern {
                Regex::new(pattern).map_err(|error| {
                    invalid(at("topic_pattern"), format!("not a valid regex: {error}"))
                })?;
            }
            match (&pipeline.version.by, &pipeline.version.column) {
                (VersionBy::Column, None) => {
                    return Err(invalid(
                        at("version.column"),
                        "version.by = \"column\" needs the column: set version.column = \"<integer column>\"",
                    ));
                }
                (VersionBy::SourcePosition | VersionBy::TsMs, Some(_)) => {
                    return Err(invalid(
                        at("version.column"),
                        "only used with version.by = \"column\"; remove it or change version.by",
                    ));
                }
                _ => {}
            }
            if pipeline.version.connector.is_some()
                && pipeline.version.by != VersionBy::SourcePosition
            {
                return Err(invalid(
                    at("version.connector"),
                    "only used with version.by = \"source_position\"; remove it or change version.by",
                ));
            }
            let mut rule_names = HashSet::new();
            for (rule_index, rule) in pipeline.rules.iter().enumerate() {
                let rule_at = |key: &str| at(&format!("rule[{rule_index}].{key}"));
                if !is_identifier(&rule.name) {
                    return Err(invalid(
                        rule_at("name"),
                        format!(
                            "`{}` is not a valid name: use letters, digits, `_`, `-` and `.`",
                            rule.name
                        ),
                    ));
                }
                if !rule_names.insert(rule.name.as_str()) {
                    return Err(invalid(
                        rule_at("name"),
                        format!(
                            "rule `{}` is defined twice in pipeline `{}`",
                            rule.name, pipeline.name
                        ),
                    ));
                }
                if rule.event_type.trim().is_empty() {
                    return Err(invalid(
                        rule_at("event_type"),
                        "must name the CloudEvents type, e.g. \"com.example.order.paid\"",
                    ));
                }
                if rule.topic.trim().is_empty() {
                    return Err(invalid(rule_at("topic"), "must name the output topic"));
                }
            }
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let kafka = &self.kafka;
        if kafka.batch_max_records == 0 {
            return Err(invalid("kafka.batch_max_records", "must be at least 1"));
        }
        if kafka.topic_partitions < 1 || kafka.replication_factor < 1 {
            return Err(invalid(
                "kafka.topic_partitions",
                "topic_partitions and replication_factor must be at least 1",
            ));
        }
        if !is_identifier(&kafka.group_id) {
            return Err(invalid(
                "kafka.group_id",
                "use letters, digits, `_`, `-` and `.`: it prefixes topic names",
            ));
        }
        for (section, properties) in [("consumer", &kafka.consumer), ("producer", &kafka.producer)]
        {
            for key in properties.keys() {
                let find = |list: &[(&'static str, &'static str)]| {
                    list.iter()
                        .find(|(managed, _)| managed == key)
                        .map(|(_, fix)| *fix)
                };
                let why = if let Some(instead) = find(&MANAGED_PROPERTIES) {
                    format!(
                        "cdcflow manages this property to keep its delivery guarantee: {instead}"
                    )
                } else if let Some(instead) = find(&SECURITY_PROPERTIES) {
                    format!(
                        "cdcflow sets this property for every client from [kafka.security]: {instead}"
                    )
                } else {
                    continue;
                };
                return Err(invalid(format!("kafka.{section}.\"{key}\""), why));
            }
        }
        Ok(())
    }

    /// Compiles every pipeline (rules included) with its topic route.
    pub fn build_pipelines(&self) -> Result<Vec<(TopicRoute, Pipeline)>, ConfigError> {
        self.pipelines
            .iter()
            .map(|pipeline| {
                let rules = CompiledRules::compile(
                    &pipeline.name,
                    &pipeline
                        .rules
                        .iter()
                        .map(RuleConfig::to_spec)
                        .collect::<Vec<_>>(),
                )?;
                let route = TopicRoute {
                    topics: pipeline.topics.iter().cloned().collect(),
                    pattern: pipeline
                        .topic_pattern
                        .as_deref()
                        .map(|pattern| Regex::new(&format!("^(?:{pattern})$")))
                        .transpose()
                        .map_err(|error| invalid("topic_pattern", error.to_string()))?,
                };
                let mut decoder = Decoder::new(
                    self.limits.to_decode_limits(),
                    pipeline.format.to_format(),
                    pipeline.key_fields.clone(),
                );
                decoder.source_fields = source_fields_read(&rules);
                let settings = PipelineSettings {
                    name: pipeline.name.clone(),
                    decoder,
                    version: pipeline.version.to_spec(),
                    rules,
                    dlq_topic: pipeline.dlq_topic(),
                    audit_topic: pipeline.audit_topic.clone(),
                    event_source: format!("{}/{}", self.events.source_prefix, pipeline.name),
                    event_mode: self.events.mode.to_mode(),
                    max_output_bytes: self.limits.max_output_bytes,
                    dlq_policy: pipeline.dlq_policy,
                    park_limit: pipeline.park_limit,
                    unavailable: pipeline
                        .unavailable_value_placeholder
                        .as_deref()
                        .map(UnavailablePlaceholder::new)
                        .unwrap_or_default(),
                };
                Ok((route, Pipeline::new(settings)))
            })
            .collect()
    }
}

/// The `source` fields a pipeline's changes keep: those its version, its events and its
/// rules read.
fn source_fields_read(rules: &CompiledRules) -> FieldSelection {
    match rules.source_fields_read() {
        None => FieldSelection::All,
        Some(mut fields) => {
            fields.extend(
                VERSION_SOURCE_FIELDS
                    .iter()
                    .chain(&CHANGE_SOURCE_FIELDS)
                    .map(|name| (*name).to_owned()),
            );
            fields.sort();
            fields.dedup();
            FieldSelection::Only(fields)
        }
    }
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Sets `a.b.c` (from `A__B__C`) in `table` to `value`.
fn apply_override(
    table: &mut toml::Table,
    variable: &str,
    path: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Override {
            variable: variable.to_owned(),
            message: "empty key segment; use CDCFLOW__SECTION__KEY".to_owned(),
        });
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut wrapper| wrapper.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (last, parents) = segments.split_last().ok_or_else(|| ConfigError::Override {
        variable: variable.to_owned(),
        message: "no key given".to_owned(),
    })?;
    let mut current = table;
    for segment in parents {
        let entry = current
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::Override {
            variable: variable.to_owned(),
            message: format!("`{segment}` is not a table, so it has no keys to override"),
        })?;
    }
    current.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = "[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n";

    /// Every property the runtime manages is refused in both pass-through maps, with the key
    /// and what to set instead; other librdkafka properties pass.
    #[test]
    fn managed_properties_are_refused_with_the_fix() {
        for (key, instead) in MANAGED_PROPERTIES.iter().chain(&SECURITY_PROPERTIES) {
            for section in ["consumer", "producer"] {
                let text = format!("[kafka]\n{section} = {{ \"{key}\" = \"1\" }}\n{PIPELINE}");
                let error = Config::parse(&text, "test", Vec::new()).unwrap_err();
                let message = error.to_string();
                assert!(
                    message.contains(&format!("kafka.{section}.\"{key}\""))
                        && message.contains(instead),
                    "{key} in {section}: {message}"
                );
            }
        }
        for key in [
            "transaction.timeout.ms",
            "max.poll.interval.ms",
            "enable.partition.eof",
        ] {
            assert!(
                MANAGED_PROPERTIES
                    .iter()
                    .any(|(managed, _)| *managed == key)
            );
        }
        let text = format!(
            "[kafka]\nconsumer = {{ \"session.timeout.ms\" = \"6000\" }}\nproducer = {{ \"compression.type\" = \"lz4\" }}\n{PIPELINE}"
        );
        Config::parse(&text, "test", Vec::new()).unwrap();
    }
}
