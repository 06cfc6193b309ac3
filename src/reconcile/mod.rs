//! Reconciliation: a pipeline's entity states against the source of truth, entity by entity.
//! The comparison is pure: `cdcflow reconcile` reads the states (store or changelog) and the
//! source rows ([`source`], SQL), both in key order, and hands them here.

pub mod repair;
pub mod source;

use std::cmp::Ordering;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::engine::{EntityState, Version};

/// One source row: its entity key (canonical form), its version and its image.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    pub key: String,
    /// `None` when the pipeline's versions are source positions, which a row does not carry:
    /// images alone are compared.
    pub version: Option<Version>,
    pub image: Map<String, Value>,
}

fn version_text(version: Option<&Version>) -> String {
    version.map_or_else(|| "-".to_owned(), Version::to_string)
}

/// How one entity differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Divergence {
    /// In the source, not in the state (or deleted there): a change never delivered.
    Missing { key: String, source_version: String },
    /// Live in the state, not in the source: a delete never delivered, or a state row
    /// written behind the pipeline's back.
    Extra { key: String, state_version: String },
    /// Both have it at different versions.
    Version {
        key: String,
        state_version: String,
        source_version: String,
    },
    /// Same version, different images: the row changed without its version changing.
    Image { key: String, fields: Vec<String> },
}

/// The outcome of a comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub compared: usize,
    pub matching: usize,
    pub divergences: Vec<Divergence>,
}

impl Report {
    /// Counts per kind: missing, extra, version, image.
    pub fn counts(&self) -> [usize; 4] {
        let mut counts = [0; 4];
        for divergence in &self.divergences {
            counts[match divergence {
                Divergence::Missing { .. } => 0,
                Divergence::Extra { .. } => 1,
                Divergence::Version { .. } => 2,
                Divergence::Image { .. } => 3,
            }] += 1;
        }
        counts
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let [missing, extra, version, image] = self.counts();
        format!(
            "{} entities compared: {} match, {missing} missing, {extra} extra, {version} at \
             another version, {image} with another image",
            self.compared, self.matching
        )
    }
}

/// Compares states and source rows, each sorted by key (a merge join over the two iterators;
/// `cdcflow reconcile` holds both sides in memory to sort them).
/// Columns in `ignore` are left out of the image comparison.
pub fn compare(
    states: impl IntoIterator<Item = (String, EntityState)>,
    rows: impl IntoIterator<Item = SourceRow>,
    ignore: &[String],
) -> Report {
    let mut report = Report::default();
    let mut states = states.into_iter().peekable();
    let mut rows = rows.into_iter().peekable();
    loop {
        let order = match (states.peek(), rows.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((key, _)), Some(row)) => key.as_str().cmp(row.key.as_str()),
        };
        report.compared += 1;
        match order {
            Ordering::Less => {
                let (key, state) = states.next().expect("peeked");
                if state.is_deleted() {
                    // Deleted on both sides.
                    report.matching += 1;
                } else {
                    report.divergences.push(Divergence::Extra {
                        key,
                        state_version: state.version.to_string(),
                    });
                }
            }
            Ordering::Greater => {
                let row = rows.next().expect("peeked");
                report.divergences.push(Divergence::Missing {
                    key: row.key,
                    source_version: version_text(row.version.as_ref()),
                });
            }
            Ordering::Equal => {
                let (key, state) = states.next().expect("peeked");
                let row = rows.next().expect("peeked");
                match divergence(key, &state, &row, ignore) {
                    Some(divergence) => report.divergences.push(divergence),
                    None => report.matching += 1,
                }
            }
        }
    }
    report
}

fn divergence(
    key: String,
    state: &EntityState,
    row: &SourceRow,
    ignore: &[String],
) -> Option<Divergence> {
    let Some(image) = state.image.as_deref() else {
        return Some(Divergence::Missing {
            key,
            source_version: version_text(row.version.as_ref()),
        });
    };
    if let Some(version) = &row.version
        && state.version.components() != version.components()
    {
        return Some(Divergence::Version {
            key,
            state_version: state.version.to_string(),
            source_version: version.to_string(),
        });
    }
    let stored: Map<String, Value> = serde_json::from_str(image).unwrap_or_default();
    let mut fields: Vec<String> = stored
        .keys()
        .chain(row.image.keys())
        .filter(|field| !ignore.contains(field) && stored.get(*field) != row.image.get(*field))
        .cloned()
        .collect();
    fields.sort();
    fields.dedup();
    (!fields.is_empty()).then_some(Divergence::Image { key, fields })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn state(version: u64, image: Option<Value>) -> EntityState {
        EntityState {
            version: Version::new(vec![version]),
            image: image.map(|image| Arc::from(image.to_string())),
            updated_at_ms: 0,
            parked: None,
        }
    }

    fn row(key: &str, version: u64, image: Value) -> SourceRow {
        SourceRow {
            key: key.to_owned(),
            version: Some(Version::new(vec![version])),
            image: image.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn each_kind_of_drift_is_reported_once() {
        let states = vec![
            (
                "1".to_owned(),
                state(2, Some(json!({"id": 1, "s": "paid"}))),
            ),
            ("2".to_owned(), state(1, Some(json!({"id": 2, "s": "new"})))),
            ("3".to_owned(), state(5, Some(json!({"id": 3, "s": "x"})))),
            (
                "4".to_owned(),
                state(3, Some(json!({"id": 4, "s": "gone"}))),
            ),
            ("5".to_owned(), state(4, None)),
        ];
        let rows = vec![
            row("1", 2, json!({"id": 1, "s": "paid"})),
            row("2", 3, json!({"id": 2, "s": "shipped"})),
            row("3", 5, json!({"id": 3, "s": "y"})),
            row("6", 1, json!({"id": 6, "s": "new"})),
        ];
        let report = compare(states, rows, &[]);
        assert_eq!(report.compared, 6);
        assert_eq!(report.matching, 2, "1 matches, 5 is deleted on both sides");
        assert_eq!(
            report.divergences,
            vec![
                Divergence::Version {
                    key: "2".into(),
                    state_version: "1".into(),
                    source_version: "3".into()
                },
                Divergence::Image {
                    key: "3".into(),
                    fields: vec!["s".into()]
                },
                Divergence::Extra {
                    key: "4".into(),
                    state_version: "3".into()
                },
                Divergence::Missing {
                    key: "6".into(),
                    source_version: "1".into()
                },
            ]
        );
        assert_eq!(report.counts(), [1, 1, 1, 1]);
        assert!(
            report
                .summary()
                .starts_with("6 entities compared: 2 match, 1 missing")
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["divergences"][0]["kind"], "version");
    }
}
