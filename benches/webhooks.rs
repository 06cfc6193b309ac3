//! Webhooks both ways (issue 13), measured on the real broker.
//!
//! - **deliver**: `cdcflow deliver` drains a preloaded topic of CloudEvents (12 partitions,
//!   `CDCFLOW_BENCH_DELIVERIES` = 50,000 events over `CDCFLOW_BENCH_DELIVERY_ENTITIES` =
//!   10,000 entities) into a receiver in this harness that answers each request after 10 ms
//!   (`CDCFLOW_BENCH_RECEIVER_MS`). Deliveries/s run from the first request received to the
//!   last first delivery; the receiver checks nothing (signing is still done by cdcflow).
//! - **ingress-sqlite** and **ingress-postgres**: `cdcflow ingress` under `wrk` (Debian's
//!   package) for `CDCFLOW_BENCH_INGRESS_SECONDS` (10) over `CDCFLOW_BENCH_CONNECTIONS` (32)
//!   connections; every request is a new signed push (a new request id: each one is claimed,
//!   written to Kafka with acks=all and its answer stored), so it is the dedup store's worst
//!   case. wrk gives the rate and the latency percentiles; the topic's record count is
//!   checked against the requests answered 202. PostgreSQL is deploy/local/postgres.sh's.
//!
//! Fairness, as in `benches/kafka.rs`: the broker, PostgreSQL, this harness (receiver, wrk) are
//! pinned to CPU 0, cdcflow alone on CPU 1 under GNU time, so its CPU seconds are its own.
//!
//! Run: `cargo bench --bench webhooks` (`CDCFLOW_BENCH_PARTS=deliver,ingress-sqlite,...` picks
//! parts). Results: stdout and `target/bench/webhooks.json`.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/checkout.rs"]
mod checkout;
use checkout::root;

#[path = "webhooks/load.rs"]
mod load;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use load::{
    Received, WRK_SCRIPT, postgres_database, receiver, topic_records, wait_for_address,
    write_pushes,
};
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::Producer;
use serde_json::json;
use support::env_number;
use support::kafka::{create_topics, delete_run_topics, producer, send};
use support::process::{
    BROKER_CPU, CONTENDER_CPU, PinnedBroker, TimedCommand, Usage, broker_pid, pin_harness,
};

const PARTITIONS: i32 = 12;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

struct Bench {
    bootstrap: String,
    runtime: tokio::runtime::Runtime,
    admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    prefix: String,
    work: PathBuf,
    cpu: Option<usize>,
}

fn main() {
    let root = root();
    let bootstrap = support::kafka::bootstrap(root);
    let parts = std::env::var("CDCFLOW_BENCH_PARTS")
        .unwrap_or_else(|_| "deliver,ingress-sqlite,ingress-postgres".to_owned());
    let pin = std::env::var("CDCFLOW_BENCH_PIN").map_or(true, |value| value != "0");
    let _pinned = pin.then(|| {
        let pid = broker_pid(root).unwrap_or_else(|why| panic!("cannot pin the broker: {why}"));
        let pinned = PinnedBroker::pin(pid, BROKER_CPU).expect("taskset pins the broker");
        pin_harness(BROKER_CPU);
        pinned
    });
    let results = support::results_path(root, "webhooks");
    let work = results.with_file_name("webhooks-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let bench = Bench {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        admin: rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("admin"),
        bootstrap,
        prefix: format!("benchhooks{}.", std::process::id()),
        work,
        cpu: pin.then_some(CONTENDER_CPU),
    };
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for part in parts.split(',') {
        match part {
            "deliver" => {
                let row = bench.deliver();
                let rate = row["deliveries_per_s"].as_f64().unwrap();
                targets.push(support::target(
                    "outgoing deliveries/s, 10 ms receiver",
                    ">= 5000",
                    format!("{rate:.0}"),
                    rate >= 5_000.0,
                ));
                rows.push(row);
            }
            "ingress-sqlite" | "ingress-postgres" => {
                let backend = part.trim_start_matches("ingress-");
                let row = bench.ingress(backend);
                let rate = row["requests_per_s"].as_f64().unwrap();
                let p99 = row["p99_ms"].as_f64().unwrap();
                targets.push(support::target(
                    &format!("ingress requests/s with dedup on {backend}, p99"),
                    ">= 5000 req/s, p99 < 20 ms",
                    format!("{rate:.0} req/s, p99 {p99:.1} ms"),
                    rate >= 5_000.0 && p99 < 20.0,
                ));
                rows.push(row);
            }
            other => panic!("unknown part `{other}`: deliver, ingress-sqlite, ingress-postgres"),
        }
    }
    let probe: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bench.bootstrap)
        .create()
        .expect("probe");
    delete_run_topics(&bench.runtime, &bench.admin, &probe, &bench.prefix);
    let report = json!({
        "bench": "webhooks",
        "machine": support::machine(),
        "date": support::utc_now(),
        "pinned": pin,
        "results": rows,
        "targets": targets,
    });
    std::fs::write(&results, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

impl Bench {
    fn cdcflow(
        &self,
        name: &str,
        args: &[&str],
        config: &Path,
    ) -> (support::process::Timed, PathBuf) {
        let log = self.work.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut timed = TimedCommand::new(
            Path::new(env!("CARGO_BIN_EXE_cdcflow")),
            self.cpu,
            log.with_extension("usage"),
        );
        timed
            .command()
            .args(args)
            .arg("--config")
            .arg(config)
            .env("CDCFLOW_LOG", "info,rdkafka=warn")
            .env("NO_COLOR", "1")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        (timed.spawn().expect("cdcflow starts"), log)
    }

    fn deliver(&self) -> serde_json::Value {
        let events = env_number("CDCFLOW_BENCH_DELIVERIES", 50_000);
        let entities = env_number("CDCFLOW_BENCH_DELIVERY_ENTITIES", 10_000);
        let receiver_ms = env_number("CDCFLOW_BENCH_RECEIVER_MS", 10);
        let in_flight = env_number("CDCFLOW_BENCH_IN_FLIGHT", 256);
        let topic = format!("{}events", self.prefix);
        create_topics(
            &self.runtime,
            &self.admin,
            std::slice::from_ref(&topic),
            PARTITIONS,
        );
        let feed = producer(&self.bootstrap, 5);
        for index in 0..events {
            let entity = index % entities;
            let value = json!({
                "specversion": "1.0", "id": format!("evt-{index}"),
                "type": "com.example.shop.OrderPaid", "source": "/bench",
                "time": "2026-11-30T09:00:00Z", "datacontenttype": "application/json",
                "data": {"order_id": entity, "amount": "12.50", "seq": index},
            });
            send(
                &feed,
                &topic,
                format!("{{\"id\":{entity}}}").as_bytes(),
                value.to_string().as_bytes(),
            );
        }
        feed.flush(Duration::from_secs(60))
            .expect("preload flushed");

        let received = Arc::new(Received::default());
        let (address, server) = receiver(Arc::clone(&received), Duration::from_millis(receiver_ms));
        let config = self.work.join("deliver.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}deliver"

[http]
listen = "127.0.0.1:0"

[[webhook]]
name = "bench"
topics = ["{topic}"]
url = "http://{address}/hook"
secrets = ["{SECRET}"]
max_in_flight = {in_flight}
max_queued = 20000
"#,
                bootstrap = self.bootstrap,
                prefix = self.prefix,
            ),
        )
        .unwrap();
        let started = Instant::now();
        let (running, log) = self.cdcflow("deliver", &["deliver"], &config);
        let deadline = Instant::now() + Duration::from_secs(600);
        while (received.seen.lock().unwrap().len() as u64) < events {
            assert!(
                Instant::now() < deadline,
                "deliveries stalled at {}; see {}",
                received.seen.lock().unwrap().len(),
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (_, usage) = running.stop(Duration::from_secs(30));
        drop(server);
        let first = received.first_ns.load(Ordering::SeqCst);
        let last = received.last_ns.load(Ordering::SeqCst);
        let seconds = (last - first) as f64 / 1e9;
        let rate = events as f64 / seconds;
        let requests = received.requests.load(Ordering::SeqCst);
        eprintln!(
            "deliver: {events} events to a {receiver_ms} ms receiver in {seconds:.2} s: {rate:.0} \
             deliveries/s, {} requests, {:.1} CPU µs per delivery, peak RSS {:.0} MiB",
            requests,
            usage.cpu_s() * 1e6 / events as f64,
            usage.peak_rss_mib()
        );
        json!({
            "part": "deliver",
            "events": events,
            "entities": entities,
            "receiver_ms": receiver_ms,
            "max_in_flight": in_flight,
            "seconds": seconds,
            "deliveries_per_s": rate,
            "requests": requests,
            "wall_s_with_startup": started.elapsed().as_secs_f64(),
            "cpu_s": usage.cpu_s(),
            "cpu_us_per_delivery": usage.cpu_s() * 1e6 / events as f64,
            "peak_rss_mib": usage.peak_rss_mib(),
        })
    }

    fn ingress(&self, backend: &str) -> serde_json::Value {
        let seconds = env_number("CDCFLOW_BENCH_INGRESS_SECONDS", 10);
        let connections = env_number("CDCFLOW_BENCH_CONNECTIONS", 32);
        let topic = format!("{}ingress-{backend}", self.prefix);
        create_topics(
            &self.runtime,
            &self.admin,
            std::slice::from_ref(&topic),
            PARTITIONS,
        );
        let database_url = match backend {
            "sqlite" => format!("sqlite://{}", self.work.join("ingress.db").display()),
            _ => postgres_database(&format!("benchhooks{}", std::process::id())),
        };
        let config = self.work.join(format!("ingress-{backend}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}ingress"

[http]
listen = "127.0.0.1:0"

[ingress]
listen = "127.0.0.1:0"
secrets = ["{SECRET}"]
database_url = "{database_url}"

[[ingress.route]]
path = "/orders"
topic = "{topic}"
key = ["id"]
"#,
                bootstrap = self.bootstrap,
                prefix = self.prefix,
            ),
        )
        .unwrap();
        let floor_topic = format!("{topic}-floor");
        create_topics(
            &self.runtime,
            &self.admin,
            std::slice::from_ref(&floor_topic),
            PARTITIONS,
        );
        let floor = self.kafka_floor(&floor_topic, connections, seconds.min(5));
        // More signed pushes than wrk can send: every request carries a new id.
        let requests_file = self.work.join(format!("pushes-{backend}.tsv"));
        write_pushes(&requests_file, seconds * 25_000);
        let (running, log) = self.cdcflow(&format!("ingress-{backend}"), &["ingress"], &config);
        let address = wait_for_address(&log, "ingress listening on http://");
        let script = self.work.join("pushes.lua");
        std::fs::write(&script, WRK_SCRIPT).unwrap();
        let wrk = Command::new("wrk")
            .args(["-t", "1", "-c", &connections.to_string()])
            .args(["-d", &format!("{seconds}s"), "--timeout", "10s"])
            .arg("-s")
            .arg(&script)
            .arg(format!("http://{address}"))
            .arg("--")
            .arg(&requests_file)
            .arg("1")
            .output()
            .expect("wrk runs (apt-get install wrk)");
        let (_, usage): (_, Usage) = running.stop(Duration::from_secs(30));
        let text = String::from_utf8_lossy(&wrk.stdout).into_owned();
        assert!(
            wrk.status.success(),
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&wrk.stderr)
        );
        let summary: serde_json::Value = text
            .lines()
            .find_map(|line| line.strip_prefix("RESULT "))
            .and_then(|line| serde_json::from_str(line).ok())
            .unwrap_or_else(|| panic!("no RESULT line from wrk: {text}"));
        let requests = summary["requests"].as_u64().unwrap();
        let failed = summary["non_2xx"].as_u64().unwrap()
            + summary["connect_errors"].as_u64().unwrap()
            + summary["timeouts"].as_u64().unwrap();
        let duration_s = summary["duration_us"].as_f64().unwrap() / 1e6;
        let rate = requests as f64 / duration_s;
        let written = topic_records(&self.bootstrap, &topic);
        let ms = |key: &str| summary[key].as_f64().unwrap() / 1000.0;
        eprintln!(
            "ingress on {backend}: Kafka alone (acks=all, {connections} in flight): {:.0} \
             records/s, p50 {:.1} ms, p99 {:.1} ms",
            floor["records_per_s"].as_f64().unwrap(),
            floor["p50_ms"].as_f64().unwrap(),
            floor["p99_ms"].as_f64().unwrap()
        );
        eprintln!(
            "ingress on {backend}: {rate:.0} requests/s over {connections} connections, p50 \
             {:.1} ms, p99 {:.1} ms, max {:.1} ms; {failed} not 202; {written} records written; \
             {:.1} CPU µs per request, peak RSS {:.0} MiB",
            ms("p50_us"),
            ms("p99_us"),
            ms("max_us"),
            usage.cpu_s() * 1e6 / requests as f64,
            usage.peak_rss_mib()
        );
        assert_eq!(failed, 0, "every push is answered 202: {text}");
        // wrk stops with requests in flight: those may be written without being counted.
        assert!(
            written >= requests && written <= requests + connections,
            "{written} records for {requests} accepted pushes"
        );
        json!({
            "part": format!("ingress-{backend}"),
            "connections": connections,
            "seconds": duration_s,
            "requests": requests,
            "requests_per_s": rate,
            "p50_ms": ms("p50_us"),
            "p90_ms": ms("p90_us"),
            "p99_ms": ms("p99_us"),
            "max_ms": ms("max_us"),
            "records_written": written,
            "floor": floor,
            "cpu_s": usage.cpu_s(),
            "cpu_us_per_request": usage.cpu_s() * 1e6 / requests as f64,
            "peak_rss_mib": usage.peak_rss_mib(),
        })
    }
}

impl Bench {
    /// The floor under the ingress: `in_flight` writers that each send one record through an
    /// idempotent producer (acks=all) and wait for its acknowledgement, as the ingress does
    /// per push, for `seconds`, from this harness's CPU (beside the broker, like wrk).
    fn kafka_floor(&self, topic: &str, in_flight: u64, seconds: u64) -> serde_json::Value {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .create()
            .expect("producer");
        let mut latencies_us: Vec<u64> = self.runtime.block_on(async {
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut writers = tokio::task::JoinSet::new();
            for writer in 0..in_flight {
                let (producer, topic) = (producer.clone(), topic.to_owned());
                writers.spawn(async move {
                    let mut latencies = Vec::new();
                    let body = format!(r#"{{"id":{writer},"status":"paid","version":1}}"#);
                    let key = format!(r#"{{"id":{writer}}}"#);
                    while Instant::now() < until {
                        let sent = Instant::now();
                        producer
                            .send(
                                FutureRecord::to(&topic).key(&key).payload(&body),
                                Duration::from_secs(10),
                            )
                            .await
                            .expect("acknowledged");
                        latencies.push(sent.elapsed().as_micros() as u64);
                    }
                    latencies
                });
            }
            let mut all = Vec::new();
            while let Some(done) = writers.join_next().await {
                all.extend(done.unwrap());
            }
            all
        });
        latencies_us.sort_unstable();
        let at = |fraction: f64| {
            latencies_us
                [((latencies_us.len() as f64 * fraction) as usize).min(latencies_us.len() - 1)]
                as f64
                / 1000.0
        };
        json!({
            "records_per_s": latencies_us.len() as f64 / seconds as f64,
            "p50_ms": at(0.50),
            "p99_ms": at(0.99),
            "max_ms": at(1.0),
        })
    }
}
