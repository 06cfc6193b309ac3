//! The load around the webhook benchmarks: the slow receiver that outgoing deliveries go to,
//! the signed pushes and the wrk script that send them to the ingress, PostgreSQL, and what
//! the topics and logs say afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cdcflow::webhook::{SigningSecret, signature_header};
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::checkout::root;
use super::support::process::{BROKER_CPU, pin_process};
use super::{PARTITIONS, SECRET};

/// What the receiver saw: requests, first deliveries, and when the first and the last came.
#[derive(Default)]
pub(crate) struct Received {
    pub(crate) requests: AtomicU64,
    pub(crate) first_ns: AtomicU64,
    pub(crate) last_ns: AtomicU64,
    pub(crate) seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The receiver: answers 204 after `delay`; runs on its own runtime on this harness's CPU.
pub(crate) fn receiver(
    received: Arc<Received>,
    delay: Duration,
) -> (String, std::thread::JoinHandle<()>) {
    use axum::routing::post;
    let (ready, address) = std::sync::mpsc::channel();
    let clock = Instant::now();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ready.send(listener.local_addr().unwrap()).unwrap();
            let handler = move |headers: axum::http::HeaderMap| {
                let received = Arc::clone(&received);
                async move {
                    tokio::time::sleep(delay).await;
                    let now = clock.elapsed().as_nanos() as u64;
                    received.requests.fetch_add(1, Ordering::SeqCst);
                    let id = headers
                        .get("webhook-id")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    if received.seen.lock().unwrap().insert(id) {
                        let _ = received.first_ns.compare_exchange(
                            0,
                            now,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        received.last_ns.fetch_max(now, Ordering::SeqCst);
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            };
            let router = axum::Router::new().route("/hook", post(handler));
            axum::serve(listener, router).await.unwrap();
        });
    });
    (address.recv().unwrap().to_string(), server)
}

/// `count` signed pushes, one per line: id, timestamp, signature, body (tab-separated).
pub(crate) fn write_pushes(path: &Path, count: u64) {
    use std::io::Write;
    let secret = [SigningSecret::parse(SECRET).unwrap()];
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for index in 0..count {
        let id = format!("msg_{}_{index}", std::process::id());
        let body = format!(
            r#"{{"id":{},"status":"paid","amount":"12.50","currency":"EUR","version":{index}}}"#,
            index % 100_000
        );
        let signature = signature_header(&secret, &id, timestamp, body.as_bytes());
        writeln!(out, "{id}\t{timestamp}\t{signature}\t{body}").unwrap();
    }
    out.flush().unwrap();
}

/// The address after `needle` in the log, once it is there.
pub(crate) fn wait_for_address(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(address) = text
            .split(needle)
            .nth(1)
            .and_then(|rest| rest.split([' ', '\n', '/']).next())
        {
            return address.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in {}: {text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh database in deploy/local/postgres.sh's PostgreSQL (started if needed, and pinned
/// beside the broker); its URL.
pub(crate) fn postgres_database(name: &str) -> String {
    let script = root().join("deploy/local/postgres.sh");
    let out = Command::new(&script)
        .arg("start")
        .output()
        .expect("postgres.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let status = Command::new(&script)
        .args([
            "psql",
            "-q",
            "-c",
            &format!("CREATE DATABASE {name} OWNER cdcflow"),
        ])
        .status()
        .expect("psql");
    assert!(status.success(), "CREATE DATABASE {name}");
    let dir = std::env::var("CDCFLOW_PG_DIR").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cdcflow/postgres"),
        PathBuf::from,
    );
    if let Some(pid) = std::fs::read_to_string(dir.join("data/postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next().map(str::to_owned))
    {
        // Backends fork from the postmaster after this, and inherit its CPUs.
        let cpus =
            std::env::var("CDCFLOW_BENCH_PG_CPUS").unwrap_or_else(|_| BROKER_CPU.to_string());
        pin_process(pid.trim().parse().unwrap(), &cpus);
    }
    let (server, _) = url.rsplit_once('/').unwrap();
    format!("{server}/{name}")
}

/// Records in `topic` (the sum of its partitions' high watermarks).
pub(crate) fn topic_records(bootstrap: &str, topic: &str) -> u64 {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .unwrap();
            (high - low) as u64
        })
        .sum()
}

/// wrk's script: each thread loads its share of the signed pushes and sends each once; the
/// summary comes back as one JSON line.
pub(crate) const WRK_SCRIPT: &str = r#"
local threads = {}
local requests = {}
local next_request = 1

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

-- args: the pushes file, the number of wrk threads; thread k sends lines k, k + n, ...
function init(args)
  local threads_count = tonumber(args[2])
  local file = assert(io.open(args[1], "r"))
  local index = 0
  for line in file:lines() do
    if index % threads_count == thread_index then
      local id, timestamp, signature, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", "/orders", {
        ["content-type"] = "application/json",
        ["webhook-id"] = id,
        ["webhook-timestamp"] = timestamp,
        ["webhook-signature"] = signature,
      }, body)
    end
    index = index + 1
  end
  file:close()
end

-- Past the last push it starts again: those copies are duplicates, and the harness fails the
-- run when the topic holds fewer records than the requests answered.
function request()
  local r = requests[next_request]
  next_request = next_request + 1
  if next_request > #requests then next_request = 1 end
  return r
end

function done(summary, latency, requests_done)
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"non_2xx":%d,"connect_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, summary.errors.status, summary.errors.connect,
    summary.errors.timeout))
end
"#;
