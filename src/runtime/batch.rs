//! One batch of records through every matching pipeline, with state loaded in bulk.

use std::collections::{HashMap, HashSet};

use crate::cdc::{Origin, RawRecord};
use crate::config::TopicRoute;
use crate::engine::{DecodeOutcome, EntityState, OutputRecord, Pipeline, RecordFailure};
use crate::metrics::Tally;
use crate::store::{StateStore, StateWrite, StoreError};

/// Records decoded at a time within a lane: bounds the memory of decoded images (about 3 KB
/// per record) without shrinking the transaction (measured in the Kafka bench: batches of
/// 10,000 decoded at once peaked ~40 MiB higher than with 5,000).
const CHUNK_RECORDS: usize = 1_000;

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

    /// Whether the cache holds more entries than its capacity. The caller clears it only when
    /// every entry is already in the store, so clearing loses nothing but speed.
    pub fn over_capacity(&self) -> bool {
        self.len() > self.capacity
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
    /// For each of `outputs`, the pipeline (index) and the input record it came from.
    pub output_origins: Vec<(usize, Origin)>,
    /// The final state of every entity the batch changed.
    pub writes: Vec<StateWrite>,
}

impl BatchOutcome {
    /// Records `record` as the origin of the outputs pushed since `from`.
    fn note_origins(&mut self, from: usize, pipeline: usize, record: &RawRecord) {
        let added = self.outputs.len() - from;
        if added > 0 {
            let origin = record.origin();
            self.output_origins
                .extend(std::iter::repeat_n((pipeline, origin), added));
        }
    }

    /// Drops every write an entity has a later write for.
    fn keep_last_writes(&mut self) {
        let mut last: HashMap<(&str, &str), usize> = HashMap::with_capacity(self.writes.len());
        for (index, write) in self.writes.iter().enumerate() {
            last.insert((&write.pipeline, &write.entity), index);
        }
        if last.len() == self.writes.len() {
            return;
        }
        let keep: Vec<bool> = self
            .writes
            .iter()
            .enumerate()
            .map(|(index, write)| last[&(write.pipeline.as_str(), write.entity.as_str())] == index)
            .collect();
        let mut keep = keep.into_iter();
        self.writes.retain(|_| keep.next().unwrap_or(true));
    }

    /// Appends another lane's outcome.
    pub fn append(&mut self, other: BatchOutcome) {
        self.outputs.extend(other.outputs);
        self.output_origins.extend(other.output_origins);
        self.writes.extend(other.writes);
    }
}

/// A record whose output a broker refused for its size, for the next attempt at its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Set when an event or audit record was refused: the record is not applied but goes to
    /// the DLQ with this failure. `None` when only its DLQ record was refused.
    pub failure: Option<RecordFailure>,
    /// The broker refused the record's DLQ record: send it without the original key and value.
    pub strip_dead_letter: bool,
}

/// Refused records by pipeline index and origin.
pub type Refusals = HashMap<(usize, Origin), Refusal>;

/// A decoded slice of a batch: (record index, pipeline index, outcome) items and the number
/// of records no pipeline reads.
type DecodedSlice = (Vec<(usize, usize, DecodeOutcome)>, u64);

/// A batch after routing and decoding: the first, parallelisable stage.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    records: Vec<RawRecord>,
    /// (record index, pipeline index, outcome), in record order.
    items: Vec<(usize, usize, DecodeOutcome)>,
    unrouted: u64,
}

impl DecodedBatch {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Routes records to pipelines and runs them against cached and stored state.
#[derive(Debug)]
pub struct BatchProcessor<'p> {
    pipelines: &'p [(TopicRoute, Pipeline)],
    refusals: Option<&'p Refusals>,
}

impl<'p> BatchProcessor<'p> {
    pub fn new(pipelines: &'p [(TopicRoute, Pipeline)]) -> BatchProcessor<'p> {
        BatchProcessor {
            pipelines,
            refusals: None,
        }
    }

    /// Sends the records in `refusals` to the DLQ instead of applying them.
    pub fn with_refusals(mut self, refusals: &'p Refusals) -> BatchProcessor<'p> {
        self.refusals = Some(refusals).filter(|refusals| !refusals.is_empty());
        self
    }

    /// Routes and decodes records. Needs no state, so it can run ahead on another thread.
    pub fn decode(&self, records: Vec<RawRecord>) -> DecodedBatch {
        let (items, unrouted) = self.decode_slice(&records);
        DecodedBatch {
            records,
            items,
            unrouted,
        }
    }

    /// Routes and decodes a slice: (record index in the slice, pipeline, outcome), unrouted.
    fn decode_slice(&self, records: &[RawRecord]) -> DecodedSlice {
        let mut items = Vec::with_capacity(records.len());
        let mut unrouted = 0;
        for (index, record) in records.iter().enumerate() {
            let mut routed = false;
            for (pipeline_index, (route, pipeline)) in self.pipelines.iter().enumerate() {
                if route.matches(&record.topic) {
                    routed = true;
                    items.push((index, pipeline_index, pipeline.decode(record)));
                }
            }
            if !routed {
                unrouted += 1;
            }
        }
        (items, unrouted)
    }

    /// Decodes and applies records in chunks of `CHUNK_RECORDS`, so that only one chunk's
    /// decoded images are in memory at a time; an entity changed in several chunks keeps one
    /// write, its last.
    pub async fn process_in_chunks<S: StateStore>(
        &self,
        records: Vec<RawRecord>,
        cache: &mut StateCache,
        store: &S,
        tally: &mut Tally,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let several_chunks = records.len() > CHUNK_RECORDS;
        let mut outcome = BatchOutcome::default();
        let mut records = records.into_iter();
        loop {
            let chunk: Vec<RawRecord> = records.by_ref().take(CHUNK_RECORDS).collect();
            if chunk.is_empty() {
                break;
            }
            let decoded = self.decode(chunk);
            outcome.append(self.apply(decoded, cache, store, tally, now_ms).await?);
        }
        // One chunk's writes are already one per entity.
        if several_chunks {
            outcome.keep_last_writes();
        }
        Ok(outcome)
    }

    /// Decodes and applies one batch.
    pub async fn process<S: StateStore>(
        &self,
        records: &[RawRecord],
        cache: &mut StateCache,
        store: &S,
        tally: &mut Tally,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let batch = self.decode(records.to_vec());
        self.apply(batch, cache, store, tally, now_ms).await
    }

    /// Gates and applies a decoded batch in record order, loading missing states in bulk.
    pub async fn apply<S: StateStore>(
        &self,
        batch: DecodedBatch,
        cache: &mut StateCache,
        store: &S,
        tally: &mut Tally,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        tally.records_read += batch.records.len() as u64;
        tally.unrouted += batch.unrouted;
        self.load_missing(&batch, cache, store).await?;

        let mut outcome = BatchOutcome::default();
        let mut dirty: HashMap<(usize, String), i32> = HashMap::new();
        for (record_index, pipeline_index, decoded) in batch.items {
            let record = &batch.records[record_index];
            let pipeline = &self.pipelines[pipeline_index].1;
            let counts = tally.pipeline(pipeline_index, pipeline.name());
            let outputs_before = outcome.outputs.len();
            let refusal = self
                .refusals
                .and_then(|refusals| refusals.get(&(pipeline_index, record.origin())));
            let dead_letter = |failure: &RecordFailure| {
                let max_bytes = if refusal.is_some_and(|refusal| refusal.strip_dead_letter) {
                    0
                } else {
                    pipeline.settings().max_output_bytes
                };
                pipeline.dead_letter_within(record, failure, now_ms, max_bytes)
            };
            if let Some(failure) = refusal.and_then(|refusal| refusal.failure.as_ref()) {
                counts.count_dlq(failure.reason);
                outcome.outputs.push(dead_letter(failure));
                outcome.note_origins(outputs_before, pipeline_index, record);
                continue;
            }
            let change = match decoded {
                DecodeOutcome::Change(change) => change,
                DecodeOutcome::Skip(reason) => {
                    counts.count_skip(reason.as_str());
                    continue;
                }
                DecodeOutcome::Failed(failure) => {
                    counts.count_dlq(failure.reason);
                    outcome.outputs.push(dead_letter(&failure));
                    outcome.note_origins(outputs_before, pipeline_index, record);
                    continue;
                }
            };
            let states = &mut cache.per_pipeline[pipeline_index];
            let stored = states.get(change.key.as_str()).and_then(Option::as_ref);
            match pipeline.apply(record, &change, stored, now_ms) {
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
                        states.insert(entity.clone(), Some(state));
                        dirty.insert((pipeline_index, entity), record.partition);
                    }
                }
                Err(failure) => {
                    counts.count_dlq(failure.reason);
                    outcome.outputs.push(dead_letter(&failure));
                }
            }
            outcome.note_origins(outputs_before, pipeline_index, record);
        }
        outcome.writes = dirty
            .into_iter()
            .filter_map(|((pipeline, entity), partition)| {
                let state = cache.per_pipeline[pipeline].get(&entity)?.clone()?;
                Some(StateWrite {
                    pipeline: self.pipelines[pipeline].1.name().to_owned(),
                    entity,
                    state,
                    partition,
                })
            })
            .collect();
        Ok(outcome)
    }

    /// Loads, in one query per pipeline, the states of entities the cache does not hold.
    async fn load_missing<S: StateStore>(
        &self,
        batch: &DecodedBatch,
        cache: &mut StateCache,
        store: &S,
    ) -> Result<(), StoreError> {
        let mut missing: Vec<HashSet<&str>> = vec![HashSet::new(); self.pipelines.len()];
        for (_, pipeline, decoded) in &batch.items {
            if let DecodeOutcome::Change(change) = decoded
                && !cache.per_pipeline[*pipeline].contains_key(change.key.as_str())
            {
                missing[*pipeline].insert(change.key.as_str());
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
