//! The default store: one SQLite file through sqlx, WAL journal, multi-row statements and one
//! SQL transaction per batch.
//!
//! sqlx hands every statement to its SQLite worker thread, so one statement per row pays a
//! thread hand-off each (see shared/MEASURED.md: 19k rows/s per-row against 238k rows/s with
//! 500-row statements). Loads and saves therefore go in chunks of [`ROWS_PER_STATEMENT`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::{Checkpoint, StateStore, StateWrite, StoreError};
use crate::engine::{EntityState, Parked, Version};

/// Six bound values per row keeps a statement far below SQLite's 32,766-variable limit.
const ROWS_PER_STATEMENT: usize = 500;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS entity_state (
    pipeline TEXT NOT NULL,
    entity TEXT NOT NULL,
    version TEXT NOT NULL,
    image TEXT,
    updated_at_ms INTEGER NOT NULL,
    parked TEXT,
    PRIMARY KEY (pipeline, entity)
)";

const CHECKPOINT_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS changelog_checkpoint (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
)";

/// Where `cdcflow replay --poll` resumes each poll: saved after the state of the rows it read.
const POLL_CURSOR_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS poll_cursor (
    poll TEXT PRIMARY KEY,
    cursor TEXT NOT NULL
)";

/// An SQLite-backed [`StateStore`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The database file (`None` in memory): its size, with the write-ahead log's, is the
    /// store's size on disk.
    path: Option<PathBuf>,
}

/// What a store holds: entities per pipeline, changelog checkpoints, size on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub entities: BTreeMap<String, u64>,
    /// Entities waiting behind a dead-lettered change, per pipeline.
    pub parked_entities: BTreeMap<String, u64>,
    pub checkpoints: Vec<Checkpoint>,
    pub size_bytes: u64,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`; `:memory:` gives a private in-memory one.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let display = path.display().to_string();
        let open_error = |source| StoreError::Open {
            path: display.clone(),
            source,
        };
        if display != ":memory:"
            && let Some(parent) = path
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| StoreError::Open {
                path: display.clone(),
                source: sqlx::Error::Io(error),
            })?;
        }
        let options = if display == ":memory:" {
            SqliteConnectOptions::from_str("sqlite::memory:").map_err(open_error)?
        } else {
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
        }
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(std::time::Duration::from_secs(5))
        .pragma("cache_size", "-16384")
        // Multi-row upserts write a statement journal; keep it off the disk.
        .pragma("temp_store", "memory");
        // One connection: the store has one writer, a second connection to `:memory:` would
        // see a different database, and each extra connection of a file costs its own page
        // cache and statement cache (measured: ~25 MiB each under the Kafka bench) for no
        // measurable speed: the entity cache takes the hot reads.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        for statement in [SCHEMA, CHECKPOINT_SCHEMA, POLL_CURSOR_SCHEMA] {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .map_err(open_error)?;
        }
        // Stores written before parking existed lack its column.
        let columns = sqlx::query("SELECT name FROM pragma_table_info('entity_state')")
            .fetch_all(&pool)
            .await
            .map_err(open_error)?;
        if !columns.iter().any(|row| {
            row.try_get::<String, _>(0)
                .is_ok_and(|name| name == "parked")
        }) {
            sqlx::query("ALTER TABLE entity_state ADD COLUMN parked TEXT")
                .execute(&pool)
                .await
                .map_err(open_error)?;
        }
        let path = (display != ":memory:").then(|| path.to_owned());
        Ok(SqliteStore { pool, path })
    }

    /// Entities per pipeline, checkpoints and size on disk. Counting is a scan of the
    /// primary key (about 50 ms per million entities): call it every few seconds, not per
    /// batch.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let rows = sqlx::query(
            "SELECT pipeline, COUNT(*), SUM(parked IS NOT NULL) FROM entity_state \
             GROUP BY pipeline ORDER BY pipeline",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::Unavailable)?;
        let mut entities = BTreeMap::new();
        let mut parked_entities = BTreeMap::new();
        for row in rows {
            let pipeline: String = row.try_get(0).map_err(StoreError::Unavailable)?;
            let count: i64 = row.try_get(1).map_err(StoreError::Unavailable)?;
            let parked: i64 = row.try_get(2).map_err(StoreError::Unavailable)?;
            entities.insert(pipeline.clone(), count.max(0) as u64);
            parked_entities.insert(pipeline, parked.max(0) as u64);
        }
        let rows = sqlx::query(
            "SELECT topic, partition, last_offset FROM changelog_checkpoint ORDER BY topic, partition",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::Unavailable)?;
        let mut checkpoints = Vec::with_capacity(rows.len());
        for row in rows {
            checkpoints.push(Checkpoint {
                topic: row.try_get(0).map_err(StoreError::Unavailable)?,
                partition: row.try_get(1).map_err(StoreError::Unavailable)?,
                offset: row.try_get(2).map_err(StoreError::Unavailable)?,
            });
        }
        let size_bytes = self.path.as_ref().map_or(0, |path| {
            ["", "-wal", "-shm"]
                .iter()
                .filter_map(|suffix| {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    std::fs::metadata(file).ok().map(|metadata| metadata.len())
                })
                .sum()
        });
        Ok(StoreStats {
            entities,
            parked_entities,
            checkpoints,
            size_bytes,
        })
    }

    /// The cursor `cdcflow replay --poll` saved for `poll` (JSON), if any.
    pub async fn poll_cursor(&self, poll: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT cursor FROM poll_cursor WHERE poll = ?")
            .bind(poll)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::Unavailable)?;
        row.map(|row| row.try_get(0).map_err(StoreError::Unavailable))
            .transpose()
    }

    pub async fn save_poll_cursor(&self, poll: &str, cursor: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO poll_cursor (poll, cursor) VALUES (?, ?) \
             ON CONFLICT (poll) DO UPDATE SET cursor = excluded.cursor",
        )
        .bind(poll)
        .bind(cursor)
        .execute(&self.pool)
        .await
        .map_err(StoreError::Unavailable)?;
        Ok(())
    }

    /// Every entity key of `pipeline` (for a reconciliation).
    pub async fn entities(&self, pipeline: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT entity FROM entity_state WHERE pipeline = ?")
            .bind(pipeline)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::Unavailable)?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::Unavailable))
            .collect()
    }

    /// How many entity rows the store holds, across pipelines.
    pub async fn count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM entity_state")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::Unavailable)?;
        row.try_get(0).map_err(StoreError::Unavailable)
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

impl StateStore for SqliteStore {
    async fn load(
        &self,
        pipeline: &str,
        entities: &[&str],
    ) -> Result<HashMap<String, EntityState>, StoreError> {
        let mut states = HashMap::with_capacity(entities.len());
        for chunk in entities.chunks(ROWS_PER_STATEMENT) {
            let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT entity, version, image, updated_at_ms, parked FROM entity_state WHERE pipeline = ",
            );
            query
                .push_bind(pipeline.to_owned())
                .push(" AND entity IN (");
            let mut list = query.separated(", ");
            for entity in chunk {
                list.push_bind((*entity).to_owned());
            }
            query.push(")");
            let rows = query
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::Unavailable)?;
            for row in rows {
                let entity: String = row.try_get(0).map_err(StoreError::Unavailable)?;
                let version_text: String = row.try_get(1).map_err(StoreError::Unavailable)?;
                let version =
                    Version::from_sequence(&version_text).ok_or_else(|| StoreError::Corrupt {
                        pipeline: pipeline.to_owned(),
                        entity: entity.clone(),
                        detail: format!("version `{version_text}` is not a version sequence"),
                    })?;
                let state = EntityState {
                    version,
                    image: row
                        .try_get::<Option<String>, _>(2)
                        .map_err(StoreError::Unavailable)?
                        .map(Arc::from),
                    updated_at_ms: row.try_get(3).map_err(StoreError::Unavailable)?,
                    parked: match row
                        .try_get::<Option<String>, _>(4)
                        .map_err(StoreError::Unavailable)?
                    {
                        None => None,
                        Some(text) => {
                            Some(Arc::new(Parked::from_json(&text).map_err(|detail| {
                                StoreError::Corrupt {
                                    pipeline: pipeline.to_owned(),
                                    entity: entity.clone(),
                                    detail: format!("parked changes: {detail}"),
                                }
                            })?))
                        }
                    },
                };
                states.insert(entity, state);
            }
        }
        Ok(states)
    }

    async fn checkpoint(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT last_offset FROM changelog_checkpoint WHERE topic = ? AND partition = ?",
        )
        .bind(topic.to_owned())
        .bind(partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::Unavailable)?;
        row.map(|row| row.try_get(0))
            .transpose()
            .map_err(StoreError::Unavailable)
    }

    async fn reset_checkpoint(
        &self,
        topic: &str,
        partition: i32,
        offset: Option<i64>,
    ) -> Result<(), StoreError> {
        let statement = match offset {
            Some(_) => {
                "INSERT INTO changelog_checkpoint (topic, partition, last_offset) VALUES (?, ?, ?) \
                 ON CONFLICT (topic, partition) DO UPDATE SET last_offset = excluded.last_offset"
            }
            None => "DELETE FROM changelog_checkpoint WHERE topic = ? AND partition = ?",
        };
        let mut query = sqlx::query(statement)
            .bind(topic.to_owned())
            .bind(partition);
        if let Some(offset) = offset {
            query = query.bind(offset);
        }
        query
            .execute(&self.pool)
            .await
            .map_err(StoreError::Unavailable)?;
        Ok(())
    }

    async fn save(
        &self,
        mut writes: Vec<StateWrite>,
        checkpoints: Vec<Checkpoint>,
    ) -> Result<(), StoreError> {
        if writes.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        // In key order the upserts walk the table's B-tree once, page after page, instead of
        // jumping between pages that fall out of SQLite's cache and are read again.
        writes.sort_unstable_by(|a, b| (&a.pipeline, &a.entity).cmp(&(&b.pipeline, &b.entity)));
        let mut transaction = self.pool.begin().await.map_err(StoreError::Unavailable)?;
        for chunk in writes.chunks(ROWS_PER_STATEMENT) {
            let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO entity_state (pipeline, entity, version, image, updated_at_ms, parked) ",
            );
            query.push_values(chunk, |mut row, write| {
                row.push_bind(write.pipeline.clone())
                    .push_bind(write.entity.clone())
                    .push_bind(write.state.version.sequence())
                    .push_bind(write.state.image.as_deref().map(str::to_owned))
                    .push_bind(write.state.updated_at_ms)
                    .push_bind(write.state.parked.as_ref().map(|parked| parked.to_json()));
            });
            // Versions are fixed-width hex sequences, so text order is version order. A write
            // older than the stored state (a late save, a restore under a newer state) is
            // ignored: the store never takes an entity back.
            query.push(
                " ON CONFLICT (pipeline, entity) DO UPDATE SET version = excluded.version, \
                 image = excluded.image, updated_at_ms = excluded.updated_at_ms, \
                 parked = excluded.parked WHERE excluded.version >= entity_state.version",
            );
            query
                .build()
                .execute(&mut *transaction)
                .await
                .map_err(StoreError::Unavailable)?;
        }
        for checkpoint in checkpoints {
            // The checkpoint only moves forward: a late, older save never rewinds it.
            sqlx::query(
                "INSERT INTO changelog_checkpoint (topic, partition, last_offset) VALUES (?, ?, ?) \
                 ON CONFLICT (topic, partition) DO UPDATE SET \
                 last_offset = MAX(last_offset, excluded.last_offset)",
            )
            .bind(checkpoint.topic)
            .bind(checkpoint.partition)
            .bind(checkpoint.offset)
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::Unavailable)?;
        }
        transaction.commit().await.map_err(StoreError::Unavailable)
    }
}
