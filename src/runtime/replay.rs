//! `cdcflow replay`: JSON Lines in, JSON Lines out, state in a store.

use std::io::{BufRead, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::batch::{BatchProcessor, StateCache};
use super::kcat::{parse_kcat_line, write_output_line};
use crate::config::TopicRoute;
use crate::engine::Pipeline;
use crate::metrics::Tally;
use crate::store::{StateStore, StoreError};

/// Replay settings.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    pub batch_size: usize,
    pub cache_entries: usize,
}

/// Why a replay stopped. Bad records and bad lines never stop it; only I/O and the store do.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot read the replay input: {0}")]
    Input(#[source] std::io::Error),
    #[error("cannot write output records: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Replays `input` through `pipelines`, writing produced records to `output` and reporting
/// malformed input lines to `diagnostics`. Returns the run's counts.
pub async fn replay<S: StateStore>(
    pipelines: &[(TopicRoute, Pipeline)],
    store: &S,
    input: &mut impl BufRead,
    output: &mut impl Write,
    diagnostics: &mut impl Write,
    options: ReplayOptions,
) -> Result<Tally, ReplayError> {
    let processor = BatchProcessor::new(pipelines);
    let mut cache = StateCache::new(pipelines.len(), options.cache_entries);
    let mut tally = Tally::default();
    let mut line = Vec::new();
    let mut line_number = 0u64;
    let mut batch = Vec::with_capacity(options.batch_size);
    loop {
        line.clear();
        let read = input
            .read_until(b'\n', &mut line)
            .map_err(ReplayError::Input)?;
        if read > 0 {
            line_number += 1;
            let text = line.trim_ascii();
            if !text.is_empty() {
                match parse_kcat_line(text, line_number) {
                    Ok(record) => batch.push(record),
                    Err(error) => {
                        tally.malformed_lines += 1;
                        writeln!(diagnostics, "input line {line_number}: skipped: {error}")
                            .map_err(ReplayError::Output)?;
                    }
                }
            }
        }
        if batch.len() >= options.batch_size || (read == 0 && !batch.is_empty()) {
            let outcome = processor
                .process(&batch, &mut cache, store, &mut tally, now_ms())
                .await?;
            for record in &outcome.outputs {
                write_output_line(output, record).map_err(ReplayError::Output)?;
            }
            // Outputs are durable before the state that says they were emitted.
            output.flush().map_err(ReplayError::Output)?;
            store.save(&outcome.writes).await?;
            cache.trim();
            batch.clear();
        }
        if read == 0 {
            return Ok(tally);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
