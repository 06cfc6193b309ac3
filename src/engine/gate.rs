//! The version gate: newer is applied, equal is a duplicate, older is stale.

use super::version::Version;

use std::sync::Arc;

/// The stored state of one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityState {
    /// The last applied version.
    pub version: Version,
    /// The last known row image as compact JSON text; `None` once the entity is deleted (a
    /// tombstone state that keeps its version, so older changes stay stale).
    /// Shared, not copied, by the cache, the write-behind set and the changelog record.
    pub image: Option<Arc<str>>,
    /// Source time of the last applied change, epoch milliseconds.
    pub updated_at_ms: i64,
}

impl EntityState {
    pub fn is_deleted(&self) -> bool {
        self.image.is_none()
    }
}

/// What the gate decided for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Newer than the stored version: state changes and rules run.
    Applied,
    /// The stored version again: a connector restart or a redelivery.
    Duplicate,
    /// Older than the stored version: a replay, a re-snapshot or a backfill.
    Stale,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Applied => "applied",
            Decision::Duplicate => "duplicate",
            Decision::Stale => "stale",
        }
    }
}

/// Compares an incoming version with the stored state.
pub fn decide(stored: Option<&EntityState>, incoming: &Version) -> Decision {
    match stored {
        None => Decision::Applied,
        Some(state) => match incoming.cmp(&state.version) {
            std::cmp::Ordering::Greater => Decision::Applied,
            std::cmp::Ordering::Equal => Decision::Duplicate,
            std::cmp::Ordering::Less => Decision::Stale,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(components: &[u64]) -> EntityState {
        EntityState {
            version: Version::new(components.to_vec()),
            image: Some("{}".into()),
            updated_at_ms: 0,
        }
    }

    /// Newer applies, equal is a duplicate, older is stale; an unknown entity always applies.
    #[test]
    fn gate_orders_versions() {
        let stored = state(&[10, 5]);
        assert_eq!(decide(None, &Version::new(vec![1])), Decision::Applied);
        assert_eq!(
            decide(Some(&stored), &Version::new(vec![10, 6])),
            Decision::Applied
        );
        assert_eq!(
            decide(Some(&stored), &Version::new(vec![11, 0])),
            Decision::Applied
        );
        assert_eq!(
            decide(Some(&stored), &Version::new(vec![10, 5])),
            Decision::Duplicate
        );
        assert_eq!(
            decide(Some(&stored), &Version::new(vec![9, 99])),
            Decision::Stale
        );
    }
}
