//! Epoch-based integers to ISO-8601 text, for Connect and Debezium temporal types and for the
//! CloudEvents `time` attribute. Proleptic Gregorian calendar, no leap seconds (as Java's
//! `java.time`, which Debezium uses).

const NANOS_PER_SECOND: i128 = 1_000_000_000;
const SECONDS_PER_DAY: i128 = 86_400;

/// Converts days since 1970-01-01 to (year, month, day), using the era-based algorithm that
/// counts 400-year cycles of 146,097 days.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Beyond ±1e12 days (years far outside any calendar) the arithmetic below could overflow.
    let days = days.clamp(-1_000_000_000_000, 1_000_000_000_000);
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a (year, month, day): the inverse of [`civil_from_days`].
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Epoch milliseconds of an RFC 3339 UTC time: `2026-11-30T05:00:00Z`, with optional
/// fractional seconds and a `+hh:mm` / `-hh:mm` offset instead of `Z`. `None` if malformed.
pub fn parse_rfc3339_millis(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            sign * (hours * 60 + minutes)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month as u32, day as u32);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1_000 + millis)
}

/// `YYYY-MM-DD` for days since the epoch.
pub(crate) fn format_date(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `HH:MM:SS` plus a fraction of `digits` digits (0, 3, 6 or 9) for nanoseconds of a day.
fn format_time_of_day(nanos_of_day: i128, digits: u32) -> String {
    let seconds = nanos_of_day / NANOS_PER_SECOND;
    let fraction = nanos_of_day % NANOS_PER_SECOND;
    let (hours, minutes, secs) = (seconds / 3600, (seconds / 60) % 60, seconds % 60);
    let mut text = format!("{hours:02}:{minutes:02}:{secs:02}");
    if digits > 0 {
        let scaled = fraction / 10i128.pow(9 - digits);
        text.push_str(&format!(".{scaled:0width$}", width = digits as usize));
    }
    text
}

/// Time of day from an integer count of `unit_nanos` since midnight.
pub(crate) fn format_time(count: i64, unit_nanos: i64, digits: u32) -> String {
    let nanos =
        (i128::from(count) * i128::from(unit_nanos)).rem_euclid(SECONDS_PER_DAY * NANOS_PER_SECOND);
    format_time_of_day(nanos, digits)
}

/// `YYYY-MM-DDTHH:MM:SS.fff` for nanoseconds since the epoch, without a zone (Debezium's
/// `io.debezium.time.*Timestamp` types carry a local date-time).
pub fn format_epoch_nanos_local(nanos: i128, digits: u32) -> String {
    let day_nanos = SECONDS_PER_DAY * NANOS_PER_SECOND;
    let days = nanos.div_euclid(day_nanos);
    let nanos_of_day = nanos.rem_euclid(day_nanos);
    // i64 holds any day count reachable from an i128 of nanoseconds divided by 8.64e13.
    let days = i64::try_from(days).unwrap_or(if days < 0 { i64::MIN / 2 } else { i64::MAX / 2 });
    format!(
        "{}T{}",
        format_date(days),
        format_time_of_day(nanos_of_day, digits)
    )
}

/// RFC 3339 UTC text with milliseconds for milliseconds since the epoch. On the hot path (every
/// event's `time`), so written without intermediate strings.
pub fn format_epoch_millis(millis: i64) -> String {
    use std::fmt::Write as _;
    let days = millis.div_euclid(86_400_000);
    let millis_of_day = millis.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let seconds = millis_of_day / 1000;
    let mut text = String::with_capacity(24);
    // Writing to a String cannot fail.
    let _ = write!(
        text,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60,
        millis_of_day % 1000
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dates on both sides of the epoch and across leap days match java.time.
    #[test]
    fn dates_match_the_gregorian_calendar() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(-1), "1969-12-31");
        assert_eq!(format_date(19_417), "2023-03-01");
        assert_eq!(format_date(11_016), "2000-02-29");
        assert_eq!(format_date(-719_528), "0000-01-01");
    }

    /// Epoch milliseconds become RFC 3339 UTC text, as CloudEvents `time` requires.
    #[test]
    fn epoch_millis_are_rfc3339_utc() {
        assert_eq!(format_epoch_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_epoch_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(format_epoch_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    /// Day counts at the edge of i64 never overflow.
    #[test]
    fn extreme_days_do_not_overflow() {
        let _ = format_date(i64::MAX);
        let _ = format_date(i64::MIN);
    }

    /// Times of day keep the precision their Debezium type carries.
    #[test]
    fn time_of_day_keeps_precision() {
        assert_eq!(format_time(45_296_789, 1_000_000, 3), "12:34:56.789");
        assert_eq!(format_time(45_296_789_012, 1_000, 6), "12:34:56.789012");
        assert_eq!(format_time(0, 1, 9), "00:00:00.000000000");
    }

    /// RFC 3339 times parse back to the epoch milliseconds that format to them, offsets and
    /// fractions included; malformed text is refused.
    #[test]
    fn rfc3339_parses_to_epoch_millis() {
        for millis in [
            0i64,
            1_732_528_863_123,
            -86_400_000,
            951_782_400_000,
            4_102_444_800_000,
        ] {
            let text = format_epoch_millis(millis);
            assert_eq!(parse_rfc3339_millis(&text), Some(millis), "{text}");
        }
        assert_eq!(
            parse_rfc3339_millis("2026-11-30T05:00:00Z"),
            Some(1_796_014_800_000)
        );
        assert_eq!(
            parse_rfc3339_millis("2026-11-30T07:00:00+02:00"),
            parse_rfc3339_millis("2026-11-30T05:00:00Z")
        );
        assert_eq!(parse_rfc3339_millis("1970-01-01T00:00:00.5Z"), Some(500));
        for bad in [
            "2026-11-30",
            "2026-13-01T00:00:00Z",
            "2026-11-30T05:00:00",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339_millis(bad), None, "{bad}");
        }
    }
}
