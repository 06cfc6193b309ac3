//! Per-entity state: the [`StateStore`] trait and its implementations.
//!
//! The store keeps each entity's last applied version and image. It is written once per batch
//! in one transaction, after the batch's outputs are durable, so that a crash can repeat an
//! output but never lose one. Implementations must never reorder writes within a batch.

pub mod changelog;
mod memory;
mod sqlite;

use std::collections::HashMap;

use thiserror::Error;

use crate::engine::EntityState;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// A state row to write: the pipeline, the entity and its new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    pub pipeline: String,
    pub entity: String,
    pub state: EntityState,
    /// The input partition the entity lives in (its changelog partition).
    pub partition: i32,
}

/// The last changelog offset the store reflects, per changelog partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Store failures. `Unavailable` is transient (retry); `Corrupt` is fatal.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state store `{path}` cannot be opened: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("state store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error(
        "state store holds a corrupt row for pipeline `{pipeline}`, entity `{entity}`: {detail}"
    )]
    Corrupt {
        pipeline: String,
        entity: String,
        detail: String,
    },
}

/// Loads and saves entity states. Futures are `Send` so that a save can run in the background
/// while the next batch is processed.
pub trait StateStore: Send + Sync + 'static {
    /// The stored states of `entities` of `pipeline`; absent entities are missing from the map.
    fn load(
        &self,
        pipeline: &str,
        entities: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, EntityState>, StoreError>> + Send;

    /// Writes states and changelog checkpoints atomically: all or none. Later rows for the
    /// same entity win.
    fn save(
        &self,
        writes: Vec<StateWrite>,
        checkpoints: Vec<Checkpoint>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The checkpoint of one changelog partition, if any.
    fn checkpoint(
        &self,
        topic: &str,
        partition: i32,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
}
