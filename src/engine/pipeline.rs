//! One pipeline's processing of one record: decode, gate, rules, events.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::event::{BusinessEvent, EventMode, event_id};
use super::failure::{RecordFailure, Stage};
use super::gate::{Decision, EntityState, decide};
use super::output::{self, DroppedChange, OutputRecord};
use super::park::{Discard, DlqPolicy, control_record};
use super::rules::{CompiledRules, RuleInput};
use super::unavailable::UnavailablePlaceholder;
use super::version::{Version, VersionSpec};
use crate::cdc::{
    Change, Decoded, Decoder, FieldSelection, Op, RawRecord, SkipReason, selected_fields,
};

/// Everything a pipeline needs, compiled from the config.
#[derive(Debug)]
pub struct PipelineSettings {
    pub name: String,
    pub decoder: Decoder,
    pub version: VersionSpec,
    pub rules: CompiledRules,
    pub dlq_topic: String,
    pub audit_topic: Option<String>,
    /// CloudEvents `source` of this pipeline's events.
    pub event_source: String,
    /// Largest output record (key, value and headers) the pipeline may produce; a change
    /// whose event would be larger goes to the DLQ instead of failing at the broker.
    pub max_output_bytes: usize,
    pub event_mode: EventMode,
    /// Whether an entity's later changes wait behind a dead-lettered one.
    pub dlq_policy: DlqPolicy,
    /// The most changes one entity parks.
    pub park_limit: usize,
    /// The connector's `unavailable.value.placeholder`: fields holding it take the stored
    /// value before rules run.
    pub unavailable: UnavailablePlaceholder,
}

/// A compiled pipeline.
#[derive(Debug)]
pub struct Pipeline {
    settings: PipelineSettings,
    /// The stored image's fields the rules read, parsed alone when no placeholder needs the
    /// rest.
    previous_fields: FieldSelection,
}

/// The first step for a record.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeOutcome {
    Change(Box<Change>),
    Skip(SkipReason),
    Failed(RecordFailure),
    /// A control record of `cdcflow dlq discard`; `None` when it names no entity (or an
    /// action this version does not know): it is skipped.
    Control(Option<Discard>),
}

/// The outcome of a change that passed the gate (or was dropped by it).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub decision: Decision,
    pub version: Version,
    /// The entity's next state; `Some` only for [`Decision::Applied`].
    pub next_state: Option<EntityState>,
    /// Events (and the audit record of a drop), in order.
    pub outputs: Vec<OutputRecord>,
    /// The CloudEvents type of each event in `outputs`, for counting.
    pub event_types: Vec<String>,
}

/// The version a column-mode delete without its column gets when nothing is stored: the lowest
/// column value with the delete marker.
const VERSIONLESS_DELETE: [u64; 2] = [0, 1];

impl Pipeline {
    pub fn new(settings: PipelineSettings) -> Pipeline {
        let previous_fields = settings
            .rules
            .previous_fields_read()
            .map_or(FieldSelection::All, FieldSelection::Only);
        Pipeline {
            settings,
            previous_fields,
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn settings(&self) -> &PipelineSettings {
        &self.settings
    }

    pub fn decode(&self, record: &RawRecord) -> DecodeOutcome {
        // Control records carry a header; most records carry none, so this costs nothing.
        if !record.headers.is_empty()
            && let Some(control) = control_record(record)
        {
            return DecodeOutcome::Control(control);
        }
        match self.settings.decoder.decode(record) {
            Ok(Decoded::Change(change)) => DecodeOutcome::Change(change),
            Ok(Decoded::Skip(reason)) => DecodeOutcome::Skip(reason),
            Err(error) => DecodeOutcome::Failed(RecordFailure {
                stage: Stage::Decode,
                reason: error.reason(),
                message: error.to_string(),
            }),
        }
    }

    /// Gates `change` against the stored state and, when applied, runs the rules.
    pub fn apply(
        &self,
        record: &RawRecord,
        change: &Change,
        stored: Option<&EntityState>,
        now_ms: i64,
    ) -> Result<Applied, RecordFailure> {
        let settings = &self.settings;
        let version = match settings.version.extract(change) {
            Ok(Some(version)) => version,
            Ok(None) => match stored {
                Some(state) if state.is_deleted() => state.version.clone(),
                Some(state) => settings.version.delete_after(&state.version),
                None => Version::new(VERSIONLESS_DELETE.to_vec()),
            },
            Err(error) => {
                return Err(RecordFailure {
                    stage: Stage::Version,
                    reason: error.reason(),
                    message: error.to_string(),
                });
            }
        };
        let decision = decide(stored, &version);
        if decision != Decision::Applied {
            let outputs = settings
                .audit_topic
                .as_deref()
                .map(|topic| {
                    output::audit(
                        topic,
                        &DroppedChange {
                            pipeline: &settings.name,
                            reason: decision.as_str(),
                            entity: change.key.as_str(),
                            op: change.op.code(),
                            stored_version: stored
                                .map(|s| s.version.to_string())
                                .unwrap_or_default(),
                            incoming_version: version.to_string(),
                            origin: record.origin(),
                            now_ms,
                        },
                    )
                })
                .into_iter()
                .collect();
            return Ok(Applied {
                decision,
                version,
                next_state: None,
                outputs,
                event_types: Vec::new(),
            });
        }
        let placeholder = &settings.unavailable;
        let holds_placeholder = |row: &Option<Map<String, Value>>| {
            row.as_ref().is_some_and(|row| placeholder.any_in(row))
        };
        let needs_fill = holds_placeholder(&change.after) || holds_placeholder(&change.before);
        let previous = match stored.and_then(|state| state.image.as_deref()) {
            Some(image) if needs_fill => Some(parse_stored_image(image, &FieldSelection::All)?),
            Some(image) if settings.rules.reads_previous() => {
                Some(parse_stored_image(image, &self.previous_fields)?)
            }
            _ => None,
        };
        // Debezium's placeholder for values it did not read (unchanged TOASTed columns) takes
        // the stored value, or leaves the field out; copies are made only when it occurs.
        let mut unavailable_fields = Vec::new();
        let mut fill = |row: &Option<Map<String, Value>>| {
            row.clone().map(|mut row| {
                unavailable_fields.extend(placeholder.fill(&mut row, previous.as_ref()));
                row
            })
        };
        let (filled_before, filled_after) = if needs_fill {
            (fill(&change.before), fill(&change.after))
        } else {
            (None, None)
        };
        unavailable_fields.sort();
        unavailable_fields.dedup();
        let before = if needs_fill {
            filled_before.as_ref()
        } else {
            change.before.as_ref()
        };
        let after = if needs_fill {
            filled_after.as_ref()
        } else {
            change.after.as_ref()
        };
        let fired = settings
            .rules
            .evaluate(&RuleInput {
                op: change.op.code(),
                before,
                after,
                previous: previous.as_ref(),
                key: change.key.fields(),
                source: &change.source,
            })
            .map_err(|error| RecordFailure {
                stage: Stage::Rule,
                reason: "rule_error",
                message: error.to_string(),
            })?;
        let time = change.source_ts_ms().map(crate::cdc::format_epoch_millis);
        // An event a chain stage read causes the events it derives; a row change is caused by
        // its record. Derived events keep the upstream entity as subject and Kafka key.
        let causation = change
            .event
            .as_ref()
            .map_or_else(|| record.origin_ref().to_string(), |event| event.id.clone());
        let subject = change
            .event
            .as_ref()
            .map_or(change.key.as_str(), |event| event.subject.as_str());
        let sequence = version.sequence();
        let entity_version = version.to_string();
        let mut outputs = Vec::with_capacity(fired.len());
        let mut event_types = Vec::with_capacity(fired.len());
        for fired in fired {
            let event = BusinessEvent {
                id: event_id(
                    &settings.name,
                    &fired.rule.name,
                    change.key.as_str(),
                    &sequence,
                ),
                source: &settings.event_source,
                event_type: &fired.rule.event_type,
                subject,
                time: time.as_deref(),
                data: fired.data,
                entity_version: &entity_version,
                sequence: &sequence,
                partition_key: subject,
                causation_id: &causation,
                correlation_id: change.transaction_id.as_deref(),
                unavailable_fields: &unavailable_fields,
            };
            let output = event.to_output(&fired.rule.topic, settings.event_mode);
            let size = output.size();
            if size > settings.max_output_bytes {
                return Err(RecordFailure {
                    stage: Stage::Output,
                    reason: "output_too_large",
                    message: format!(
                        "rule `{}` built a {size}-byte event, over limits.max_output_bytes \
                         ({}); trim its payload mapping",
                        fired.rule.name, settings.max_output_bytes
                    ),
                });
            }
            outputs.push(output);
            event_types.push(fired.rule.event_type.clone());
        }
        let image = match change.op {
            Op::Delete | Op::Truncate => None,
            Op::Create | Op::Update | Op::Read => match &change.after_json {
                Some(text) if !needs_fill => Some(Arc::clone(text)),
                _ => after.and_then(|row| serde_json::to_string(row).ok().map(Arc::from)),
            },
        };
        let next_state = EntityState {
            version: version.clone(),
            image,
            updated_at_ms: change.source_ts_ms().unwrap_or(now_ms),
            parked: None,
        };
        Ok(Applied {
            decision,
            version,
            next_state: Some(next_state),
            outputs,
            event_types,
        })
    }

    /// The DLQ record for a record that failed.
    pub fn dead_letter(
        &self,
        record: &RawRecord,
        failure: &RecordFailure,
        now_ms: i64,
    ) -> OutputRecord {
        self.dead_letter_within(record, failure, now_ms, self.settings.max_output_bytes)
    }

    /// The DLQ record for a record that failed, dropping the original value (then key) when
    /// the record would exceed `max_bytes`.
    pub fn dead_letter_within(
        &self,
        record: &RawRecord,
        failure: &RecordFailure,
        now_ms: i64,
        max_bytes: usize,
    ) -> OutputRecord {
        output::dead_letter(
            &self.settings.dlq_topic,
            &self.settings.name,
            record,
            failure,
            now_ms,
            max_bytes,
        )
    }
}

fn parse_stored_image(
    image: &str,
    fields: &FieldSelection,
) -> Result<Map<String, Value>, RecordFailure> {
    selected_fields(image, fields).map_err(|error| RecordFailure {
        stage: Stage::State,
        reason: "corrupt_state",
        message: format!("the stored image of this entity is not a JSON object: {error}"),
    })
}
