//! Per-entity state: the [`StateStore`] trait and its implementations.
//!
//! The store keeps each entity's last applied version and image. It is written once per batch
//! in one transaction, after the batch's outputs are durable, so that a crash can repeat an
//! output but never lose one. Implementations must never reorder writes within a batch.

pub mod changelog;
mod memory;
mod sqlite;
mod write_behind;

use std::collections::HashMap;

use thiserror::Error;

use crate::engine::EntityState;

pub use memory::MemoryStore;
pub use sqlite::{SqliteStore, StoreStats};
pub use write_behind::WriteBehind;

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
    #[error("the background state save stopped: {0}")]
    BackgroundSave(String),
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
    /// same entity win, but a row never replaces a stored state of a newer version (a late
    /// save or a restore must not take an entity back), and a checkpoint only moves forward.
    fn save(
        &self,
        writes: Vec<StateWrite>,
        checkpoints: Vec<Checkpoint>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sets the checkpoint of one changelog partition to exactly `offset` (or removes it),
    /// backwards too: for a changelog that was recreated or truncated behind the store.
    fn reset_checkpoint(
        &self,
        topic: &str,
        partition: i32,
        offset: Option<i64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The checkpoint of one changelog partition, if any.
    fn checkpoint(
        &self,
        topic: &str,
        partition: i32,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Version;

    fn write(version: u64, status: &str) -> StateWrite {
        StateWrite {
            pipeline: "orders".to_owned(),
            entity: "1".to_owned(),
            state: EntityState {
                version: Version::new(vec![version, 1 << 33]),
                image: Some(format!(r#"{{"status":"{status}"}}"#).into()),
                updated_at_ms: 0,
                parked: None,
            },
            partition: 0,
        }
    }

    fn checkpoint(offset: i64) -> Checkpoint {
        Checkpoint {
            topic: "changelog".to_owned(),
            partition: 0,
            offset,
        }
    }

    /// The same guarantees from every store: an older write (a late save, a restore from an
    /// older changelog) never takes an entity back; checkpoints only move forward unless
    /// reset on purpose.
    async fn never_goes_back(store: &impl StateStore) {
        store
            .save(vec![write(20, "paid")], vec![checkpoint(9)])
            .await
            .unwrap();
        store
            .save(vec![write(3, "pending")], vec![checkpoint(4)])
            .await
            .unwrap();
        let states = store.load("orders", &["1"]).await.unwrap();
        assert_eq!(states["1"], write(20, "paid").state);
        assert_eq!(store.checkpoint("changelog", 0).await.unwrap(), Some(9));
        // A newer version (a larger first component beats any second one) still wins.
        store
            .save(vec![write(21, "shipped")], vec![])
            .await
            .unwrap();
        let states = store.load("orders", &["1"]).await.unwrap();
        assert_eq!(states["1"], write(21, "shipped").state);
        store
            .reset_checkpoint("changelog", 0, Some(2))
            .await
            .unwrap();
        assert_eq!(store.checkpoint("changelog", 0).await.unwrap(), Some(2));
        store.reset_checkpoint("changelog", 0, None).await.unwrap();
        assert_eq!(store.checkpoint("changelog", 0).await.unwrap(), None);
    }

    /// Parked changes are stored with the state and come back whole; releasing them (an
    /// equal version without them) replaces the parked state.
    async fn keeps_parked_changes(store: &impl StateStore) {
        let blocker = crate::cdc::RawRecord {
            topic: "orders".to_owned(),
            partition: 0,
            offset: 3,
            key: Some(b"1".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: Vec::new(),
            timestamp_ms: None,
        };
        let parked = crate::engine::Parked::behind(blocker.origin(), false).with(&blocker);
        let mut parked_write = write(30, "pending");
        parked_write.state.parked = Some(parked);
        store
            .save(vec![parked_write.clone()], vec![])
            .await
            .unwrap();
        let states = store.load("orders", &["1"]).await.unwrap();
        assert_eq!(states["1"], parked_write.state);
        store
            .save(vec![write(30, "pending")], vec![])
            .await
            .unwrap();
        let states = store.load("orders", &["1"]).await.unwrap();
        assert!(states["1"].parked.is_none());
    }

    /// SQLite (file-backed) and the in-memory store both refuse to go back.
    #[tokio::test]
    async fn stores_never_take_an_entity_back() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("state.db"))
            .await
            .unwrap();
        never_goes_back(&sqlite).await;
        never_goes_back(&MemoryStore::new()).await;
        keeps_parked_changes(&sqlite).await;
        keeps_parked_changes(&MemoryStore::new()).await;
    }
}
