//! The side-by-side Kafka benchmark (issue 10): five contenders on one preloaded topic of
//! 1,000,000 Debezium Postgres changes over 100,000 `orders` entities in 12 partitions.
//!
//! - **raw pipe**: consume and produce every record unchanged with rdkafka, no logic (the
//!   ceiling); done when it has produced every record.
//! - **cdcflow at-least-once** and **cdcflow exactly-once**: `cdcflow run` with
//!   `examples/shop.toml`; done when the group's committed offsets reach the end of the input.
//! - **Kafka Streams at_least_once** and **exactly_once_v2**: `benches/kstreams`, the same gate
//!   and six rules over a RocksDB store; done when it has processed every record and closed.
//!
//! Fairness: the broker and this harness (preload, load generator, probes) are pinned to one
//! CPU and each contender runs alone on the other (`taskset`). Each contender runs under GNU
//! time, so its CPU seconds (user + sys) and peak RSS come from the kernel's accounting of the
//! whole process. Throughput counts from the contender's first visible output to done, so
//! group joins and JVM start-up do not count; CPU seconds count everything.
//!
//! Latency: each contender then runs on a fresh topic fed at half its measured throughput for
//! `CDCFLOW_BENCH_LATENCY_SECONDS` (20); the generator stamps `source.ts_ms` with the send
//! time, and a read_committed consumer takes each output's age when it sees it (p50, p99, max).
//!
//! Run: `cargo bench --bench kafka`. Uses the broker `deploy/local/kafka.sh start` starts
//! (its pid from `kafka.sh pid`), or `CDCFLOW_KAFKA_BOOTSTRAP` with `CDCFLOW_BENCH_BROKER_PID`.
//! `CDCFLOW_BENCH_RECORDS` / `CDCFLOW_BENCH_ENTITIES` change the size,
//! `CDCFLOW_BENCH_CONTENDERS=raw,cdcflow-eos,...` picks contenders, `CDCFLOW_BENCH_PIN=0` runs
//! unpinned (figures then not comparable). Results: stdout and `target/bench/kafka.json`
//! (`CDCFLOW_BENCH_RESULTS` moves it); `benches/render.sh` renders them into
//! `docs/performance.md`. Every topic the run created is deleted at its end (1M records fill
//! ~5 GB of broker log), unless `CDCFLOW_BENCH_KEEP_TOPICS=1`.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/checkout.rs"]
mod checkout;
use checkout::root;

#[path = "kafka/latency.rs"]
mod latency;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use latency::{Latency, Watermarks};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use support::kafka::{
    committed, create_topics, delete_run_topics, group_consumer, preload, producer, send,
};
use support::process::{
    BROKER_CPU, CONTENDER_CPU, PinnedBroker, Timed, TimedCommand, Usage, broker_pid, pin_harness,
};
use support::{env_number, order_change_texts};

const PARTITIONS: i32 = 12;

/// The raw pipe: consume every input record and produce it unchanged, no logic; after
/// `records` records, or until killed when `records` is 0.
fn raw_pipe(bootstrap: &str, input: &str, output: &str, group: &str, records: u64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .expect("consumer");
    consumer.subscribe(&[input]).expect("subscribe");
    let producer = producer(bootstrap, 5);
    let limit = if records == 0 { u64::MAX } else { records };
    let mut seen = 0;
    while seen < limit {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            send(
                &producer,
                output,
                message.key().unwrap_or_default(),
                message.payload().unwrap_or_default(),
            );
            seen += 1;
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// How a contender is started and when it is done.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    RawPipe,
    Cdcflow { delivery: &'static str },
    KafkaStreams { guarantee: &'static str },
}

#[derive(Debug, Clone, Copy)]
struct Contender {
    id: &'static str,
    name: &'static str,
    kind: Kind,
}

const CONTENDERS: [Contender; 5] = [
    Contender {
        id: "raw",
        name: "raw pipe",
        kind: Kind::RawPipe,
    },
    Contender {
        id: "cdcflow-alo",
        name: "cdcflow at-least-once",
        kind: Kind::Cdcflow {
            delivery: "at_least_once",
        },
    },
    Contender {
        id: "cdcflow-eos",
        name: "cdcflow exactly-once",
        kind: Kind::Cdcflow {
            delivery: "exactly_once",
        },
    },
    Contender {
        id: "kstreams-alo",
        name: "Kafka Streams at_least_once",
        kind: Kind::KafkaStreams {
            guarantee: "at_least_once",
        },
    },
    Contender {
        id: "kstreams-eos",
        name: "Kafka Streams exactly_once_v2",
        kind: Kind::KafkaStreams {
            guarantee: "exactly_once_v2",
        },
    },
];

/// One contender's throughput run.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    elapsed_s: f64,
    processing_s: f64,
    usage: Usage,
}

struct Bench {
    bootstrap: String,
    prefix: String,
    records: u64,
    entities: u64,
    /// The contender's CPU; `None` runs it unpinned (`CDCFLOW_BENCH_PIN=0`).
    cpu: Option<usize>,
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Runtime,
    /// Configs, state and logs of the contenders; kept when the run fails.
    work: PathBuf,
}

/// A contender started on an input, with the topics it writes its events to.
struct Launched {
    running: Timed,
    outputs: Vec<String>,
    group: String,
}

impl Bench {
    fn create_topics(&self, names: &[String]) {
        create_topics(&self.runtime, &self.admin, names, PARTITIONS);
    }

    fn preload(&self, input: &str) {
        let started = Instant::now();
        let source_ts_ms = |offset| 1_732_528_800_000 + offset;
        let changes = order_change_texts(self.records, self.entities, source_ts_ms);
        preload(&self.bootstrap, input, changes);
        eprintln!(
            "preloaded {} records over {} entities in {:.1}s",
            self.records,
            self.entities,
            started.elapsed().as_secs_f64()
        );
    }

    /// Starts `contender` on `input`; `expect` records (none: until stopped).
    fn launch(
        &self,
        contender: &Contender,
        tag: &str,
        input: &str,
        expect: Option<u64>,
    ) -> Launched {
        let group = format!("{}{tag}", self.prefix);
        let log = self.work.join(format!("{tag}.log"));
        let (program, args, env, outputs): (PathBuf, Vec<String>, Vec<(&str, String)>, _) =
            match contender.kind {
                Kind::RawPipe => {
                    let output = format!("{group}.raw-output");
                    let args = vec![
                        "--raw-pipe".to_owned(),
                        self.bootstrap.clone(),
                        input.to_owned(),
                        output.clone(),
                        group.clone(),
                        expect.unwrap_or(0).to_string(),
                    ];
                    let program = std::env::current_exe().expect("bench executable");
                    (program, args, Vec::new(), vec![output])
                }
                Kind::Cdcflow { delivery } => {
                    // The example's second pipeline reads customers: an empty topic here.
                    self.create_topics(&[format!("{group}.shop.public.customers")]);
                    let config = self.cdcflow_config(&group, delivery, input);
                    let args = vec!["run".to_owned(), "--config".to_owned(), config];
                    let program = PathBuf::from(env!("CARGO_BIN_EXE_cdcflow"));
                    let outputs = vec![format!("{group}.shop.order-events")];
                    (
                        program,
                        args,
                        vec![("CDCFLOW_LOG", "warn".to_owned())],
                        outputs,
                    )
                }
                Kind::KafkaStreams { guarantee } => {
                    let output = format!("{group}.events");
                    let state = self.work.join(format!("{tag}-state"));
                    let mut args: Vec<String> = [
                        "--bootstrap",
                        &self.bootstrap,
                        "--input",
                        input,
                        "--output",
                        &output,
                        "--application-id",
                        &group,
                        "--guarantee",
                        guarantee,
                        "--state-dir",
                    ]
                    .iter()
                    .map(|arg| arg.to_string())
                    .collect();
                    args.push(state.display().to_string());
                    if let Some(expect) = expect {
                        args.extend(["--expect".to_owned(), expect.to_string()]);
                    }
                    (kstreams_script(), args, Vec::new(), vec![output])
                }
            };
        // Created here, as the contenders would, so the probes can read them from the start.
        self.create_topics(&outputs);
        let log_file = std::fs::File::create(&log).expect("contender log");
        let mut timed = TimedCommand::new(&program, self.cpu, log.with_extension("usage"));
        timed
            .command()
            .args(&args)
            .envs(env)
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file);
        let running = timed.spawn().unwrap_or_else(|error| {
            panic!("{}: could not start {program:?}: {error}", contender.name)
        });
        Launched {
            running,
            outputs,
            group,
        }
    }

    /// `examples/shop.toml` with this run's topics, group and state file.
    fn cdcflow_config(&self, group: &str, delivery: &str, input: &str) -> String {
        let example = std::fs::read_to_string(root().join("examples/shop.toml")).unwrap();
        let mut config = format!(
            "[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"{group}\"\ninstance_id = \"bench\"\n\
             delivery = \"{delivery}\"\ntopic_partitions = {PARTITIONS}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n",
            self.bootstrap
        );
        for line in example.lines() {
            if line.starts_with("path = ") {
                let state = self.work.join(format!("{group}.db"));
                config.push_str(&format!("path = \"{}\"\n", state.display()));
            } else {
                config.push_str(&line.replace("\"shop.", &format!("\"{group}.shop.")));
                config.push('\n');
            }
        }
        let config = config.replace(
            &format!("\"{group}.shop.public.orders\""),
            &format!("\"{input}\""),
        );
        let path = self.work.join(format!("{group}.toml"));
        std::fs::write(&path, config).unwrap();
        path.display().to_string()
    }

    /// Runs `contender` over the preloaded `input` until done.
    fn throughput(&self, contender: &Contender, input: &str) -> Throughput {
        let tag = contender.id;
        let mut launched = self.launch(contender, tag, input, Some(self.records));
        let watermarks = Watermarks::new(&self.bootstrap, PARTITIONS);
        let started = launched.running.started;
        let deadline = started + Duration::from_secs(1800);
        let mut first_output = None;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            if first_output.is_none() && watermarks.sum(&launched.outputs) > 0 {
                first_output = Some(Instant::now());
            }
            let done = match contender.kind {
                Kind::Cdcflow { .. } => {
                    let group = group_consumer(&self.bootstrap, &launched.group);
                    committed(&group, input, PARTITIONS) >= self.records as i64
                }
                Kind::RawPipe | Kind::KafkaStreams { .. } => false,
            };
            match launched.running.exited().map(|status| status.success()) {
                Some(true) if !matches!(contender.kind, Kind::Cdcflow { .. }) => break,
                Some(success) => panic!(
                    "{} exited early (success: {success}); see {}",
                    contender.name,
                    self.work.join(format!("{tag}.log")).display()
                ),
                None if done => break,
                None => {}
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish in 30 minutes",
                contender.name
            );
        }
        let finished = Instant::now();
        let (_, usage) = launched.running.stop(Duration::from_secs(60));
        Throughput {
            elapsed_s: (finished - started).as_secs_f64(),
            processing_s: (finished - first_output.unwrap_or(started)).as_secs_f64(),
            usage,
        }
    }

    /// The harness and broker alone at `rate_rps`: the probe reads the generator's topic
    /// directly. What a contender's latency adds is its figure minus this floor.
    fn latency_floor(&self, tag: &str, rate_rps: f64, duration: Duration) -> Latency {
        let topic = format!("{}floor-{tag}", self.prefix);
        self.create_topics(std::slice::from_ref(&topic));
        latency::measure(
            &self.bootstrap,
            &topic,
            std::slice::from_ref(&topic),
            PARTITIONS,
            self.entities,
            rate_rps,
            duration,
        )
    }

    /// Runs `contender` on a fresh input fed at `rate_rps`.
    fn latency(&self, contender: &Contender, rate_rps: f64, duration: Duration) -> Latency {
        let tag = format!("lat-{}", contender.id);
        let input = format!("{}{tag}.shop.public.orders", self.prefix);
        self.create_topics(std::slice::from_ref(&input));
        let launched = self.launch(contender, &tag, &input, None);
        let latency = latency::measure(
            &self.bootstrap,
            &input,
            &launched.outputs,
            PARTITIONS,
            self.entities,
            rate_rps,
            duration,
        );
        launched.running.stop(Duration::from_secs(60));
        latency
    }
}

/// An empty `kafka-work` beside the results.
fn work_dir() -> PathBuf {
    let results = support::results_path(root(), "kafka");
    let work = results.with_file_name("kafka-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    work
}

fn kstreams_script() -> PathBuf {
    root().join("benches/kstreams/run.sh")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if args.get(1).map(String::as_str) == Some("--raw-pipe") {
        let records = args[6].parse().unwrap();
        raw_pipe(&args[2], &args[3], &args[4], &args[5], records);
        return;
    }
    let records = env_number("CDCFLOW_BENCH_RECORDS", 1_000_000);
    let entities = env_number("CDCFLOW_BENCH_ENTITIES", 100_000);
    let latency_for = Duration::from_secs(env_number("CDCFLOW_BENCH_LATENCY_SECONDS", 20));
    let chosen: Vec<Contender> = match std::env::var("CDCFLOW_BENCH_CONTENDERS") {
        Ok(list) => list
            .split(',')
            .map(|id| {
                *CONTENDERS
                    .iter()
                    .find(|c| c.id == id.trim())
                    .unwrap_or_else(|| {
                        panic!("unknown contender `{id}` in CDCFLOW_BENCH_CONTENDERS")
                    })
            })
            .collect(),
        Err(_) => CONTENDERS.to_vec(),
    };
    let machine = support::machine();
    let cpus = support::cpus();
    let bootstrap = support::kafka::bootstrap(root());
    let pin = std::env::var("CDCFLOW_BENCH_PIN").map_or(true, |value| value != "0");
    assert!(
        !pin || cpus >= 2,
        "pinning needs two CPUs; CDCFLOW_BENCH_PIN=0 runs unpinned"
    );
    let broker = pin.then(|| {
        broker_pid(root()).unwrap_or_else(|why| {
            panic!(
                "cannot find the broker to pin: {why} (set CDCFLOW_BENCH_BROKER_PID to the \
                 broker's pid, or CDCFLOW_BENCH_PIN=0 to run unpinned)"
            )
        })
    });
    if chosen
        .iter()
        .any(|c| matches!(c.kind, Kind::KafkaStreams { .. }))
    {
        let status = Command::new(kstreams_script())
            .arg("--build-only")
            .status()
            .expect("benches/kstreams/run.sh");
        assert!(
            status.success(),
            "the Kafka Streams contender did not build"
        );
    }
    let pinned_broker = broker.map(|pid| {
        let pinned = PinnedBroker::pin(pid, BROKER_CPU)
            .unwrap_or_else(|| panic!("taskset could not pin pid {pid}"));
        pin_harness(BROKER_CPU);
        eprintln!(
            "broker (pid {pid}) and harness on CPU {BROKER_CPU}, contenders on CPU {CONTENDER_CPU}"
        );
        pinned
    });
    let bench = Bench {
        prefix: format!("bench{}.", std::process::id()),
        records,
        entities,
        cpu: pin.then_some(CONTENDER_CPU),
        admin: ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("admin"),
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        work: work_dir(),
        bootstrap,
    };
    let input = format!("{}shop.public.orders", bench.prefix);
    bench.create_topics(std::slice::from_ref(&input));
    bench.preload(&input);
    let value_bytes_avg = average_value_bytes(&bench.bootstrap, &input);

    let mut results = Vec::new();
    for contender in &chosen {
        let run = bench.throughput(contender, &input);
        let rate = records as f64 / run.processing_s;
        eprintln!(
            "{:<30} {rate:>9.0} records/s, {:.1} CPU s per 1M records, peak RSS {:.0} MiB",
            contender.name,
            run.usage.cpu_s() * 1e6 / records as f64,
            run.usage.peak_rss_mib()
        );
        results.push((contender, run, rate));
    }
    let mut rows = Vec::new();
    for (contender, run, rate) in &results {
        // CDCFLOW_BENCH_LATENCY_RATE fixes the rate instead (to compare contenders at one rate).
        let latency_rate = std::env::var("CDCFLOW_BENCH_LATENCY_RATE")
            .ok()
            .and_then(|rate| rate.parse().ok())
            .unwrap_or(rate / 2.0);
        let floor = bench.latency_floor(contender.id, latency_rate, latency_for);
        let latency = bench.latency(contender, latency_rate, latency_for);
        eprintln!(
            "{:<30} at {:.0} records/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples); \
             broker and harness alone: p50 {:.1} ms, p99 {:.1} ms",
            contender.name,
            latency.rate_rps,
            latency.p50_ms,
            latency.p99_ms,
            latency.max_ms,
            latency.samples,
            floor.p50_ms,
            floor.p99_ms
        );
        rows.push(json!({
            "id": contender.id,
            "name": contender.name,
            "throughput_rps": rate,
            "elapsed_s": run.elapsed_s,
            "processing_s": run.processing_s,
            "cpu_s": run.usage.cpu_s(),
            "user_s": run.usage.user_s,
            "system_s": run.usage.system_s,
            "cpu_s_per_million": run.usage.cpu_s() * 1e6 / records as f64,
            "peak_rss_mib": run.usage.peak_rss_mib(),
            "latency": latency,
            "latency_floor": floor,
        }));
    }
    // Every CPU back to the broker (also when the bench fails, by the drop).
    drop(pinned_broker);
    let document = json!({
        "benchmark": "kafka",
        "date": support::utc_now(),
        "machine": machine,
        "method": {
            "records": records,
            "entities": entities,
            "partitions": PARTITIONS,
            "broker_cpu": broker.map(|_| BROKER_CPU),
            "contender_cpu": broker.map(|_| CONTENDER_CPU),
            "value_bytes_avg": value_bytes_avg,
            "latency_seconds": latency_for.as_secs(),
            "cdcflow_batch_max_wait_ms": 100,
        },
        "contenders": rows,
        "targets": targets(&rows),
    });
    let path = support::results_path(root(), "kafka");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&document).unwrap() + "\n",
    )
    .unwrap();
    print_table(&rows);
    println!("results: {}", path.display());
    if std::env::var("CDCFLOW_BENCH_KEEP_TOPICS").is_err() {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bench.bootstrap)
            .create()
            .unwrap();
        delete_run_topics(&bench.runtime, &bench.admin, &probe, &bench.prefix);
    }
    let _ = std::fs::remove_dir_all(&bench.work);
}

/// Mean value size of the first records of the input, for the method line.
fn average_value_bytes(bootstrap: &str, topic: &str) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "cdcflow-bench-sizer")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let (mut count, mut bytes) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(10);
    while count < 1000 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            bytes += message.payload_len() as u64;
            count += 1;
        }
    }
    bytes / count.max(1)
}

fn field<'a>(rows: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|row| row["id"] == id)
}

/// The targets, each judged from this run's figures.
fn targets(rows: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let number = |id: &str, key: &str| field(rows, id).and_then(|row| row[key].as_f64());
    let p99 = |id: &str| field(rows, id).and_then(|row| row["latency"]["p99_ms"].as_f64());
    let mut targets = Vec::new();
    let mut ratio = |name: &str,
                     wanted: &str,
                     numerator: Option<f64>,
                     denominator: Option<f64>,
                     bound: f64,
                     at_least: bool| {
        if let (Some(numerator), Some(denominator)) = (numerator, denominator) {
            let value = numerator / denominator;
            let met = if at_least {
                value >= bound
            } else {
                value <= bound
            };
            targets.push(support::target(name, wanted, format!("{value:.2}x"), met));
        }
    };
    ratio(
        "cdcflow exactly-once / Kafka Streams exactly_once_v2, throughput",
        ">= 3x",
        number("cdcflow-eos", "throughput_rps"),
        number("kstreams-eos", "throughput_rps"),
        3.0,
        true,
    );
    ratio(
        "cdcflow exactly-once / Kafka Streams exactly_once_v2, peak RSS",
        "<= 0.25x",
        number("cdcflow-eos", "peak_rss_mib"),
        number("kstreams-eos", "peak_rss_mib"),
        0.25,
        false,
    );
    ratio(
        "cdcflow at-least-once / raw pipe, throughput",
        ">= 0.5x",
        number("cdcflow-alo", "throughput_rps"),
        number("raw", "throughput_rps"),
        0.5,
        true,
    );
    ratio(
        "cdcflow exactly-once / raw pipe, throughput",
        ">= 0.4x",
        number("cdcflow-eos", "throughput_rps"),
        number("raw", "throughput_rps"),
        0.4,
        true,
    );
    if let Some(p99) = p99("cdcflow-alo") {
        targets.push(support::target(
            "cdcflow at-least-once p99 latency at half load",
            "<= 20 ms",
            format!("{p99:.1} ms"),
            p99 <= 20.0,
        ));
    }
    if let Some(p99) = p99("cdcflow-eos") {
        targets.push(support::target(
            "cdcflow exactly-once p99 latency at half load",
            "<= batch_max_wait (100 ms) + 30 ms",
            format!("{p99:.1} ms"),
            p99 <= 130.0,
        ));
    }
    targets
}

fn print_table(rows: &[serde_json::Value]) {
    println!(
        "{:<30} {:>10} {:>12} {:>9} {:>10} {:>8} {:>8} {:>8}",
        "contender",
        "records/s",
        "CPU s / 1M",
        "RSS MiB",
        "lat. rate",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    for row in rows {
        let number = |value: &serde_json::Value| value.as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<30} {:>10.0} {:>12.1} {:>9.0} {:>10.0} {:>8.1} {:>8.1} {:>8.1}",
            row["name"].as_str().unwrap_or_default(),
            number(&row["throughput_rps"]),
            number(&row["cpu_s_per_million"]),
            number(&row["peak_rss_mib"]),
            number(&row["latency"]["rate_rps"]),
            number(&row["latency"]["p50_ms"]),
            number(&row["latency"]["p99_ms"]),
            number(&row["latency"]["max_ms"]),
        );
    }
}
