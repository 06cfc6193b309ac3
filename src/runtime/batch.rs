//! One batch of records through every matching pipeline, with state loaded in bulk.

use std::collections::{HashMap, HashSet};

use crate::cdc::RawRecord;
use crate::config::TopicRoute;
use crate::engine::{DecodeOutcome, EntityState, OutputRecord, Pipeline};
use crate::metrics::Tally;
use crate::store::{StateStore, StateWrite, StoreError};

/// Entity states in memory in front of the store, per pipeline. `None` caches "not stored", so
/// a new entity costs one lookup, not one per record.
#[derive(Debug)]
pub struct StateCache {
    per_pipeline: Vec<HashMap<String, Option<EntityState>>>,
    capacity: usize,
}

impl StateCache {
    pub fn new(pipelines: usize, capacity: usize) -> StateCache {
        StateCache {
            per_pipeline: (0..pipelines).map(|_| HashMap::new()).collect(),
            capacity,
        }
    }

    fn len(&self) -> usize {
        self.per_pipeline.iter().map(HashMap::len).sum()
    }

    /// Drops everything once over capacity. Called between batches, when every entry is
    /// already in the store, so dropping loses nothing but speed.
    pub fn trim(&mut self) {
        if self.len() > self.capacity {
            self.per_pipeline.iter_mut().for_each(HashMap::clear);
        }
    }

    /// Forgets every entry (after an aborted batch whose staged states must not be seen).
    pub fn clear(&mut self) {
        self.per_pipeline.iter_mut().for_each(HashMap::clear);
    }
}

/// What a batch produced, in input order.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub outputs: Vec<OutputRecord>,
    /// The final state of every entity the batch changed.
    pub writes: Vec<StateWrite>,
}

/// Routes records to pipelines and runs them against cached and stored state.
#[derive(Debug)]
pub struct BatchProcessor<'p> {
    pipelines: &'p [(TopicRoute, Pipeline)],
}

struct Decoded<'r> {
    record: &'r RawRecord,
    pipeline: usize,
    outcome: DecodeOutcome,
}

impl<'p> BatchProcessor<'p> {
    pub fn new(pipelines: &'p [(TopicRoute, Pipeline)]) -> BatchProcessor<'p> {
        BatchProcessor { pipelines }
    }

    pub async fn process<S: StateStore>(
        &self,
        records: &[RawRecord],
        cache: &mut StateCache,
        store: &S,
        tally: &mut Tally,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut decoded = Vec::with_capacity(records.len());
        for record in records {
            tally.records_read += 1;
            let mut routed = false;
            for (index, (route, pipeline)) in self.pipelines.iter().enumerate() {
                if route.matches(&record.topic) {
                    routed = true;
                    decoded.push(Decoded {
                        record,
                        pipeline: index,
                        outcome: pipeline.decode(record),
                    });
                }
            }
            if !routed {
                tally.unrouted += 1;
            }
        }
        self.load_missing(&decoded, cache, store).await?;

        let mut outcome = BatchOutcome::default();
        let mut dirty: HashMap<(usize, String), EntityState> = HashMap::new();
        for item in decoded {
            let pipeline = &self.pipelines[item.pipeline].1;
            let counts = tally.pipeline(item.pipeline, pipeline.name());
            let change = match item.outcome {
                DecodeOutcome::Change(change) => change,
                DecodeOutcome::Skip(reason) => {
                    counts.count_skip(reason.as_str());
                    continue;
                }
                DecodeOutcome::Failed(failure) => {
                    counts.count_dlq(failure.reason);
                    outcome
                        .outputs
                        .push(pipeline.dead_letter(item.record, &failure, now_ms));
                    continue;
                }
            };
            let states = &mut cache.per_pipeline[item.pipeline];
            let stored = states.get(change.key.as_str()).and_then(Option::as_ref);
            match pipeline.apply(item.record, &change, stored, now_ms) {
                Ok(applied) => {
                    counts.count_decision(applied.decision.as_str());
                    for event_type in &applied.event_types {
                        counts.count_event(event_type);
                    }
                    if applied.outputs.len() > applied.event_types.len() {
                        counts.audit_records += 1;
                    }
                    outcome.outputs.extend(applied.outputs);
                    if let Some(state) = applied.next_state {
                        let entity = change.key.as_str().to_owned();
                        states.insert(entity.clone(), Some(state.clone()));
                        dirty.insert((item.pipeline, entity), state);
                    }
                }
                Err(failure) => {
                    counts.count_dlq(failure.reason);
                    outcome
                        .outputs
                        .push(pipeline.dead_letter(item.record, &failure, now_ms));
                }
            }
        }
        outcome.writes = dirty
            .into_iter()
            .map(|((pipeline, entity), state)| StateWrite {
                pipeline: self.pipelines[pipeline].1.name().to_owned(),
                entity,
                state,
            })
            .collect();
        Ok(outcome)
    }

    /// Loads, in one query per pipeline, the states of entities the cache does not hold.
    async fn load_missing<S: StateStore>(
        &self,
        decoded: &[Decoded<'_>],
        cache: &mut StateCache,
        store: &S,
    ) -> Result<(), StoreError> {
        let mut missing: Vec<HashSet<&str>> = vec![HashSet::new(); self.pipelines.len()];
        for item in decoded {
            if let DecodeOutcome::Change(change) = &item.outcome
                && !cache.per_pipeline[item.pipeline].contains_key(change.key.as_str())
            {
                missing[item.pipeline].insert(change.key.as_str());
            }
        }
        for (index, entities) in missing.into_iter().enumerate() {
            if entities.is_empty() {
                continue;
            }
            let entities: Vec<&str> = entities.into_iter().collect();
            let mut found = store
                .load(self.pipelines[index].1.name(), &entities)
                .await?;
            let states = &mut cache.per_pipeline[index];
            for entity in entities {
                states.insert(entity.to_owned(), found.remove(entity));
            }
        }
        Ok(())
    }
}
