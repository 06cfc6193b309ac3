//! The pure core: version ordering, decisions, rules, business events, DLQ and audit records.
//!
//! Everything here is a function of its inputs: no I/O, no async, no clocks (the caller passes
//! the time). [`Pipeline`] is the entry point: decode a record, then apply the change against the
//! stored entity state to get a decision, the next state and the records to publish.

mod event;
mod failure;
mod gate;
mod output;
pub mod park;
mod pipeline;
mod rules;
mod unavailable;
mod version;

pub use event::{BusinessEvent, EventMode, event_id};
pub use failure::{INTERNAL_ERROR, RecordFailure, Stage};
pub use gate::{Decision, EntityState, decide};
pub use output::{OutputKind, OutputRecord, headers as output_headers};
pub use park::{DlqPolicy, Parked};
pub use pipeline::{Applied, DecodeOutcome, Pipeline, PipelineSettings};
pub(crate) use rules::json_to_cel;
pub use rules::{CompiledRules, PayloadSpec, RuleCompileError, RuleError, RuleInput, RuleSpec};
pub use unavailable::{DEFAULT_PLACEHOLDER, UnavailablePlaceholder};
pub use version::{
    Connector, VERSION_SOURCE_FIELDS, Version, VersionError, VersionSource, VersionSpec,
};
