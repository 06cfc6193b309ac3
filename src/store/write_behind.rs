//! Committed state written behind processing: states of committed batches (one per entity,
//! the latest) and changelog checkpoints collect here and go to the store in large batches,
//! one save in the background at a time.
//!
//! Anything that reads the store as the truth (a changelog restore, a cache eviction, a
//! reload after an abort) must [`WriteBehind::flush`] first; otherwise an older state still
//! held here could land after, and under, a newer one.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::{Checkpoint, StateStore, StateWrite, StoreError};

/// Committed states and checkpoints not yet in the store.
#[derive(Debug)]
pub struct WriteBehind<S> {
    store: Arc<S>,
    runtime: tokio::runtime::Handle,
    /// Records covered by the unsaved states after which a background save starts.
    flush_records: usize,
    /// One state per (pipeline, entity): the latest committed.
    unsaved: HashMap<(String, String), StateWrite>,
    /// The last committed changelog offset per changelog partition.
    checkpoints: HashMap<(String, i32), i64>,
    unsaved_records: usize,
    saving: Option<JoinHandle<Result<(), StoreError>>>,
}

impl<S: StateStore> WriteBehind<S> {
    pub fn new(store: Arc<S>, runtime: tokio::runtime::Handle, flush_records: usize) -> Self {
        WriteBehind {
            store,
            runtime,
            flush_records,
            unsaved: HashMap::new(),
            checkpoints: HashMap::new(),
            unsaved_records: 0,
            saving: None,
        }
    }

    /// Takes the states and changelog offsets of a committed batch of `records` records;
    /// starts a background save once enough records are covered.
    pub fn committed(
        &mut self,
        writes: Vec<StateWrite>,
        changelog: Vec<Checkpoint>,
        records: usize,
    ) -> Result<(), StoreError> {
        for Checkpoint {
            topic,
            partition,
            offset,
        } in changelog
        {
            let slot = self.checkpoints.entry((topic, partition)).or_insert(offset);
            *slot = (*slot).max(offset);
        }
        for write in writes {
            self.unsaved
                .insert((write.pipeline.clone(), write.entity.clone()), write);
        }
        self.unsaved_records += records;
        if self.unsaved_records >= self.flush_records {
            self.save_in_background()?;
        }
        Ok(())
    }

    /// Whether nothing is waiting to be saved (a save may still be running).
    pub fn is_empty(&self) -> bool {
        self.unsaved.is_empty() && self.checkpoints.is_empty()
    }

    /// Writes everything committed to the store and waits for it (and for the save in
    /// flight). Blocks the calling thread: call it from the service thread, never from a
    /// tokio worker.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.finish_save()?;
        let (writes, checkpoints) = self.take();
        if writes.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        self.runtime.block_on(self.store.save(writes, checkpoints))
    }

    /// Starts saving what is unsaved now rather than at the next window: for changes an
    /// operator watches in the store (an entity parked or released), which are rare.
    pub fn save_soon(&mut self) -> Result<(), StoreError> {
        self.save_in_background()
    }

    /// Starts saving what is unsaved in the background, after the previous save (one in
    /// flight keeps saves in order and memory bounded).
    fn save_in_background(&mut self) -> Result<(), StoreError> {
        self.finish_save()?;
        let (writes, checkpoints) = self.take();
        if writes.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        self.saving = Some(
            self.runtime
                .spawn(async move { store.save(writes, checkpoints).await }),
        );
        Ok(())
    }

    fn finish_save(&mut self) -> Result<(), StoreError> {
        match self.saving.take() {
            Some(task) => self
                .runtime
                .block_on(task)
                .map_err(|error| StoreError::BackgroundSave(error.to_string()))?,
            None => Ok(()),
        }
    }

    fn take(&mut self) -> (Vec<StateWrite>, Vec<Checkpoint>) {
        self.unsaved_records = 0;
        let writes = std::mem::take(&mut self.unsaved).into_values().collect();
        let checkpoints = std::mem::take(&mut self.checkpoints)
            .into_iter()
            .map(|((topic, partition), offset)| Checkpoint {
                topic,
                partition,
                offset,
            })
            .collect();
        (writes, checkpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EntityState, Version};
    use crate::store::MemoryStore;

    fn write(entity: &str, version: u64) -> StateWrite {
        StateWrite {
            pipeline: "orders".to_owned(),
            entity: entity.to_owned(),
            state: EntityState {
                version: Version::new(vec![version]),
                image: Some(format!(r#"{{"v":{version}}}"#).into()),
                updated_at_ms: 0,
                parked: None,
            },
            partition: 0,
        }
    }

    fn at(offset: i64) -> Checkpoint {
        Checkpoint {
            topic: "changelog".to_owned(),
            partition: 0,
            offset,
        }
    }

    /// Committed states stay behind until the window fills or a flush; a flush lands the
    /// latest state of each entity and the highest checkpoint.
    #[test]
    fn flush_lands_the_latest_state_and_checkpoint() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = Arc::new(MemoryStore::new());
        let mut behind = WriteBehind::new(Arc::clone(&store), runtime.handle().clone(), 100);
        behind
            .committed(vec![write("a", 1), write("b", 1)], vec![at(3)], 10)
            .unwrap();
        behind
            .committed(vec![write("a", 2)], vec![at(5)], 10)
            .unwrap();
        assert!(store.is_empty(), "nothing is saved before the window fills");
        assert!(!behind.is_empty());
        behind.flush().unwrap();
        assert!(behind.is_empty());
        let states = runtime.block_on(store.load("orders", &["a", "b"])).unwrap();
        assert_eq!(states["a"], write("a", 2).state);
        assert_eq!(states["b"], write("b", 1).state);
        assert_eq!(
            runtime.block_on(store.checkpoint("changelog", 0)).unwrap(),
            Some(5)
        );
    }

    /// A full window saves in the background; the next flush waits for that save.
    #[test]
    fn a_full_window_saves_in_the_background() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = Arc::new(MemoryStore::new());
        let mut behind = WriteBehind::new(Arc::clone(&store), runtime.handle().clone(), 20);
        behind
            .committed(vec![write("a", 1)], vec![at(0)], 25)
            .unwrap();
        assert!(behind.is_empty(), "the window went to a background save");
        behind.flush().unwrap();
        assert_eq!(store.len(), 1);
    }
}
