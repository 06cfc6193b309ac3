//! Times in the representation of a SQLite cursor column. SQLite has no time type: a column
//! holds Unix times (`unixepoch()`, in seconds, milliseconds or microseconds) or UTC text
//! (`CURRENT_TIMESTAMP`, `strftime('%Y-%m-%d %H:%M:%f')`, RFC 3339 in UTC). The horizon of a SQLite
//! poll is written like the column's latest value, so that SQLite compares like with like.
//! Pure.

use serde_json::Value;

use crate::cdc::format_epoch_millis;
use crate::cdc::parse_rfc3339_millis;

/// Unix times below this are seconds, below the next milliseconds, else microseconds.
const SECONDS_BELOW: i64 = 100_000_000_000;
const MILLIS_BELOW: i64 = 100_000_000_000_000;

/// The epoch milliseconds of a cursor value, if it is a time.
pub fn epoch_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => {
            let n = number
                .as_i64()
                .or_else(|| number.as_f64().map(|f| f as i64))?;
            Some(match n.abs() {
                n_abs if n_abs < SECONDS_BELOW => n * 1_000,
                n_abs if n_abs < MILLIS_BELOW => n,
                _ => n / 1_000,
            })
        }
        Value::String(text) => parse_text(text).map(|parsed| parsed.ms),
        _ => None,
    }
}

/// `at_ms` written like `sample`: `None` when `sample` is not a time cdcflow can read.
pub fn like(sample: &Value, at_ms: i64) -> Option<Value> {
    match sample {
        Value::Number(number) => {
            let n = number
                .as_i64()
                .or_else(|| number.as_f64().map(|f| f as i64))?;
            Some(Value::from(match n.abs() {
                n_abs if n_abs < SECONDS_BELOW => at_ms.div_euclid(1_000),
                n_abs if n_abs < MILLIS_BELOW => at_ms,
                _ => at_ms * 1_000,
            }))
        }
        Value::String(text) => {
            let shape = parse_text(text)?;
            // `YYYY-MM-DDTHH:MM:SS.mmmZ`, reshaped.
            let utc = format_epoch_millis(at_ms);
            let (date, time) = (utc.get(0..10)?, utc.get(11..19)?);
            let millis = utc.get(20..23).unwrap_or("000");
            let fraction = match shape.fraction_digits {
                0 => String::new(),
                digits => format!(".{:0<digits$}", &millis[..digits.min(3)]),
            };
            Some(Value::from(format!(
                "{date}{}{time}{fraction}{}",
                shape.separator, shape.suffix
            )))
        }
        _ => None,
    }
}

struct TextShape {
    ms: i64,
    separator: char,
    fraction_digits: usize,
    suffix: String,
}

fn parse_text(text: &str) -> Option<TextShape> {
    let separator = text.chars().nth(10)?;
    if !matches!(separator, 'T' | ' ') {
        return None;
    }
    let rest = text.get(19..)?;
    let fraction_digits = rest.strip_prefix('.').map_or(0, |fraction| {
        fraction.bytes().take_while(u8::is_ascii_digit).count()
    });
    let suffix = &rest[if fraction_digits > 0 {
        fraction_digits + 1
    } else {
        0
    }..];
    // The horizon is written in UTC with the sample's suffix: another offset would shift it.
    if !matches!(suffix, "" | "Z" | "z" | "+00:00") {
        return None;
    }
    // Without a zone, SQLite's times are UTC.
    let normalised = if suffix.is_empty() {
        format!("{}T{}Z", &text[..10], &text[11..])
    } else {
        format!("{}T{}", &text[..10], &text[11..])
    };
    Some(TextShape {
        ms: parse_rfc3339_millis(&normalised)?,
        separator,
        fraction_digits,
        suffix: suffix.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AT: i64 = 1_796_040_000_123; // 2026-11-30T12:00:00.123Z

    #[test]
    fn unix_times_keep_their_unit() {
        assert_eq!(like(&json!(1_700_000_000), AT), Some(json!(1_796_040_000)));
        assert_eq!(like(&json!(1_700_000_000_000_i64), AT), Some(json!(AT)));
        assert_eq!(
            like(&json!(1_700_000_000_000_000_i64), AT),
            Some(json!(AT * 1_000))
        );
        assert_eq!(epoch_ms(&json!(1_796_040_000)), Some(1_796_040_000_000));
    }

    #[test]
    fn text_times_keep_their_shape() {
        assert_eq!(
            like(&json!("2025-01-02 03:04:05"), AT),
            Some(json!("2026-11-30 12:00:00"))
        );
        assert_eq!(
            like(&json!("2025-01-02 03:04:05.678"), AT),
            Some(json!("2026-11-30 12:00:00.123"))
        );
        assert_eq!(
            like(&json!("2025-01-02T03:04:05.678901Z"), AT),
            Some(json!("2026-11-30T12:00:00.123000Z"))
        );
        assert_eq!(epoch_ms(&json!("2026-11-30 12:00:00.123")), Some(AT));
        assert_eq!(like(&json!("yesterday"), AT), None);
        assert_eq!(
            like(&json!("2025-01-02T03:04:05-05:00"), AT),
            None,
            "UTC only"
        );
        assert!(like(&json!("2025-01-02T03:04:05+00:00"), AT).is_some());
        assert_eq!(like(&json!(true), AT), None);
    }

    #[test]
    fn the_horizon_sorts_like_the_values_it_bounds() {
        let earlier = json!("2026-11-30 11:59:59.999");
        let horizon = like(&earlier, AT).unwrap();
        assert!(earlier.as_str().unwrap() < horizon.as_str().unwrap());
    }
}
