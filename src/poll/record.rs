//! A polled row as a Kafka record, and the cursor after it. Pure.
//!
//! The record has the shape of Debezium's flattened "new record state" (`ExtractNewRecordState`
//! with `delete.handling.mode=rewrite`), so a pipeline reads it with `format = "flattened"`:
//! the key is `{"id": 42}` (the key columns), the value is the row plus `__deleted` and
//! `__source_ts_ms` (the cursor as epoch milliseconds, for `version.by = "ts_ms"`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// One row a poll read.
#[derive(Debug, Clone, PartialEq)]
pub struct PolledRow {
    pub image: Map<String, Value>,
    /// The cursor column's value, as the database writes it in text.
    pub cursor: String,
    /// The cursor as epoch milliseconds.
    pub ts_ms: Option<i64>,
}

/// Where a poll resumes: after this cursor value and, among rows that share it, after these
/// key values (as text, in key order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub cursor: String,
    pub key: Vec<String>,
    /// The cursor as epoch milliseconds (for the lag metric).
    #[serde(default)]
    pub ts_ms: Option<i64>,
    /// The cursor and key values as the row holds them (SQLite compares by storage class, so
    /// a resume binds them typed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub typed: Vec<Value>,
}

/// A row that cannot be written as a record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error(
        "the row at cursor `{cursor}` has no key column `{column}` (or it is null): name the \
         table's primary key in `key` (its columns are NOT NULL)"
    )]
    MissingKey { cursor: String, column: String },
    #[error(
        "the row at cursor `{cursor}` has a column named `{column}`, which cdcflow writes \
         itself: poll a view that renames it"
    )]
    ReservedColumn { cursor: String, column: String },
}

/// How rows become records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordShape {
    pub cursor_column: String,
    pub key: Vec<String>,
    /// A row where this column is non-null and not `false` is a delete.
    pub soft_delete_column: Option<String>,
}

/// A record ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct PolledRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub cursor: Cursor,
}

const DELETED: &str = "__deleted";
const TS_MS: &str = "__source_ts_ms";

impl RecordShape {
    pub fn record(&self, row: PolledRow) -> Result<PolledRecord, RecordError> {
        let mut key = Map::new();
        let mut key_text = Vec::with_capacity(self.key.len());
        let mut typed = vec![
            row.image
                .get(&self.cursor_column)
                .cloned()
                .unwrap_or(Value::Null),
        ];
        for column in &self.key {
            match row.image.get(column) {
                Some(value) if !value.is_null() => {
                    key_text.push(match value {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    });
                    key.insert(column.clone(), value.clone());
                    typed.push(value.clone());
                }
                _ => {
                    return Err(RecordError::MissingKey {
                        cursor: row.cursor,
                        column: column.clone(),
                    });
                }
            }
        }
        if let Some(column) = [DELETED, TS_MS]
            .into_iter()
            .find(|name| row.image.contains_key(*name))
        {
            return Err(RecordError::ReservedColumn {
                cursor: row.cursor,
                column: column.to_owned(),
            });
        }
        let deleted = self.soft_delete_column.as_ref().is_some_and(|column| {
            !matches!(
                row.image.get(column),
                None | Some(Value::Null | Value::Bool(false))
            )
        });
        let ts_ms = row.ts_ms;
        let mut value = row.image;
        value.insert(DELETED.to_owned(), Value::from(deleted.to_string()));
        if let Some(ts_ms) = ts_ms {
            value.insert(TS_MS.to_owned(), Value::from(ts_ms));
        }
        Ok(PolledRecord {
            key: Value::Object(key).to_string().into_bytes(),
            value: Value::Object(value).to_string().into_bytes(),
            cursor: Cursor {
                cursor: row.cursor,
                key: key_text,
                ts_ms: row.ts_ms,
                typed,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(image: Value) -> PolledRow {
        PolledRow {
            image: image.as_object().unwrap().clone(),
            cursor: "2026-11-30 12:00:00+00".to_owned(),
            ts_ms: Some(1_796_040_000_000),
        }
    }

    fn shape() -> RecordShape {
        RecordShape {
            cursor_column: "updated_at".to_owned(),
            key: vec!["id".to_owned()],
            soft_delete_column: Some("deleted_at".to_owned()),
        }
    }

    #[test]
    fn a_row_becomes_a_flattened_record_keyed_like_debezium() {
        let record = shape()
            .record(row(json!({"id": 7, "status": "paid", "deleted_at": null})))
            .unwrap();
        assert_eq!(record.key, br#"{"id":7}"#);
        let value: Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(value["__deleted"], "false");
        assert_eq!(value["__source_ts_ms"], 1_796_040_000_000_i64);
        assert_eq!(value["status"], "paid");
        assert_eq!(
            record.cursor,
            Cursor {
                cursor: "2026-11-30 12:00:00+00".to_owned(),
                key: vec!["7".to_owned()],
                ts_ms: Some(1_796_040_000_000),
                typed: vec![Value::Null, json!(7)],
            }
        );
    }

    #[test]
    fn a_soft_deleted_row_is_a_rewritten_delete_that_the_decoder_reads_as_one() {
        let record = shape()
            .record(row(
                json!({"id": "a-1", "deleted_at": "2026-11-30T12:00:00+00:00"}),
            ))
            .unwrap();
        assert_eq!(record.cursor.key, vec!["a-1".to_owned()]);
        let decoded = crate::cdc::Decoder::new(
            crate::cdc::DecodeLimits::default(),
            crate::cdc::EnvelopeFormat::Flattened,
            Vec::new(),
        )
        .decode(&crate::cdc::RawRecord {
            topic: "t".to_owned(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: Some(record.key.clone()),
            value: Some(record.value.clone()),
            headers: Vec::new(),
        })
        .unwrap();
        let crate::cdc::Decoded::Change(change) = decoded else {
            panic!("not a change: {decoded:?}");
        };
        assert_eq!(change.op, crate::cdc::Op::Delete);
        assert_eq!(change.key.as_str(), "a-1");
        for flag in [json!(false), json!(null)] {
            let record = shape()
                .record(row(json!({"id": 1, "deleted_at": flag})))
                .unwrap();
            let value: Value = serde_json::from_slice(&record.value).unwrap();
            assert_eq!(value["__deleted"], "false");
        }
    }

    #[test]
    fn a_row_without_its_key_or_with_a_reserved_column_is_refused_by_name() {
        assert_eq!(
            shape().record(row(json!({"id": null}))).unwrap_err(),
            RecordError::MissingKey {
                cursor: "2026-11-30 12:00:00+00".to_owned(),
                column: "id".to_owned()
            }
        );
        assert!(matches!(
            shape().record(row(json!({"id": 1, "__deleted": 1}))),
            Err(RecordError::ReservedColumn { .. })
        ));
    }
}
