//! One batch of records through every matching pipeline, with state loaded in bulk.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;

use super::park::Step;
use crate::cdc::{Origin, RawRecord};
use crate::config::TopicRoute;
use crate::engine::DlqPolicy;
use crate::engine::{DecodeOutcome, EntityState, OutputRecord, Pipeline, RecordFailure, Stage};
use crate::metrics::Tally;
use crate::store::{StateStore, StateWrite, StoreError};

/// Records decoded at a time within a lane: bounds the memory of decoded images (about 3 KB
/// per record) without shrinking the transaction (measured in the Kafka bench: batches of
/// 10,000 decoded at once peaked ~40 MiB higher than with 5,000).
const CHUNK_RECORDS: usize = 1_000;

/// Entity states in memory in front of the store, per pipeline. `None` caches "not stored", so
/// a new entity costs one lookup, not one per record. Each entry remembers when it was last
/// used, so that a full cache evicts its least recently used entries instead of forgetting
/// every hot entity at once.
#[derive(Debug)]
pub struct StateCache {
    per_pipeline: Vec<HashMap<String, CachedState>>,
    capacity: usize,
    /// A logical clock: bumped on every use of an entry.
    clock: u64,
}

#[derive(Debug)]
struct CachedState {
    state: Option<EntityState>,
    last_used: u64,
}

/// The share of the capacity an eviction keeps: evicting a quarter at a time makes the
/// O(entries) eviction rare.
const KEEP_AFTER_EVICTION: f64 = 0.75;

impl StateCache {
    pub fn new(pipelines: usize, capacity: usize) -> StateCache {
        StateCache {
            per_pipeline: (0..pipelines).map(|_| HashMap::new()).collect(),
            capacity,
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.per_pipeline.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache holds more entries than its capacity. The caller evicts only once
    /// every entry is in the store, so eviction loses nothing but speed.
    pub fn over_capacity(&self) -> bool {
        self.len() > self.capacity
    }

    /// Forgets every entry (after an aborted batch whose staged states must not be seen).
    pub fn clear(&mut self) {
        self.per_pipeline.iter_mut().for_each(HashMap::clear);
    }

    /// Drops the least recently used entries until a quarter of the capacity is free. Only
    /// call it when the store holds every cached state (a later load must not read older
    /// state than the cache had).
    pub fn evict_least_recently_used(&mut self) {
        let keep = (self.capacity as f64 * KEEP_AFTER_EVICTION) as usize;
        let len = self.len();
        if len <= keep {
            return;
        }
        let mut uses: Vec<u64> = self
            .per_pipeline
            .iter()
            .flat_map(|states| states.values().map(|cached| cached.last_used))
            .collect();
        if keep == 0 {
            self.clear();
            return;
        }
        let evict = len - keep;
        // Uses are distinct (one clock tick each), so exactly `evict` entries lie below the
        // threshold.
        let (_, threshold, _) = uses.select_nth_unstable(evict);
        let threshold = *threshold;
        for states in &mut self.per_pipeline {
            states.retain(|_, cached| cached.last_used >= threshold);
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Whether the cache knows the entity (stored or known to be absent).
    fn contains(&self, pipeline: usize, entity: &str) -> bool {
        self.per_pipeline[pipeline].contains_key(entity)
    }

    /// The cached state of an entity (marking it used); `None` when absent or not stored.
    fn touch(&mut self, pipeline: usize, entity: &str) -> Option<&EntityState> {
        let now = self.tick();
        let cached = self.per_pipeline[pipeline].get_mut(entity)?;
        cached.last_used = now;
        cached.state.as_ref()
    }

    fn insert(&mut self, pipeline: usize, entity: String, state: Option<EntityState>) {
        let last_used = self.tick();
        self.per_pipeline[pipeline].insert(entity, CachedState { state, last_used });
    }

    fn get(&self, pipeline: usize, entity: &str) -> Option<&EntityState> {
        self.per_pipeline[pipeline].get(entity)?.state.as_ref()
    }
}

/// Where an output came from: the pipeline (by index) and the input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputOrigin {
    pub pipeline: usize,
    pub origin: Origin,
}

/// What a batch produced, in input order.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub outputs: Vec<OutputRecord>,
    /// For each of `outputs`, the pipeline and the input record it came from.
    pub output_origins: Vec<OutputOrigin>,
    /// The final state of every entity the batch changed.
    pub writes: Vec<StateWrite>,
}

impl BatchOutcome {
    /// Records `record` as the origin of the outputs pushed since `from`.
    fn note_origins(&mut self, from: usize, pipeline: usize, record: &RawRecord) {
        let added = self.outputs.len() - from;
        if added > 0 {
            let origin = record.origin();
            self.output_origins.extend(std::iter::repeat_n(
                OutputOrigin { pipeline, origin },
                added,
            ));
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

/// One record decoded for one pipeline that reads it.
#[derive(Debug)]
struct DecodedItem {
    /// The record's index in its batch.
    record: usize,
    /// The pipeline's index.
    pipeline: usize,
    outcome: DecodeOutcome,
}

/// A batch after routing and decoding: the first, parallelisable stage.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    records: Vec<RawRecord>,
    /// In record order.
    items: Vec<DecodedItem>,
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

/// Decodes a record; a panic in the decoder (a bug) sends the record to the DLQ.
pub(super) fn decode_guarded(pipeline: &Pipeline, record: &RawRecord) -> DecodeOutcome {
    std::panic::catch_unwind(AssertUnwindSafe(|| pipeline.decode(record))).unwrap_or_else(|panic| {
        DecodeOutcome::Failed(RecordFailure::from_panic(Stage::Decode, panic.as_ref()))
    })
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

    /// Routes and decodes records: the items, and how many records no pipeline reads.
    fn decode_slice(&self, records: &[RawRecord]) -> (Vec<DecodedItem>, u64) {
        let mut items = Vec::with_capacity(records.len());
        let mut unrouted = 0;
        for (index, record) in records.iter().enumerate() {
            let mut routed = false;
            for (pipeline_index, (route, pipeline)) in self.pipelines.iter().enumerate() {
                if route.matches(&record.topic) {
                    routed = true;
                    items.push(DecodedItem {
                        record: index,
                        pipeline: pipeline_index,
                        outcome: decode_guarded(pipeline, record),
                    });
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
        self.load_missing(&batch, cache, store, tally).await?;

        let mut outcome = BatchOutcome::default();
        let mut dirty: HashMap<(usize, String), i32> = HashMap::new();
        for DecodedItem {
            record: record_index,
            pipeline: pipeline_index,
            outcome: decoded,
        } in batch.items
        {
            let record = &batch.records[record_index];
            let pipeline = &self.pipelines[pipeline_index].1;
            let counts = tally.pipeline(pipeline_index, pipeline.name());
            let outputs_before = outcome.outputs.len();
            // Refusals are rare: an empty map is not worth an `Origin` (a topic copy) per record.
            let refusal = self
                .refusals
                .filter(|refusals| !refusals.is_empty())
                .and_then(|refusals| refusals.get(&(pipeline_index, record.origin())));
            let dead_letter_bytes = if refusal.is_some_and(|refusal| refusal.strip_dead_letter) {
                0
            } else {
                pipeline.settings().max_output_bytes
            };
            let mut step = Step {
                pipeline,
                counts,
                outputs: &mut outcome.outputs,
                now_ms,
                dead_letter_bytes,
            };
            let park = pipeline.settings().dlq_policy == DlqPolicy::Park;
            let (entity, next) = match decoded {
                _ if refusal.is_some_and(|refusal| refusal.failure.is_some()) => {
                    if let Some(failure) = refusal.and_then(|refusal| refusal.failure.as_ref()) {
                        step.dead_letter(record, failure, None);
                    }
                    (None, None)
                }
                DecodeOutcome::Change(change) => {
                    let stored = cache.touch(pipeline_index, change.key.as_str());
                    let next = if park {
                        step.change_or_park(record, &change, stored)
                    } else {
                        step.change(record, &change, stored)
                    };
                    (Some(change.key.as_str().to_owned()), next)
                }
                DecodeOutcome::Skip(reason) => {
                    step.counts.count_skip(reason.as_str());
                    (None, None)
                }
                DecodeOutcome::Failed(failure) => {
                    step.dead_letter(record, &failure, None);
                    (None, None)
                }
                DecodeOutcome::Control(Some(discard)) if park => {
                    let stored = cache.touch(pipeline_index, &discard.entity);
                    let next = step.discard(&discard, stored);
                    (Some(discard.entity), next)
                }
                DecodeOutcome::Control(_) => {
                    step.counts.count_skip("control");
                    (None, None)
                }
            };
            if let (Some(entity), Some(state)) = (entity, next) {
                cache.insert(pipeline_index, entity.clone(), Some(state));
                dirty.insert((pipeline_index, entity), record.partition);
            }
            outcome.note_origins(outputs_before, pipeline_index, record);
        }
        outcome.writes = dirty
            .into_iter()
            .filter_map(|((pipeline, entity), partition)| {
                let state = cache.get(pipeline, &entity)?.clone();
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
        tally: &mut Tally,
    ) -> Result<(), StoreError> {
        let mut missing: Vec<HashSet<&str>> = vec![HashSet::new(); self.pipelines.len()];
        let mut changes = 0u64;
        for item in &batch.items {
            let entity = match &item.outcome {
                DecodeOutcome::Change(change) => change.key.as_str(),
                DecodeOutcome::Control(Some(discard)) => discard.entity.as_str(),
                _ => continue,
            };
            changes += 1;
            if !cache.contains(item.pipeline, entity) {
                missing[item.pipeline].insert(entity);
            }
        }
        // A change of an entity loaded for an earlier change of the same batch is a hit.
        let misses: u64 = missing.iter().map(|entities| entities.len() as u64).sum();
        tally.cache_misses += misses;
        tally.cache_hits += changes - misses;
        for (index, entities) in missing.into_iter().enumerate() {
            if entities.is_empty() {
                continue;
            }
            let entities: Vec<&str> = entities.into_iter().collect();
            let mut found = store
                .load(self.pipelines[index].1.name(), &entities)
                .await?;
            for entity in entities {
                cache.insert(index, entity.to_owned(), found.remove(entity));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Version;

    type OutputKindName = &'static str;

    fn state(version: u64) -> Option<EntityState> {
        Some(EntityState {
            version: Version::new(vec![version]),
            image: Some("{}".into()),
            updated_at_ms: 0,
            parked: None,
        })
    }

    fn order(offset: i64, id: u64, status: &str, lsn: u64) -> RawRecord {
        let value = serde_json::json!({
            "before": null,
            "after": {"id": id, "status": status},
            "source": {"connector": "postgresql", "ts_ms": 1_700_000_000_000u64,
                       "sequence": format!("[\"{lsn}\",\"{lsn}\"]"), "lsn": lsn},
            "op": "c",
        });
        RawRecord {
            topic: "orders".to_owned(),
            partition: 0,
            offset,
            key: Some(format!(r#"{{"id":{id}}}"#).into_bytes()),
            value: Some(value.to_string().into_bytes()),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// A rule that panics on one record (a bug) sends that record to the DLQ with reason
    /// `internal_error` and the panic's message; the records around it are processed.
    #[tokio::test]
    async fn a_panicking_rule_costs_one_record() {
        let config = crate::config::Config::parse(
            r#"
            [[pipeline]]
            name = "orders"
            topics = ["orders"]
            [[pipeline.rule]]
            name = "created"
            when = "op == 'c' && (after.status != 'explode' || cdcflow_fault_panic('boom'))"
            event_type = "OrderCreated"
            topic = "events"
            "#,
            "test",
            Vec::new(),
        )
        .unwrap();
        let pipelines = config.build_pipelines().unwrap();
        let processor = BatchProcessor::new(&pipelines);
        let records = [
            order(0, 1, "pending", 100),
            order(1, 2, "explode", 200),
            order(2, 3, "pending", 300),
        ];
        let mut cache = StateCache::new(1, 100);
        let mut tally = Tally::default();
        let store = crate::store::MemoryStore::new();
        let outcome = processor
            .process(&records, &mut cache, &store, &mut tally, 0)
            .await
            .unwrap();
        let kinds: Vec<(OutputKindName, i64)> = outcome
            .outputs
            .iter()
            .zip(&outcome.output_origins)
            .map(|(output, from)| (output.kind.as_str(), from.origin.offset))
            .collect();
        assert_eq!(kinds, [("event", 0), ("dlq", 1), ("event", 2)]);
        let dead_letter = &outcome.outputs[1];
        let header = |name: &str| {
            dead_letter
                .headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        };
        assert_eq!(
            header("cdcflow.error.reason").as_deref(),
            Some("internal_error")
        );
        assert!(
            header("cdcflow.error.message").is_some_and(|message| message.contains("boom")),
            "{:?}",
            header("cdcflow.error.message")
        );
        assert_eq!(tally.dlq_total(), 1);
        assert_eq!(tally.events_total(), 2);
    }

    /// A full cache evicts its least recently used entries down to three quarters of its
    /// capacity; entries used recently (read or written) stay.
    #[test]
    fn a_full_cache_evicts_the_least_recently_used() {
        let mut cache = StateCache::new(2, 8);
        for entity in 0..10u64 {
            cache.insert((entity % 2) as usize, entity.to_string(), state(entity));
        }
        // Entities 0 and 1 are the oldest inserts; reading them makes them the newest.
        assert!(cache.touch(0, "0").is_some());
        assert!(cache.touch(1, "1").is_some());
        assert!(cache.over_capacity());
        cache.evict_least_recently_used();
        assert_eq!(cache.len(), 6);
        assert!(!cache.over_capacity());
        for kept in ["0", "1", "6", "7", "8", "9"] {
            let pipeline = kept.parse::<usize>().unwrap() % 2;
            assert!(cache.contains(pipeline, kept), "{kept} was evicted");
        }
        for evicted in ["2", "3", "4", "5"] {
            let pipeline = evicted.parse::<usize>().unwrap() % 2;
            assert!(!cache.contains(pipeline, evicted), "{evicted} was kept");
        }
    }
}
