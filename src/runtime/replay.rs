//! `cdcflow replay`: JSON Lines in, JSON Lines out, state in a store.
//!
//! Three stages overlap: a reader thread parses and decodes batch N+1 while the caller's task
//! applies batch N and writes its outputs, while the store saves earlier batches in the
//! background. State is saved every `flush_records` records, each entity once per window; the
//! order of effects stays: outputs flushed, then the state that says they were emitted.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::batch::{BatchProcessor, DecodedBatch, StateCache};
use super::kcat::{parse_kcat_line, write_output_line};
use super::now_ms;
use crate::config::TopicRoute;
use crate::engine::Pipeline;
use crate::metrics::Tally;
use crate::store::{StateStore, StateWrite, StoreError};

/// Replay settings.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    pub batch_size: usize,
    pub cache_entries: usize,
    /// Records between state saves: writes of one entity within a window are coalesced.
    pub flush_records: usize,
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
    #[error("a background stage of the replay stopped unexpectedly")]
    Stage,
}

/// What the reader stage hands over: a decoded batch and the input lines it had to skip.
struct ReadBatch {
    batch: DecodedBatch,
    skipped_lines: Vec<String>,
}

/// The pipelines a replay runs, shared with its reader thread.
pub type SharedPipelines = Arc<Vec<(TopicRoute, Pipeline)>>;

/// Replays `input` through `pipelines`, writing produced records to `output` and reporting
/// skipped input lines to `diagnostics`. Returns the run's counts.
pub async fn replay<S: StateStore>(
    pipelines: SharedPipelines,
    store: Arc<S>,
    input: Box<dyn BufRead + Send>,
    output: &mut impl Write,
    diagnostics: &mut impl Write,
    options: ReplayOptions,
) -> Result<Tally, ReplayError> {
    let (sender, mut receiver) = mpsc::channel(2);
    let reader = {
        let pipelines = Arc::clone(&pipelines);
        std::thread::Builder::new()
            .name("cdcflow-replay-reader".into())
            .spawn(move || read_and_decode(&pipelines, input, options.batch_size, &sender))
            .map_err(ReplayError::Input)?
    };
    let processor = BatchProcessor::new(&pipelines);
    let mut cache = StateCache::new(pipelines.len(), options.cache_entries);
    let mut tally = Tally::default();
    let mut pending_save: Option<JoinHandle<Result<(), StoreError>>> = None;
    // States changed since the last save, one per entity: the latest wins.
    let mut unsaved: HashMap<(String, String), StateWrite> = HashMap::new();
    let mut unsaved_records = 0usize;
    while let Some(read) = receiver.recv().await {
        let ReadBatch {
            batch,
            skipped_lines,
        } = read?;
        tally.malformed_lines += skipped_lines.len() as u64;
        for line in &skipped_lines {
            writeln!(diagnostics, "{line}").map_err(ReplayError::Output)?;
        }
        if cache.over_capacity() {
            // Evicting is safe only once every cached state is in the store.
            finish(pending_save.take()).await?;
            finish(Some(spawn_save(&store, &mut unsaved))).await?;
            unsaved_records = 0;
            cache.evict_least_recently_used();
        }
        unsaved_records += batch.len();
        let outcome = processor
            .apply(batch, &mut cache, store.as_ref(), &mut tally, now_ms())
            .await?;
        for record in &outcome.outputs {
            write_output_line(output, record).map_err(ReplayError::Output)?;
        }
        // Outputs are durable before the state that says they were emitted.
        output.flush().map_err(ReplayError::Output)?;
        for write in outcome.writes {
            unsaved.insert((write.pipeline.clone(), write.entity.clone()), write);
        }
        if unsaved_records >= options.flush_records {
            finish(pending_save.take()).await?;
            pending_save = Some(spawn_save(&store, &mut unsaved));
            unsaved_records = 0;
        }
    }
    finish(pending_save).await?;
    finish(Some(spawn_save(&store, &mut unsaved))).await?;
    reader.join().map_err(|_| ReplayError::Stage)??;
    Ok(tally)
}

/// Saves the unsaved states in the background and starts a new window.
fn spawn_save<S: StateStore>(
    store: &Arc<S>,
    unsaved: &mut HashMap<(String, String), StateWrite>,
) -> JoinHandle<Result<(), StoreError>> {
    let writes: Vec<StateWrite> = std::mem::take(unsaved).into_values().collect();
    let store = Arc::clone(store);
    tokio::spawn(async move { store.save(writes, Vec::new()).await })
}

async fn finish(save: Option<JoinHandle<Result<(), StoreError>>>) -> Result<(), ReplayError> {
    match save {
        Some(handle) => Ok(handle.await.map_err(|_| ReplayError::Stage)??),
        None => Ok(()),
    }
}

/// Bytes of input records a batch holds at most, whatever `batch_size` says: bounds the
/// reader's memory for large records.
const BATCH_MAX_BYTES: usize = 32 * 1024 * 1024;

/// Skipped-line reports held before they are handed over with a batch.
const MAX_SKIPPED_LINES: usize = 1_000;

/// The longest input line read: a kcat line holds one record, escaped as JSON text, so a
/// valid one is at most a few times `limits.max_record_bytes`. A longer line is skipped
/// without being held in memory.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// One line of input, read with a bound on its length.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (possibly empty) is in the buffer.
    Read,
    /// The line was longer than the bound: its first bytes are in the buffer, the rest was
    /// skipped; the line had this many bytes.
    TooLong(u64),
    End,
}

/// Reads one line into `buffer` (without its newline), holding at most `max_bytes` of it.
fn read_bounded_line(
    input: &mut dyn BufRead,
    buffer: &mut Vec<u8>,
    max_bytes: usize,
) -> std::io::Result<Line> {
    buffer.clear();
    let mut total = 0u64;
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            return Ok(match total {
                0 => Line::End,
                _ if total as usize > max_bytes => Line::TooLong(total),
                _ => Line::Read,
            });
        }
        let (chunk, found_newline) = match available.iter().position(|&byte| byte == b'\n') {
            Some(at) => (&available[..at], true),
            None => (available, false),
        };
        let room = max_bytes.saturating_sub(buffer.len());
        buffer.extend_from_slice(&chunk[..chunk.len().min(room)]);
        total += chunk.len() as u64;
        let consumed = chunk.len() + usize::from(found_newline);
        input.consume(consumed);
        if found_newline {
            return Ok(if total as usize > max_bytes {
                Line::TooLong(total)
            } else {
                Line::Read
            });
        }
    }
}

/// The reader stage: lines to records to decoded batches. Returns when the input ends or the
/// consumer hangs up.
fn read_and_decode(
    pipelines: &[(TopicRoute, Pipeline)],
    mut input: Box<dyn BufRead + Send>,
    batch_size: usize,
    sender: &mpsc::Sender<Result<ReadBatch, ReplayError>>,
) -> Result<(), ReplayError> {
    let processor = BatchProcessor::new(pipelines);
    let mut line = Vec::new();
    let mut line_number = 0u64;
    let mut records = Vec::with_capacity(batch_size);
    let mut bytes = 0usize;
    let mut skipped_lines = Vec::new();
    loop {
        let read = match read_bounded_line(input.as_mut(), &mut line, MAX_LINE_BYTES) {
            Ok(read) => read,
            Err(error) => {
                let _ = sender.blocking_send(Err(ReplayError::Input(error)));
                return Ok(());
            }
        };
        match read {
            Line::Read => {
                line_number += 1;
                let text = line.trim_ascii();
                if !text.is_empty() {
                    match parse_kcat_line(text, line_number) {
                        Ok(record) => {
                            bytes += text.len();
                            records.push(record);
                        }
                        Err(error) => skipped_lines
                            .push(format!("input line {line_number}: skipped: {error}")),
                    }
                }
            }
            Line::TooLong(length) => {
                line_number += 1;
                skipped_lines.push(format!(
                    "input line {line_number}: skipped: {length} bytes, more than the \
                     {MAX_LINE_BYTES} a record line may have"
                ));
            }
            Line::End => {}
        }
        let at_end = read == Line::End;
        if records.len() >= batch_size
            || bytes >= BATCH_MAX_BYTES
            || skipped_lines.len() >= MAX_SKIPPED_LINES
            || (at_end && (!records.is_empty() || !skipped_lines.is_empty()))
        {
            bytes = 0;
            let batch = processor.decode(std::mem::replace(
                &mut records,
                Vec::with_capacity(batch_size),
            ));
            let read = ReadBatch {
                batch,
                skipped_lines: std::mem::take(&mut skipped_lines),
            };
            if sender.blocking_send(Ok(read)).is_err() {
                return Ok(());
            }
        }
        if at_end {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines come back without their newline; a line over the bound is reported with its
    /// length and only the bound's worth of it is held; the next line is read normally.
    #[test]
    fn bounded_lines_skip_what_is_too_long() {
        let text = b"short\n0123456789abcdef\n\nlast";
        let mut input: &[u8] = text;
        let mut buffer = Vec::new();
        assert_eq!(
            read_bounded_line(&mut input, &mut buffer, 8).unwrap(),
            Line::Read
        );
        assert_eq!(buffer, b"short");
        assert_eq!(
            read_bounded_line(&mut input, &mut buffer, 8).unwrap(),
            Line::TooLong(16)
        );
        assert_eq!(buffer.len(), 8);
        assert_eq!(
            read_bounded_line(&mut input, &mut buffer, 8).unwrap(),
            Line::Read
        );
        assert!(buffer.is_empty());
        assert_eq!(
            read_bounded_line(&mut input, &mut buffer, 8).unwrap(),
            Line::Read
        );
        assert_eq!(buffer, b"last");
        assert_eq!(
            read_bounded_line(&mut input, &mut buffer, 8).unwrap(),
            Line::End
        );
    }
}
