//! Real databases, real Debezium, real Kafka: SQL changes in PostgreSQL and MariaDB captured
//! by Debezium's connectors on Kafka Connect, turned into business events by `cdcflow run`
//! with the example's pipelines (examples/shop.toml). tests/run-all.sh starts the stack once
//! (deploy/local/stack.sh); each test has its own database, connector and topics.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kafka_support::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const PLACEHOLDER: &str = "__debezium_unavailable_value";

/// One test's world: a database, a Debezium topic prefix, cdcflow's config and state.
struct Stack {
    /// Prefix of cdcflow's own topics (events, DLQ) in the example config.
    prefix: String,
    /// The connector's topic prefix: Debezium writes `<topics>.<schema>.<table>`.
    topics: String,
    database: String,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Stack {
    /// The example config over this test's Debezium topics (`<topics>.public.orders`), plus a
    /// rule on the TOASTed `notes` column that must fire only when notes really change.
    fn new(name: &str, source_schema: &str) -> Stack {
        let database = sql_name(name);
        let prefix = format!("{database}_");
        let topics = format!("{prefix}shop");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cdcflow.toml");
        let group = unique(&format!("{name}-group"));
        let mut text = shop_config(
            &prefix,
            &group,
            "a",
            "exactly_once",
            &dir.path().join("state.db"),
        );
        if source_schema != "public" {
            text = text.replace(".public.", &format!(".{source_schema}."));
        }
        text.push_str(&format!(
            "\n[[pipeline.rule]]\nname = \"notes_changed\"\nwhen = \"op == 'u' && old != null && 'notes' in changed\"\n\
             event_type = \"com.example.shop.CustomerNotesChanged\"\ntopic = \"{prefix}shop.customer-events\"\n\
             payload = {{ customer_id = \"after.id\", length = \"has(after.notes) && after.notes != null ? size(after.notes) : -1\" }}\n"
        ));
        std::fs::write(&config, text).unwrap();
        Stack {
            prefix,
            topics,
            database,
            dir,
            config,
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn start(&self, log: &str) -> Service {
        Service::start(&self.config, &self.dir.path().join(log))
    }

    fn group(&self) -> String {
        group_of(&self.config)
    }

    /// Waits until cdcflow has committed every record Debezium wrote to `inputs`.
    fn wait_caught_up(&self, inputs: &[String]) {
        for input in inputs {
            wait_caught_up(&self.group(), input, 2 * MINUTE);
        }
    }
}

/// (entity key, CloudEvents type, data) of the events on `topic`, read_committed.
fn business_events(topic: &str) -> Vec<(String, String, Value)> {
    read_topic(topic, "read_committed", 3_000)
        .iter()
        .map(|record| {
            let event = record.json();
            assert!(
                !record.value.contains(PLACEHOLDER),
                "an event carries Debezium's placeholder: {}",
                record.value
            );
            (
                record.key.clone(),
                event["type"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("com.example.shop.")
                    .to_owned(),
                event["data"].clone(),
            )
        })
        .collect()
}

/// Events per entity, in order: the guarantee downstream consumers rely on.
fn per_key(events: &[(String, String, Value)]) -> BTreeMap<String, Vec<(String, Value)>> {
    let mut grouped: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    for (key, event_type, data) in events {
        grouped
            .entry(key.clone())
            .or_default()
            .push((event_type.clone(), data.clone()));
    }
    grouped
}

fn expect(entries: &[(&str, &str, Value)]) -> BTreeMap<String, Vec<(String, Value)>> {
    let owned: Vec<(String, String, Value)> = entries
        .iter()
        .map(|(key, event_type, data)| ((*key).to_owned(), (*event_type).to_owned(), data.clone()))
        .collect();
    per_key(&owned)
}

/// The workload both databases run first: an insert, a multi-row transaction (an insert and a
/// transition), and a transition of a row the initial snapshot read (order 1000, shipped).
const SHARED_WORKLOAD: &str = "
    INSERT INTO orders (id, customer_id, status, amount) VALUES (1001, 7, 'pending', 120.00);
    BEGIN;
      INSERT INTO orders (id, customer_id, status, amount) VALUES (1002, 8, 'pending', 35.50);
      UPDATE orders SET status = 'paid' WHERE id = 1001;
    COMMIT;
    UPDATE orders SET status = 'cancelled' WHERE id = 1000;
";

/// The order events of [`SHARED_WORKLOAD`], followed by `more`.
fn shared_order_events<'a>(more: &[(&'a str, &'a str, Value)]) -> Vec<(&'a str, &'a str, Value)> {
    let mut events = vec![
        (
            "1000",
            "OrderCancelled",
            json!({"order_id": 1000, "from_status": "shipped", "amount": "42.00"}),
        ),
        (
            "1001",
            "OrderCreated",
            json!({"order_id": 1001, "customer_id": 7, "amount": "120.00", "status": "pending"}),
        ),
        (
            "1001",
            "OrderPaid",
            json!({"order_id": 1001, "amount": "120.00", "from_status": "pending"}),
        ),
        (
            "1002",
            "OrderCreated",
            json!({"order_id": 1002, "customer_id": 8, "amount": "35.50", "status": "pending"}),
        ),
    ];
    events.extend(more.iter().cloned());
    events
}

/// The shop workload on PostgreSQL (REPLICA IDENTITY DEFAULT): the initial snapshot of the seed
/// rows sets state without events (the example fires on `c` only); a multi-row transaction;
/// transitions computed from the stored image (Debezium sends `before: null`); an update that
/// leaves the TOASTed `notes` unchanged neither leaks the placeholder nor fires the notes rule;
/// a primary-key change (delete + tombstone + create); a delete; a TRUNCATE. Exactly the
/// expected events, in order per entity, and nothing in the DLQ.
#[test]
fn postgres_changes_become_exactly_the_expected_events() {
    let stack = Stack::new("pg", "public");
    postgres_database(&stack.database);
    register_connector(
        "postgres-shop.json",
        &[
            ("CDCFLOW_TOPIC_PREFIX", &stack.topics),
            ("CDCFLOW_PG_DATABASE", &stack.database),
        ],
    );
    let inputs = [
        format!("{}.public.orders", stack.topics),
        format!("{}.public.customers", stack.topics),
    ];
    for input in &inputs {
        wait_for_topic(input, MINUTE);
    }
    let service = stack.start("run.log");
    service.wait_for_log(ASSIGNED, MINUTE);
    let notes = "n".repeat(8_000);
    psql(
        &stack.database,
        &format!(
            "{SHARED_WORKLOAD}
             UPDATE customers SET notes = '{notes}' WHERE id = 7;
             UPDATE customers SET email = 'ada@new.example' WHERE id = 7;
             UPDATE orders SET amount = 130.00 WHERE id = 1001;
             UPDATE orders SET id = 2001 WHERE id = 1002;
             DELETE FROM orders WHERE id = 1001;
             TRUNCATE customers;
             INSERT INTO customers (id, email, name, credit_limit) VALUES (9, 'grace@example.com', 'Grace', 100.00);"
        ),
    );
    // The last change is visible once customer 9's registration is.
    wait_until("the last change's event", 2 * MINUTE, || {
        business_events(&stack.topic("shop.customer-events"))
            .iter()
            .any(|(key, event_type, _)| key == "9" && event_type == "CustomerRegistered")
    });
    stack.wait_caught_up(&inputs);
    let (_, metrics) = service.http_get("/metrics");
    assert!(service.stop(Duration::from_secs(30)).success());

    let orders = business_events(&stack.topic("shop.order-events"));
    assert_eq!(
        per_key(&orders),
        expect(&shared_order_events(&[
            (
                "1001",
                "OrderAmountChanged",
                json!({"order_id": 1001, "from": "120.00", "to": "130.00"})
            ),
            (
                "1001",
                "OrderDeleted",
                json!({"order_id": 1001, "last_status": "paid"})
            ),
            (
                "1002",
                "OrderDeleted",
                json!({"order_id": 1002, "last_status": "pending"})
            ),
            (
                "2001",
                "OrderCreated",
                json!({"order_id": 2001, "customer_id": 8, "amount": "35.50", "status": "pending"})
            ),
        ])),
        "order events: {orders:#?}"
    );
    let customers = business_events(&stack.topic("shop.customer-events"));
    let email = customers
        .iter()
        .find(|(_, event_type, _)| event_type == "CustomerEmailChanged")
        .map(|(_, _, data)| data.clone())
        .unwrap_or_else(|| panic!("no CustomerEmailChanged in {customers:#?}"));
    assert_eq!(email["from"], "ada@example.com");
    assert_eq!(email["to"], "ada@new.example");
    let types: Vec<(&str, &str)> = customers
        .iter()
        .map(|(key, event_type, _)| (key.as_str(), event_type.as_str()))
        .collect();
    assert_eq!(
        types,
        [
            ("7", "CustomerNotesChanged"),
            ("7", "CustomerEmailChanged"),
            ("9", "CustomerRegistered")
        ],
        "customer events: {customers:#?}"
    );
    assert_eq!(customers[0].2["length"], 8_000);
    assert!(
        read_topic(&stack.topic("dlq.orders"), "read_uncommitted", 2_000).is_empty(),
        "nothing goes to the orders DLQ"
    );
    // The snapshot reads were applied (they set the state the cancellation used) and the
    // TRUNCATE was a change of its own, not a failure.
    assert!(
        metrics.contains("cdcflow_decisions_total{decision=\"applied\",pipeline=\"orders\"}"),
        "{metrics}"
    );
    delete_connector(&format!("{}-postgres", stack.topics));
}

/// Debezium's schema-wrapped JSON of every type whose encoding matters (numeric, timestamptz,
/// timestamp, date, time, json, jsonb, uuid, bytea, arrays, enum, boolean) reaches the rules as
/// real values; an update of another column leaves the TOASTed ones as the placeholder, which
/// the rules never see.
#[test]
fn postgres_types_reach_rules_as_real_values() {
    let database = sql_name("types");
    postgres_database(&database);
    let topics = format!("{database}_types");
    register_connector(
        "postgres-shop-schemas.json",
        &[
            ("CDCFLOW_SCHEMAS_TOPIC_PREFIX", &topics),
            ("CDCFLOW_PG_DATABASE", &database),
        ],
    );
    let input = format!("{topics}.public.type_samples");
    wait_for_topic(&input, MINUTE);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("types.toml");
    let events = format!("{database}_type_events");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"{database}\"\ninstance_id = \"a\"\nbatch_max_wait = \"50ms\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\n[state]\npath = \"{}\"\n\n\
             [[pipeline]]\nname = \"types\"\ntopics = [\"{input}\"]\ndlq_topic = \"{database}_dlq\"\n\n\
             [[pipeline.rule]]\nname = \"sample\"\nwhen = \"op == 'r' || op == 'u'\"\nevent_type = \"TypeSample\"\ntopic = \"{events}\"\n\
             payload = {{ op = \"op\", price = \"after.price\", ratio = \"after.ratio\", happened_at = \"after.happened_at\", \
             local_at = \"after.local_at\", day = \"after.day\", at_time = \"after.at_time\", doc_a = \"after.doc.a\", \
             docb_k = \"has(after.docb) ? after.docb.k : null\", uid = \"after.uid\", blob = \"has(after.blob) ? after.blob : null\", \
             tags = \"has(after.tags) ? after.tags : null\", scores = \"has(after.scores) ? after.scores : null\", \
             mood = \"after.mood\", flag = \"after.flag\", big = \"has(after.big_text) ? size(after.big_text) : -1\", \
             changed = \"changed\" }}\n",
            bootstrap(),
            dir.path().join("state.db").display()
        ),
    )
    .unwrap();
    let service = Service::start(&config, &dir.path().join("run.log"));
    service.wait_for_log(ASSIGNED, MINUTE);
    let big = "b".repeat(9_000);
    psql(
        &database,
        &format!(
            "UPDATE type_samples SET big_text = '{big}', blob = decode(repeat('ab', 5000), 'hex'),
                 tags = array_fill('t'::text, ARRAY[900]), scores = array_fill(7, ARRAY[900]) WHERE id = 1;
             UPDATE type_samples SET counter = counter + 1 WHERE id = 1;"
        ),
    );
    let read = wait_for(&events, 3, 2 * MINUTE);
    wait_caught_up(&database, &input, 2 * MINUTE);
    assert!(service.stop(Duration::from_secs(30)).success());
    assert!(read_topic(&format!("{database}_dlq"), "read_uncommitted", 2_000).is_empty());
    let data: Vec<Value> = read
        .iter()
        .map(|record| record.json()["data"].clone())
        .collect();
    assert_eq!(data.len(), 3, "{data:#?}");
    let snapshot = &data[0];
    assert_eq!(snapshot["op"], "r");
    assert_eq!(snapshot["price"], "1234.5678");
    assert_eq!(snapshot["day"], "2024-11-25");
    assert_eq!(snapshot["uid"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(snapshot["doc_a"], 1, "json arrives as a document");
    assert_eq!(snapshot["docb_k"], "v", "jsonb arrives as a document");
    assert_eq!(snapshot["mood"], "happy");
    assert_eq!(snapshot["flag"], true);
    assert_eq!(snapshot["tags"], json!(["red", "green"]));
    assert_eq!(snapshot["scores"], json!([1, 2, 3]));
    assert!(
        snapshot["happened_at"]
            .as_str()
            .is_some_and(|t| t.starts_with("2024-11-25T09:58:00.123456")),
        "{snapshot}"
    );
    assert_eq!(snapshot["big"], 10, "{snapshot}");
    // The last update changed only `counter`: the TOASTed columns arrived as the placeholder
    // and the rules saw the stored values instead, so `changed` names counter alone.
    let last = &data[2];
    assert_eq!(last["big"], 9_000, "{last}");
    assert_eq!(last["tags"].as_array().map(Vec::len), Some(900), "{last}");
    assert_eq!(last["changed"], json!(["counter"]), "{last}");
    delete_connector(&format!("{topics}-postgres"));
}

/// The shop workload on MariaDB (binlog positions as versions): creates, a transition from
/// the snapshot's state, a multi-row transaction, a delete.
#[test]
fn mariadb_changes_become_exactly_the_expected_events() {
    let stack = Stack::new("maria", "DATABASE");
    mariadb_database(&stack.database);
    // MariaDB topics are <prefix>.<database>.<table>.
    let text = std::fs::read_to_string(&stack.config)
        .unwrap()
        .replace(".DATABASE.", &format!(".{}.", stack.database));
    std::fs::write(&stack.config, text).unwrap();
    let server_id = (std::process::id() % 100_000 + 200_000).to_string();
    register_connector(
        "mariadb-shop.json",
        &[
            ("CDCFLOW_MARIADB_TOPIC_PREFIX", &stack.topics),
            ("CDCFLOW_MARIADB_DATABASE", &stack.database),
            ("CDCFLOW_MARIADB_SERVER_ID", &server_id),
        ],
    );
    let inputs = [
        format!("{}.{}.orders", stack.topics, stack.database),
        format!("{}.{}.customers", stack.topics, stack.database),
    ];
    for input in &inputs {
        wait_for_topic(input, MINUTE);
    }
    let service = stack.start("run.log");
    service.wait_for_log(ASSIGNED, MINUTE);
    mariadb(
        &stack.database,
        &format!(
            "{SHARED_WORKLOAD}
             UPDATE customers SET email = 'ada@new.example' WHERE id = 7;
             DELETE FROM orders WHERE id = 1002;"
        ),
    );
    wait_until("the last change's event", 2 * MINUTE, || {
        business_events(&stack.topic("shop.order-events"))
            .iter()
            .any(|(key, event_type, _)| key == "1002" && event_type == "OrderDeleted")
    });
    stack.wait_caught_up(&inputs);
    assert!(service.stop(Duration::from_secs(30)).success());
    let orders = business_events(&stack.topic("shop.order-events"));
    assert_eq!(
        per_key(&orders),
        expect(&shared_order_events(&[(
            "1002",
            "OrderDeleted",
            json!({"order_id": 1002, "last_status": "pending"})
        ),])),
        "order events: {orders:#?}"
    );
    let customers = business_events(&stack.topic("shop.customer-events"));
    let types: Vec<&str> = customers.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(types, ["CustomerEmailChanged"], "{customers:#?}");
    delete_connector(&format!("{}-mariadb", stack.topics));
}

/// kill -9 of Kafka Connect after changes it streamed but had not flushed the offsets of:
/// the restarted connector re-sends them (the CDC topic holds repeats); then kill -9 of
/// cdcflow mid-workload and a restart: every event exactly once, in order per entity.
#[test]
fn connect_and_cdcflow_killed_mid_workload_emit_each_event_once() {
    let stack = Stack::new("kills", "public");
    postgres_database(&stack.database);
    let connector = format!("{}-postgres", stack.topics);
    register_connector(
        "postgres-shop.json",
        &[
            ("CDCFLOW_TOPIC_PREFIX", &stack.topics),
            ("CDCFLOW_PG_DATABASE", &stack.database),
        ],
    );
    let orders_input = format!("{}.public.orders", stack.topics);
    let inputs = [
        orders_input.clone(),
        format!("{}.public.customers", stack.topics),
    ];
    for input in &inputs {
        wait_for_topic(input, MINUTE);
    }
    let service = stack.start("run-1.log");
    service.wait_for_log(ASSIGNED, MINUTE);
    // Each order: created, paid and shipped (three changes, three events).
    let workload = |ids: std::ops::Range<u32>| {
        let mut sql = String::new();
        for id in ids {
            sql.push_str(&format!(
                "INSERT INTO orders (id, customer_id, status, amount) VALUES ({id}, 7, 'pending', 10.00);
                 UPDATE orders SET status = 'paid' WHERE id = {id};
                 UPDATE orders SET status = 'shipped' WHERE id = {id};\n"
            ));
        }
        sql
    };
    // The seed order's snapshot read, then 300 streamed changes.
    let mut changes = 1;
    let mut next = 5_000;
    psql(&stack.database, &workload(next..next + 100));
    (changes, next) = (changes + 300, next + 100);
    wait_until("the first changes are in Kafka", MINUTE, || {
        record_count(&orders_input) >= changes
    });
    // Streaming offsets flushed: a restart resumes from a streamed position, not a snapshot.
    wait_until("Connect flushed a streaming offset", MINUTE, || {
        connector_offsets(&connector).contains("lsn_proc")
    });
    // Changes streamed since the last flush are re-sent after a kill -9: kill only while
    // the flushed offsets are still those from before the batch.
    let mut killed = false;
    for _ in 0..5 {
        let flushed = connector_offsets(&connector);
        psql(&stack.database, &workload(next..next + 50));
        (changes, next) = (changes + 150, next + 50);
        wait_until("the batch is in Kafka", MINUTE, || {
            record_count(&orders_input) >= changes
        });
        if connector_offsets(&connector) == flushed {
            kill_and_restart_connect();
            killed = true;
            break;
        }
    }
    assert!(
        killed,
        "Connect flushed its offsets after every batch: no kill was aimed"
    );
    wait_for_connector_running(&connector, 2 * MINUTE);
    psql(&stack.database, &workload(next..next + 50));
    (changes, next) = (changes + 150, next + 50);
    wait_until(
        "Debezium re-sent what it had not flushed",
        2 * MINUTE,
        || record_count(&orders_input) > changes,
    );
    service.kill();
    psql(&stack.database, &workload(next..next + 50));
    (changes, next) = (changes + 150, next + 50);
    let service = stack.start("run-2.log");
    wait_until("every change is in Kafka", MINUTE, || {
        record_count(&orders_input) > changes
    });
    stack.wait_caught_up(&inputs);
    let (_, metrics) = service.http_get("/metrics");
    assert!(service.stop(Duration::from_secs(30)).success());
    let orders = business_events(&stack.topic("shop.order-events"));
    let grouped = per_key(&orders);
    assert_eq!(grouped.len(), (next - 5_000) as usize, "{orders:#?}");
    for id in 5_000..next {
        let types: Vec<&str> = grouped
            .get(&id.to_string())
            .map(|events| events.iter().map(|(t, _)| t.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            types,
            ["OrderCreated", "OrderPaid", "OrderShipped"],
            "order {id}"
        );
    }
    eprintln!(
        "{} CDC records for {changes} changes; after the restart cdcflow counted {}",
        record_count(&orders_input),
        metrics
            .lines()
            .filter(|line| line.starts_with("cdcflow_decisions_total{decision=\"duplicate\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_no_hanging_transaction(&stack.topic("shop.order-events"));
    delete_connector(&connector);
}
