//! Drivers that feed records through the pure core and persist its outcome, and the pieces of
//! the service loop that need no Kafka: lanes, retries with jitter, the shutdown signal and
//! health.
//!
//! `replay` reads `kcat -C -J` JSON Lines and writes produced records as JSON Lines: the
//! embedded way to run cdcflow with no broker. Order of effects per batch: outputs are written
//! and flushed, then state is saved, so a crash can repeat an output (same event id) but never
//! lose one.

mod batch;
mod health;
mod kcat;
mod lanes;
mod park;
mod replay;
mod retry;
mod shutdown;

pub use batch::{
    BatchOutcome, BatchProcessor, DecodedBatch, OutputOrigin, Refusal, Refusals, StateCache,
};
pub use health::Health;
pub use kcat::{KcatLineError, parse_kcat_line, write_output_line};
pub use lanes::Lanes;
pub use replay::{ReplayError, ReplayOptions, SharedPipelines, replay};
pub use retry::{
    Attempt, Jitter, RetryError, RetryLimit, RetryPolicy, count_retry, retry, retry_counts,
};
pub use shutdown::{Shutdown, Stopping};

/// Wall-clock milliseconds since the epoch: the time of DLQ and audit records. The pure core
/// never reads a clock; the drivers pass this in.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
