//! The version gate: newer is applied, equal is a duplicate, older is stale.

use super::park::Parked;
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
    /// Changes waiting behind a dead-lettered one (`dlq_policy = "park"`).
    pub parked: Option<Arc<Parked>>,
}

impl EntityState {
    pub fn is_deleted(&self) -> bool {
        self.image.is_none()
    }

    /// The state before anything was parked: what the gate compares against. `None` when the
    /// entity had no state of its own (it exists only to park).
    pub fn without_parked(&self) -> Option<EntityState> {
        match &self.parked {
            Some(parked) if parked.entity_absent => None,
            _ => Some(EntityState {
                parked: None,
                ..self.clone()
            }),
        }
    }

    /// The state of an entity with nothing stored that parks changes: the lowest version, no
    /// image (the gate never sees it: [`EntityState::without_parked`] is `None`).
    pub fn parking_only(parked: Arc<Parked>) -> EntityState {
        EntityState {
            parked: Some(parked),
            ..EntityState::absent()
        }
    }

    /// The state of an entity released from parking that never had state of its own: like a
    /// deletion at the lowest version, so that any change of it applies.
    pub fn absent() -> EntityState {
        EntityState {
            version: Version::new(vec![0]),
            image: None,
            updated_at_ms: 0,
            parked: None,
        }
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
            parked: None,
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
