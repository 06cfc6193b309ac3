//! Parallel lanes: a batch's records split by input partition (partition modulo the lane
//! count), each lane with its own state cache on its own thread, so partitions run in
//! parallel and each partition strictly in order.
//!
//! Lanes share no state because an entity never crosses partitions: the entity is the record
//! key, which is the Kafka key (`cdcflow run` refuses pipelines that could break this at
//! start). No rdkafka here: the Kafka adapter hands records in and takes outcomes out.

use super::batch::{BatchOutcome, BatchProcessor, StateCache};
use crate::cdc::RawRecord;
use crate::metrics::Tally;
use crate::store::{StateStore, StoreError};

/// The lanes of one service and their caches.
#[derive(Debug)]
pub struct Lanes {
    caches: Vec<StateCache>,
}

impl Lanes {
    /// `lanes` lanes sharing `cache_entries` between them.
    pub fn new(lanes: usize, pipelines: usize, cache_entries: usize) -> Lanes {
        let lanes = lanes.max(1);
        Lanes {
            caches: (0..lanes)
                .map(|_| StateCache::new(pipelines, cache_entries / lanes))
                .collect(),
        }
    }

    /// One lane per core, at most 8.
    pub fn per_core(pipelines: usize, cache_entries: usize) -> Lanes {
        let cores = std::thread::available_parallelism().map_or(2, |cores| cores.get().clamp(1, 8));
        Lanes::new(cores, pipelines, cache_entries)
    }

    /// Processes a batch: each lane decodes and applies its partitions' records in order
    /// against its cache (staging the new states there) and the store.
    pub fn process<S: StateStore>(
        &mut self,
        records: Vec<RawRecord>,
        processor: &BatchProcessor<'_>,
        store: &S,
        runtime: &tokio::runtime::Handle,
        now_ms: i64,
    ) -> Result<(BatchOutcome, Tally), StoreError> {
        let lanes = self.caches.len();
        let mut by_lane: Vec<Vec<RawRecord>> = (0..lanes).map(|_| Vec::new()).collect();
        for record in records {
            by_lane[record.partition.unsigned_abs() as usize % lanes].push(record);
        }
        let results: Vec<Result<(BatchOutcome, Tally), StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = by_lane
                .into_iter()
                .zip(self.caches.iter_mut())
                .filter(|(lane, _)| !lane.is_empty())
                .map(|(lane, cache)| {
                    scope.spawn(move || {
                        let mut tally = Tally::default();
                        runtime
                            .block_on(
                                processor.process_in_chunks(lane, cache, store, &mut tally, now_ms),
                            )
                            .map(|outcome| (outcome, tally))
                    })
                })
                .collect();
            handles
                .into_iter()
                // A record's panic is caught per record (to the DLQ); one that escapes is a
                // bug outside any record: surface it on the caller's thread.
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut merged = BatchOutcome::default();
        let mut tally = Tally::default();
        for result in results {
            let (outcome, lane_tally) = result?;
            merged.append(outcome);
            tally.merge(lane_tally);
        }
        Ok((merged, tally))
    }

    /// Forgets every cached state (staged states of an aborted batch included).
    pub fn clear(&mut self) {
        self.caches.iter_mut().for_each(StateCache::clear);
    }

    pub fn over_capacity(&self) -> bool {
        self.caches.iter().any(StateCache::over_capacity)
    }

    /// Evicts the least recently used entries of full caches; returns how many. The store
    /// must hold every committed state first.
    pub fn evict(&mut self) -> usize {
        let mut evicted = 0;
        for cache in &mut self.caches {
            if cache.over_capacity() {
                let before = cache.len();
                cache.evict_least_recently_used();
                evicted += before - cache.len();
            }
        }
        evicted
    }
}
