//! The changelog record of an entity state: what the compacted changelog topic holds, keyed by
//! entity, so that state can be rebuilt from Kafka alone.
//!
//! ```json
//! {"version":"00000000016e3a8e.00000000016e3b40","updated_at_ms":1732528863000,
//!  "image":{"id":1001,"status":"paid"}}
//! ```
//! `image` is null for a deleted entity (the tombstone state keeps its version; a Kafka
//! tombstone would lose it). An entity of a `dlq_policy = "park"` pipeline that waits behind a
//! dead letter also has `"parked"`: the blocker and the changes parked behind it
//! ([`crate::engine::Parked::to_json`]).

use std::io::Write;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::engine::{EntityState, Parked, Version};

/// A changelog value that cannot be read back.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("changelog record is unreadable: {0}")]
pub struct ChangelogError(String);

/// The changelog value of a state. The image is embedded as JSON, not as escaped text.
pub fn encode(state: &EntityState) -> Vec<u8> {
    let image = state.image.as_deref().unwrap_or("null");
    let version = state.version.sequence();
    let mut value = Vec::with_capacity(48 + version.len() + image.len());
    value.extend_from_slice(b"{\"version\":\"");
    value.extend_from_slice(version.as_bytes());
    value.extend_from_slice(b"\",\"updated_at_ms\":");
    // Writing into a Vec cannot fail.
    let _ = write!(value, "{}", state.updated_at_ms);
    value.extend_from_slice(b",\"image\":");
    value.extend_from_slice(image.as_bytes());
    if let Some(parked) = &state.parked {
        value.extend_from_slice(b",\"parked\":");
        value.extend_from_slice(parked.to_json().as_bytes());
    }
    value.push(b'}');
    value
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored<'a> {
    version: &'a str,
    updated_at_ms: i64,
    #[serde(borrow)]
    image: &'a RawValue,
    #[serde(borrow, default)]
    parked: Option<&'a RawValue>,
}

/// Reads a changelog value back into a state.
pub fn decode(bytes: &[u8]) -> Result<EntityState, ChangelogError> {
    let stored: Stored<'_> =
        serde_json::from_slice(bytes).map_err(|error| ChangelogError(error.to_string()))?;
    let version = Version::from_sequence(stored.version)
        .ok_or_else(|| ChangelogError(format!("`{}` is not a version sequence", stored.version)))?;
    let image = match stored.image.get() {
        "null" => None,
        text => Some(text.into()),
    };
    let parked = stored
        .parked
        .map(|parked| Parked::from_json(parked.get()).map(std::sync::Arc::new))
        .transpose()
        .map_err(|error| ChangelogError(format!("parked changes: {error}")))?;
    Ok(EntityState {
        version,
        image,
        updated_at_ms: stored.updated_at_ms,
        parked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live and deleted states survive the changelog round trip exactly.
    #[test]
    fn round_trips_live_and_deleted_states() {
        for image in [Some(r#"{"id":1,"note":"a \"quoted\" text"}"#.into()), None] {
            let state = EntityState {
                version: Version::new(vec![7, 1 << 40]),
                image,
                updated_at_ms: 1_700_000_000_000,
                parked: None,
            };
            assert_eq!(decode(&encode(&state)).unwrap(), state);
        }
        let blocker = crate::cdc::Origin {
            topic: "orders".to_owned(),
            partition: 0,
            offset: 3,
        };
        let parked = EntityState::parking_only(Parked::behind(blocker, true));
        assert_eq!(decode(&encode(&parked)).unwrap(), parked);
        assert!(decode(b"{\"version\":\"zz\",\"updated_at_ms\":0,\"image\":null}").is_err());
    }
}
