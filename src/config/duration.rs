//! Durations as operators write them: `250ms`, `10s`, `2m`, `24h`, `3d` (or a number of
//! milliseconds).

use std::time::Duration;

use serde::{Deserialize, Deserializer, de::Error};

#[derive(Deserialize)]
#[serde(untagged)]
enum Written {
    Millis(u64),
    Text(String),
}

pub(super) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    match Written::deserialize(deserializer)? {
        Written::Millis(millis) => Ok(Duration::from_millis(millis)),
        Written::Text(text) => parse(&text).ok_or_else(|| {
            D::Error::custom(format!(
                "`{text}` is not a duration: write a number with a unit, e.g. \"250ms\", \"10s\", \"2m\", \"24h\""
            ))
        }),
    }
}

pub(crate) fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(number.checked_mul(3_600)?)),
        "d" => Some(Duration::from_secs(number.checked_mul(86_400)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations take the units operators write.
    #[test]
    fn parses_units() {
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse("3d"), Some(Duration::from_secs(259_200)));
        assert_eq!(parse("10"), None);
        assert_eq!(parse("1w"), None);
    }
}
