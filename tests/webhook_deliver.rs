//! `cdcflow deliver` on the real broker against a real HTTP receiver on loopback that fails on
//! purpose and checks every signature: every event arrives, with the same `webhook-id` on every
//! attempt, each entity's events in order; an endpoint that stays down past `max_age` puts
//! exactly its events in the subscription's DLQ; a kill -9 during delivery loses nothing.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use cdcflow::webhook::{SigningSecret, verify};
use kafka_support::*;
use serde_json::{Value, json};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One accepted delivery: its webhook-id, entity and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Accepted {
    id: String,
    entity: String,
    seq: u64,
}

#[derive(Default)]
struct Receiver {
    /// Attempts per webhook-id.
    attempts: HashMap<String, u32>,
    accepted: Vec<Accepted>,
    bad_signatures: u32,
}

type Shared = Arc<Mutex<Receiver>>;

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `/flaky`: the first attempt at every third event is a 500, at every fifth a 429 with
/// Retry-After 1, at every seventh an answer slower than the subscription's timeout; the rest
/// are accepted. `/down`: always 503.
async fn hook(
    State(shared): State<Shared>,
    UrlPath(mode): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    match reply(&shared, &mode, &headers, &body) {
        Some(response) => response,
        None => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// The receiver's answer to one attempt; `None` for one sent only after the subscription's
/// timeout.
fn reply(
    shared: &Shared,
    mode: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<axum::response::Response> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let verified = verify(
        &[SigningSecret::parse(SECRET).unwrap()],
        header("webhook-id").as_deref(),
        header("webhook-timestamp").as_deref(),
        header("webhook-signature").as_deref(),
        body,
        now_s(),
        300,
    );
    let mut receiver = shared.lock().unwrap();
    if verified.is_err() {
        receiver.bad_signatures += 1;
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                [("retry-after", "")],
                "bad signature",
            )
                .into_response(),
        );
    }
    let id = header("webhook-id").unwrap();
    let event: Value = serde_json::from_slice(body).unwrap();
    let seq = event["data"]["seq"].as_u64().unwrap();
    let attempt = {
        let count = receiver.attempts.entry(id.clone()).or_default();
        *count += 1;
        *count
    };
    if mode == "down" {
        return Some(StatusCode::SERVICE_UNAVAILABLE.into_response());
    }
    if attempt == 1 && seq.is_multiple_of(3) {
        return Some((StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response());
    }
    if attempt == 1 && seq.is_multiple_of(7) {
        return None;
    }
    if attempt == 1 && seq.is_multiple_of(5) {
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response(),
        );
    }
    receiver.accepted.push(Accepted {
        id,
        entity: event["data"]["entity"].as_str().unwrap().to_owned(),
        seq,
    });
    Some(StatusCode::NO_CONTENT.into_response())
}

/// Starts the receiver on its own thread, on `address` (`127.0.0.1:0` picks a port); returns
/// its base URL.
fn start_receiver_on(shared: Shared, address: &str) -> String {
    let (ready, bound) = std::sync::mpsc::channel();
    let address = address.to_owned();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind(&address).await.unwrap();
            ready.send(listener.local_addr().unwrap()).unwrap();
            let router = Router::new()
                .route("/{mode}", post(hook))
                .with_state(shared);
            axum::serve(listener, router).await.unwrap();
        });
    });
    format!("http://{}", bound.recv().unwrap())
}

fn start_receiver(shared: Shared) -> String {
    start_receiver_on(shared, "127.0.0.1:0")
}

/// Events `seq` 1..=per_entity of each of `entities`, interleaved, keyed by entity.
fn events(topic: &str, entities: u64, per_entity: u64) -> Vec<Record> {
    let mut records = Vec::new();
    for seq in 1..=per_entity {
        for entity in 0..entities {
            let id = format!("evt-{entity}-{seq}");
            let value = json!({
                "specversion": "1.0", "id": id, "type": "com.example.OrderChanged",
                "source": "/test", "data": {"entity": format!("e{entity}"), "seq": seq * 100 + entity},
            });
            records.push((
                topic.to_owned(),
                Some(format!("e{entity}").into_bytes()),
                Some(value.to_string().into_bytes()),
            ));
        }
    }
    records
}

fn config(dir: &Path, prefix: &str, url: &str, max_age: &str) -> PathBuf {
    let path = dir.join("deliver.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}group"

[http]
listen = "127.0.0.1:0"

[[webhook]]
name = "receiver"
topics = ["{prefix}events"]
url = "{url}"
secrets = ["{SECRET}"]
timeout = "1s"
initial_backoff = "100ms"
max_backoff = "1s"
max_attempts = 1000
max_age = "{max_age}"
max_in_flight = 8
dlq_topic = "{prefix}webhook-dlq"
"#,
            bootstrap = bootstrap()
        ),
    )
    .unwrap();
    path
}

fn start_deliver(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["deliver", "--config"])
        .arg(config)
        .env("CDCFLOW_LOG", "info,cdcflow=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("cdcflow deliver starts")
}

/// The body of `GET path` (HTTP/1.0: never chunked).
fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The `/metrics` text of the `cdcflow deliver` that logs to `log` (empty before it serves).
fn metrics_of(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.split("serving http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map_or_else(String::new, |address| http_get(address, "/metrics"))
}

/// Per entity, the sequence numbers of its first acceptances, in arrival order.
fn first_acceptances(accepted: &[Accepted]) -> BTreeMap<String, Vec<u64>> {
    let mut seen = BTreeSet::new();
    let mut per_entity: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for delivery in accepted {
        if seen.insert(delivery.id.clone()) {
            per_entity
                .entry(delivery.entity.clone())
                .or_default()
                .push(delivery.seq);
        }
    }
    per_entity
}

fn assert_in_order(per_entity: &BTreeMap<String, Vec<u64>>) {
    for (entity, seqs) in per_entity {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "events of {entity} out of order");
    }
}

/// A receiver that refuses connections for a while, then fails on purpose (500s, 429s, answers
/// past the timeout on first attempts) gets every event, in order per entity, every
/// signature valid; a kill -9 in the middle and a restart lose nothing (redeliveries carry
/// the same webhook-id).
#[test]
fn every_event_arrives_in_order_across_failures_and_kill_9() {
    let prefix = format!("{}.", unique("deliver"));
    create_topics(&[(&format!("{prefix}events"), 3)]);
    let shared = Shared::default();
    // The receiver's port, closed until the receiver starts: connections are refused first.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = port.local_addr().unwrap().to_string();
    drop(port);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &prefix,
        &format!("http://{address}/flaky"),
        "1h",
    );
    let all = events(&format!("{prefix}events"), 20, 30);
    produce(&all[..300]);
    let mut first = start_deliver(&config, &dir.path().join("first.log"));
    let log = dir.path().join("first.log");
    wait_until("refused connections", Duration::from_secs(60), || {
        metrics_of(&log).contains(
            r#"cdcflow_webhook_attempts_total{outcome="unreachable",subscription="receiver"}"#,
        ) && !metrics_of(&log).contains(r#"outcome="unreachable",subscription="receiver"} 0"#)
    });
    start_receiver_on(Arc::clone(&shared), &address);
    wait_until("some deliveries", Duration::from_secs(60), || {
        shared.lock().unwrap().accepted.len() >= 100
    });
    let metrics = metrics_of(&log);
    assert!(
        !metrics.contains(r#"outcome="timeout",subscription="receiver"} 0"#)
            && metrics.contains(r#"outcome="timeout",subscription="receiver"}"#),
        "{metrics}"
    );
    first.kill().unwrap();
    let _ = first.wait();
    produce(&all[300..]);
    let mut second = start_deliver(&config, &dir.path().join("second.log"));
    let expected: BTreeSet<String> = (1..=30)
        .flat_map(|seq| (0..20).map(move |entity| format!("evt-{entity}-{seq}")))
        .collect();
    wait_until("every event delivered", Duration::from_secs(120), || {
        let receiver = shared.lock().unwrap();
        receiver
            .accepted
            .iter()
            .map(|a| a.id.clone())
            .collect::<BTreeSet<_>>()
            == expected
    });
    let _ = second.kill();
    let _ = second.wait();
    let receiver = shared.lock().unwrap();
    assert_eq!(receiver.bad_signatures, 0);
    assert_in_order(&first_acceptances(&receiver.accepted));
    // Duplicates come only from the kill: at most the events in flight or not yet committed
    // then, never more than one extra copy each.
    let mut copies: HashMap<&str, u32> = HashMap::new();
    for accepted in &receiver.accepted {
        *copies.entry(&accepted.id).or_default() += 1;
    }
    assert!(copies.values().all(|count| *count <= 2), "{copies:?}");
    let failed_once = receiver
        .attempts
        .values()
        .filter(|attempts| **attempts > 1)
        .count();
    assert!(
        failed_once >= 200,
        "the receiver failed first attempts: {failed_once}"
    );
}

/// An endpoint down past `max_age` puts exactly its events in the subscription's DLQ, with the
/// reason and the last status, and the offsets move past them.
#[test]
fn an_endpoint_down_past_max_age_dead_letters_its_events() {
    let prefix = format!("{}.", unique("deliver-dlq"));
    create_topics(&[(&format!("{prefix}events"), 2)]);
    let shared = Shared::default();
    let base = start_receiver(Arc::clone(&shared));
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &prefix, &format!("{base}/down"), "2s");
    let all = events(&format!("{prefix}events"), 4, 5);
    produce(&all);
    let mut deliver = start_deliver(&config, &dir.path().join("deliver.log"));
    let dead = wait_for(
        &format!("{prefix}webhook-dlq"),
        all.len(),
        Duration::from_secs(120),
    );
    wait_caught_up(
        &format!("{prefix}group.webhook.receiver"),
        &format!("{prefix}events"),
        Duration::from_secs(60),
    );
    let metrics = metrics_of(&dir.path().join("deliver.log"));
    let dead_lettered = format!(
        r#"cdcflow_webhook_dlq_records_total{{reason="max_age_exceeded",subscription="receiver"}} {}"#,
        all.len()
    );
    assert!(metrics.contains(&dead_lettered), "{metrics}");
    assert!(
        metrics.contains(r#"cdcflow_webhook_endpoint_up{subscription="receiver"} 0"#),
        "{metrics}"
    );
    let _ = deliver.kill();
    let _ = deliver.wait();
    assert_eq!(dead.len(), all.len(), "{dead:?}");
    let ids: BTreeSet<String> = dead
        .iter()
        .map(|record| record.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), all.len());
    for record in &dead {
        assert_eq!(
            record
                .headers
                .get("cdcflow.webhook.reason")
                .map(String::as_str),
            Some("max_age_exceeded")
        );
        assert_eq!(
            record
                .headers
                .get("cdcflow.webhook.last_status")
                .map(String::as_str),
            Some("503")
        );
    }
    assert!(shared.lock().unwrap().accepted.is_empty());
}
