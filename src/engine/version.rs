//! Entity versions: a totally ordered value per entity, extracted the way each connector orders
//! its changes.

use std::fmt;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::cdc::{Change, Op};

/// A version: components compared left to right. Every component is an unsigned integer, so the
/// fixed-width [`Version::sequence`] text sorts exactly as the version does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version(Vec<u64>);

impl Version {
    pub fn new(components: Vec<u64>) -> Version {
        Version(components)
    }

    pub fn components(&self) -> &[u64] {
        &self.0
    }

    /// Lexicographically ordered text (16 hex digits per component, `.`-separated): the
    /// CloudEvents `sequence` extension and the stored form.
    pub fn sequence(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(self.0.len() * 17);
        for (index, component) in self.0.iter().enumerate() {
            if index > 0 {
                text.push('.');
            }
            for shift in (0..16).rev() {
                text.push(char::from(HEX[((component >> (shift * 4)) & 0xf) as usize]));
            }
        }
        text
    }

    /// Parses [`Version::sequence`] text.
    pub fn from_sequence(text: &str) -> Option<Version> {
        if text.is_empty() {
            return Some(Version::default());
        }
        text.split('.')
            .map(|part| u64::from_str_radix(part, 16).ok())
            .collect::<Option<Vec<_>>>()
            .map(Version)
    }
}

impl fmt::Display for Version {
    /// Decimal components joined by `.`: the human form, used as `entityversion`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, component) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(".")?;
            }
            write!(f, "{component}")?;
        }
        Ok(())
    }
}

/// The connectors whose source positions cdcflow knows how to order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connector {
    /// `lsn`, ordered by the commit LSN of `source.sequence` first, then the change LSN.
    Postgres,
    /// Binlog `file` (its numeric suffix), `pos`, `row`. MariaDB orders the same way.
    MySql,
    /// `commit_lsn`, `change_lsn`, `event_serial_no`.
    SqlServer,
    /// `scn`, then `ssn` where the connector reports it.
    Oracle,
}

impl Connector {
    /// Maps `source.connector` to a connector.
    pub fn from_source_name(name: &str) -> Option<Connector> {
        match name {
            "postgresql" => Some(Connector::Postgres),
            "mysql" | "mariadb" => Some(Connector::MySql),
            "sqlserver" => Some(Connector::SqlServer),
            "oracle" => Some(Connector::Oracle),
            _ => None,
        }
    }
}

/// Where a pipeline's versions come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSource {
    /// The connector's source position; `None` detects the connector from `source.connector`.
    SourcePosition(Option<Connector>),
    /// An integer column of the row (a version counter), with deletes ordered after the update
    /// that carried the same value.
    Column(String),
    /// `source.ts_ms`: the weakest choice, two changes in one millisecond tie.
    TsMs,
}

/// Every `source` field a version is read from, for any connector.
pub const VERSION_SOURCE_FIELDS: [&str; 12] = [
    "connector",
    "ts_ms",
    "lsn",
    "sequence",
    "file",
    "pos",
    "row",
    "commit_lsn",
    "change_lsn",
    "event_serial_no",
    "scn",
    "ssn",
];

/// How a pipeline computes versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionSpec {
    pub source: VersionSource,
    /// An integer column appended as a last component, which orders snapshot reads (that all
    /// share one source position) of one entity.
    pub snapshot_column: Option<String>,
}

/// Why a version could not be read: the record goes to the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VersionError {
    #[error("version field `{field}` is missing")]
    Missing { field: String },
    #[error("version field `{field}` holds {found}: expected {expected}")]
    Invalid {
        field: String,
        found: String,
        expected: &'static str,
    },
    #[error(
        "source.connector `{name}` is not one whose positions cdcflow orders (postgresql, mysql, \
         mariadb, sqlserver, oracle); set the pipeline's version.by to `column` or `ts_ms`"
    )]
    UnknownConnector { name: String },
}

impl VersionError {
    pub fn reason(&self) -> &'static str {
        match self {
            VersionError::Missing { .. } => "missing_version",
            VersionError::Invalid { .. } => "invalid_version",
            VersionError::UnknownConnector { .. } => "unknown_connector",
        }
    }
}

/// Column mode: the last component says whether the change is a delete, so that a delete that
/// carries the last update's version column still orders after that update.
const LIVE_MARKER: u64 = 0;
const DELETE_MARKER: u64 = 1;

impl VersionSpec {
    /// The change's version. `Ok(None)` only in column mode, for a delete whose `before` image
    /// lacks the column (Postgres REPLICA IDENTITY DEFAULT): it then follows the stored version.
    pub fn extract(&self, change: &Change) -> Result<Option<Version>, VersionError> {
        let mut components = match &self.source {
            VersionSource::SourcePosition(connector) => position(&change.source, *connector)?,
            VersionSource::TsMs => vec![unsigned(&change.source, "ts_ms", "source.ts_ms")?],
            VersionSource::Column(column) => {
                let row = change.latest_image();
                match row.and_then(|row| row.get(column)) {
                    Some(value) if !value.is_null() => {
                        let marker = if change.op == Op::Delete {
                            DELETE_MARKER
                        } else {
                            LIVE_MARKER
                        };
                        vec![ordered_integer(value, column)?, marker]
                    }
                    _ if change.op == Op::Delete => return Ok(None),
                    _ => {
                        return Err(VersionError::Missing {
                            field: format!("after.{column}"),
                        });
                    }
                }
            }
        };
        if let Some(column) = &self.snapshot_column {
            let tiebreak = match change.latest_image().and_then(|row| row.get(column)) {
                Some(value) if !value.is_null() => ordered_integer(value, column)?,
                _ => 0,
            };
            components.push(tiebreak);
        }
        Ok(Some(Version(components)))
    }

    /// The version of a live row read from the source of truth (reconciliation, a repair's
    /// snapshot read): what a change carrying this row would get. `None` when versions come
    /// from the source position or `ts_ms`, which a row does not carry.
    pub fn of_row(&self, row: &Map<String, Value>) -> Option<Result<Version, VersionError>> {
        let VersionSource::Column(column) = &self.source else {
            return None;
        };
        let version = || {
            let value = row
                .get(column)
                .filter(|value| !value.is_null())
                .ok_or_else(|| VersionError::Missing {
                    field: column.clone(),
                })?;
            let mut components = vec![ordered_integer(value, column)?, LIVE_MARKER];
            if let Some(column) = &self.snapshot_column {
                components.push(match row.get(column) {
                    Some(value) if !value.is_null() => ordered_integer(value, column)?,
                    _ => 0,
                });
            }
            Ok(Version(components))
        };
        Some(version())
    }

    /// The version a versionless delete takes on top of the stored one (column mode): the
    /// stored column value with the delete marker.
    pub fn delete_after(&self, stored: &Version) -> Version {
        let mut components = stored.components().to_vec();
        if let Some(marker) = components.get_mut(1) {
            *marker = DELETE_MARKER;
        }
        Version(components)
    }
}

fn position(
    source: &Map<String, Value>,
    connector: Option<Connector>,
) -> Result<Vec<u64>, VersionError> {
    // A CloudEvent's position is its `sequence` extension (a chain stage's input).
    if connector.is_none()
        && source.contains_key("specversion")
        && !source.contains_key("connector")
    {
        let sequence = source
            .get("sequence")
            .and_then(Value::as_str)
            .ok_or_else(|| VersionError::Missing {
                field: "sequence (the CloudEvents sequence extension cdcflow writes)".to_owned(),
            })?;
        return Version::from_sequence(sequence)
            .map(|version| version.components().to_vec())
            .ok_or_else(|| VersionError::Invalid {
                field: "sequence".to_owned(),
                found: format!("`{sequence}`"),
                expected: "`.`-separated hex (the sequence cdcflow writes)",
            });
    }
    let connector = match connector {
        Some(connector) => connector,
        None => {
            let name = source
                .get("connector")
                .and_then(Value::as_str)
                .ok_or_else(|| VersionError::Missing {
                    field: "source.connector".to_owned(),
                })?;
            Connector::from_source_name(name).ok_or_else(|| VersionError::UnknownConnector {
                name: name.to_owned(),
            })?
        }
    };
    match connector {
        Connector::Postgres => postgres_position(source),
        Connector::MySql => Ok(vec![
            binlog_file_index(source)?,
            unsigned(source, "pos", "source.pos")?,
            optional_unsigned(source, "row", "source.row")?.unwrap_or(0),
        ]),
        Connector::SqlServer => {
            let mut components = sqlserver_lsn(source, "commit_lsn")?
                .ok_or_else(|| VersionError::Missing {
                    field: "source.commit_lsn".to_owned(),
                })?
                .to_vec();
            components.extend(sqlserver_lsn(source, "change_lsn")?.unwrap_or([0; 3]));
            components.push(
                optional_unsigned(source, "event_serial_no", "source.event_serial_no")?
                    .unwrap_or(0),
            );
            Ok(components)
        }
        Connector::Oracle => Ok(vec![
            unsigned(source, "scn", "source.scn")?,
            optional_unsigned(source, "ssn", "source.ssn")?.unwrap_or(0),
        ]),
    }
}

/// Postgres: `[commit LSN, change LSN]`. `source.sequence` is JSON text
/// `["<last commit lsn>","<change lsn>"]`; its first element is null for snapshot reads, where
/// the snapshot LSN stands in for it so a later re-snapshot orders after earlier streaming.
fn postgres_position(source: &Map<String, Value>) -> Result<Vec<u64>, VersionError> {
    let mut commit = None;
    let mut change = optional_unsigned(source, "lsn", "source.lsn")?;
    if let Some(sequence) = source.get("sequence").filter(|value| !value.is_null()) {
        let invalid = || VersionError::Invalid {
            field: "source.sequence".to_owned(),
            found: sequence.to_string(),
            expected: "JSON text of a two-element array of LSN strings",
        };
        let text = sequence.as_str().ok_or_else(invalid)?;
        let parts: Vec<Option<String>> = serde_json::from_str(text).map_err(|_| invalid())?;
        let parse = |part: &Option<String>| -> Result<Option<u64>, VersionError> {
            part.as_deref()
                .map(|text| text.parse::<u64>().map_err(|_| invalid()))
                .transpose()
        };
        match parts.as_slice() {
            [last_commit, current] => {
                commit = parse(last_commit)?;
                change = change.or(parse(current)?);
            }
            _ => return Err(invalid()),
        }
    }
    let change = change.ok_or_else(|| VersionError::Missing {
        field: "source.lsn".to_owned(),
    })?;
    Ok(vec![commit.unwrap_or(change), change])
}

/// `mysql-bin.000042` -> 42: binlog files roll over with an increasing numeric suffix.
fn binlog_file_index(source: &Map<String, Value>) -> Result<u64, VersionError> {
    let file = source
        .get("file")
        .and_then(Value::as_str)
        .ok_or_else(|| VersionError::Missing {
            field: "source.file".to_owned(),
        })?;
    file.rsplit('.')
        .next()
        .and_then(|suffix| suffix.parse::<u64>().ok())
        .ok_or_else(|| VersionError::Invalid {
            field: "source.file".to_owned(),
            found: format!("`{file}`"),
            expected: "a binlog file name ending in a numeric suffix",
        })
}

/// SQL Server LSNs are three hex groups: `00000027:00000758:0005`.
fn sqlserver_lsn(
    source: &Map<String, Value>,
    field: &str,
) -> Result<Option<[u64; 3]>, VersionError> {
    let Some(value) = source.get(field).filter(|value| !value.is_null()) else {
        return Ok(None);
    };
    let invalid = || VersionError::Invalid {
        field: format!("source.{field}"),
        found: value.to_string(),
        expected: "an LSN like 00000027:00000758:0005",
    };
    let text = value.as_str().ok_or_else(invalid)?;
    let mut groups = [0u64; 3];
    let mut count = 0;
    for (slot, part) in groups.iter_mut().zip(text.split(':')) {
        *slot = u64::from_str_radix(part, 16).map_err(|_| invalid())?;
        count += 1;
    }
    if count != 3 || text.split(':').count() != 3 {
        return Err(invalid());
    }
    Ok(Some(groups))
}

fn unsigned(source: &Map<String, Value>, field: &str, path: &str) -> Result<u64, VersionError> {
    optional_unsigned(source, field, path)?.ok_or_else(|| VersionError::Missing {
        field: path.to_owned(),
    })
}

/// An unsigned integer given as a JSON number or as decimal text (Oracle writes SCNs as text).
fn optional_unsigned(
    source: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<u64>, VersionError> {
    match source.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) if number.as_u64().is_some() => Ok(number.as_u64()),
        Some(Value::String(text)) if text.parse::<u64>().is_ok() => Ok(text.parse().ok()),
        Some(other) => Err(VersionError::Invalid {
            field: path.to_owned(),
            found: other.to_string(),
            expected: "a non-negative integer",
        }),
    }
}

/// A signed integer column mapped onto `u64` preserving order (the sign bit flipped).
fn ordered_integer(value: &Value, column: &str) -> Result<u64, VersionError> {
    let signed = match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.parse::<i64>().ok(),
        _ => None,
    };
    signed
        .map(|signed| (signed as u64) ^ (1 << 63))
        .ok_or_else(|| VersionError::Invalid {
            field: column.to_owned(),
            found: value.to_string(),
            expected: "an integer (a version counter, or epoch-based time)",
        })
}
