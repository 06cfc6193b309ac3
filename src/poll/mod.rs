//! SQL polling sources (work in progress): the adaptive interval and the SQL of a poll, pure.

pub mod interval;
pub mod query;

pub use interval::{AdaptiveInterval, PollResult};
pub use query::{PollTable, quote_identifier};
