//! One change of one entity through one pipeline: the gate and the rules, its dead letter, and
//! for `dlq_policy = "park"` the parking of later changes behind a dead-lettered one and their
//! release (by a replay of the dead-lettered change, or a discard) in their original order.
//!
//! Parked changes live inside the entity's state ([`crate::engine::Parked`]), so they are
//! written, committed and restored with it: they survive a crash and a rebalance like any
//! state.

use std::panic::AssertUnwindSafe;

use crate::cdc::{Change, RawRecord};
use crate::engine::output_headers::ENTITY;
use crate::engine::park::{Discard, PARK_LIMIT_REACHED, first_origin, replayed_origin};
use crate::engine::{
    DecodeOutcome, EntityState, OutputRecord, Parked, Pipeline, RecordFailure, Stage,
};
use crate::metrics::PipelineTally;

use super::batch::decode_guarded;

/// What one record does to its entity: counted into `counts`, outputs appended to `outputs`.
pub(super) struct Step<'a> {
    pub pipeline: &'a Pipeline,
    pub counts: &'a mut PipelineTally,
    pub outputs: &'a mut Vec<OutputRecord>,
    pub now_ms: i64,
    /// The largest DLQ record allowed (0 when the broker refused this record's dead letter:
    /// it goes without the original key and value).
    pub dead_letter_bytes: usize,
}

impl Step<'_> {
    /// Gates and applies `change` against `stored`, counting the decision and its events.
    /// `Ok(Some(state))` when the entity's state changes; `Err` when the change failed (not
    /// yet dead-lettered).
    fn apply(
        &mut self,
        record: &RawRecord,
        change: &Change,
        stored: Option<&EntityState>,
    ) -> Result<Option<EntityState>, RecordFailure> {
        // A panic in a rule or the gate is a bug: it must cost one record (to the DLQ), not
        // stop the partition on the same offset after every restart.
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.pipeline.apply(record, change, stored, self.now_ms)
        }))
        .unwrap_or_else(|panic| Err(RecordFailure::from_panic(Stage::Rule, panic.as_ref())))?;
        let counts = &mut *self.counts;
        counts.count_decision(applied.decision.as_str());
        for event_type in &applied.event_types {
            counts.count_event(event_type);
        }
        if applied.outputs.len() > applied.event_types.len() {
            counts.audit_records += 1;
        }
        if applied.next_state.is_some()
            && let Some(source_ms) = change.source_ts_ms()
        {
            counts.source_ts_ms.push(source_ms);
        }
        self.outputs.extend(applied.outputs);
        Ok(applied.next_state)
    }

    /// Sends `record` to the DLQ with `failure`, naming its entity when known.
    pub(super) fn dead_letter(
        &mut self,
        record: &RawRecord,
        failure: &RecordFailure,
        entity: Option<&str>,
    ) {
        tracing::debug!(origin = %record.origin(), reason = failure.reason, "record dead-lettered");
        self.counts.count_dlq(failure.reason);
        let mut letter =
            self.pipeline
                .dead_letter_within(record, failure, self.now_ms, self.dead_letter_bytes);
        if let Some(entity) = entity {
            letter
                .headers
                .push((ENTITY.to_owned(), entity.as_bytes().to_vec()));
        }
        self.outputs.push(letter);
    }

    /// `dlq_policy = "continue"`: the change is applied, or dead-lettered.
    pub(super) fn change(
        &mut self,
        record: &RawRecord,
        change: &Change,
        stored: Option<&EntityState>,
    ) -> Option<EntityState> {
        match self.apply(record, change, stored) {
            Ok(next) => next,
            Err(failure) => {
                self.dead_letter(record, &failure, Some(change.key.as_str()));
                None
            }
        }
    }

    /// `dlq_policy = "park"`: behind a dead letter the change waits (unless it is that dead
    /// letter's replay, which is applied and releases what waits behind it); otherwise it is
    /// applied, and a failure parks the entity behind it.
    pub(super) fn change_or_park(
        &mut self,
        record: &RawRecord,
        change: &Change,
        stored: Option<&EntityState>,
    ) -> Option<EntityState> {
        let entity = change.key.as_str();
        let Some((state, parked)) = stored.and_then(|state| Some((state, state.parked.as_ref()?)))
        else {
            return match self.apply(record, change, stored) {
                Ok(next) => next,
                Err(failure) => {
                    self.dead_letter(record, &failure, Some(entity));
                    self.counts.parking_transitions += 1;
                    let blocker = Parked::behind(first_origin(record), stored.is_none());
                    Some(park_on(stored, blocker))
                }
            };
        };
        if replayed_origin(record).as_ref() != Some(&parked.blocker) {
            if parked.changes.len() >= self.pipeline.settings().park_limit {
                let failure = RecordFailure {
                    stage: Stage::State,
                    reason: PARK_LIMIT_REACHED,
                    message: format!(
                        "entity `{entity}` already parks {} changes behind the dead letter of \
                         {}: replay or discard that one (cdcflow dlq), or raise park_limit",
                        parked.changes.len(),
                        parked.blocker
                    ),
                };
                self.dead_letter(record, &failure, Some(entity));
                return None;
            }
            self.counts.parked_changes += 1;
            return Some(EntityState {
                parked: Some(parked.with(record)),
                ..state.clone()
            });
        }
        // The dead-lettered change itself, replayed: applied against the state it was parked
        // on; then the changes behind it follow in order.
        let base = state.without_parked();
        match self.apply(record, change, base.as_ref()) {
            Ok(next) => Some(self.release(next.or(base), &parked.changes)),
            Err(failure) => {
                // Still failing: dead-lettered again, and the entity stays parked behind it.
                self.dead_letter(record, &failure, Some(entity));
                None
            }
        }
    }

    /// `cdcflow dlq discard`: the entity parked behind the discarded dead letter goes on with
    /// its parked changes, without the dead-lettered one. A discard for anything else (already
    /// released, another blocker) changes nothing.
    pub(super) fn discard(
        &mut self,
        discard: &Discard,
        stored: Option<&EntityState>,
    ) -> Option<EntityState> {
        let parked = stored
            .and_then(|state| state.parked.as_ref())
            .filter(|parked| parked.blocker == discard.origin);
        let (Some(state), Some(parked)) = (stored, parked) else {
            self.counts.count_skip("control");
            return None;
        };
        self.counts.count_skip("discarded");
        Some(self.release(state.without_parked(), &parked.changes))
    }

    /// Processes parked changes in their order on top of `base`. A change that fails parks
    /// the entity again, behind it, with the rest.
    fn release(&mut self, base: Option<EntityState>, changes: &[RawRecord]) -> EntityState {
        self.counts.parking_transitions += 1;
        let mut state = base;
        for (index, record) in changes.iter().enumerate() {
            self.counts.unparked_changes += 1;
            let failure = match decode_guarded(self.pipeline, record) {
                DecodeOutcome::Change(change) => {
                    match self.apply(record, &change, state.as_ref()) {
                        Ok(next) => {
                            if next.is_some() {
                                state = next;
                            }
                            continue;
                        }
                        Err(failure) => {
                            self.dead_letter(record, &failure, Some(change.key.as_str()));
                            failure
                        }
                    }
                }
                DecodeOutcome::Skip(reason) => {
                    self.counts.count_skip(reason.as_str());
                    continue;
                }
                DecodeOutcome::Control(_) => {
                    self.counts.count_skip("control");
                    continue;
                }
                DecodeOutcome::Failed(failure) => {
                    self.dead_letter(record, &failure, None);
                    failure
                }
            };
            tracing::debug!(origin = %record.origin(), reason = failure.reason, "a released change failed; its entity parks again");
            let mut blocker = Parked::behind(first_origin(record), state.is_none());
            for rest in &changes[index + 1..] {
                blocker = blocker.with(rest);
            }
            return park_on(state.as_ref(), blocker);
        }
        state.unwrap_or_else(EntityState::absent)
    }
}

/// The entity's state with `parked` waiting behind its dead letter.
fn park_on(stored: Option<&EntityState>, parked: std::sync::Arc<Parked>) -> EntityState {
    match stored {
        Some(state) => EntityState {
            parked: Some(parked),
            ..state.clone()
        },
        None => EntityState::parking_only(parked),
    }
}

#[cfg(test)]
mod tests;
