//! The one retry loop for transient failures: capped exponential backoff with jitter, a limit,
//! and a [`Shutdown`] that ends any wait at once.
//!
//! Jitter matters for a consumer group: after a broker restart every instance fails at the
//! same moment, and without it they would all retry in lock-step.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt::Display;
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::shutdown::Shutdown;

/// When a retry loop gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryLimit {
    /// Until it succeeds or shutdown is requested (waiting for a broker at start).
    Forever,
    /// After this many attempts in all.
    Attempts(u32),
    /// Once this much time has passed since the first attempt.
    Within(Duration),
}

/// How a retry loop waits between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait; each next one doubles, up to `max`.
    pub initial: Duration,
    pub max: Duration,
    pub limit: RetryLimit,
    /// What is retried, for `cdcflow_retries_total{kind}`.
    pub kind: &'static str,
}

/// Retries since start, by kind: every retry loop of the process counts here, and the
/// metrics endpoint exports the table (`cdcflow_retries_total`).
static RETRIES: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts one retry of `kind` (for retries outside [`retry`], such as a whole batch).
pub fn count_retry(kind: &'static str) {
    *RETRIES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(kind)
        .or_default() += 1;
}

/// The retries since start, by kind.
pub fn retry_counts() -> Vec<(&'static str, u64)> {
    RETRIES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(kind, count)| (*kind, *count))
        .collect()
}

impl RetryPolicy {
    pub const fn new(initial: Duration, max: Duration, limit: RetryLimit) -> RetryPolicy {
        RetryPolicy {
            initial,
            max,
            limit,
            kind: "other",
        }
    }

    /// Names what the policy retries, for the retry counts.
    pub const fn counted_as(mut self, kind: &'static str) -> RetryPolicy {
        self.kind = kind;
        self
    }

    /// The wait before retry number `retry` (0 for the first): the capped exponential delay
    /// with "equal jitter", half of it fixed and half random, so waits never collapse to zero
    /// and never synchronise.
    pub fn delay(&self, retry: u32, jitter: &mut Jitter) -> Duration {
        let exponential = self
            .initial
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        let half = exponential / 2;
        half + half.mul_f64(jitter.next_fraction())
    }
}

/// A small pseudo-random source for jitter, seeded per process from the standard library's
/// hash keys (no dependency, and jitter needs no cryptographic quality).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new() -> Jitter {
        Jitter(RandomState::new().hash_one(Instant::now()) | 1)
    }

    /// A number in `[0, 1)`.
    pub fn fraction(&mut self) -> f64 {
        self.next_fraction()
    }

    fn next_fraction(&mut self) -> f64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::new()
    }
}

/// What one attempt says about its failure.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Worth another try after a wait.
    Transient(E),
    /// Trying again cannot help.
    Permanent(E),
}

/// Why a retry loop ended without a result.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryError<E> {
    /// A permanent failure, or the limit was reached: the last error.
    Failed { error: E, attempts: u32 },
    /// Shutdown was requested while waiting.
    Stopped,
}

/// Runs `attempt` until it succeeds, fails permanently, reaches `policy.limit`, or shutdown
/// is requested. Every retry is logged with `what`, the error and the wait.
pub fn retry<T, E: Display>(
    what: &str,
    policy: RetryPolicy,
    shutdown: &Shutdown,
    mut attempt: impl FnMut() -> Result<T, Attempt<E>>,
) -> Result<T, RetryError<E>> {
    let started = Instant::now();
    let mut jitter = Jitter::new();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match attempt() {
            Ok(value) => return Ok(value),
            Err(Attempt::Permanent(error)) => return Err(RetryError::Failed { error, attempts }),
            Err(Attempt::Transient(error)) => error,
        };
        let wait = policy.delay(attempts - 1, &mut jitter);
        let exhausted = match policy.limit {
            RetryLimit::Forever => false,
            RetryLimit::Attempts(limit) => attempts >= limit,
            RetryLimit::Within(limit) => started.elapsed() + wait > limit,
        };
        if exhausted {
            return Err(RetryError::Failed { error, attempts });
        }
        tracing::warn!(%error, attempt = attempts, retry_in = ?wait, "{what} failed; retrying");
        count_retry(policy.kind);
        if shutdown.sleep(wait).is_err() {
            return Err(RetryError::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_millis(1);

    /// Delays grow exponentially up to the cap, and each lies between half and all of its
    /// exponential value (the jitter).
    #[test]
    fn delays_grow_capped_with_jitter() {
        let policy = RetryPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            RetryLimit::Forever,
        );
        let mut jitter = Jitter::new();
        let mut seen = std::collections::BTreeSet::new();
        for retry in 0..40 {
            let full = Duration::from_millis(100)
                .saturating_mul(1 << retry.min(20))
                .min(Duration::from_secs(5));
            let delay = policy.delay(retry, &mut jitter);
            assert!(
                delay >= full / 2 && delay <= full,
                "retry {retry}: {delay:?}"
            );
            seen.insert(delay);
        }
        assert!(seen.len() > 20, "jitter varies the delays: {seen:?}");
    }

    /// Transient failures are retried until success; the value comes back.
    #[test]
    fn transient_failures_are_retried_until_success() {
        let mut calls = 0;
        let policy = RetryPolicy::new(QUICK, QUICK, RetryLimit::Attempts(10));
        let result = retry("test", policy, &Shutdown::new(), || {
            calls += 1;
            if calls < 4 {
                Err(Attempt::Transient("not yet"))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(result, Ok(4));
    }

    /// A permanent failure ends the loop at once; the attempt limit ends it after that many.
    #[test]
    fn permanent_failures_and_limits_end_the_loop() {
        let policy = RetryPolicy::new(QUICK, QUICK, RetryLimit::Attempts(3));
        let result: Result<(), _> = retry("test", policy, &Shutdown::new(), || {
            Err(Attempt::Permanent("broken"))
        });
        assert_eq!(
            result,
            Err(RetryError::Failed {
                error: "broken",
                attempts: 1
            })
        );
        let result: Result<(), _> = retry("test", policy, &Shutdown::new(), || {
            Err(Attempt::Transient("down"))
        });
        assert_eq!(
            result,
            Err(RetryError::Failed {
                error: "down",
                attempts: 3
            })
        );
        let policy = RetryPolicy::new(QUICK, QUICK, RetryLimit::Within(Duration::from_millis(30)));
        let started = Instant::now();
        let result: Result<(), _> = retry("test", policy, &Shutdown::new(), || {
            Err(Attempt::Transient("down"))
        });
        assert!(matches!(result, Err(RetryError::Failed { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// A stop request ends a long backoff wait at once (SIGTERM never waits out a backoff).
    #[test]
    fn shutdown_ends_a_backoff_wait() {
        let shutdown = Shutdown::new();
        let stopper = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                shutdown.request();
            })
        };
        let policy = RetryPolicy::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
            RetryLimit::Forever,
        );
        let started = Instant::now();
        let result: Result<(), _> = retry("test", policy, &shutdown, || {
            Err(Attempt::Transient("down"))
        });
        stopper.join().unwrap();
        assert_eq!(result, Err(RetryError::Stopped));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
