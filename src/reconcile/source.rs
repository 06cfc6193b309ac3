//! The source of truth of a reconciliation: the rows of a SQL query, read in one snapshot
//! (PostgreSQL, `REPEATABLE READ`), keyed and versioned as the pipeline keys and versions
//! its changes.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::PgPoolOptions;
use thiserror::Error;

use super::SourceRow;
use crate::cdc::EntityKey;
use crate::config::ReconcileConfig;
use crate::engine::{VersionError, VersionSpec};

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("no database URL: set reconcile.database_url (or database_url_env)")]
    NoDatabase,
    #[error("{context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("a row of the query is not a JSON object: {0}")]
    Row(String),
    #[error("a row of the query lacks key column `{column}`: {row}")]
    Key { column: String, row: String },
    #[error(
        "the query returns entity `{0}` twice: it must return one row per key (a join? add \
         the missing key columns to `key`)"
    )]
    DuplicateKey(String),
    #[error("row `{key}`: {source}")]
    Version {
        key: String,
        #[source]
        source: VersionError,
    },
}

/// The rows of `config.query`, by entity key.
pub async fn read_rows(
    config: &ReconcileConfig,
    version: &VersionSpec,
) -> Result<BTreeMap<String, SourceRow>, SourceError> {
    let url = config.database_url().ok_or(SourceError::NoDatabase)?;
    let database = |context| move |source| SourceError::Database { context, source };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .map_err(database("cannot connect to the source database"))?;
    let mut transaction = pool
        .begin()
        .await
        .map_err(database("cannot begin a transaction"))?;
    // One snapshot: the rows are those of one point in time.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *transaction)
        .await
        .map_err(database("cannot set the snapshot"))?;
    // The query is the operator's own, from the config file.
    let sql = format!("SELECT row_to_json(q)::text FROM ({}) AS q", config.query);
    let texts = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *transaction)
        .await
        .map_err(database("the reconcile query failed"))?;
    transaction
        .rollback()
        .await
        .map_err(database("cannot end the snapshot"))?;
    pool.close().await;
    let mut rows = BTreeMap::new();
    for row in texts {
        let text: String = row.get(0);
        let image: Map<String, Value> =
            serde_json::from_str(&text).map_err(|error| SourceError::Row(error.to_string()))?;
        let key = EntityKey::from_row(&image, &config.key).ok_or_else(|| {
            let column = config
                .key
                .iter()
                .find(|column| !image.contains_key(*column))
                .cloned()
                .unwrap_or_default();
            SourceError::Key {
                column,
                row: text.clone(),
            }
        })?;
        let key = key.as_str().to_owned();
        let version =
            version
                .of_row(&image)
                .transpose()
                .map_err(|source| SourceError::Version {
                    key: key.clone(),
                    source,
                })?;
        let duplicate = rows.insert(
            key.clone(),
            SourceRow {
                key: key.clone(),
                version,
                image,
            },
        );
        if duplicate.is_some() {
            return Err(SourceError::DuplicateKey(key));
        }
    }
    Ok(rows)
}
