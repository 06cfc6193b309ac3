//! What `cdcflow reconcile --repair` writes to a pipeline's input topic: the source rows of
//! the entities that diverge, as snapshot reads (`op` `r`), and a delete for each entity the
//! source no longer has. The pipeline's version gate then applies each only where it is newer
//! than the state, so the events that were missed come out, once. Pure.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::{Divergence, Report, SourceRow};
use crate::cdc::EnvelopeFormat;
use crate::engine::EntityState;

/// The records of a repair, and the divergences it cannot repair.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repair {
    /// (key, value) records for the input topic, keyed like Debezium's (`{"id": 42}`).
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Divergences a record through the gate cannot repair: an image that differs at the
    /// same version (the gate drops it as a duplicate: bump the row's version column), or a
    /// state newer than the source.
    pub not_repairable: Vec<String>,
}

/// The repair of `report`. `rows` are the source rows and `states` the states, by entity
/// key; `key` the key columns,
/// `format` the pipeline's input format (flattened or an envelope), `ts_ms` the time stamped
/// on the records.
pub fn repair(
    report: &Report,
    rows: &BTreeMap<String, SourceRow>,
    states: &BTreeMap<String, EntityState>,
    key: &[String],
    format: EnvelopeFormat,
    ts_ms: i64,
) -> Repair {
    let mut repair = Repair::default();
    let flattened = format == EnvelopeFormat::Flattened;
    for divergence in &report.divergences {
        match divergence {
            Divergence::Missing { key: entity, .. } => {
                if let Some(row) = rows.get(entity) {
                    repair.records.push(read(row, key, flattened, ts_ms));
                }
            }
            Divergence::Version {
                key: entity,
                state_version,
                source_version,
            } => {
                if let Some(row) = rows.get(entity) {
                    let newer = match (states.get(entity), &row.version) {
                        (Some(state), Some(source)) => source > &state.version,
                        _ => true,
                    };
                    if newer {
                        repair.records.push(read(row, key, flattened, ts_ms));
                    } else {
                        repair.not_repairable.push(format!(
                            "{entity}: the state ({state_version}) is newer than the source \
                             ({source_version})"
                        ));
                    }
                }
            }
            Divergence::Extra { key: entity, .. } => {
                // The key fields as the stored image holds them (a text key stays text).
                let stored = states
                    .get(entity)
                    .and_then(|state| state.image.as_deref())
                    .and_then(|image| serde_json::from_str::<Map<String, Value>>(image).ok())
                    .map(|image| key_of(&image, key))
                    .filter(|fields| fields.len() == key.len());
                repair
                    .records
                    .push(delete(entity, stored, key, flattened, ts_ms));
            }
            Divergence::Image {
                key: entity,
                fields,
            } => {
                repair.not_repairable.push(format!(
                    "{entity}: {fields:?} differ at the same version; the gate drops a change \
                     at a version it has applied, so bump the row's version column to send it"
                ));
            }
        }
    }
    repair
}

fn key_of(image: &Map<String, Value>, key: &[String]) -> Map<String, Value> {
    key.iter()
        .filter_map(|column| Some((column.clone(), image.get(column)?.clone())))
        .collect()
}

fn source(ts_ms: i64) -> Value {
    json!({"connector": "cdcflow-reconcile", "snapshot": "true", "ts_ms": ts_ms})
}

fn read(row: &SourceRow, key: &[String], flattened: bool, ts_ms: i64) -> (Vec<u8>, Vec<u8>) {
    let value = if flattened {
        let mut value = row.image.clone();
        value.insert("__op".to_owned(), Value::from("r"));
        value.insert("__source_ts_ms".to_owned(), Value::from(ts_ms));
        Value::Object(value)
    } else {
        json!({"op": "r", "before": null, "after": row.image, "source": source(ts_ms), "ts_ms": ts_ms})
    };
    (
        Value::Object(key_of(&row.image, key))
            .to_string()
            .into_bytes(),
        value.to_string().into_bytes(),
    )
}

/// A delete for an entity the source no longer has: its key fields alone, so that the gate
/// orders it after the stored version (a versionless delete). The fields come from the stored
/// image, else from the entity's canonical key.
fn delete(
    entity: &str,
    stored: Option<Map<String, Value>>,
    key: &[String],
    flattened: bool,
    ts_ms: i64,
) -> (Vec<u8>, Vec<u8>) {
    let fields: Map<String, Value> = stored.unwrap_or_else(|| match key {
        [single] => {
            let value = serde_json::from_str::<Value>(entity)
                .ok()
                .filter(|value| !value.is_object() && !value.is_array())
                .unwrap_or_else(|| Value::from(entity));
            Map::from_iter([(single.clone(), value)])
        }
        _ => serde_json::from_str(entity).unwrap_or_default(),
    });
    let value = if flattened {
        let mut value = fields.clone();
        value.insert("__deleted".to_owned(), Value::from("true"));
        value.insert("__source_ts_ms".to_owned(), Value::from(ts_ms));
        Value::Object(value)
    } else {
        json!({"op": "d", "before": fields, "after": null, "source": source(ts_ms), "ts_ms": ts_ms})
    };
    (
        Value::Object(fields).to_string().into_bytes(),
        value.to_string().into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Version;

    fn row(id: i64, version: u64) -> SourceRow {
        SourceRow {
            key: id.to_string(),
            version: Some(Version::new(vec![version, 0])),
            image: json!({"id": id, "version": version})
                .as_object()
                .unwrap()
                .clone(),
        }
    }

    #[test]
    fn missing_and_older_entities_are_read_extra_ones_deleted_and_the_rest_explained() {
        let rows: BTreeMap<String, SourceRow> = [row(1, 3), row(2, 5), row(3, 1), row(7, 2)]
            .into_iter()
            .map(|row| (row.key.clone(), row))
            .collect();
        let version = |v: u64| Version::new(vec![v, 0]).to_string();
        let report = Report {
            compared: 5,
            matching: 0,
            divergences: vec![
                Divergence::Missing {
                    key: "1".into(),
                    source_version: version(3),
                },
                Divergence::Version {
                    key: "2".into(),
                    state_version: version(4),
                    source_version: version(5),
                },
                Divergence::Version {
                    key: "3".into(),
                    state_version: version(2),
                    source_version: version(1),
                },
                Divergence::Extra {
                    key: "9".into(),
                    state_version: version(1),
                },
                Divergence::Image {
                    key: "7".into(),
                    fields: vec!["status".into()],
                },
            ],
        };
        let states: BTreeMap<String, EntityState> = [(2, 4), (3, 2), (9, 1)]
            .into_iter()
            .map(|(id, v)| {
                (
                    id.to_string(),
                    EntityState {
                        version: Version::new(vec![v, 0]),
                        image: Some("{}".into()),
                        updated_at_ms: 0,
                        parked: None,
                    },
                )
            })
            .collect();
        let key = vec!["id".to_owned()];
        let repair = repair(&report, &rows, &states, &key, EnvelopeFormat::Flattened, 5);
        let records: Vec<(String, Value)> = repair
            .records
            .iter()
            .map(|(key, value)| {
                (
                    String::from_utf8(key.clone()).unwrap(),
                    serde_json::from_slice(value).unwrap(),
                )
            })
            .collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].0, r#"{"id":1}"#);
        assert_eq!(records[0].1["__op"], "r");
        assert_eq!(records[1].1["version"], 5);
        assert_eq!(records[2].0, r#"{"id":9}"#);
        assert_eq!(
            records[2].1,
            json!({"id": 9, "__deleted": "true", "__source_ts_ms": 5})
        );
        assert_eq!(
            repair.not_repairable.len(),
            2,
            "{:?}",
            repair.not_repairable
        );
        let envelope = super::repair(&report, &rows, &states, &key, EnvelopeFormat::Envelope, 5);
        let first: Value = serde_json::from_slice(&envelope.records[0].1).unwrap();
        assert_eq!(first["op"], "r");
        assert_eq!(first["after"]["id"], 1);
        let deleted: Value = serde_json::from_slice(&envelope.records[2].1).unwrap();
        assert_eq!(deleted["op"], "d");
        assert_eq!(deleted["before"], json!({"id": 9}));
    }
}
