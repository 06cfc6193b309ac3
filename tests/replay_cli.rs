//! End-to-end tests of the `cdcflow` binary: `replay` on the example files, `check`, and the
//! JSON Schemas validated against real outputs.

#[path = "common/checkout.rs"]
mod checkout;
use checkout::root;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

fn cdcflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cdcflow"));
    command.current_dir(root()).env_remove("CDCFLOW_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("CDCFLOW__") {
            command.env_remove(name);
        }
    }
    command
}

fn example_inputs() -> Vec<PathBuf> {
    [
        "examples/input/orders.jsonl",
        "examples/input/customers.jsonl",
    ]
    .iter()
    .map(PathBuf::from)
    .collect()
}

/// Runs `replay` on the example with the given state file and extra arguments.
fn replay(state: &Path, inputs: &[PathBuf], envs: &[(&str, &str)]) -> (Vec<Value>, String) {
    let output: Output = cdcflow()
        .args(["replay", "--config", "examples/shop.toml", "--state"])
        .arg(state)
        .args(inputs)
        .envs(envs.iter().copied())
        .output()
        .expect("cdcflow runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "replay failed: {stderr}");
    let lines = String::from_utf8(output.stdout)
        .expect("stdout is UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each output line is JSON"))
        .collect();
    (lines, stderr)
}

fn of_kind<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|line| line["kind"] == kind).collect()
}

fn payload(line: &Value) -> Value {
    serde_json::from_str(line["payload"].as_str().expect("payload is text"))
        .expect("payload is JSON")
}

fn schema(name: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(root().join("schemas").join(name)).expect("schema exists");
    jsonschema::validator_for(&serde_json::from_str(&text).expect("schema is JSON"))
        .expect("schema compiles")
}

fn assert_valid(validator: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{instance} is invalid: {errors:?}");
}

/// The example replays into exactly the expected business events, keyed by entity, in order per
/// entity, each valid against the business-event schema; bad records land in the DLQ.
#[test]
fn example_replay_emits_the_expected_events() {
    let state = tempfile::tempdir().unwrap();
    let (lines, stderr) = replay(&state.path().join("state.db"), &example_inputs(), &[]);
    let event_schema = schema("business-event.schema.json");
    let events: Vec<(String, String, String, Value)> = of_kind(&lines, "event")
        .into_iter()
        .map(|line| {
            let event = payload(line);
            assert_valid(&event_schema, &event);
            assert_eq!(
                line["key"], event["partitionkey"],
                "Kafka key is the entity key"
            );
            (
                line["topic"].as_str().unwrap().to_owned(),
                line["key"].as_str().unwrap().to_owned(),
                event["type"].as_str().unwrap().to_owned(),
                event["data"].clone(),
            )
        })
        .collect();
    let expected = vec![
        (
            "shop.order-events",
            "1001",
            "com.example.shop.OrderCreated",
            json!({"order_id": 1001, "customer_id": 7, "amount": "120.00", "status": "pending"}),
        ),
        (
            "shop.order-events",
            "1002",
            "com.example.shop.OrderCreated",
            json!({"order_id": 1002, "customer_id": 8, "amount": "75.50", "status": "pending"}),
        ),
        (
            "shop.order-events",
            "1001",
            "com.example.shop.OrderPaid",
            json!({"order_id": 1001, "amount": "120.00", "from_status": "pending"}),
        ),
        (
            "shop.order-events",
            "1002",
            "com.example.shop.OrderAmountChanged",
            json!({"order_id": 1002, "from": "75.50", "to": "80.00"}),
        ),
        (
            "shop.order-events",
            "1001",
            "com.example.shop.OrderShipped",
            json!({"order_id": 1001, "from_status": "paid"}),
        ),
        (
            "shop.order-events",
            "1002",
            "com.example.shop.OrderCancelled",
            json!({"order_id": 1002, "from_status": "pending", "amount": "80.00"}),
        ),
        (
            "shop.order-events",
            "1003",
            "com.example.shop.OrderCreated",
            json!({"order_id": 1003, "customer_id": 9, "amount": "15.00", "status": "pending"}),
        ),
        (
            "shop.order-events",
            "1003",
            "com.example.shop.OrderDeleted",
            json!({"order_id": 1003, "last_status": "pending"}),
        ),
        (
            "shop.customer-events",
            "7",
            "com.example.shop.CustomerRegistered",
            json!({"customer_id": 7, "email": "ada@example.com", "credit_limit": "1500.00", "birth_date": "1835-11-05"}),
        ),
        (
            "shop.customer-events",
            "7",
            "com.example.shop.CustomerEmailChanged",
            json!({"customer_id": 7, "from": "ada@example.com", "to": "ada.lovelace@example.com", "at": "2024-11-25T10:00:05.000000"}),
        ),
        (
            "shop.customer-events",
            "7",
            "com.example.shop.CustomerCreditLimitChanged",
            json!({"customer_id": 7, "from": "1500.00", "to": "2500.00"}),
        ),
        (
            "shop.customer-events",
            "8",
            "com.example.shop.CustomerRegistered",
            json!({"customer_id": 8, "email": "alan@example.com", "credit_limit": "900.00", "birth_date": "1915-03-31"}),
        ),
        (
            "shop.customer-events",
            "8",
            "com.example.shop.CustomerDeleted",
            json!({"customer_id": 8}),
        ),
    ];
    let expected: Vec<(String, String, String, Value)> = expected
        .into_iter()
        .map(|(topic, key, kind, data)| (topic.to_owned(), key.to_owned(), kind.to_owned(), data))
        .collect();
    assert_eq!(events, expected);

    let dlq_schema = schema("dlq-record.schema.json");
    let dlq = of_kind(&lines, "dlq");
    assert_eq!(dlq.len(), 2);
    for record in &dlq {
        assert_valid(&dlq_schema, record);
    }
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|record| {
            let headers = record["headers"].as_array().unwrap();
            let at = headers
                .iter()
                .position(|h| h == "cdcflow.error.reason")
                .unwrap();
            headers[at + 1].as_str().unwrap()
        })
        .collect();
    assert_eq!(reasons, ["truncated_json", "unknown_op"]);
    assert_eq!(
        of_kind(&lines, "audit").len(),
        2,
        "one duplicate and one stale change audited"
    );
    assert!(
        stderr.contains("decisions: applied 15, duplicate 1, stale 1"),
        "{stderr}"
    );
    assert!(stderr.contains("events: 13  dlq records: 2"), "{stderr}");
}

/// Replaying the same input against the same state file emits no event the second time.
#[test]
fn second_replay_emits_nothing() {
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("state.db");
    let (first, _) = replay(&path, &example_inputs(), &[]);
    assert_eq!(of_kind(&first, "event").len(), 13);
    let (second, stderr) = replay(&path, &example_inputs(), &[]);
    assert!(of_kind(&second, "event").is_empty(), "{second:#?}");
    assert!(stderr.contains("applied 0"), "{stderr}");
}

/// Event ids are deterministic: two fresh runs give the same ids.
#[test]
fn event_ids_are_stable_across_runs() {
    let ids = |dir: &tempfile::TempDir| -> Vec<String> {
        let (lines, _) = replay(&dir.path().join("s.db"), &example_inputs(), &[]);
        of_kind(&lines, "event")
            .into_iter()
            .map(|line| payload(line)["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(ids(&a), ids(&b));
}

/// A malformed replay input line is reported with its line number and skipped.
#[test]
fn malformed_input_lines_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    let orders = std::fs::read_to_string(root().join("examples/input/orders.jsonl")).unwrap();
    let mut lines: Vec<&str> = orders.lines().collect();
    lines.insert(2, "this is not json");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (output, stderr) = replay(&dir.path().join("s.db"), &[input], &[]);
    assert!(
        stderr.contains("input line 3: skipped: not a kcat JSON record"),
        "{stderr}"
    );
    assert!(stderr.contains("malformed input lines: 1"), "{stderr}");
    assert_eq!(
        of_kind(&output, "event").len(),
        8,
        "every order event is still produced"
    );
}

/// Binary mode, chosen by an environment override, puts attributes in `ce_` headers.
#[test]
fn binary_mode_uses_ce_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, _) = replay(
        &dir.path().join("s.db"),
        &example_inputs()[..1],
        &[("CDCFLOW__EVENTS__MODE", "binary")],
    );
    let first = of_kind(&lines, "event")[0];
    let headers: Vec<&str> = first["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    for name in [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "ce_sequence",
        "ce_partitionkey",
        "ce_causationid",
        "ce_correlationid",
    ] {
        assert!(headers.contains(&name), "{name} missing from {headers:?}");
    }
    assert_eq!(
        payload(first),
        json!({"order_id": 1001, "customer_id": 7, "amount": "120.00", "status": "pending"})
    );
}

/// `check` prints the compiled pipelines of a valid config.
#[test]
fn check_prints_compiled_pipelines() {
    let output = cdcflow()
        .args(["check", "--config", "examples/shop.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("2 pipeline(s)"), "{stdout}");
    assert!(
        stdout.contains("rule `paid` -> com.example.shop.OrderPaid"),
        "{stdout}"
    );
}

/// A bad config stops start-up with the key and what would be valid.
#[test]
fn bad_config_names_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n[pipeline.version]\nby = \"position\"\n",
            "config key `pipeline[0].version.by`: unknown variant `position`, expected one of `source_position`, `column`, `ts_ms`",
        ),
        (
            "[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\ntopicz = [\"t\"]\n",
            "unknown field `topicz`",
        ),
        (
            "[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n[pipeline.version]\nby = \"column\"\n",
            "config key `pipeline[0].version.column`: version.by = \"column\" needs the column",
        ),
        (
            "[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n[[pipeline.rule]]\nname = \"paid\"\nwhen = \"after.status == \"\nevent_type = \"X\"\ntopic = \"e\"\n",
            "pipeline `o`, rule `paid`, when:",
        ),
        ("[state]\npath = \"x.db\"\n", "no pipeline is defined"),
        (
            "[http]\nlisten = \"localhost:http\"\n[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n",
            "config key `http.listen`: invalid socket address syntax",
        ),
        (
            "[kafka]\nproducer = { \"transaction.timeout.ms\" = \"60000\" }\n[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n",
            "config key `kafka.producer.\"transaction.timeout.ms\"`: cdcflow manages this property to keep its delivery guarantee: set kafka.transaction_timeout instead",
        ),
        (
            "[kafka.security]\nprotocol = \"sasl_ssl\"\nusername = \"u\"\npassword_env = \"P\"\n[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n",
            "config key `kafka.security.sasl_mechanism`: protocol `sasl_ssl` needs a SASL mechanism",
        ),
        (
            "[kafka]\nconsumer = { \"sasl.password\" = \"hunter2\" }\n[[pipeline]]\nname = \"o\"\ntopics = [\"t\"]\n",
            "keep it out of the config: set kafka.security.password_env or password_file",
        ),
    ];
    for (index, (config, message)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{index}.toml"));
        std::fs::write(&path, config).unwrap();
        let output = cdcflow()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "case {index} was accepted");
        assert!(
            stderr.contains(message),
            "case {index}: `{stderr}` lacks `{message}`"
        );
    }
}

/// The example config is valid against the config JSON Schema, and an unknown key is not.
#[test]
fn config_schema_matches_the_example() {
    let validator = schema("config.schema.json");
    let text = std::fs::read_to_string(root().join("examples/shop.toml")).unwrap();
    let config: Value =
        serde_json::to_value(toml::from_str::<toml::Table>(&text).unwrap()).unwrap();
    assert_valid(&validator, &config);
    let mut wrong = config.clone();
    wrong["pipeline"][0]["topicz"] = json!(["x"]);
    assert!(!validator.is_valid(&wrong));
    // The README's [kafka] section is valid; a property the runtime manages is not.
    let mut with_kafka = config.clone();
    with_kafka["kafka"] = json!({
        "bootstrap_servers": "kafka-1:9092,kafka-2:9092", "group_id": "shop-events",
        "instance_id": "cdcflow-0", "delivery": "exactly_once", "batch_max_records": 10000,
        "batch_max_bytes": 33554432, "batch_max_wait": "100ms", "transaction_timeout": "10s",
        "consumer": {"session.timeout.ms": "10000"}, "producer": {"compression.type": "zstd"}
    });
    assert_valid(&validator, &with_kafka);
    // The README's secured-cluster examples are valid too.
    with_kafka["kafka"]["security"] = json!({
        "protocol": "sasl_ssl", "sasl_mechanism": "SCRAM-SHA-512", "username": "cdcflow",
        "password_env": "KAFKA_PASSWORD", "ca_file": "/etc/cdcflow/ca.pem"
    });
    assert_valid(&validator, &with_kafka);
    with_kafka["kafka"]["security"] = json!({
        "protocol": "ssl", "ca_file": "/etc/cdcflow/ca.pem", "cert_file": "/etc/cdcflow/client.pem",
        "key_file": "/etc/cdcflow/client.key", "key_password_file": "/run/secrets/key-password"
    });
    assert_valid(&validator, &with_kafka);
    let mut inline_password = with_kafka.clone();
    inline_password["kafka"]["producer"]["sasl.password"] = json!("x");
    assert!(!validator.is_valid(&inline_password));
    with_kafka["kafka"]["consumer"]["isolation.level"] = json!("read_uncommitted");
    assert!(!validator.is_valid(&with_kafka));
}

/// `--help` explains each command to a new user.
#[test]
fn help_explains_commands() {
    let output = cdcflow()
        .args(["replay", "--help"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("kcat -C -J"), "{help}");
    assert!(help.contains("--state"), "{help}");
    assert!(
        help.contains("replaying the same input again emits nothing"),
        "{help}"
    );
}

/// `cdcflow state stats` and `state get` read the store a replay left: entities per pipeline,
/// and one entity's version and image as JSON; an unknown entity is an error naming it.
#[test]
fn state_commands_read_the_replay_store() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let (lines, _) = replay(&state, &example_inputs(), &[]);
    assert!(!lines.is_empty());
    let output = cdcflow()
        .args([
            "state",
            "stats",
            "--config",
            "examples/shop.toml",
            "--state",
        ])
        .arg(&state)
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stats}");
    assert!(
        stats.contains("pipeline orders: 4 entities, 0 parked"),
        "{stats}"
    );
    assert!(stats.contains("pipeline customers: 2 entities"), "{stats}");
    let output = cdcflow()
        .args(["state", "get", "--config", "examples/shop.toml", "--state"])
        .arg(&state)
        .args(["orders", "1001"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let entity: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(entity["image"]["status"], "shipped");
    assert_eq!(entity["deleted"], false);
    assert!(entity["parked"].is_null());
    let output = cdcflow()
        .args(["state", "get", "--config", "examples/shop.toml", "--state"])
        .arg(&state)
        .args(["orders", "424242"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no state for entity `424242`"));
}

/// `--log-format json` writes one JSON object per line; at debug level a dead-lettered record
/// is logged with its origin and reason, and nothing else is logged per record.
#[test]
fn json_logs_name_the_origin_of_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"topic\":\"shop.public.orders\",\"partition\":2,\"offset\":17,\"key\":\"{\\\"id\\\":1}\",\"payload\":\"{not json\"}\n",
    )
    .unwrap();
    let output = cdcflow()
        .args([
            "--log-format",
            "json",
            "replay",
            "--in-memory",
            "--config",
            "examples/shop.toml",
        ])
        .arg(&input)
        .env("CDCFLOW_LOG", "debug")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let logged: Vec<Value> = stderr
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let dead_letter = logged
        .iter()
        .find(|line| line["fields"]["message"] == "record dead-lettered")
        .unwrap_or_else(|| panic!("no dead-letter line in:\n{stderr}"));
    assert_eq!(dead_letter["fields"]["origin"], "shop.public.orders/2/17");
    assert_eq!(dead_letter["fields"]["reason"], "malformed_json");
    assert_eq!(dead_letter["level"], "DEBUG");
}
