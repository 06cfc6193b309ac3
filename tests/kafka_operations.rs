//! Operating cdcflow on the real broker: its metrics against what the input must produce, lag,
//! restore figures, `promtool check metrics`, a real Prometheus server scraping it with the
//! project's alert rules loaded; `cdcflow dlq list|replay` after a fixed rule; and
//! `dlq_policy = "park"` across a kill -9.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kafka_support::*;
use serde_json::{Value, json};

/// One test's topics, group and state, and its config in two forms: the status rule failing
/// on status `bad` (broken), and fixed.
struct Operations {
    prefix: String,
    dir: tempfile::TempDir,
    state: PathBuf,
    group: String,
}

impl Operations {
    fn new(name: &str, partitions: i32) -> Operations {
        let prefix = format!("{}.", unique(name));
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        create_topics(&[(&format!("{prefix}orders"), partitions)]);
        Operations {
            group: unique(&format!("{name}-group")),
            prefix,
            dir,
            state,
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Writes the config and returns its path.
    fn config(&self, fixed: bool, policy: &str) -> PathBuf {
        let status_rule = if fixed {
            "op == 'u' && after.status != before.status"
        } else {
            "op == 'u' && after.status != before.status && (after.status != 'bad' || after.nope == 1)"
        };
        let text = format!(
            r#"
[state]
path = "{state}"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
instance_id = "a"
delivery = "exactly_once"
batch_max_records = 500
batch_max_wait = "50ms"
transaction_timeout = "10s"
shutdown_timeout = "15s"
consumer = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}

[http]
listen = "127.0.0.1:0"

[[pipeline]]
name = "orders"
topics = ["{orders}"]
dlq_topic = "{dlq}"
dlq_policy = "{policy}"

[[pipeline.rule]]
name = "created"
when = "op == 'c'"
event_type = "OrderCreated"
topic = "{events}"

[[pipeline.rule]]
name = "status"
when = "{status_rule}"
event_type = "OrderStatusChanged"
topic = "{events}"
payload = {{ status = "after.status" }}
"#,
            state = self.state.display(),
            bootstrap = bootstrap(),
            group = self.group,
            orders = self.topic("orders"),
            dlq = self.topic("dlq.orders"),
            events = self.topic("events"),
        );
        let path = self.dir.path().join(format!(
            "cdcflow-{}-{policy}.toml",
            if fixed { "fixed" } else { "broken" }
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path, log: &str) -> Service {
        Service::start(config, &self.dir.path().join(log))
    }

    fn caught_up(&self) {
        wait_caught_up(&self.group, &self.topic("orders"), Duration::from_secs(120));
    }

    /// The events read back with read_committed: (entity, status or `created`), in topic
    /// order per partition.
    fn events(&self) -> Vec<(String, String)> {
        read_topic(&self.topic("events"), "read_committed", 2_000)
            .iter()
            .map(|record| {
                let value = record.json();
                let status = if value["type"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with("OrderCreated")
                {
                    "created".to_owned()
                } else {
                    value["data"]["status"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                };
                (record.key.clone(), status)
            })
            .collect()
    }

    fn events_of(&self, entity: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|(key, _)| key == entity)
            .map(|(_, status)| status)
            .collect()
    }

    fn record(&self, id: u64, before: Option<&str>, status: &str, lsn: u64) -> Record {
        let value = json!({
            "before": before.map(|before| json!({"id": id, "status": before})),
            "after": {"id": id, "status": status},
            "source": {"connector": "postgresql", "ts_ms": 1_700_000_000_000u64, "lsn": lsn},
            "op": if before.is_some() { "u" } else { "c" },
        });
        (
            self.topic("orders"),
            Some(format!(r#"{{"id":{id}}}"#).into_bytes()),
            Some(value.to_string().into_bytes()),
        )
    }
}

/// Runs `cdcflow <args>` to its end: (success, stdout, stderr).
fn cdcflow(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("cdcflow runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The samples of a Prometheus text exposition: `name{labels}` (labels as written) to value.
fn samples(exposition: &str) -> BTreeMap<String, f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `family` whose labels contain all of `labels` (`k="v"`).
fn sum(samples: &BTreeMap<String, f64>, family: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let name = series.split('{').next().unwrap_or_default();
            name == family && labels.iter().all(|label| series.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

fn scrape(service: &Service) -> (String, BTreeMap<String, f64>) {
    let (status, body) = service.http_get("/metrics");
    assert_eq!(status, 200, "{body}");
    let parsed = samples(&body);
    (body, parsed)
}

/// Where the test script unpacked Debian's `prometheus` package (tests/check-deploy-files.sh).
fn prometheus_tools() -> PathBuf {
    let dir = std::env::var("CDCFLOW_PROMETHEUS_DIR").map_or_else(
        |_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/cdcflow/tools/promtool")
        },
        PathBuf::from,
    );
    assert!(
        dir.join("promtool").is_file() && dir.join("prometheus").is_file(),
        "no promtool and prometheus in {}: run tests/run-all.sh (tests/check-deploy-files.sh \
         unpacks them from Debian's prometheus package)",
        dir.display()
    );
    dir
}

/// `promtool check metrics` on an exposition: its verdict and what it printed.
fn promtool_check_metrics(exposition: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(prometheus_tools().join("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A Prometheus server scraping `target` every second, with the project's alert rules.
struct PrometheusServer {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    fn start(target: &str) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let rules = root().join("deploy/prometheus/cdcflow-alerts.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: cdcflow\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let child = Command::new(prometheus_tools().join("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus starts");
        PrometheusServer {
            child,
            address,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> Option<Value> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.address).ok()?;
        write!(
            stream,
            // HTTP/1.0: the answer comes whole, never chunked.
            "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.address
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }

    /// The value of an instant query with a single result.
    fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        let answer = self.get(&format!("/api/v1/query?query={encoded}"))?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1,000 records: 890 distinct changes of 445 orders, 100 of them again, and 10 that are not
/// JSON. The metrics say applied 890, duplicate 100, DLQ 10; the lag of every partition goes
/// to 0; the exposition passes `promtool check metrics`; a real Prometheus server scrapes it
/// and evaluates the alert rules without errors; after a restart without the local store the
/// restore figures appear.
#[test]
fn metrics_match_the_input_and_are_scraped_by_prometheus() {
    let ops = Operations::new("ops-metrics", 3);
    let config = ops.config(true, "continue");
    let mut input = Vec::new();
    for id in 0..445u64 {
        input.push(ops.record(id, None, "pending", 1_000 + id));
    }
    for id in 0..445u64 {
        input.push(ops.record(id, Some("pending"), "paid", 10_000 + id));
    }
    // The last change of 100 orders again: equal versions, duplicates (a first change again
    // would be stale, behind its update).
    input.extend(input[445..545].to_vec());
    for id in 0..10u64 {
        input.push((
            ops.topic("orders"),
            Some(format!(r#"{{"id":{}}}"#, 9_000 + id).into_bytes()),
            Some(b"{not json".to_vec()),
        ));
    }
    assert_eq!(input.len(), 1_000);
    produce(&input);
    let service = ops.start(&config, "first.log");
    ops.caught_up();

    let mut last = BTreeMap::new();
    wait_until(
        "the committed batches to be counted",
        Duration::from_secs(30),
        || {
            last = scrape(&service).1;
            sum(&last, "cdcflow_records_total", &[]) >= 1_000.0
        },
    );
    let applied = r#"decision="applied""#;
    assert_eq!(sum(&last, "cdcflow_decisions_total", &[applied]), 890.0);
    assert_eq!(
        sum(
            &last,
            "cdcflow_decisions_total",
            &[r#"decision="duplicate""#]
        ),
        100.0
    );
    assert_eq!(
        sum(&last, "cdcflow_decisions_total", &[r#"decision="stale""#]),
        0.0
    );
    assert_eq!(
        sum(
            &last,
            "cdcflow_dlq_records_total",
            &[r#"reason="malformed_json""#]
        ),
        10.0
    );
    assert_eq!(sum(&last, "cdcflow_events_total", &[]), 890.0);
    assert_eq!(
        sum(&last, "cdcflow_end_to_end_latency_seconds_count", &[]),
        890.0
    );
    assert!(
        sum(
            &last,
            "cdcflow_transactions_total",
            &[r#"result="committed""#]
        ) >= 1.0
    );
    assert_eq!(sum(&last, "cdcflow_assigned_partitions", &[]), 3.0);
    assert_eq!(sum(&last, "cdcflow_build_info", &[]), 1.0);

    // librdkafka's statistics come every second: the lag of all three partitions reaches 0.
    wait_until(
        "the lag of every partition to be 0",
        Duration::from_secs(30),
        || {
            let (_, samples) = scrape(&service);
            let lags: Vec<f64> = samples
                .iter()
                .filter(|(series, _)| series.starts_with("cdcflow_consumer_committed_lag_records{"))
                .map(|(_, value)| *value)
                .collect();
            lags.len() == 3
                && lags.iter().all(|lag| *lag == 0.0)
                && sum(&samples, "cdcflow_consumer_lag_records", &[]) == 0.0
        },
    );
    assert_eq!(service.http_get("/healthz").0, 200);
    assert_eq!(service.http_get("/readyz").0, 200);

    let (exposition, _) = scrape(&service);
    let (clean, findings) = promtool_check_metrics(&exposition);
    assert!(
        clean && findings.trim().is_empty(),
        "promtool check metrics:\n{findings}"
    );

    let target = service
        .log_text()
        .split("serving http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let prometheus = PrometheusServer::start(&target);
    wait_until(
        "Prometheus to scrape the applied count",
        Duration::from_secs(60),
        || prometheus.query(r#"sum(cdcflow_decisions_total{decision="applied"})"#) == Some(890.0),
    );
    assert_eq!(prometheus.query(r#"up{job="cdcflow"}"#), Some(1.0));
    wait_until(
        "the alert rules to be evaluated",
        Duration::from_secs(30),
        || {
            prometheus.get("/api/v1/rules").is_some_and(|rules| {
                let groups = rules["data"]["groups"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let rules: Vec<Value> = groups
                    .iter()
                    .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
                    .collect();
                !rules.is_empty()
                    && rules.iter().all(|rule| {
                        rule["health"] == "ok"
                            && rule["lastEvaluation"]
                                .as_str()
                                .is_some_and(|t| !t.starts_with("0001"))
                    })
            })
        },
    );
    drop(prometheus);

    assert!(service.stop(Duration::from_secs(30)).success());
    std::fs::remove_file(&ops.state).unwrap();
    let service = ops.start(&config, "second.log");
    service.wait_for_log("restored changelog", Duration::from_secs(60));
    wait_until(
        "the restore and the store to be reported",
        Duration::from_secs(40),
        || {
            let (_, samples) = scrape(&service);
            let orders = r#"pipeline="orders""#;
            sum(&samples, "cdcflow_restore_records_total", &[orders]) >= 445.0
                && sum(&samples, "cdcflow_restore_remaining_records", &[orders]) == 0.0
                && sum(&samples, "cdcflow_restore_seconds_total", &[]) > 0.0
                && sum(&samples, "cdcflow_store_entities", &[orders]) == 445.0
                && sum(&samples, "cdcflow_store_size_bytes", &[]) > 0.0
        },
    );
    assert!(service.stop(Duration::from_secs(30)).success());
}

/// A rule that fails on status `bad` dead-letters those changes; `cdcflow dlq list` shows
/// them with their entity and filters them; after the rule is fixed `cdcflow dlq replay`
/// emits their events exactly once (read_committed), and a second replay emits nothing.
#[test]
fn dlq_replay_after_a_fix_emits_each_event_once() {
    let ops = Operations::new("ops-replay", 2);
    let broken = ops.config(false, "continue");
    let fixed = ops.config(true, "continue");
    let mut input = Vec::new();
    for id in 1..=20u64 {
        input.push(ops.record(id, None, "pending", 100 + id));
    }
    for id in 1..=20u64 {
        input.push(ops.record(id, Some("pending"), "bad", 200 + id));
    }
    produce(&input);
    let service = ops.start(&broken, "broken.log");
    ops.caught_up();
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_eq!(ops.events().len(), 20);

    let broken_path = broken.to_str().unwrap();
    let (ok, listed, errors) = cdcflow(&["dlq", "list", "--config", broken_path, "--json"]);
    assert!(ok, "{errors}");
    let letters: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 20, "{listed}");
    assert!(
        letters
            .iter()
            .all(|l| l["reason"] == "rule_error" && l["pipeline"] == "orders")
    );
    let (_, one, _) = cdcflow(&[
        "dlq",
        "list",
        "--config",
        broken_path,
        "--json",
        "--key",
        "7",
    ]);
    assert_eq!(one.lines().count(), 1, "{one}");
    assert!(one.contains(r#""entity":"7""#), "{one}");
    let (_, five, _) = cdcflow(&["dlq", "list", "-c", broken_path, "--json", "--limit", "5"]);
    assert_eq!(five.lines().count(), 5);
    let (_, none, _) = cdcflow(&["dlq", "list", "-c", broken_path, "--json", "--since", "0s"]);
    assert_eq!(
        none.lines().count(),
        0,
        "nothing was dead-lettered in the future: {none}"
    );

    let service = ops.start(&fixed, "fixed.log");
    let fixed_path = fixed.to_str().unwrap();
    let (ok, replayed, errors) = cdcflow(&["dlq", "replay", "--config", fixed_path]);
    assert!(
        ok && replayed.contains("replayed: 20"),
        "{replayed}{errors}"
    );
    ops.caught_up();
    let events = ops.events();
    assert_eq!(events.len(), 40, "{events:?}");
    for id in 1..=20 {
        assert_eq!(ops.events_of(&id.to_string()), ["created", "bad"]);
    }
    let ids: std::collections::BTreeSet<String> =
        read_topic(&ops.topic("events"), "read_committed", 2_000)
            .iter()
            .map(|record| record.json()["id"].as_str().unwrap_or_default().to_owned())
            .collect();
    assert_eq!(ids.len(), 40, "event ids are distinct");

    let (ok, again, errors) = cdcflow(&["dlq", "replay", "--config", fixed_path]);
    assert!(ok && again.contains("replayed: 20"), "{again}{errors}");
    ops.caught_up();
    wait_until(
        "the second replay to be counted",
        Duration::from_secs(30),
        || {
            sum(
                &scrape(&service).1,
                "cdcflow_decisions_total",
                &[r#"decision="duplicate""#],
            ) == 20.0
        },
    );
    assert_eq!(ops.events().len(), 40, "a second replay emits nothing");
    assert!(service.stop(Duration::from_secs(30)).success());
    assert_no_hanging_transaction(&ops.topic("events"));
}

/// Waits until the service reports one parked entity and one change parked since it started.
fn wait_parked(service: &Service) {
    wait_until(
        "the parked entity to be counted",
        Duration::from_secs(40),
        || {
            let (_, samples) = scrape(service);
            let orders = r#"pipeline="orders""#;
            sum(&samples, "cdcflow_parked_entities", &[orders]) == 1.0
                && sum(&samples, "cdcflow_parked_changes_total", &[orders]) == 1.0
        },
    );
}

/// `dlq_policy = "park"`: order 1's second change fails; its third and fourth changes park
/// behind it, also across a kill -9 and a restart without the local store (they come back
/// from the changelog), while order 2 is never held up. After the rule is fixed, the replay
/// of the second change emits order 1's events in version order, each once.
#[test]
fn park_holds_an_entity_behind_its_dead_letter_across_kill_9() {
    let ops = Operations::new("ops-park", 2);
    let broken = ops.config(false, "park");
    let fixed = ops.config(true, "park");
    produce(&[
        ops.record(1, None, "pending", 10),
        ops.record(2, None, "pending", 11),
        ops.record(1, Some("pending"), "bad", 12),
        ops.record(2, Some("pending"), "paid", 13),
        ops.record(1, Some("bad"), "paid", 14),
    ]);
    let service = ops.start(&broken, "first.log");
    ops.caught_up();
    assert_eq!(ops.events_of("1"), ["created"]);
    assert_eq!(ops.events_of("2"), ["created", "paid"]);
    // Parking saves the entity's state at once: the gauge (counted in the store) sees it
    // without waiting for the write-behind window.
    wait_parked(&service);
    service.kill();

    produce(&[
        ops.record(1, Some("paid"), "shipped", 15),
        ops.record(2, Some("paid"), "shipped", 16),
    ]);
    std::fs::remove_file(&ops.state).unwrap();
    let service = ops.start(&broken, "second.log");
    ops.caught_up();
    assert_eq!(ops.events_of("1"), ["created"], "order 1 stays parked");
    assert_eq!(
        ops.events_of("2"),
        ["created", "paid", "shipped"],
        "order 2 goes on"
    );
    wait_parked(&service);
    assert!(service.stop(Duration::from_secs(30)).success());

    let broken_path = broken.to_str().unwrap();
    let (ok, state, errors) = cdcflow(&[
        "state",
        "get",
        "--config",
        broken_path,
        "--from-changelog",
        "orders",
        "1",
    ]);
    assert!(ok, "{errors}");
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["image"]["status"], "pending");
    assert_eq!(
        state["parked"]["changes"].as_array().map(Vec::len),
        Some(2),
        "{state}"
    );

    let service = ops.start(&fixed, "fixed.log");
    let fixed_path = fixed.to_str().unwrap();
    let (ok, replayed, errors) = cdcflow(&["dlq", "replay", "--config", fixed_path, "--key", "1"]);
    assert!(ok && replayed.contains("replayed: 1"), "{replayed}{errors}");
    ops.caught_up();
    wait_until("order 1's events", Duration::from_secs(30), || {
        ops.events_of("1").len() >= 4
    });
    assert_eq!(ops.events_of("1"), ["created", "bad", "paid", "shipped"]);
    assert_eq!(ops.events_of("2"), ["created", "paid", "shipped"]);
    assert!(service.stop(Duration::from_secs(30)).success());
    let (ok, state, errors) = cdcflow(&["state", "get", "-c", fixed_path, "orders", "1"]);
    assert!(ok, "{errors}");
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["image"]["status"], "shipped");
    assert!(state["parked"].is_null(), "{state}");
    assert_no_hanging_transaction(&ops.topic("events"));
}
