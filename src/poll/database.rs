//! The database side of a poll (sqlx, PostgreSQL): the column types, the horizon and one page
//! of rows. The SQL itself is built in [`super::query`].

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use thiserror::Error;

use super::query::{PollTable, quote_identifier};
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

/// The horizon of one poll: rows with a cursor below `at` are final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Horizon {
    /// As text of the cursor's type.
    pub at: String,
    pub now_ms: i64,
    pub at_ms: i64,
}

/// A connection pool and the poll's statements. The statements are built from the config's
/// identifiers, each quoted (`query::quote_identifier`), and types read from the catalog.
#[derive(Debug, Clone)]
pub struct PollDatabase {
    poll: String,
    pool: PgPool,
    horizon_sql: String,
    first_sql: String,
    resume_sql: String,
}

const CURSOR_TYPES: [&str; 3] = [
    "timestamp with time zone",
    "timestamp without time zone",
    "date",
];

impl PollDatabase {
    /// Connects and checks the table: the cursor and key columns exist, and the cursor is a
    /// timestamp (the horizon is a time).
    pub async fn connect(config: &PollConfig) -> Result<PollDatabase, PollError> {
        let poll = config.name.clone();
        let url = config
            .database_url()
            .ok_or_else(|| PollError::NoDatabase { poll: poll.clone() })?;
        let database = |context| {
            let poll = poll.clone();
            move |source| PollError::Database {
                poll,
                context,
                source,
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(database("cannot connect to the database"))?;
        let columns: HashMap<String, String> = sqlx::query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
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
                "cursor_column: `{}` is a {cursor_type}; it must be a timestamp set on every \
                 insert and update (`updated_at`), which the poll compares with the start of \
                 open transactions",
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
            horizon_sql: table.horizon_sql(config.grace.as_millis() as u64),
            first_sql: table.page_sql(false),
            resume_sql: table.page_sql(true),
            poll,
            pool,
        })
    }

    pub async fn horizon(&self) -> Result<Horizon, PollError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.horizon_sql.clone()))
            .fetch_one(&self.pool)
            .await
            .map_err(|source| self.error("cannot read the horizon", source))?;
        Ok(Horizon {
            at: row.get(0),
            now_ms: row.get(1),
            at_ms: row.get(2),
        })
    }

    /// The rows after `after` and below `horizon`, in cursor and key order.
    pub async fn page(
        &self,
        horizon: &Horizon,
        after: Option<&Cursor>,
    ) -> Result<Vec<PolledRow>, PollError> {
        let query = match after {
            None => sqlx::query(sqlx::AssertSqlSafe(self.first_sql.clone())).bind(&horizon.at),
            Some(cursor) => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(self.resume_sql.clone()))
                    .bind(&horizon.at)
                    .bind(&cursor.cursor);
                for value in &cursor.key {
                    query = query.bind(value);
                }
                query
            }
        };
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|source| self.error("cannot read a page", source))?;
        rows.into_iter()
            .map(|row| {
                let text: String = row.get(0);
                let cursor: String = row.get(1);
                let image = serde_json::from_str::<Map<String, Value>>(&text).map_err(|error| {
                    PollError::Row {
                        poll: self.poll.clone(),
                        cursor: cursor.clone(),
                        detail: error.to_string(),
                    }
                })?;
                Ok(PolledRow {
                    image,
                    cursor,
                    ts_ms: row.get(2),
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn error(&self, context: &'static str, source: sqlx::Error) -> PollError {
        PollError::Database {
            poll: self.poll.clone(),
            context,
            source,
        }
    }
}
