//! Per-entity state: the [`StateStore`] trait and its implementations.
//!
//! The store keeps each entity's last applied version and image. It is written once per batch
//! in one transaction, after the batch's outputs are durable, so that a crash can repeat an
//! output but never lose one. Implementations must never reorder writes within a batch.

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

    /// Writes a batch atomically: all rows or none. Later rows for the same entity win.
    fn save(&self, writes: Vec<StateWrite>) -> impl Future<Output = Result<(), StoreError>> + Send;
}
