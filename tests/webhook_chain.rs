//! The whole chain inside one `cdcflow run` on the real broker: a signed push to the ingress,
//! the pipeline that reads the ingress topic (version gate, rules), the business event, and
//! the outgoing webhook that delivers it, signed, to a real receiver on loopback. Copies of a
//! push (same id, or a new id for a version already applied) emit nothing more.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use cdcflow::webhook::{SigningSecret, signature_header, verify};
use kafka_support::*;
use serde_json::{Value, json};

/// The ingress's secret (senders sign with it) and the subscription's (cdcflow signs).
const INGRESS_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WEBHOOK_SECRET: &str = "whsec_dGhpcyBpcyB0aGUgd2ViaG9vayBzZWNyZXQh";

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Deliveries the receiver accepted: (webhook-id, event), signatures checked.
type Received = Arc<Mutex<Vec<(String, Value)>>>;

async fn receive(State(received): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let verified = verify(
        &[SigningSecret::parse(WEBHOOK_SECRET).unwrap()],
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        &body,
        now_s(),
        300,
    );
    if verified.is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let event: Value = serde_json::from_slice(&body).unwrap();
    received
        .lock()
        .unwrap()
        .push((header("webhook-id").unwrap().to_owned(), event));
    StatusCode::OK
}

fn start_receiver(received: Received) -> String {
    let (ready, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ready.send(listener.local_addr().unwrap()).unwrap();
            let router = Router::new()
                .route("/hooks/erp", post(receive))
                .with_state(received);
            axum::serve(listener, router).await.unwrap();
        });
    });
    format!("http://{}/hooks/erp", address.recv().unwrap())
}

#[test]
fn a_push_becomes_a_business_event_delivered_by_webhook() {
    let prefix = format!("{}.", unique("chain"));
    let (orders, events) = (format!("{prefix}orders"), format!("{prefix}events"));
    create_topics(&[(&orders, 2), (&events, 2), (&format!("{prefix}dlq"), 1)]);
    let received = Received::default();
    let receiver = start_receiver(Arc::clone(&received));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chain.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[state]
path = "{state}"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}group"
batch_max_wait = "50ms"

[http]
listen = "127.0.0.1:0"

[ingress]
listen = "127.0.0.1:0"
secrets = ["{INGRESS_SECRET}"]

[[ingress.route]]
path = "/orders"
topic = "{orders}"
key = ["id"]

[[pipeline]]
name = "orders"
topics = ["{orders}"]
format = "flattened"
dlq_topic = "{prefix}dlq"

[pipeline.version]
by = "column"
column = "version"

[[pipeline.rule]]
name = "paid"
when = "after.status == 'paid' && (old == null || old.status != 'paid')"
event_type = "com.example.OrderPaid"
topic = "{events}"
payload = {{ order_id = "after.id", total = "after.total" }}

[[webhook]]
name = "erp"
topics = ["{events}"]
url = "{receiver}"
secrets = ["{WEBHOOK_SECRET}"]
when = "event.data.total >= 20"
initial_backoff = "100ms"
"#,
            state = dir.path().join("state.db").display(),
            bootstrap = bootstrap(),
        ),
    )
    .unwrap();
    let service = Service::start(&config, &dir.path().join("run.log"));
    let log = service.wait_for_log("ingress listening on http://", Duration::from_secs(30));
    let address = log
        .split("ingress listening on http://")
        .nth(1)
        .and_then(|rest| rest.split([' ', '\n']).next())
        .unwrap()
        .to_owned();
    let url = format!("http://{address}/orders");
    let change = |id: u64, status: &str, total: u64, version: u64| {
        json!({"id": id, "status": status, "total": total, "version": version}).to_string()
    };
    // (request id, body): order 1 is created then paid (delivered); order 2 is paid with a
    // total the subscription's `when` leaves out; then a copy of the payment with the same
    // id (answered from the store) and a new id for the same version (dropped by the gate).
    let pushes = [
        ("p1", change(1, "pending", 30, 1)),
        ("p2", change(1, "paid", 30, 2)),
        ("p3", change(2, "paid", 5, 1)),
        ("p2", change(1, "paid", 30, 2)),
        ("p4", change(1, "paid", 30, 2)),
    ];
    let statuses: Vec<u16> = runtime().block_on(async {
        let client = reqwest::Client::new();
        let secret = [SigningSecret::parse(INGRESS_SECRET).unwrap()];
        let mut statuses = Vec::new();
        for (id, body) in &pushes {
            let timestamp = now_s();
            let response = client
                .post(&url)
                .header("webhook-id", *id)
                .header("webhook-timestamp", timestamp.to_string())
                .header(
                    "webhook-signature",
                    signature_header(&secret, id, timestamp, body.as_bytes()),
                )
                .body(body.clone())
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        statuses
    });
    assert_eq!(statuses, [202; 5]);
    wait_until("the OrderPaid webhook", Duration::from_secs(60), || {
        !received.lock().unwrap().is_empty()
    });
    let paid = wait_for(&events, 2, Duration::from_secs(30));
    // Time for a wrong extra delivery to show up.
    std::thread::sleep(Duration::from_secs(3));
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "{received:?}");
    let (webhook_id, event) = &received[0];
    assert_eq!(event["type"], "com.example.OrderPaid");
    assert_eq!(event["data"], json!({"order_id": 1, "total": 30}));
    assert_eq!(webhook_id, event["id"].as_str().unwrap());
    // Kafka holds both payments (order 2's as well); the copies emitted nothing.
    assert_eq!(paid.len(), 2, "{paid:?}");
    assert_eq!(read_topic(&events, "read_committed", 2_000).len(), 2);
    assert_eq!(read_topic(&orders, "read_committed", 2_000).len(), 4);
    let (_, metrics) = service.http_get("/metrics");
    assert!(
        metrics.contains(r#"cdcflow_ingress_duplicates_total{route="/orders"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cdcflow_webhook_attempts_total{outcome="2xx",subscription="erp"} 1"#),
        "{metrics}"
    );
    let status = service.stop(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}
