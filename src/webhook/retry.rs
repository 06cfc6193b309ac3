//! What happens after one delivery attempt: delivered, retried after a wait (exponential
//! backoff with jitter, or the receiver's `Retry-After`), or dead-lettered, with the reason
//! and a bounded excerpt of the last response.
//!
//! Retried: timeouts, connection errors, 408, 429 and 5xx. Not retried: any other status
//! outside 2xx (a receiver that answers 400 or 401 will answer it again; redirects are not
//! followed, since a signed delivery goes only where it was configured to).

use std::time::Duration;

use crate::cdc::days_from_civil;

/// The most of a response body a dead letter keeps.
pub const EXCERPT_BYTES: usize = 512;

/// What one attempt came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The receiver answered: its status, its `Retry-After` header, and the start of its body.
    Answered {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    /// No answer within the timeout.
    TimedOut,
    /// No connection (refused, reset, DNS, TLS).
    Unreachable(String),
}

/// How long and how often a subscription tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait; each next one doubles, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// From the first attempt: a delivery not done by then is dead-lettered.
    pub max_age: Duration,
}

/// Why a delivery ended in the DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    /// `rejected` (a status not worth retrying), `attempts_exhausted`, `max_age_exceeded`.
    pub reason: &'static str,
    pub attempts: u32,
    /// The last status, if the receiver answered at all.
    pub last_status: Option<u16>,
    /// What went wrong last: the start of the body, or the timeout or connection error.
    pub last_error: String,
}

/// The next step of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Delivered,
    RetryIn(Duration),
    DeadLetter(Abandoned),
}

/// Cuts `text` to at most `EXCERPT_BYTES` bytes on a character boundary.
pub fn excerpt(text: &str) -> String {
    if text.len() <= EXCERPT_BYTES {
        return text.to_owned();
    }
    let mut end = EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Decides the next step after attempt number `attempts` (1 for the first), made `age` after
/// the first; `now_s` is the Unix time (for an HTTP-date `Retry-After`), `jitter` a number in
/// `[0, 1)`.
pub fn next_step(
    policy: &RetryPolicy,
    result: &AttemptResult,
    attempts: u32,
    age: Duration,
    now_s: i64,
    jitter: f64,
) -> Next {
    let (retriable, last_status, last_error, retry_after) = match result {
        AttemptResult::Answered { status, .. } if (200..300).contains(status) => {
            return Next::Delivered;
        }
        AttemptResult::Answered {
            status,
            retry_after,
            body,
        } => (
            matches!(status, 408 | 429 | 500..=599),
            Some(*status),
            excerpt(body),
            retry_after
                .as_deref()
                .and_then(|value| parse_retry_after(value, now_s)),
        ),
        AttemptResult::TimedOut => (true, None, "timed out".to_owned(), None),
        AttemptResult::Unreachable(error) => (true, None, excerpt(error), None),
    };
    let abandon = |reason| {
        Next::DeadLetter(Abandoned {
            reason,
            attempts,
            last_status,
            last_error: last_error.clone(),
        })
    };
    if !retriable {
        return abandon("rejected");
    }
    if attempts >= policy.max_attempts {
        return abandon("attempts_exhausted");
    }
    let wait = retry_after.unwrap_or_else(|| backoff(policy, attempts, jitter));
    if age + wait > policy.max_age {
        return abandon("max_age_exceeded");
    }
    Next::RetryIn(wait)
}

/// The wait after attempt `attempts`: capped exponential with "equal jitter" (half fixed,
/// half random), so that receivers coming back are not hit by every sender at once.
fn backoff(policy: &RetryPolicy, attempts: u32, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    let full = policy
        .initial_backoff
        .saturating_mul(1u32 << doublings)
        .min(policy.max_backoff);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// `Retry-After`: delay seconds, or an HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`). A date in
/// the past means now.
pub fn parse_retry_after(value: &str, now_s: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = parse_http_date(value)?;
    Some(Duration::from_secs(at.saturating_sub(now_s).max(0) as u64))
}

/// Unix seconds of an IMF-fixdate (RFC 9110's preferred HTTP-date).
fn parse_http_date(value: &str) -> Option<i64> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [_weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|name| name == month)? as u32
        + 1;
    let day: u32 = day.parse().ok().filter(|day| (1..=31).contains(day))?;
    let year: i64 = year.parse().ok()?;
    let mut clock = time.split(':').map(|part| part.parse::<i64>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    if clock.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        max_attempts: 5,
        max_age: Duration::from_secs(600),
    };

    fn answered(status: u16, retry_after: Option<&str>) -> AttemptResult {
        AttemptResult::Answered {
            status,
            retry_after: retry_after.map(str::to_owned),
            body: format!("status {status}"),
        }
    }

    fn step(result: &AttemptResult, attempts: u32, age_s: u64) -> Next {
        next_step(
            &POLICY,
            result,
            attempts,
            Duration::from_secs(age_s),
            1_000,
            0.0,
        )
    }

    /// 2xx is delivered; timeouts, connection errors, 408, 429 and 5xx are retried; any other
    /// status is dead-lettered at once with its status and body.
    #[test]
    fn statuses_are_classified() {
        for status in [200, 201, 204, 299] {
            assert_eq!(step(&answered(status, None), 1, 0), Next::Delivered);
        }
        for result in [
            answered(500, None),
            answered(503, None),
            answered(429, None),
            answered(408, None),
            AttemptResult::TimedOut,
            AttemptResult::Unreachable("connection refused".into()),
        ] {
            assert!(
                matches!(step(&result, 1, 0), Next::RetryIn(_)),
                "{result:?}"
            );
        }
        for status in [301, 400, 401, 403, 404, 410, 422] {
            assert_eq!(
                step(&answered(status, None), 1, 0),
                Next::DeadLetter(Abandoned {
                    reason: "rejected",
                    attempts: 1,
                    last_status: Some(status),
                    last_error: format!("status {status}"),
                })
            );
        }
    }

    /// Waits double from the initial backoff up to the cap, each between half and all of its
    /// exponential value; the attempts and the age end the retries.
    #[test]
    fn backoff_grows_and_limits_end_it() {
        let waits: Vec<Duration> = (1..5)
            .map(|attempt| match step(&AttemptResult::TimedOut, attempt, 0) {
                Next::RetryIn(wait) => wait,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits, [500, 1_000, 2_000, 4_000].map(Duration::from_millis));
        for attempt in 1..40 {
            let wait = backoff(&POLICY, attempt, 0.999);
            assert!(wait <= POLICY.max_backoff, "{attempt}: {wait:?}");
        }
        assert!(matches!(
            step(&AttemptResult::TimedOut, 5, 0),
            Next::DeadLetter(Abandoned {
                reason: "attempts_exhausted",
                attempts: 5,
                ..
            })
        ));
        assert!(matches!(
            step(&AttemptResult::TimedOut, 2, 600),
            Next::DeadLetter(Abandoned {
                reason: "max_age_exceeded",
                ..
            })
        ));
    }

    /// `Retry-After` wins over the backoff, in seconds or as an HTTP-date; a wait beyond the
    /// delivery's age limit dead-letters it now instead of waiting in vain.
    #[test]
    fn retry_after_is_honoured() {
        assert_eq!(
            step(&answered(429, Some("7")), 1, 0),
            Next::RetryIn(Duration::from_secs(7))
        );
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", 784_111_777),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_999),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert!(matches!(
            step(&answered(503, Some("3600")), 1, 0),
            Next::DeadLetter(Abandoned {
                reason: "max_age_exceeded",
                last_status: Some(503),
                ..
            })
        ));
    }

    #[test]
    fn excerpts_are_bounded_on_a_character_boundary() {
        let long = "é".repeat(1_000);
        let cut = excerpt(&long);
        assert!(cut.len() <= EXCERPT_BYTES + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt("short"), "short");
    }
}
