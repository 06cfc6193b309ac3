//! `cdcflow ingress` on the real broker with a real PostgreSQL (Debian's package, started once
//! per suite by tests/run-all.sh): copies of one push sent at the same time to two instances
//! that share the database become one Kafka record, answered alike; refused pushes (bad
//! signature, old timestamp, too large, not JSON) write nothing; a push Kafka does not
//! acknowledge is answered 503 and its retry is written.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdcflow::webhook::{SigningSecret, signature_header};
use kafka_support::*;
use serde_json::{Value, json};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An ingress config: one route `/orders` to `topic`, keyed by `id`.
fn config(
    dir: &Path,
    name: &str,
    bootstrap: &str,
    database: Option<&str>,
    topic: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let database = database.map_or(String::new(), |url| format!("database_url = \"{url}\""));
    std::fs::write(
        &path,
        format!(
            r#"
[state]
path = "{state}"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{name}"

[http]
listen = "127.0.0.1:0"

[ingress]
listen = "127.0.0.1:0"
secrets = ["{SECRET}"]
{database}
{extra}

[[ingress.route]]
path = "/orders"
topic = "{topic}"
key = ["id"]
"#,
            state = dir.join(format!("{name}-state.db")).display(),
        ),
    )
    .unwrap();
    path
}

/// A running `cdcflow ingress`, with its addresses from the log.
struct Instance {
    child: Child,
    log: PathBuf,
    ingress: String,
    metrics: String,
}

impl Instance {
    fn start(config: &Path, log: &Path) -> Instance {
        let child = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .args(["ingress", "--config"])
            .arg(config)
            .env("CDCFLOW_LOG", "info,cdcflow=debug,rdkafka=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("cdcflow ingress starts");
        let address = |needle: &str| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if let Some(address) = text
                    .split(needle)
                    .nth(1)
                    .and_then(|rest| rest.split(['/', ' ', '\n']).next())
                {
                    return address.to_owned();
                }
                assert!(
                    Instant::now() < deadline,
                    "no `{needle}` in the log: {text}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let ingress = address("ingress listening on http://");
        let metrics = address("serving http://");
        Instance {
            child,
            log: log.to_owned(),
            ingress,
            metrics,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/orders", self.ingress)
    }

    /// The sum of a metric's series whose labels contain `labels`.
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let body = runtime().block_on(async {
            reqwest::get(format!("http://{}/metrics", self.metrics))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        body.lines()
            .filter(|line| line.starts_with(name) && line.contains(labels))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("--- {} (end) ---\n{tail}", self.log.display());
        }
    }
}

/// What the ingress answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: String,
    replayed: bool,
}

/// POSTs `body` signed for `id` at `timestamp`.
async fn push(
    client: &reqwest::Client,
    url: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Answer {
    let signature = signature_header(
        &[SigningSecret::parse(SECRET).unwrap()],
        id,
        timestamp,
        body,
    );
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .expect("the ingress answers");
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.text().await.unwrap();
    Answer {
        status,
        body,
        replayed,
    }
}

fn order(id: u64, version: u64) -> Vec<u8> {
    json!({"id": id, "status": "paid", "total": 10 * id, "version": version})
        .to_string()
        .into_bytes()
}

/// Every push sent four times at once, twice to each of two instances sharing PostgreSQL:
/// one Kafka record per request id, all four answered 202 with the same body (three of
/// them marked replayed), and a late copy answered the same way again.
#[test]
fn concurrent_copies_on_two_instances_sharing_postgres_are_written_once() {
    let name = sql_name("ingress_pg");
    let url = empty_postgres_database(&name);
    let topic = format!("{name}.orders");
    create_topics(&[(&topic, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let first = Instance::start(
        &config(dir.path(), "a", &bootstrap(), Some(&url), &topic, ""),
        &dir.path().join("a.log"),
    );
    let second = Instance::start(
        &config(dir.path(), "b", &bootstrap(), Some(&url), &topic, ""),
        &dir.path().join("b.log"),
    );
    const PUSHES: u64 = 60;
    let targets = [first.url(), second.url(), first.url(), second.url()];
    let answers: BTreeMap<String, Vec<Answer>> = runtime().block_on(async {
        let client = reqwest::Client::new();
        let mut copies = tokio::task::JoinSet::new();
        for order_id in 0..PUSHES {
            let id = format!("msg_{name}_{order_id}");
            let timestamp = now_s();
            for target in &targets {
                let (client, id, target) = (client.clone(), id.clone(), target.clone());
                copies.spawn(async move {
                    let answer = push(&client, &target, &id, timestamp, &order(order_id, 1)).await;
                    (id, answer)
                });
            }
        }
        let mut answers: BTreeMap<String, Vec<Answer>> = BTreeMap::new();
        while let Some(joined) = copies.join_next().await {
            let (id, answer) = joined.unwrap();
            answers.entry(id).or_default().push(answer);
        }
        answers
    });
    assert_eq!(answers.len(), PUSHES as usize);
    for (id, copies) in &answers {
        assert!(
            copies.iter().all(|answer| answer.status == 202),
            "{id}: {copies:?}"
        );
        let bodies: BTreeSet<&str> = copies.iter().map(|answer| answer.body.as_str()).collect();
        assert_eq!(
            bodies.len(),
            1,
            "{id}: copies answered differently: {copies:?}"
        );
        assert_eq!(
            copies.iter().filter(|answer| answer.replayed).count(),
            3,
            "{id}: {copies:?}"
        );
    }
    let records = wait_for(&topic, PUSHES as usize, Duration::from_secs(60));
    // The console consumer has read everything there is: a second copy would be here.
    let records_again = read_topic(&topic, "read_committed", 3_000);
    assert_eq!(records_again.len(), PUSHES as usize, "{records_again:?}");
    let ids: BTreeSet<&str> = records
        .iter()
        .map(|record| record.headers["cdcflow.ingress.request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), PUSHES as usize);
    for record in &records {
        let value = record.json();
        assert_eq!(record.key, format!("{{\"id\":{}}}", value["id"]));
        let answer = &answers[&record.headers["cdcflow.ingress.request_id"]][0];
        let answered: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(answered["partition"], json!(record.partition));
    }
    let duplicates = first.metric("cdcflow_ingress_duplicates_total", "/orders")
        + second.metric("cdcflow_ingress_duplicates_total", "/orders");
    assert_eq!(duplicates, (3 * PUSHES) as f64);
    // A retry long after: the same answer, replayed, nothing written.
    let late = runtime().block_on(async {
        let id = format!("msg_{name}_7");
        push(
            &reqwest::Client::new(),
            &second.url(),
            &id,
            now_s(),
            &order(7, 1),
        )
        .await
    });
    assert_eq!(late.status, 202);
    assert!(late.replayed);
    assert_eq!(late.body, answers[&format!("msg_{name}_7")][0].body);
    assert_eq!(
        read_topic(&topic, "read_committed", 2_000).len(),
        PUSHES as usize
    );
}

/// Refused pushes are answered with the status and the reason, and write nothing; an id used
/// again with another body is refused; the default store is SQLite beside the state.
#[test]
fn refused_pushes_write_nothing() {
    let name = unique("ingress-refused");
    let topic = format!("{name}.orders");
    create_topics(&[(&topic, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let instance = Instance::start(
        &config(
            dir.path(),
            "refused",
            &bootstrap(),
            None,
            &topic,
            "max_body_bytes = 1024\ntimestamp_tolerance = \"1m\"",
        ),
        &dir.path().join("refused.log"),
    );
    let url = instance.url();
    let answers = runtime().block_on(async {
        let client = reqwest::Client::new();
        let body = order(1, 1);
        let wrong_secret =
            SigningSecret::parse("whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldCBhdCBhbGw=").unwrap();
        let forged = client
            .post(&url)
            .header("webhook-id", "msg_forged")
            .header("webhook-timestamp", now_s().to_string())
            .header(
                "webhook-signature",
                signature_header(&[wrong_secret], "msg_forged", now_s(), &body),
            )
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let forged = (forged.status().as_u16(), forged.text().await.unwrap());
        let unsigned = client
            .post(&url)
            .header("idempotency-key", "k1")
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        let old = push(&client, &url, "msg_old", now_s() - 120, &body).await;
        let large_body = json!({"id": 2, "pad": "x".repeat(2_000)}).to_string();
        let large = push(&client, &url, "msg_large", now_s(), large_body.as_bytes()).await;
        let malformed = push(&client, &url, "msg_bad", now_s(), b"{\"id\": 3,").await;
        let keyless = push(&client, &url, "msg_keyless", now_s(), b"{\"name\": \"x\"}").await;
        let good = push(&client, &url, "msg_good", now_s(), &body).await;
        let reused = push(&client, &url, "msg_good", now_s(), &order(1, 2)).await;
        (
            forged, unsigned, old, large, malformed, keyless, good, reused,
        )
    });
    let (forged, unsigned, old, large, malformed, keyless, good, reused) = answers;
    assert_eq!(forged.0, 401, "{forged:?}");
    assert!(forged.1.contains("signature"), "{forged:?}");
    assert_eq!(unsigned, 401);
    assert_eq!(old.status, 401, "{old:?}");
    assert!(old.body.contains("old"), "{old:?}");
    assert_eq!(large.status, 413, "{large:?}");
    assert!(large.body.contains("1024"), "{large:?}");
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert!(malformed.body.contains("not JSON"), "{malformed:?}");
    assert_eq!(keyless.status, 422, "{keyless:?}");
    assert!(keyless.body.contains("`id`"), "{keyless:?}");
    assert_eq!(good.status, 202, "{good:?}");
    assert_eq!(reused.status, 422, "{reused:?}");
    assert!(reused.body.contains("another body"), "{reused:?}");
    let records = read_topic(&topic, "read_committed", 3_000);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].headers["cdcflow.ingress.request_id"], "msg_good");
    assert!(
        dir.path().join("ingress.db").exists(),
        "the default SQLite store"
    );
    assert_eq!(
        instance.metric("cdcflow_ingress_refused_total", "reason=\"unauthorized\""),
        3.0
    );
    assert_eq!(
        instance.metric("cdcflow_ingress_requests_total", "status=\"202\""),
        1.0
    );
}

/// With no broker to take the record, a push is answered 503 once `produce_timeout` passes,
/// and its claim is released: the sender's retry (same id, another instance sharing the
/// database) is written, once.
#[test]
fn a_push_is_not_acknowledged_while_kafka_is_down() {
    let name = sql_name("ingress_down");
    let url = empty_postgres_database(&name);
    let topic = format!("{name}.orders");
    create_topics(&[(&topic, 1)]);
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: Kafka is down for this instance.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let down = Instance::start(
        &config(
            dir.path(),
            "down",
            &down_address,
            Some(&url),
            &topic,
            "produce_timeout = \"2s\"",
        ),
        &dir.path().join("down.log"),
    );
    let id = format!("msg_{name}");
    let started = Instant::now();
    let refused = runtime().block_on(async {
        push(
            &reqwest::Client::new(),
            &down.url(),
            &id,
            now_s(),
            &order(5, 1),
        )
        .await
    });
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("Kafka"), "{refused:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let up = Instance::start(
        &config(dir.path(), "up", &bootstrap(), Some(&url), &topic, ""),
        &dir.path().join("up.log"),
    );
    let retried = runtime().block_on(async {
        push(
            &reqwest::Client::new(),
            &up.url(),
            &id,
            now_s(),
            &order(5, 1),
        )
        .await
    });
    assert_eq!(retried.status, 202, "{retried:?}");
    assert!(!retried.replayed);
    let records = read_topic(&topic, "read_committed", 3_000);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        down.metric("cdcflow_ingress_requests_total", "status=\"503\""),
        1.0
    );
}
