//! Golden tests: realistic Debezium records decoded to exact values.
//!
//! Each fixture under `tests/fixtures/debezium/` is `{"description", "topic", "key", "value"}`,
//! with the Kafka key and value as JSON (`null` for a Kafka null), modelled on the change-event
//! examples in the Debezium connector documentation. The descriptions say how each record was
//! produced and, for the schema-wrapped update, which converted values to expect.

#[path = "common/checkout.rs"]
mod checkout;
use checkout::root;

use serde_json::{Map, Value, json};

use cdcflow::cdc::{
    Change, DecodeLimits, Decoded, Decoder, EnvelopeFormat, Header, Op, RawRecord, SkipReason,
};
use cdcflow::engine::{Connector, Version, VersionSource, VersionSpec};

fn fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures/debezium").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// A Kafka record; a JSON `null` key or value is a Kafka null.
fn record(topic: &str, key: &Value, value: &Value) -> RawRecord {
    let bytes = |part: &Value| (!part.is_null()).then(|| serde_json::to_vec(part).unwrap());
    RawRecord {
        topic: topic.to_owned(),
        partition: 0,
        offset: 0,
        key: bytes(key),
        value: bytes(value),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn fixture_record(fixture: &Value) -> RawRecord {
    record(
        fixture["topic"].as_str().unwrap(),
        &fixture["key"],
        &fixture["value"],
    )
}

fn decode(record: &RawRecord) -> Decoded {
    Decoder::default().decode(record).expect("record decodes")
}

fn decode_change(fixture: &Value) -> Change {
    match decode(&fixture_record(fixture)) {
        Decoded::Change(change) => *change,
        other => panic!("expected a change, got {other:?}"),
    }
}

/// The fixture decoded with `fields` overwritten in its `source` block: a later change.
fn edited(fixture: &Value, fields: Value) -> Change {
    let mut fixture = fixture.clone();
    let source = fixture["value"]["source"].as_object_mut().unwrap();
    for (name, value) in fields.as_object().unwrap() {
        source.insert(name.clone(), value.clone());
    }
    decode_change(&fixture)
}

fn version_by(source: VersionSource, change: &Change) -> Version {
    let spec = VersionSpec {
        source,
        snapshot_column: None,
    };
    spec.extract(change)
        .expect("version extracts")
        .expect("version present")
}

/// The source-position version, the connector detected from `source.connector`.
fn position(change: &Change) -> Version {
    version_by(VersionSource::SourcePosition(None), change)
}

fn image(row: &Option<Map<String, Value>>) -> &Map<String, Value> {
    row.as_ref().expect("row image present")
}

// ------------------------------------------------------------------------------- PostgreSQL

/// A Postgres create without a schema keeps raw values and orders by [sequence[0], lsn].
#[test]
fn postgres_create_without_schema() {
    let change = decode_change(&fixture("postgres/create_no_schema.json"));
    assert_eq!(change.op, Op::Create);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(change.before, None);
    let after = image(&change.after);
    assert_eq!(after["status"], "pending");
    assert_eq!(after["amount"], "120.00");
    // Without the schema wrapper the MicroTimestamp stays the raw integer.
    assert_eq!(after["created_at"], 1_710_495_000_123_456i64);
    assert_eq!(after["ship_date"], Value::Null);
    assert_eq!(change.source["connector"], "postgresql");
    assert_eq!(change.source["table"], "orders");
    assert_eq!(change.source["sequence"], r#"["24023800","24023928"]"#);
    assert_eq!(change.transaction_id.as_deref(), Some("771"));
    assert_eq!(change.source_ts_ms(), Some(1_710_495_000_125));
    assert_eq!(change.envelope_ts_ms, Some(1_710_495_000_456));
    assert_eq!(position(&change).components(), [24_023_800, 24_023_928]);
}

/// A REPLICA IDENTITY DEFAULT update carries no before image.
#[test]
fn postgres_update_with_default_identity_has_no_before() {
    let change = decode_change(&fixture("postgres/update_default_identity.json"));
    assert_eq!(change.op, Op::Update);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(change.before, None);
    assert_eq!(image(&change.after)["status"], "shipped");
    assert_eq!(change.transaction_id.as_deref(), Some("774"));
    assert_eq!(change.source_ts_ms(), Some(1_710_597_912_300));
    assert_eq!(position(&change).components(), [24_024_400, 24_024_512]);
}

/// A REPLICA IDENTITY FULL update carries both images, at the same position as with DEFAULT.
#[test]
fn postgres_update_with_full_identity_has_both_images() {
    let change = decode_change(&fixture("postgres/update_full_identity.json"));
    assert_eq!(change.op, Op::Update);
    assert_eq!(change.key.as_str(), "1001");
    let (before, after) = (image(&change.before), image(&change.after));
    assert_eq!(before["status"], "pending");
    assert_eq!(before["amount"], "120.00");
    assert_eq!(before["ship_date"], Value::Null);
    assert_eq!(after["status"], "shipped");
    assert_eq!(after["amount"], "330.00");
    assert_eq!(after["ship_date"], 19_800);
    let default_identity = decode_change(&fixture("postgres/update_default_identity.json"));
    assert_eq!(position(&change), position(&default_identity));
}

/// With the schema wrapper, Decimal, MicroTimestamp and Date become exact text; nothing else moves.
#[test]
fn postgres_schema_wrapped_update_converts_logical_types() {
    let wrapped = decode_change(&fixture("postgres/with_schema_update.json"));
    let before = image(&wrapped.before);
    assert_eq!(before["amount"], "120.00");
    assert_eq!(before["created_at"], "2024-03-15T09:30:00.123456");
    assert_eq!(before["ship_date"], Value::Null);
    let after = image(&wrapped.after);
    assert_eq!(after["amount"], "330.00");
    assert_eq!(after["created_at"], "2024-03-15T09:30:00.123456");
    assert_eq!(after["ship_date"], "2024-03-18");
    assert_eq!(after["status"], "shipped");
    assert_eq!(after["id"], 1001);

    let plain = decode_change(&fixture("postgres/update_full_identity.json"));
    assert_eq!(wrapped.op, plain.op);
    assert_eq!(wrapped.key.as_str(), plain.key.as_str());
    assert_eq!(wrapped.source, plain.source);
    assert_eq!(wrapped.transaction_id, plain.transaction_id);
    assert_eq!(wrapped.envelope_ts_ms, plain.envelope_ts_ms);
    assert_eq!(position(&wrapped), position(&plain));
    assert_eq!(position(&wrapped).components(), [24_024_400, 24_024_512]);
}

/// A REPLICA IDENTITY DEFAULT delete has a before image holding only the key.
#[test]
fn postgres_delete_with_default_identity_keeps_only_the_key() {
    let change = decode_change(&fixture("postgres/delete_default_identity.json"));
    assert_eq!(change.op, Op::Delete);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(change.after, None);
    let expected = json!({"id": 1001, "customer_id": null, "status": null, "amount": null,
                          "created_at": null, "ship_date": null});
    assert_eq!(Value::Object(image(&change.before).clone()), expected);
    assert_eq!(change.transaction_id.as_deref(), Some("780"));
    assert_eq!(change.source_ts_ms(), Some(1_710_921_600_000));
    assert_eq!(position(&change).components(), [24_025_500, 24_025_600]);
}

/// A null value after a delete is a tombstone, skipped rather than failed.
#[test]
fn postgres_tombstone_is_skipped() {
    let record = fixture_record(&fixture("postgres/tombstone.json"));
    assert!(record.key.is_some());
    assert_eq!(decode(&record), Decoded::Skip(SkipReason::Tombstone));
}

/// A snapshot read (sequence `[null, lsn]`) takes [lsn, lsn] and orders before later streaming.
#[test]
fn postgres_snapshot_read_is_versioned_at_the_snapshot_lsn() {
    let change = decode_change(&fixture("postgres/snapshot_read.json"));
    assert_eq!(change.op, Op::Read);
    assert_eq!(change.key.as_str(), "1000");
    assert_eq!(change.before, None);
    assert_eq!(image(&change.after)["status"], "delivered");
    assert_eq!(change.source["snapshot"], "true");
    assert_eq!(change.transaction_id.as_deref(), Some("760"));
    assert_eq!(change.source_ts_ms(), Some(1_710_460_798_000));
    assert_eq!(position(&change).components(), [23_912_440, 23_912_440]);
    let streamed = decode_change(&fixture("postgres/create_no_schema.json"));
    assert!(position(&change) < position(&streamed));
}

/// A primary-key update is a delete and a create of two entities at one position.
#[test]
fn postgres_primary_key_change_is_a_delete_and_a_create_at_one_position() {
    let with_header = |name: &str, header: &str, key: &str| {
        let mut record = fixture_record(&fixture(name));
        record.headers.push(Header {
            name: header.to_owned(),
            value: Some(key.as_bytes().to_vec()),
        });
        match decode(&record) {
            Decoded::Change(change) => *change,
            other => panic!("expected a change, got {other:?}"),
        }
    };
    let delete = with_header(
        "postgres/pk_change_delete.json",
        "__debezium.newkey",
        r#"{"id":6}"#,
    );
    let create = with_header(
        "postgres/pk_change_create.json",
        "__debezium.oldkey",
        r#"{"id":5}"#,
    );
    assert_eq!(delete.op, Op::Delete);
    assert_eq!(create.op, Op::Create);
    assert_eq!(delete.key.as_str(), "5");
    assert_eq!(create.key.as_str(), "6");
    assert_ne!(delete.key.as_str(), create.key.as_str());
    assert_eq!(image(&delete.before)["id"], 5);
    assert_eq!(delete.after, None);
    assert_eq!(image(&create.after)["id"], 6);
    assert_eq!(create.before, None);
    assert_eq!(delete.transaction_id.as_deref(), Some("790"));
    assert_eq!(create.transaction_id, delete.transaction_id);
    assert_eq!(position(&delete).components(), [24_026_000, 24_026_100]);
    assert_eq!(position(&delete), position(&create));
}

/// A truncate has the empty table-level key, no images, and the table's position.
#[test]
fn postgres_truncate_is_a_table_level_change() {
    let change = decode_change(&fixture("postgres/truncate.json"));
    assert_eq!(change.op, Op::Truncate);
    assert_eq!(change.op.code(), "t");
    assert_eq!(change.key.as_str(), "");
    assert_eq!(change.before, None);
    assert_eq!(change.after, None);
    assert_eq!(change.source["table"], "orders");
    assert_eq!(change.transaction_id.as_deref(), Some("795"));
    assert_eq!(change.source_ts_ms(), Some(1_711_087_200_000));
    assert_eq!(position(&change).components(), [24_026_900, 24_027_000]);
}

/// A logical decoding message (op m) is skipped, not a change and not an error.
#[test]
fn postgres_logical_message_is_skipped() {
    let record = fixture_record(&fixture("postgres/message.json"));
    assert_eq!(decode(&record), Decoded::Skip(SkipReason::LogicalMessage));
}

// ------------------------------------------------------------------------------------ MySQL

/// MySQL versions are [binlog file index, pos, row]; a later file wins over a higher pos.
#[test]
fn mysql_update_is_versioned_by_binlog_coordinates() {
    let update = fixture("mysql/update.json");
    let change = decode_change(&update);
    assert_eq!(change.op, Op::Update);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(image(&change.before)["status"], "pending");
    assert_eq!(image(&change.after)["status"], "shipped");
    assert_eq!(change.source["connector"], "mysql");
    assert_eq!(change.source["server_id"], 223_344);
    assert_eq!(
        change.transaction_id.as_deref(),
        Some("3e11fa47-71ca-11e1-9e33-c80aa9429562:23")
    );
    assert_eq!(change.source_ts_ms(), Some(1_710_597_912_000));
    let version = position(&change);
    assert_eq!(version.components(), [3, 4331, 0]);

    let next_row = position(&edited(&update, json!({"row": 1})));
    assert_eq!(next_row.components(), [3, 4331, 1]);
    assert!(next_row > version);
    let next_event = position(&edited(&update, json!({"pos": 4520})));
    assert_eq!(next_event.components(), [3, 4520, 0]);
    assert!(next_event > next_row);
    let next_file = position(&edited(
        &update,
        json!({"file": "mysql-bin.000004", "pos": 154}),
    ));
    assert_eq!(next_file.components(), [4, 154, 0]);
    assert!(next_file > next_event);
}

/// A MySQL snapshot read has the snapshot's binlog coordinates and no transaction id.
#[test]
fn mysql_snapshot_read_orders_before_streaming() {
    let change = decode_change(&fixture("mysql/snapshot_read.json"));
    assert_eq!(change.op, Op::Read);
    assert_eq!(change.key.as_str(), "1000");
    assert_eq!(image(&change.after)["status"], "delivered");
    assert_eq!(change.source["snapshot"], "true");
    assert_eq!(change.transaction_id, None);
    assert_eq!(change.source_ts_ms(), Some(1_710_460_740_000));
    assert_eq!(position(&change).components(), [3, 154, 0]);
    let streamed = decode_change(&fixture("mysql/update.json"));
    assert!(position(&change) < position(&streamed));
}

// ------------------------------------------------------------------------------- SQL Server

/// SQL Server versions are [commit_lsn groups, change_lsn groups, event_serial_no].
#[test]
fn sqlserver_update_is_versioned_by_commit_change_and_serial() {
    let update = fixture("sqlserver/update.json");
    let change = decode_change(&update);
    assert_eq!(change.op, Op::Update);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(image(&change.before)["status"], "pending");
    assert_eq!(image(&change.after)["status"], "shipped");
    // The envelope's transaction block wins; SQL Server's source has no txId.
    assert_eq!(
        change.transaction_id.as_deref(),
        Some("00000027:00000758:0005")
    );
    assert_eq!(change.source_ts_ms(), Some(1_710_597_912_300));
    let version = position(&change);
    assert_eq!(version.components(), [0x27, 0x758, 5, 0x27, 0x758, 3, 2]);

    let next_serial = position(&edited(&update, json!({"event_serial_no": 3})));
    assert_eq!(
        next_serial.components(),
        [0x27, 0x758, 5, 0x27, 0x758, 3, 3]
    );
    assert!(next_serial > version);
    let next_change = position(&edited(
        &update,
        json!({"change_lsn": "00000027:00000758:0004", "event_serial_no": 1}),
    ));
    assert!(next_change > next_serial);
    let next_commit = position(&edited(
        &update,
        json!({"commit_lsn": "00000028:00000010:0002", "change_lsn": "00000028:00000010:0001",
               "event_serial_no": 1}),
    ));
    assert_eq!(next_commit.components(), [0x28, 0x10, 2, 0x28, 0x10, 1, 1]);
    assert!(next_commit > next_change);
}

/// A SQL Server snapshot read (null change_lsn and serial) orders by its commit_lsn alone.
#[test]
fn sqlserver_snapshot_read_has_zero_change_components() {
    let change = decode_change(&fixture("sqlserver/snapshot_read.json"));
    assert_eq!(change.op, Op::Read);
    assert_eq!(change.key.as_str(), "1000");
    assert_eq!(change.source["change_lsn"], Value::Null);
    assert_eq!(change.transaction_id, None);
    assert_eq!(position(&change).components(), [0x27, 0x740, 1, 0, 0, 0, 0]);
    let streamed = decode_change(&fixture("sqlserver/update.json"));
    assert!(position(&change) < position(&streamed));
}

// ----------------------------------------------------------------------------------- Oracle

/// Oracle versions are [scn, ssn] read from decimal text; txId is the transaction id.
#[test]
fn oracle_update_is_versioned_by_scn_and_ssn() {
    let update = fixture("oracle/update.json");
    let change = decode_change(&update);
    assert_eq!(change.op, Op::Update);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(image(&change.before)["STATUS"], "PENDING");
    assert_eq!(image(&change.after)["STATUS"], "SHIPPED");
    assert_eq!(change.source["commit_scn"], "2868552");
    assert_eq!(change.transaction_id.as_deref(), Some("13000c0045020000"));
    assert_eq!(change.source_ts_ms(), Some(1_710_597_912_000));
    let version = position(&change);
    assert_eq!(version.components(), [2_868_546, 1]);

    let next_scn = position(&edited(&update, json!({"scn": "2868560", "ssn": 0})));
    assert_eq!(next_scn.components(), [2_868_560, 0]);
    assert!(next_scn > version);
}

// -------------------------------------------------------------------------------- Flattened

/// A flattened update is the after row; `__` fields rebuild the source block.
#[test]
fn flattened_update_rebuilds_source_from_metadata_fields() {
    let fixture = fixture("flattened/update.json");
    let change = decode_change(&fixture);
    assert_eq!(change.op, Op::Update);
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(change.before, None);
    let after = image(&change.after);
    assert_eq!(after["status"], "shipped");
    assert_eq!(after["amount"], "330.00");
    assert!(
        after.keys().all(|name| !name.starts_with("__")),
        "{after:?}"
    );
    assert_eq!(change.source["table"], "orders");
    assert_eq!(change.source["lsn"], 24_024_512);
    assert_eq!(change.source["ts_ms"], 1_710_597_912_300i64);
    assert_eq!(change.source_ts_ms(), Some(1_710_597_912_300));
    assert_eq!(change.envelope_ts_ms, None);
    assert_eq!(change.transaction_id, None);

    // No `source.connector` survives flattening: the connector must be named.
    let spec = VersionSpec {
        source: VersionSource::SourcePosition(None),
        snapshot_column: None,
    };
    assert!(spec.extract(&change).is_err());
    let postgres = VersionSource::SourcePosition(Some(Connector::Postgres));
    assert_eq!(
        version_by(postgres, &change).components(),
        [24_024_512, 24_024_512]
    );
    assert_eq!(
        version_by(VersionSource::TsMs, &change).components(),
        [1_710_597_912_300]
    );

    let explicit = Decoder::new(
        DecodeLimits::default(),
        EnvelopeFormat::Flattened,
        Vec::new(),
    );
    let record = fixture_record(&fixture);
    assert_eq!(explicit.decode(&record).unwrap(), decode(&record));
}

/// A rewritten flattened delete (`__deleted` "true") is a delete whose row is the before image.
#[test]
fn flattened_rewrite_delete_is_a_delete_of_the_before_row() {
    let change = decode_change(&fixture("flattened/delete_rewrite.json"));
    assert_eq!(change.op, Op::Delete);
    assert_eq!(change.op.code(), "d");
    assert_eq!(change.key.as_str(), "1001");
    assert_eq!(change.after, None);
    let before = image(&change.before);
    assert_eq!(before["id"], 1001);
    assert_eq!(before["status"], "shipped");
    assert!(!before.contains_key("__deleted"));
    assert_eq!(change.source["lsn"], 24_025_600);
    assert_eq!(change.source_ts_ms(), Some(1_710_921_600_000));
    let postgres = VersionSource::SourcePosition(Some(Connector::Postgres));
    let version = version_by(postgres.clone(), &change);
    assert_eq!(version.components(), [24_025_600, 24_025_600]);
    let update = decode_change(&fixture("flattened/update.json"));
    assert!(version > version_by(postgres, &update));
}

/// The JsonConverter's own text (`schema` before `payload`, compact) of a fixture's value.
fn converter_text(value: &Value) -> Vec<u8> {
    format!(
        r#"{{"schema":{},"payload":{}}}"#,
        value["schema"], value["payload"]
    )
    .into_bytes()
}

/// A decoder that has seen a schema reads the next record's payload without scanning the
/// schema again: the change is the same as on first sight, and so is the error of a payload
/// that is broken after a known schema.
#[test]
fn a_schema_seen_before_decodes_the_same() {
    let fixture = fixture("postgres/with_schema_update.json");
    let mut record = fixture_record(&fixture);
    record.value = Some(converter_text(&fixture["value"]));
    let decoder = Decoder::default();
    let first = decoder.decode(&record).expect("first decode");
    let again = decoder.decode(&record).expect("second decode");
    assert_eq!(first, again);
    assert_eq!(first, Decoder::default().decode(&record).unwrap());

    let text = String::from_utf8(record.value.clone().unwrap()).unwrap();
    for broken in [
        text.replace(r#""op":"u""#, r#""op":7"#),
        text[..text.len() - 2].to_owned(),
        text.replace(r#","payload":"#, r#","payload":{"x":1},"extra":"#),
    ] {
        record.value = Some(broken.into_bytes());
        let fresh = Decoder::default().decode(&record).unwrap_err().to_string();
        let warm = decoder.decode(&record).unwrap_err().to_string();
        assert_eq!(warm, fresh);
    }
}
