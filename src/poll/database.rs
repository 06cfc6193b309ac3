//! The database side of a poll (sqlx, PostgreSQL or SQLite): the columns, the horizon and one
//! page of rows. The SQL itself is built in [`super::query`].

use std::collections::HashMap;
use std::str::FromStr as _;
use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Column as _, Row, TypeInfo as _, ValueRef as _};
use thiserror::Error;

use super::clock;
use super::query::{PollTable, SqlitePollTable, quote_identifier};
use super::record::{Cursor, PolledRow};
use crate::config::PollConfig;

#[derive(Debug, Error)]
pub enum PollError {
    #[error("poll `{poll}`: no database URL (database_url or database_url_env)")]
    NoDatabase { poll: String },
    #[error("poll `{poll}`: {context}: {source}")]
    Database {
        poll: String,
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("poll `{poll}`: {detail}")]
    Table { poll: String, detail: String },
    #[error("poll `{poll}`: a row at cursor `{cursor}` is not a JSON object: {detail}")]
    Row {
        poll: String,
        cursor: String,
        detail: String,
    },
}

/// The horizon of one poll: rows with a cursor below `at` are final. `None` when a SQLite
/// table has no row yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Horizon {
    /// PostgreSQL: text of the cursor's type; SQLite: a value like the column's.
    pub at: Option<Value>,
    pub now_ms: i64,
    pub at_ms: i64,
}

/// A connection pool and the poll's statements. The statements are built from the config's
/// identifiers, each quoted (`query::quote_identifier`), and types read from the catalog.
#[derive(Debug, Clone)]
pub struct PollDatabase {
    poll: String,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Postgres {
        pool: PgPool,
        horizon_sql: String,
        first_sql: String,
        resume_sql: String,
    },
    Sqlite {
        pool: SqlitePool,
        latest_sql: String,
        first_sql: String,
        resume_sql: String,
        cursor_column: String,
        /// The cursor and key columns, whose values a resume binds.
        resume_columns: Vec<String>,
        grace_ms: i64,
    },
}

/// A `timestamp without time zone` (or a `date`) is refused: its value depends on each
/// writer's session TimeZone, which the poll's horizon cannot know.
const CURSOR_TYPES: [&str; 1] = ["timestamp with time zone"];

impl PollDatabase {
    /// Connects and checks the table: the cursor and key columns exist, and the cursor is a
    /// timestamp (the horizon is a time).
    pub async fn connect(config: &PollConfig) -> Result<PollDatabase, PollError> {
        let poll = config.name.clone();
        let url = config
            .database_url()
            .ok_or_else(|| PollError::NoDatabase { poll: poll.clone() })?;
        if url.starts_with("sqlite:") {
            return connect_sqlite(config, &url).await;
        }
        let database = |context| database_error(&poll, context);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(database("cannot connect to the database"))?;
        // A standby sees none of the primary's open transactions: its horizon would not hold.
        let (standby, sees_all): (bool, bool) = sqlx::query_as(
            "SELECT pg_is_in_recovery(), \
             pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') \
             OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
        )
        .fetch_one(&pool)
        .await
        .map_err(database("cannot read the server's role"))?;
        if standby {
            return Err(PollError::Table {
                poll: poll.clone(),
                detail: "database_url names a standby (pg_is_in_recovery()), which cannot see \
                         the primary's open transactions: poll the primary"
                    .to_owned(),
            });
        }
        if !sees_all {
            tracing::warn!(
                poll = %poll,
                "the role lacks pg_read_all_stats: transactions of other roles are invisible to \
                 the horizon, and only `grace` protects rows they write (GRANT pg_read_all_stats \
                 TO the role)"
            );
        }
        let columns: HashMap<String, String> = sqlx::query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(quote_identifier(&config.table))
        .fetch_all(&pool)
        .await
        .map_err(database("cannot read the table's columns"))?
        .into_iter()
        .map(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
        .collect();
        let table_error = |detail: String| PollError::Table {
            poll: poll.clone(),
            detail,
        };
        if columns.is_empty() {
            return Err(table_error(format!(
                "table `{}` does not exist (or the role cannot see it)",
                config.table
            )));
        }
        let type_of = |column: &str, key: &str| {
            columns.get(column).cloned().ok_or_else(|| {
                table_error(format!(
                    "{key}: table `{}` has no column `{column}`",
                    config.table
                ))
            })
        };
        let cursor_type = type_of(&config.cursor_column, "cursor_column")?;
        if !CURSOR_TYPES.contains(&cursor_type.as_str()) {
            return Err(table_error(format!(
                "cursor_column: `{}` is a {cursor_type}; it must be a timestamptz set on every \
                 insert and update (`updated_at`), which the poll compares with the start of \
                 open transactions (for a timestamp without time zone, poll a view that \
                 converts it: `updated_at AT TIME ZONE 'UTC' AS updated_at`)",
                config.cursor_column
            )));
        }
        let mut key = Vec::new();
        for column in &config.key {
            key.push((column.clone(), type_of(column, "key")?));
        }
        if let Some(column) = &config.soft_delete_column {
            type_of(column, "soft_delete_column")?;
        }
        let table = PollTable {
            table: config.table.clone(),
            cursor: (config.cursor_column.clone(), cursor_type),
            key,
            page_size: config.page_size,
        };
        Ok(PollDatabase {
            backend: Backend::Postgres {
                horizon_sql: table.horizon_sql(config.grace.as_millis() as u64),
                first_sql: table.page_sql(false),
                resume_sql: table.page_sql(true),
                pool,
            },
            poll,
        })
    }

    pub async fn horizon(&self) -> Result<Horizon, PollError> {
        match &self.backend {
            Backend::Postgres {
                pool, horizon_sql, ..
            } => {
                let row = sqlx::query(sqlx::AssertSqlSafe(horizon_sql.clone()))
                    .fetch_one(pool)
                    .await
                    .map_err(|source| self.error("cannot read the horizon", source))?;
                Ok(Horizon {
                    at: Some(Value::from(row.get::<String, _>(0))),
                    now_ms: row.get(1),
                    at_ms: row.get(2),
                })
            }
            Backend::Sqlite {
                pool,
                latest_sql,
                grace_ms,
                ..
            } => {
                let now_ms = crate::runtime::now_ms();
                let at_ms = now_ms - grace_ms;
                let latest = sqlx::query(sqlx::AssertSqlSafe(latest_sql.clone()))
                    .fetch_optional(pool)
                    .await
                    .map_err(|source| self.error("cannot read the latest cursor", source))?;
                let at = match latest {
                    None => None,
                    Some(row) => {
                        let (sample, _) = sqlite_value(&row, 0).map_err(|source| {
                            self.error("cannot read the latest cursor", source)
                        })?;
                        Some(clock::like(&sample, at_ms).ok_or_else(|| PollError::Table {
                            poll: self.poll.clone(),
                            detail: format!(
                                "cursor_column holds {sample}, which is not a time: use Unix times \
                                 (unixepoch()) or UTC date-times (CURRENT_TIMESTAMP)"
                            ),
                        })?)
                    }
                };
                Ok(Horizon { at, now_ms, at_ms })
            }
        }
    }

    /// The rows after `after` and below `horizon`, in cursor and key order.
    pub async fn page(
        &self,
        horizon: &Horizon,
        after: Option<&Cursor>,
    ) -> Result<Vec<PolledRow>, PollError> {
        let Some(at) = &horizon.at else {
            return Ok(Vec::new());
        };
        match &self.backend {
            Backend::Postgres {
                pool,
                first_sql,
                resume_sql,
                ..
            } => {
                let at = at.as_str().unwrap_or_default().to_owned();
                let query = match after {
                    None => sqlx::query(sqlx::AssertSqlSafe(first_sql.clone())).bind(at),
                    Some(cursor) => {
                        let mut query = sqlx::query(sqlx::AssertSqlSafe(resume_sql.clone()))
                            .bind(at)
                            .bind(cursor.cursor.clone());
                        for value in &cursor.key {
                            query = query.bind(value.clone());
                        }
                        query
                    }
                };
                let rows = query
                    .fetch_all(pool)
                    .await
                    .map_err(|source| self.error("cannot read a page", source))?;
                rows.into_iter()
                    .map(|row| {
                        let text: String = row.get(0);
                        let cursor: String = row.get(1);
                        let image = serde_json::from_str::<Map<String, Value>>(&text)
                            .map_err(|error| self.row_error(&cursor, error.to_string()))?;
                        Ok(PolledRow {
                            image,
                            cursor,
                            ts_ms: row.get(2),
                        })
                    })
                    .collect()
            }
            Backend::Sqlite {
                pool,
                first_sql,
                resume_sql,
                cursor_column,
                resume_columns,
                ..
            } => {
                let (sql, values): (&String, Vec<&Value>) = match after {
                    None => (first_sql, vec![at]),
                    Some(cursor) => (
                        resume_sql,
                        std::iter::once(at).chain(&cursor.typed).collect(),
                    ),
                };
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                for value in values {
                    query = match value {
                        Value::Number(number) => match number.as_i64() {
                            Some(integer) => query.bind(integer),
                            None => query.bind(number.as_f64().unwrap_or_default()),
                        },
                        Value::String(text) => query.bind(text.clone()),
                        other => query.bind(other.to_string()),
                    };
                }
                let rows = query
                    .fetch_all(pool)
                    .await
                    .map_err(|source| self.error("cannot read a page", source))?;
                rows.iter()
                    .map(|row| self.sqlite_row(row, cursor_column, resume_columns))
                    .collect()
            }
        }
    }

    fn sqlite_row(
        &self,
        row: &SqliteRow,
        cursor_column: &str,
        resume_columns: &[String],
    ) -> Result<PolledRow, PollError> {
        let mut image = Map::new();
        for (index, column) in row.columns().iter().enumerate() {
            let (value, blob) = sqlite_value(row, index)
                .map_err(|source| self.error("cannot read a row", source))?;
            // A resume binds these values back, and a blob read as hex text would no longer
            // compare as the blob: SQLite orders every text before every blob.
            if blob && resume_columns.iter().any(|name| name == column.name()) {
                return Err(PollError::Table {
                    poll: self.poll.clone(),
                    detail: format!(
                        "column `{}` holds a BLOB, which cannot be a cursor or key column; poll \
                         a view that converts it (`hex({0}) AS {0}`)",
                        column.name()
                    ),
                });
            }
            image.insert(column.name().to_owned(), value);
        }
        let cursor = image.get(cursor_column).cloned().unwrap_or(Value::Null);
        Ok(PolledRow {
            cursor: match &cursor {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            },
            ts_ms: clock::epoch_ms(&cursor),
            image,
        })
    }

    pub async fn close(&self) {
        match &self.backend {
            Backend::Postgres { pool, .. } => pool.close().await,
            Backend::Sqlite { pool, .. } => pool.close().await,
        }
    }

    fn row_error(&self, cursor: &str, detail: String) -> PollError {
        PollError::Row {
            poll: self.poll.clone(),
            cursor: cursor.to_owned(),
            detail,
        }
    }

    fn error(&self, context: &'static str, source: sqlx::Error) -> PollError {
        database_error(&self.poll, context)(source)
    }
}

/// One column of a SQLite row as JSON, by the value's own storage class (SQLite's columns are
/// typed per value): integers, reals, text, and blobs as hex text (flagged).
fn sqlite_value(row: &SqliteRow, index: usize) -> Result<(Value, bool), sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok((Value::Null, false));
    }
    let class = raw.type_info().name().to_owned();
    let blob = class == "BLOB";
    Ok((
        match class.as_str() {
            "INTEGER" => Value::from(row.try_get_unchecked::<i64, _>(index)?),
            "REAL" => Value::from(row.try_get_unchecked::<f64, _>(index)?),
            "BLOB" => Value::from(
                row.try_get_unchecked::<Vec<u8>, _>(index)?
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect::<String>(),
            ),
            _ => Value::from(row.try_get_unchecked::<String, _>(index)?),
        },
        blob,
    ))
}

/// Maps a sqlx error of `poll` to [`PollError::Database`] with what was being done.
fn database_error(poll: &str, context: &'static str) -> impl FnOnce(sqlx::Error) -> PollError {
    let poll = poll.to_owned();
    move |source| PollError::Database {
        poll,
        context,
        source,
    }
}

async fn connect_sqlite(config: &PollConfig, url: &str) -> Result<PollDatabase, PollError> {
    let poll = config.name.clone();
    let database = |context| database_error(&poll, context);
    let options = SqliteConnectOptions::from_str(url)
        .map_err(database("the SQLite URL is invalid"))?
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(database("cannot open the SQLite database"))?;
    let (schema, table) = config
        .table
        .split_once('.')
        .unwrap_or(("main", config.table.as_str()));
    let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info(?1, ?2)")
        .bind(table)
        .bind(schema)
        .fetch_all(&pool)
        .await
        .map_err(database("cannot read the table's columns"))?
        .iter()
        .map(|row| row.get::<String, _>(0))
        .collect();
    let table_error = |detail: String| PollError::Table {
        poll: poll.clone(),
        detail,
    };
    if columns.is_empty() {
        return Err(table_error(format!(
            "table `{}` does not exist in {url}",
            config.table
        )));
    }
    let named = std::iter::once(("cursor_column", &config.cursor_column))
        .chain(config.key.iter().map(|column| ("key", column)))
        .chain(
            config
                .soft_delete_column
                .iter()
                .map(|column| ("soft_delete_column", column)),
        );
    for (key, column) in named {
        if !columns.contains(column) {
            return Err(table_error(format!(
                "{key}: table `{}` has no column `{column}`",
                config.table
            )));
        }
    }
    let table = SqlitePollTable {
        table: config.table.clone(),
        cursor: config.cursor_column.clone(),
        key: config.key.clone(),
        page_size: config.page_size,
    };
    Ok(PollDatabase {
        backend: Backend::Sqlite {
            latest_sql: table.latest_sql(),
            first_sql: table.page_sql(false),
            resume_sql: table.page_sql(true),
            cursor_column: config.cursor_column.clone(),
            resume_columns: std::iter::once(&config.cursor_column)
                .chain(&config.key)
                .cloned()
                .collect(),
            grace_ms: config.grace.as_millis() as i64,
            pool,
        },
        poll,
    })
}
