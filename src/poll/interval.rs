//! How long a SQL poll waits before the next one: short while polls return full pages (a
//! backlog), longer while they return nothing, within `[min_interval, max_interval]`, with
//! jitter so that many sources do not poll in step.

use std::time::Duration;

/// The next wait, from what the last polls returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveInterval {
    min: Duration,
    max: Duration,
    current: Duration,
}

/// What one poll returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollResult {
    /// A full page: more rows are waiting.
    FullPage,
    /// Some rows, fewer than a page: caught up.
    Some,
    /// No row.
    Empty,
}

impl PollResult {
    pub fn of(rows: usize, page_size: usize) -> PollResult {
        match rows {
            0 => PollResult::Empty,
            rows if rows >= page_size => PollResult::FullPage,
            _ => PollResult::Some,
        }
    }
}

impl AdaptiveInterval {
    /// Starts at `min`: the first polls find out how much is waiting. `max` below `min` is
    /// taken as `min`.
    pub fn new(min: Duration, max: Duration) -> AdaptiveInterval {
        AdaptiveInterval {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The wait before the next poll, without jitter.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Updates the wait after a poll: a full page polls again at `min`; an empty poll doubles
    /// the wait up to `max`; a partial page halves it toward `min` (changes are arriving, at
    /// less than a page per wait).
    pub fn after(&mut self, result: PollResult) -> Duration {
        self.current = match result {
            PollResult::FullPage => self.min,
            PollResult::Empty => self.current.saturating_mul(2).min(self.max),
            PollResult::Some => (self.current / 2).max(self.min),
        };
        self.current
    }

    /// The wait with jitter: `fraction` in `[0, 1)` spreads it over ±20 %, kept within
    /// `[min, max]`.
    pub fn jittered(&self, fraction: f64) -> Duration {
        let factor = 0.8 + 0.4 * fraction.clamp(0.0, 1.0);
        self.current.mul_f64(factor).clamp(self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn idle_polls_back_off_to_the_maximum_and_a_backlog_brings_them_back() {
        let mut interval = AdaptiveInterval::new(MIN, MAX);
        let waits: Vec<Duration> = (0..12).map(|_| interval.after(PollResult::Empty)).collect();
        assert_eq!(waits[0], Duration::from_millis(200));
        assert_eq!(waits[1], Duration::from_millis(400));
        assert_eq!(*waits.last().unwrap(), MAX);
        assert_eq!(interval.after(PollResult::Some), MAX / 2);
        assert_eq!(interval.after(PollResult::FullPage), MIN);
        assert_eq!(PollResult::of(500, 500), PollResult::FullPage);
        assert_eq!(PollResult::of(3, 500), PollResult::Some);
        assert_eq!(PollResult::of(0, 500), PollResult::Empty);
    }

    fn result() -> impl Strategy<Value = PollResult> {
        prop_oneof![
            Just(PollResult::FullPage),
            Just(PollResult::Some),
            Just(PollResult::Empty)
        ]
    }

    proptest! {
        /// Whatever the polls return, the wait stays within bounds, jitter included; empty
        /// polls never shorten it and full pages always bring it to the minimum.
        #[test]
        fn waits_stay_within_bounds(
            results in proptest::collection::vec(result(), 0..200),
            fraction in 0.0f64..1.0,
        ) {
            let mut interval = AdaptiveInterval::new(MIN, MAX);
            for result in results {
                let before = interval.current();
                let after = interval.after(result);
                prop_assert!(after >= MIN && after <= MAX);
                let jittered = interval.jittered(fraction);
                prop_assert!(jittered >= MIN && jittered <= MAX);
                match result {
                    PollResult::Empty => prop_assert!(after >= before),
                    PollResult::FullPage => prop_assert_eq!(after, MIN),
                    PollResult::Some => prop_assert!(after <= before),
                }
            }
        }
    }
}
