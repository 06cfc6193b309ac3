//! The per-run [`Tally`] the hot path counts into: plain integers per pipeline, added to the
//! registry once per batch, so the hot path never touches Prometheus label maps.

use std::collections::BTreeMap;

/// Counts of one pipeline.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PipelineTally {
    pub name: String,
    /// Decisions by kind: `applied`, `duplicate`, `stale`.
    pub decisions: BTreeMap<&'static str, u64>,
    /// Skipped records by reason: `tombstone`, `logical_message`.
    pub skipped: BTreeMap<&'static str, u64>,
    /// Business events by CloudEvents type.
    pub events: BTreeMap<String, u64>,
    /// DLQ records by reason.
    pub dlq: BTreeMap<&'static str, u64>,
    pub audit_records: u64,
    /// The source commit time (`source.ts_ms`) of each applied change, for the end-to-end
    /// latency observed once its batch commits.
    pub source_ts_ms: Vec<i64>,
    /// Changes parked behind a dead letter, and parked changes released.
    pub parked_changes: u64,
    pub unparked_changes: u64,
    /// Entities that began or stopped waiting behind a dead letter.
    pub parking_transitions: u64,
}

impl PipelineTally {
    pub fn count_decision(&mut self, decision: &'static str) {
        *self.decisions.entry(decision).or_default() += 1;
    }

    pub fn count_skip(&mut self, reason: &'static str) {
        *self.skipped.entry(reason).or_default() += 1;
    }

    pub fn count_dlq(&mut self, reason: &'static str) {
        *self.dlq.entry(reason).or_default() += 1;
    }

    pub fn count_event(&mut self, event_type: &str) {
        match self.events.get_mut(event_type) {
            Some(count) => *count += 1,
            None => {
                self.events.insert(event_type.to_owned(), 1);
            }
        }
    }

    pub fn dlq_total(&self) -> u64 {
        self.dlq.values().sum()
    }

    pub fn events_total(&self) -> u64 {
        self.events.values().sum()
    }
}

/// Counts of a run (or of one batch).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub records_read: u64,
    /// Records whose topic no pipeline reads.
    pub unrouted: u64,
    /// Replay input lines that were not kcat records.
    pub malformed_lines: u64,
    /// Entity look-ups the state cache answered, and those that went to the store.
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub pipelines: Vec<PipelineTally>,
}

impl Tally {
    /// The counts of pipeline `index`, created on first use.
    pub fn pipeline(&mut self, index: usize, name: &str) -> &mut PipelineTally {
        if self.pipelines.len() <= index {
            self.pipelines
                .resize_with(index + 1, PipelineTally::default);
        }
        let counts = &mut self.pipelines[index];
        if counts.name.is_empty() {
            counts.name = name.to_owned();
        }
        counts
    }

    /// Totals of one decision kind across pipelines.
    pub fn decisions(&self, decision: &str) -> u64 {
        self.pipelines
            .iter()
            .filter_map(|p| p.decisions.get(decision))
            .sum()
    }

    pub fn events_total(&self) -> u64 {
        self.pipelines.iter().map(PipelineTally::events_total).sum()
    }

    pub fn dlq_total(&self) -> u64 {
        self.pipelines.iter().map(PipelineTally::dlq_total).sum()
    }

    /// Adds another tally's counts (of the same pipelines) to this one.
    pub fn merge(&mut self, other: Tally) {
        self.records_read += other.records_read;
        self.unrouted += other.unrouted;
        self.malformed_lines += other.malformed_lines;
        self.cache_hits += other.cache_hits;
        self.cache_misses += other.cache_misses;
        for (index, counts) in other.pipelines.into_iter().enumerate() {
            let target = self.pipeline(index, &counts.name);
            for (key, value) in counts.decisions {
                *target.decisions.entry(key).or_default() += value;
            }
            for (key, value) in counts.skipped {
                *target.skipped.entry(key).or_default() += value;
            }
            for (key, value) in counts.events {
                *target.events.entry(key).or_default() += value;
            }
            for (key, value) in counts.dlq {
                *target.dlq.entry(key).or_default() += value;
            }
            target.audit_records += counts.audit_records;
            target.source_ts_ms.extend(counts.source_ts_ms);
            target.parked_changes += counts.parked_changes;
            target.unparked_changes += counts.unparked_changes;
            target.parking_transitions += counts.parking_transitions;
        }
    }
}
