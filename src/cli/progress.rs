//! The progress bar of `cdcflow replay` on a terminal: bytes of the input file read, records
//! (input lines) and records per second.

use std::io::{self, BufRead, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// The bar of one input.
pub(crate) struct ReplayProgress {
    bar: ProgressBar,
    lines: Arc<AtomicU64>,
    started: Instant,
}

impl ReplayProgress {
    pub(crate) fn new(path: &Path, size: Option<u64>) -> ReplayProgress {
        let bar = match size {
            Some(size) => ProgressBar::new(size).with_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {spinner} {bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_prefix(path.display().to_string());
        ReplayProgress {
            bar,
            lines: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    /// The input, counted as it is read.
    pub(crate) fn wrap(&self, inner: Box<dyn BufRead + Send>) -> CountingReader {
        CountingReader {
            inner,
            bar: self.bar.clone(),
            lines: Arc::clone(&self.lines),
            started: self.started,
            unreported: 0,
        }
    }

    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// Counts the bytes and lines the replay consumes, and updates the bar every 256 KiB.
pub(crate) struct CountingReader {
    inner: Box<dyn BufRead + Send>,
    bar: ProgressBar,
    lines: Arc<AtomicU64>,
    started: Instant,
    unreported: u64,
}

impl CountingReader {
    fn count(&mut self, bytes: u64, lines: u64) {
        let lines = self.lines.fetch_add(lines, Ordering::Relaxed) + lines;
        self.unreported += bytes;
        if self.unreported >= 256 * 1024 {
            self.bar.inc(self.unreported);
            self.unreported = 0;
            let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
            self.bar.set_message(format!(
                "{lines} records, {:.0} records/s",
                lines as f64 / seconds
            ));
        }
    }
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        let lines = buf[..read].iter().filter(|&&byte| byte == b'\n').count() as u64;
        self.count(read as u64, lines);
        Ok(read)
    }
}

impl BufRead for CountingReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        // The buffer of the last `fill_buf` is still there until it is consumed: asking for
        // it again reads nothing new.
        let lines = self
            .inner
            .fill_buf()
            .map(|buffer| {
                buffer[..amount.min(buffer.len())]
                    .iter()
                    .filter(|&&byte| byte == b'\n')
                    .count() as u64
            })
            .unwrap_or(0);
        self.inner.consume(amount);
        self.count(amount as u64, lines);
    }
}
