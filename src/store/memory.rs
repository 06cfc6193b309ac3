//! An in-memory store for tests and for replays that need no persistence.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Checkpoint, StateStore, StateWrite, StoreError};
use crate::engine::EntityState;

/// States in a map behind a mutex.
#[derive(Debug, Default)]
pub struct MemoryStore {
    states: Mutex<HashMap<(String, String), EntityState>>,
    checkpoints: Mutex<HashMap<(String, i32), i64>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// How many entities are stored, across pipelines.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), EntityState>> {
        // A panic while holding the lock cannot leave the map half-written: every mutation is
        // a single insert, so recovering the guard is sound.
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StateStore for MemoryStore {
    async fn load(
        &self,
        pipeline: &str,
        entities: &[&str],
    ) -> Result<HashMap<String, EntityState>, StoreError> {
        let states = self.lock();
        Ok(entities
            .iter()
            .filter_map(|entity| {
                states
                    .get(&(pipeline.to_owned(), (*entity).to_owned()))
                    .map(|state| ((*entity).to_owned(), state.clone()))
            })
            .collect())
    }

    async fn save(
        &self,
        writes: Vec<StateWrite>,
        checkpoints: Vec<Checkpoint>,
    ) -> Result<(), StoreError> {
        let mut states = self.lock();
        for write in writes {
            let key = (write.pipeline, write.entity);
            // Never take an entity back to an older version (as the SQLite store).
            if states
                .get(&key)
                .is_none_or(|stored| write.state.version >= stored.version)
            {
                states.insert(key, write.state);
            }
        }
        let mut stored = self
            .checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for checkpoint in checkpoints {
            let slot = stored
                .entry((checkpoint.topic, checkpoint.partition))
                .or_insert(checkpoint.offset);
            *slot = (*slot).max(checkpoint.offset);
        }
        Ok(())
    }

    async fn reset_checkpoint(
        &self,
        topic: &str,
        partition: i32,
        offset: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut stored = self
            .checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (topic.to_owned(), partition);
        match offset {
            Some(offset) => stored.insert(key, offset),
            None => stored.remove(&key),
        };
        Ok(())
    }

    async fn checkpoint(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(topic.to_owned(), partition))
            .copied())
    }
}
