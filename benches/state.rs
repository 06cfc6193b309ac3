//! State at scale (issue 10): `cdcflow run` holding 1,000,000 entities, and the restore of
//! their changelog into an empty local store, with the real binary against a real broker.
//!
//! 1. **Load.** One Debezium Postgres create per entity (`support::order_changes` with as many
//!    records as entities) is preloaded into a 12-partition `orders` topic, then `cdcflow run`
//!    (exactly_once, the default delivery, over the `examples/shop.toml` pipelines) processes
//!    it from its start until the group's committed offsets reach the end of the input; then
//!    SIGTERM. Measured: peak RSS of the process (GNU time's `%M`), CPU seconds (user + sys),
//!    the load rate (entities / seconds from spawn to the last commit), and the SQLite file's
//!    size and row count afterwards (when the `sqlite3` CLI is installed).
//! 2. **Restore.** The local SQLite file (and its `-wal`/`-shm`) is deleted and `cdcflow run`
//!    starts again with the same config and group, so no input is left and every state comes
//!    back from the compacted changelog topic. Measured: the `restored changelog` line the
//!    service logs at INFO (count and elapsed, which the result and the target use: the restore
//!    alone, without start-up and group join), the wall time from spawn to that line, and the
//!    restoring process's peak RSS and CPU seconds; then SIGTERM.
//!
//! Both runs log at INFO to `load.log` / `restore.log` (kept with `CDCFLOW_BENCH_DIR`). To tell
//! where memory goes, stderr also shows the load's RSS at each tenth of the input committed
//! (flat once the entity cache is full: the entities live in SQLite, not in memory) and the
//! anonymous / file-backed split at the end.
//!
//! Pinning, as in the Kafka benchmark: with two or more CPUs the cdcflow process runs under
//! `taskset -c 1` (the contender's CPU), so its CPU seconds are one core's, and the broker and
//! this harness are pinned to CPU 0 (given every CPU back at the end). The broker's pid comes
//! from `CDCFLOW_BENCH_BROKER_PID`, else `deploy/local/kafka.sh pid`; when neither finds it the
//! broker stays unpinned (said on stderr). `CDCFLOW_BENCH_PIN=0` pins nothing.
//!
//! Targets: 1M entities in at most 150 MiB peak RSS; the restore of a 1M-entity changelog in at
//! most 10 s.
//!
//! Run: `cargo bench --bench state --features kafka-it`. Environment:
//! - `CDCFLOW_KAFKA_BOOTSTRAP`: the broker; unset, `deploy/local/kafka.sh start` starts the
//!   local one and its address is used.
//! - `CDCFLOW_BENCH_BROKER_PID`: the broker to pin; `CDCFLOW_BENCH_PIN=0`: no pinning.
//! - `CDCFLOW_BENCH_ENTITIES`: entities (and input records), default 1,000,000.
//! - `CDCFLOW_BENCH_RESULTS`: directory of `state.json` (default `<repo>/target/bench`).
//! - `CDCFLOW_BENCH_DIR`: keep the configs, state files and the two runs' logs there
//!   (default: a temporary directory, deleted at the end).
//! - `CDCFLOW_BENCH_KEEP_TOPICS=1`: keep the run's topics (otherwise all are deleted at the
//!   end: the input, changelog and event topics of 1M entities fill ~1.5 GB of broker log).
//! - `CDCFLOW__STATE__CACHE_ENTRIES`, `CDCFLOW__STATE__FLUSH_RECORDS` and any other
//!   `CDCFLOW__…` override reach the cdcflow process unchanged (to compare settings).

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/checkout.rs"]
mod checkout;
use checkout::root;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use serde_json::json;
use support::kafka::{committed, create_topics, delete_run_topics, group_consumer, preload};
use support::process::{
    BROKER_CPU, CONTENDER_CPU, PinnedBroker, Timed, TimedCommand, Usage, broker_pid, pin_harness,
    status_kib,
};
use support::{env_number, order_changes, peak_rss_kib};

const PARTITIONS: i32 = 12;
/// The targets of issue 10.
const RSS_TARGET_MIB: f64 = 150.0;
const RESTORE_TARGET_SECONDS: f64 = 10.0;
/// A run that has not finished by then is reported as failed rather than waited for.
const RUN_TIMEOUT: Duration = Duration::from_secs(1_800);

/// The resident memory's split (`RssAnon`, `RssFile`), in KiB: heap against mapped files.
fn rss_split_kib(pid: u32) -> (u64, u64) {
    let kib = |field: &str| status_kib(pid, field).unwrap_or(0);
    (kib("RssAnon"), kib("RssFile"))
}

/// A line of the service's log that the bench waits for, with when it came.
#[derive(Debug)]
struct Logged {
    at: Instant,
    line: String,
}

/// A `cdcflow run` under GNU time (and taskset): its log goes to a file, and the lines that
/// matter come back through `lines`.
struct Service {
    timed: Timed,
    /// cdcflow's own pid, for its memory figures along the way.
    pid: u32,
    log: PathBuf,
    lines: mpsc::Receiver<Logged>,
}

const WATCHED: [&str; 2] = [
    "partitions assigned; restoring their state",
    "restored changelog",
];

impl Service {
    fn start(config: &Path, dir: &Path, name: &str, pin: bool) -> Service {
        let log = dir.join(format!("{name}.log"));
        let mut timed = TimedCommand::new(
            Path::new(env!("CARGO_BIN_EXE_cdcflow")),
            pin.then_some(CONTENDER_CPU),
            dir.join(format!("{name}.time")),
        );
        timed
            .command()
            .args(["run", "--config"])
            .arg(config)
            .env("CDCFLOW_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut timed = timed.spawn().expect("cdcflow under /usr/bin/time starts");
        let stderr = timed.take_stderr().unwrap();
        let (sender, lines) = mpsc::channel();
        let mut file = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let _ = writeln!(file, "{line}");
                if WATCHED.iter().any(|watched| line.contains(watched)) {
                    let _ = file.flush();
                    let _ = sender.send(Logged { at, line });
                }
            }
            let _ = file.flush();
        });
        let pid = loop {
            if let Some(pid) = timed.program_pid() {
                break pid;
            }
            if let Some(status) = timed.exited() {
                panic!("cdcflow exited at once ({status})");
            }
            assert!(
                timed.started.elapsed() < Duration::from_secs(10),
                "cdcflow did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        Service {
            timed,
            pid,
            log,
            lines,
        }
    }

    fn started(&self) -> Instant {
        self.timed.started
    }

    /// Fails with the end of the log if the service has exited.
    fn check_running(&mut self) {
        if let Some(status) = self.timed.exited() {
            panic!(
                "cdcflow exited early ({status}); its log ends with:\n{}",
                tail(&self.log, 30)
            );
        }
        assert!(
            self.started().elapsed() < RUN_TIMEOUT,
            "cdcflow did not finish within {RUN_TIMEOUT:?}; its log ends with:\n{}",
            tail(&self.log, 30)
        );
    }

    /// Waits for the next watched log line containing `text`.
    fn wait_for(&mut self, text: &str) -> Logged {
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(logged) if logged.line.contains(text) => return logged,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => self.check_running(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.check_running();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// SIGTERM, then GNU time's figures of the whole run.
    fn stop(self) -> Usage {
        let (status, usage) = self.timed.stop(RUN_TIMEOUT);
        assert!(
            status.success(),
            "cdcflow did not stop cleanly ({status}); its log ends with:\n{}",
            tail(&self.log, 30)
        );
        usage
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A `key=value` field of a tracing log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// A `Duration` in its `Debug` form (`6.12s`, `812.3ms`, `95µs`), in seconds.
fn debug_seconds(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(number * scale)
}

/// The SQLite state file's size (with its WAL) and its row count, if `sqlite3` is installed.
fn store_summary(db: &Path) -> (u64, Option<u64>) {
    let size = ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|metadata| metadata.len())
        .sum();
    let rows = Command::new("sqlite3")
        .arg(db)
        .arg("SELECT COUNT(*) FROM entity_state")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok());
    (size, rows)
}

fn remove_store(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("cannot delete {path}: {error}"),
        }
    }
}

/// `1M`, `100k` or the number itself, for the result names.
fn count_label(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let entities = env_number("CDCFLOW_BENCH_ENTITIES", 1_000_000);
    let label = count_label(entities);
    let machine = support::machine();
    let cpus = support::cpus();
    let pin = cpus >= 2 && std::env::var("CDCFLOW_BENCH_PIN").map_or(true, |v| v != "0");
    let bootstrap = support::kafka::bootstrap(root());
    let pinned_broker = if pin {
        // A broker not found, or not pinnable, runs unpinned: said below, and in the summary.
        let broker = broker_pid(root())
            .ok()
            .and_then(|pid| PinnedBroker::pin(pid, BROKER_CPU));
        pin_harness(BROKER_CPU);
        match &broker {
            Some(broker) => eprintln!(
                "broker (pid {}) and harness on CPU {BROKER_CPU}, cdcflow on CPU {CONTENDER_CPU}",
                broker.pid()
            ),
            None => eprintln!(
                "broker not found (set CDCFLOW_BENCH_BROKER_PID): it runs unpinned; harness on \
                 CPU {BROKER_CPU}, cdcflow on CPU {CONTENDER_CPU}"
            ),
        }
        broker
    } else {
        None
    };
    let temporary = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("CDCFLOW_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| temporary.path().to_owned());
    std::fs::create_dir_all(&dir).unwrap();

    let prefix = format!("state{}.", std::process::id());
    let input = format!("{prefix}shop.public.orders");
    let customers = format!("{prefix}shop.public.customers");
    let group = format!("{prefix}group");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let probe = group_consumer(&bootstrap, &group);
    let topics = Topics {
        runtime: &runtime,
        admin: &admin,
        probe: &probe,
        prefix: &prefix,
    };
    create_topics(&runtime, &admin, &[input.clone(), customers], PARTITIONS);

    let started = Instant::now();
    let changes = order_changes(entities, entities).map(|(id, value)| (id, value.to_string()));
    preload(&bootstrap, &input, changes);
    eprintln!(
        "preloaded {entities} creates of {entities} entities in {PARTITIONS} partitions in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The example's pipelines, every topic under this run's prefix, the state in `dir`.
    let db = dir.join("state.db");
    let example = std::fs::read_to_string(root().join("examples/shop.toml")).unwrap();
    let mut config = format!(
        "[kafka]\nbootstrap_servers = \"{bootstrap}\"\ngroup_id = \"{group}\"\n\
         instance_id = \"statebench\"\ndelivery = \"exactly_once\"\n\
         topic_partitions = {PARTITIONS}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n"
    );
    let mut section = "";
    for line in example.lines() {
        if line.starts_with('[') {
            section = line;
        }
        if line.starts_with("path = ") {
            config.push_str(&format!("path = \"{}\"\n", db.display()));
            continue;
        }
        config.push_str(&line.replace("\"shop.", &format!("\"{prefix}shop.")));
        config.push('\n');
        // The DLQ topics too (by default `cdcflow.dlq.<pipeline>`, shared by every run).
        if section == "[[pipeline]]"
            && let Some(name) = line.strip_prefix("name = ")
        {
            let name = name.trim_matches('"');
            config.push_str(&format!("dlq_topic = \"{prefix}cdcflow.dlq.{name}\"\n"));
        }
    }
    let config_path = dir.join("state.toml");
    std::fs::write(&config_path, config).unwrap();
    remove_store(&db);

    // 1. Load: every create processed and committed.
    let mut service = Service::start(&config_path, &dir, "load", pin);
    let startup = service.wait_for("restored changelog");
    let startup_seconds = (startup.at - service.started()).as_secs_f64();
    let mut last_check = Instant::now();
    let mut next_mark = 1;
    let mut progress = Vec::new();
    let loaded = loop {
        std::thread::sleep(Duration::from_millis(50));
        service.check_running();
        if last_check.elapsed() < Duration::from_millis(250) {
            continue;
        }
        last_check = Instant::now();
        let done = committed(&probe, &input, PARTITIONS);
        // RSS along the way: does it grow with the entities held, or level off?
        while next_mark <= 10 && done as u64 * 10 >= entities * next_mark {
            if let Some(rss) = status_kib(service.pid, "VmRSS") {
                progress.push(format!("{}0% {:.0}", next_mark, rss as f64 / 1024.0));
            }
            next_mark += 1;
        }
        if done >= entities as i64 {
            break Instant::now();
        }
    };
    let load_seconds = (loaded - service.started()).as_secs_f64();
    let load_hwm = peak_rss_kib(service.pid).unwrap_or(0);
    let (anon, file) = rss_split_kib(service.pid);
    let load = service.stop();
    let load_rate = entities as f64 / load_seconds;
    let (load_size, load_rows) = store_summary(&db);
    eprintln!(
        "load: RSS (MiB) at committed progress: {}; at the last commit VmHWM {:.0} MiB, \
         RSS {:.0} MiB anonymous + {:.0} MiB files",
        progress.join(", "),
        load_hwm as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );

    // 2. Restore: an empty local store, the same group; every state comes from the changelog.
    remove_store(&db);
    let mut service = Service::start(&config_path, &dir, "restore", pin);
    let assigned = service.wait_for("partitions assigned");
    let restored_line = service.wait_for("restored changelog");
    let restore_hwm = peak_rss_kib(service.pid).unwrap_or(0);
    let (anon, file) = rss_split_kib(service.pid);
    eprintln!(
        "restore: at the log line RSS {:.0} MiB anonymous + {:.0} MiB files",
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    let restore_wall = (restored_line.at - service.started()).as_secs_f64();
    let assigned_to_restored = (restored_line.at - assigned.at).as_secs_f64();
    let restored: u64 = field(&restored_line.line, "restored")
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", restored_line.line));
    let restore_seconds = field(&restored_line.line, "elapsed")
        .and_then(debug_seconds)
        .unwrap_or_else(|| panic!("no elapsed in {:?}", restored_line.line));
    let restore = service.stop();
    let (restore_size, restore_rows) = store_summary(&db);
    assert_eq!(
        restored, entities,
        "the restore read {restored} changelog records, not one per entity"
    );

    let rows = |rows: Option<u64>| rows.map_or("? (no sqlite3)".to_owned(), |n| n.to_string());
    let pinned = match (&pinned_broker, pin) {
        (Some(_), _) => format!(" (cdcflow on CPU {CONTENDER_CPU}, broker on CPU {BROKER_CPU})"),
        (None, true) => format!(" (cdcflow on CPU {CONTENDER_CPU}, broker unpinned)"),
        (None, false) => " (unpinned)".to_owned(),
    };
    println!("state at scale: {entities} entities, {PARTITIONS} partitions, exactly_once{pinned}");
    println!(
        "load:    {load_rate:>9.0} records/s ({load_seconds:.1}s from spawn to the last commit, \
         {startup_seconds:.1}s of it start-up), peak RSS {:.1} MiB, CPU {:.1}s \
         (user {:.1}s, sys {:.1}s); store {:.0} MiB, {} rows",
        load.peak_rss_mib(),
        load.cpu_s(),
        load.user_s,
        load.system_s,
        load_size as f64 / 1_048_576.0,
        rows(load_rows)
    );
    println!(
        "restore: {restored} records in {restore_seconds:.2}s (logged) = {:.0} entities/s; \
         {restore_wall:.1}s from spawn to the log line ({assigned_to_restored:.1}s from the \
         assignment); peak RSS {:.1} MiB (VmHWM at the line {:.1} MiB), CPU {:.1}s \
         (user {:.1}s, sys {:.1}s, whole run of {:.1}s); store {:.0} MiB, {} rows",
        restored as f64 / restore_seconds,
        restore.peak_rss_mib(),
        restore_hwm as f64 / 1024.0,
        restore.cpu_s(),
        restore.user_s,
        restore.system_s,
        restore.wall_s,
        restore_size as f64 / 1_048_576.0,
        rows(restore_rows)
    );

    let rss_met = load.peak_rss_mib() <= RSS_TARGET_MIB;
    let restore_met = restore_seconds <= RESTORE_TARGET_SECONDS;
    println!(
        "targets: {label} entities in <= {RSS_TARGET_MIB:.0} MiB: {:.0} MiB, {}; restore in <= \
         {RESTORE_TARGET_SECONDS:.0} s: {restore_seconds:.1} s, {}",
        load.peak_rss_mib(),
        if rss_met { "met" } else { "MISSED" },
        if restore_met { "met" } else { "MISSED" }
    );
    let results = json!({
        "benchmark": "state",
        "date": support::utc_now(),
        "machine": machine,
        "results": [
            {"name": "entities in the store", "value": entities, "unit": "entities"},
            {"name": format!("peak RSS holding {label} entities"),
             "value": round(load.peak_rss_mib(), 1), "unit": "MiB"},
            {"name": format!("load of {label} creates"), "value": load_rate.round() as u64,
             "unit": "records/s"},
            {"name": format!("restore of a {label}-entity changelog"),
             "value": round(restore_seconds, 2), "unit": "s"},
            {"name": "restore rate",
             "value": (restored as f64 / restore_seconds).round() as u64,
             "unit": "entities/s"},
            {"name": "peak RSS while restoring", "value": round(restore.peak_rss_mib(), 1),
             "unit": "MiB"},
        ],
        "targets": [
            support::target(
                &format!("{label} entities, peak RSS"),
                &format!("<= {RSS_TARGET_MIB:.0} MiB"),
                format!("{:.0} MiB", load.peak_rss_mib()),
                rss_met,
            ),
            support::target(
                &format!("restore of a {label}-entity changelog"),
                &format!("<= {RESTORE_TARGET_SECONDS:.0} s"),
                format!("{restore_seconds:.1} s"),
                restore_met,
            ),
        ],
    });
    let path = support::results_path(root(), "state");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .unwrap();
    eprintln!("wrote {}", path.display());
    drop(topics);
    drop(pinned_broker);
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Deletes the run's topics when the bench ends, failed or not.
struct Topics<'a> {
    runtime: &'a tokio::runtime::Runtime,
    admin: &'a AdminClient<DefaultClientContext>,
    probe: &'a BaseConsumer,
    prefix: &'a str,
}

impl Drop for Topics<'_> {
    fn drop(&mut self) {
        if std::env::var("CDCFLOW_BENCH_KEEP_TOPICS").is_err() {
            delete_run_topics(self.runtime, self.admin, self.probe, self.prefix);
        }
    }
}
