//! The config of SQL polling sources (`[[poll]]`) and of reconciliation
//! (`[pipeline.reconcile]`).

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, is_identifier};

/// `[[poll]]`: a table read by a cursor, its changed rows written to a Kafka topic in the
/// flattened "new record state" form, for a pipeline to read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// Names the poll: its consumer group (`<group_id>.poll.<name>`), its transactional id,
    /// its cursor record and its metrics.
    pub name: String,
    /// `postgres://user:password@host/database`, or `sqlite://path/to/file.db`; the URL may
    /// come from `database_url_env` instead.
    #[serde(default)]
    pub database_url: Option<String>,
    /// An environment variable holding the database URL.
    #[serde(default)]
    pub database_url_env: Option<String>,
    /// `schema.table` or `table`.
    pub table: String,
    /// A timestamp column every insert and update sets (`updated_at`, set by `now()` or a
    /// trigger). In SQLite: Unix times or UTC date-times (`CURRENT_TIMESTAMP`).
    pub cursor_column: String,
    /// The primary key columns: ties on the cursor are broken by them, and they are the
    /// record's key (`{"id": 42}`).
    pub key: Vec<String>,
    /// The topic the changed rows go to. Default `cdcflow.poll.<name>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Rows per poll. Default 500.
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// The shortest wait between polls, taken while polls return full pages. Default 1 s.
    #[serde(default = "default_min_interval", with = "super::duration")]
    pub min_interval: Duration,
    /// The longest wait, reached by doubling while polls return nothing. Default 30 s.
    #[serde(default = "default_max_interval", with = "super::duration")]
    pub max_interval: Duration,
    /// Rows are read only once their cursor is this far behind the database's `now()`, and
    /// behind the start of every open transaction. Covers cursor values a client sets from
    /// its own clock. Default 1 s.
    #[serde(default = "default_grace", with = "super::duration")]
    pub grace: Duration,
    /// How deletes are seen.
    #[serde(default)]
    pub deletes: DeletesConfig,
    /// With `deletes = "soft"`: the column that marks a deleted row (a timestamp or boolean);
    /// a row where it is non-null and not false is a delete.
    #[serde(default)]
    pub soft_delete_column: Option<String>,
}

/// How a poll sees deletes.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeletesConfig {
    /// Rows are never deleted, or their deletes are not wanted: a hard delete is not seen
    /// (said at start and in `cdcflow check`).
    #[default]
    Unsupported,
    /// Deletes are updates of `soft_delete_column` (and the cursor column).
    Soft,
}

fn default_page_size() -> usize {
    500
}
fn default_min_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_max_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_grace() -> Duration {
    Duration::from_secs(1)
}

impl PollConfig {
    pub fn topic(&self) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("cdcflow.poll.{}", self.name))
    }

    /// The poll's consumer group, whose one member owns the poll.
    pub fn group_id(&self, kafka_group: &str) -> String {
        format!("{kafka_group}.poll.{}", self.name)
    }

    /// The database URL, from the config or its environment variable.
    pub fn database_url(&self) -> Option<String> {
        self.database_url.clone().or_else(|| {
            self.database_url_env
                .as_ref()
                .and_then(|name| std::env::var(name).ok())
        })
    }
}

/// The compacted topic that holds every poll's cursor: `<group_id>.poll.cursors`.
pub fn cursor_topic(kafka_group: &str) -> String {
    format!("{kafka_group}.poll.cursors")
}

/// `[pipeline.reconcile]`: the source of truth a pipeline's state is compared with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// `postgres://...`.
    #[serde(default)]
    pub database_url: Option<String>,
    #[serde(default)]
    pub database_url_env: Option<String>,
    /// A query returning the rows as the pipeline sees them (`SELECT * FROM orders`).
    pub query: String,
    /// The key columns, as in the records' keys.
    pub key: Vec<String>,
    /// Columns left out of the image comparison (a column the pipeline never sees).
    #[serde(default)]
    pub ignore_columns: Vec<String>,
}

impl ReconcileConfig {
    pub fn database_url(&self) -> Option<String> {
        self.database_url.clone().or_else(|| {
            self.database_url_env
                .as_ref()
                .and_then(|name| std::env::var(name).ok())
        })
    }
}

fn validate_database_url(
    at: &dyn Fn(&str) -> String,
    url: Option<&str>,
    url_env: Option<&str>,
    schemes: &[&str],
) -> Result<(), ConfigError> {
    match (url, url_env) {
        (None, None) => Err(invalid(
            at("database_url"),
            "no database: set database_url (or database_url_env, the variable that holds it)",
        )),
        (Some(_), Some(_)) => Err(invalid(
            at("database_url_env"),
            "set database_url or database_url_env, not both",
        )),
        (Some(url), None) if !schemes.iter().any(|scheme| url.starts_with(scheme)) => Err(invalid(
            at("database_url"),
            format!("the URL must start with one of {}", schemes.join(", ")),
        )),
        _ => Ok(()),
    }
}

pub(super) fn validate_polls(polls: &[PollConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (index, poll) in polls.iter().enumerate() {
        let at = |key: &str| format!("poll[{index}].{key}");
        if !is_identifier(&poll.name) {
            return Err(invalid(
                at("name"),
                format!(
                    "`{}` is not a valid name: use letters, digits, `_`, `-` and `.`",
                    poll.name
                ),
            ));
        }
        if !names.insert(poll.name.as_str()) {
            return Err(invalid(
                at("name"),
                format!(
                    "poll `{}` is defined twice; names must be unique",
                    poll.name
                ),
            ));
        }
        validate_database_url(
            &at,
            poll.database_url.as_deref(),
            poll.database_url_env.as_deref(),
            &["postgres://", "postgresql://", "sqlite:"],
        )?;
        if poll.key.is_empty() {
            return Err(invalid(
                at("key"),
                "name the primary key columns: they break ties on the cursor and key the records",
            ));
        }
        if poll.page_size == 0 {
            return Err(invalid(at("page_size"), "must be at least 1"));
        }
        if poll.min_interval.is_zero() {
            return Err(invalid(
                at("min_interval"),
                "must be above zero (\"100ms\", say)",
            ));
        }
        if poll.max_interval < poll.min_interval {
            return Err(invalid(
                at("max_interval"),
                "must be at least min_interval: the wait grows from min_interval up to it",
            ));
        }
        match (poll.deletes, &poll.soft_delete_column) {
            (DeletesConfig::Soft, None) => {
                return Err(invalid(
                    at("soft_delete_column"),
                    "deletes = \"soft\" needs the column that marks a deleted row",
                ));
            }
            (DeletesConfig::Unsupported, Some(_)) => {
                return Err(invalid(
                    at("deletes"),
                    "a soft_delete_column is set: set deletes = \"soft\" to use it",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn validate_reconciles(pipelines: &[super::PipelineConfig]) -> Result<(), ConfigError> {
    for pipeline in pipelines {
        if let Some(reconcile) = &pipeline.reconcile {
            validate_reconcile(&pipeline.name, reconcile)?;
        }
    }
    Ok(())
}

fn validate_reconcile(pipeline: &str, reconcile: &ReconcileConfig) -> Result<(), ConfigError> {
    let at = |key: &str| format!("pipeline `{pipeline}` reconcile.{key}");
    validate_database_url(
        &at,
        reconcile.database_url.as_deref(),
        reconcile.database_url_env.as_deref(),
        &["postgres://", "postgresql://"],
    )?;
    if reconcile.key.is_empty() {
        return Err(invalid(
            at("key"),
            "name the key columns, as in the records' keys",
        ));
    }
    if reconcile.query.trim().is_empty() {
        return Err(invalid(
            at("query"),
            "give the query that returns the rows (`SELECT * FROM orders`)",
        ));
    }
    Ok(())
}
