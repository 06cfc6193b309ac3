//! cdcflow against the raw pipe on the same broker in the same run (issue 3 targets).
//! 1,000,000 Debezium records over 100,000 entities in 12 partitions are preloaded, then three
//! runs are timed from their start to their last output, with peak RSS (`VmHWM`):
//! a raw consume-and-produce pipe with rdkafka and no logic (the ceiling; done when the output
//! holds every record), `cdcflow run` at-least-once and `cdcflow run` exactly-once (done when
//! the group's committed offsets reach the end of the input).
//!
//! Run: `cargo bench --bench kafka`. Uses `CDCFLOW_KAFKA_BOOTSTRAP`, or starts the local broker
//! with `deploy/local/kafka.sh start`. `CDCFLOW_BENCH_RECORDS` / `CDCFLOW_BENCH_ENTITIES` change
//! the size. Every topic the run created is deleted at its end (1M records fill ~5 GB of
//! broker log), unless `CDCFLOW_BENCH_KEEP_TOPICS=1`.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/checkout.rs"]
mod checkout;
use checkout::root;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::{env_number, order_changes, peak_rss_kib};

const PARTITIONS: i32 = 12;

fn producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "262144")
        .create()
        .expect("producer")
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &[u8],
    value: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, returned)) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The raw pipe: consume every input record and produce it unchanged, no logic.
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
    let producer = producer(bootstrap);
    let mut seen = 0;
    while seen < records {
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

fn end_offsets(consumer: &BaseConsumer, topic: &str) -> i64 {
    (0..PARTITIONS)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(5))
                .map_or(0, |(_, high)| high)
        })
        .sum()
}

fn committed(bootstrap: &str, group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        list.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(list, Duration::from_secs(5))
        .map(|list| {
            list.elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(offset) => offset,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Runs a child until `done()` holds; returns (seconds, peak RSS MiB).
fn measure(mut command: Command, done: impl Fn() -> bool) -> (f64, f64) {
    let started = Instant::now();
    let mut child = command.stdout(Stdio::null()).spawn().expect("child starts");
    let mut peak = 0;
    let mut last_check = Instant::now();
    loop {
        if let Some(rss) = peak_rss_kib(child.id()) {
            peak = peak.max(rss);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "child failed: {status}");
            break;
        }
        if last_check.elapsed() > Duration::from_millis(250) {
            last_check = Instant::now();
            if done() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (elapsed, peak as f64 / 1024.0)
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
    let bootstrap = std::env::var("CDCFLOW_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        let out = Command::new(root().join("deploy/local/kafka.sh"))
            .arg("start")
            .output()
            .expect("kafka.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    });
    let run = std::process::id();
    let prefix = format!("bench{run}.");
    let input = format!("{prefix}shop.public.orders");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let customers = format!("{prefix}shop.public.customers");
    let raw_output = format!("{prefix}raw-output");
    let topics = [
        NewTopic::new(&input, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(&customers, PARTITIONS, TopicReplication::Fixed(1)),
    ];
    for result in runtime
        .block_on(admin.create_topics(topics.iter(), &AdminOptions::new()))
        .unwrap()
    {
        result.expect("topic created");
    }

    let started = Instant::now();
    let producer = producer(&bootstrap);
    for (id, value) in order_changes(records, entities) {
        send(
            &producer,
            &input,
            format!("{{\"id\":{id}}}").as_bytes(),
            value.to_string().as_bytes(),
        );
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("preload flushed");
    eprintln!(
        "preloaded {records} records over {entities} entities in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    // The ceiling varies from run to run on a shared 2-core machine: take the median of three.
    let mut raw_runs: Vec<(f64, f64)> = (0..3)
        .map(|attempt| {
            let output = format!("{raw_output}{attempt}");
            let topic = NewTopic::new(&output, PARTITIONS, TopicReplication::Fixed(1));
            for result in runtime
                .block_on(admin.create_topics([&topic], &AdminOptions::new()))
                .unwrap()
            {
                result.expect("topic created");
            }
            let mut raw = Command::new(std::env::current_exe().unwrap());
            raw.args([
                "--raw-pipe",
                &bootstrap,
                &input,
                &output,
                &format!("{prefix}raw{attempt}"),
                &records.to_string(),
            ]);
            let (seconds, rss) = measure(raw, || end_offsets(&probe, &output) >= records as i64);
            (records as f64 / seconds, rss)
        })
        .collect();
    raw_runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (raw_rate, raw_rss) = raw_runs[1];
    println!(
        "raw pipe:              {raw_rate:>9.0} records/s (median of {:.0}, {:.0}, {:.0}), peak RSS {raw_rss:.0} MiB",
        raw_runs[0].0, raw_runs[1].0, raw_runs[2].0
    );

    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(root().join("examples/shop.toml")).unwrap();
    for delivery in ["at_least_once", "exactly_once"] {
        let group = format!("{prefix}{delivery}");
        let mut config = format!(
            "[kafka]\nbootstrap_servers = \"{bootstrap}\"\ngroup_id = \"{group}\"\ninstance_id = \"bench\"\n\
             delivery = \"{delivery}\"\ntopic_partitions = {PARTITIONS}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n"
        );
        for line in example.lines() {
            if line.starts_with("path = ") {
                config.push_str(&format!(
                    "path = \"{}\"\n",
                    dir.path().join(format!("{delivery}.db")).display()
                ));
            } else {
                config.push_str(&line.replace("\"shop.", &format!("\"{prefix}{delivery}.shop.")));
                config.push('\n');
            }
        }
        // Both pipelines read the shared preloaded input.
        let config = config
            .replace(
                &format!("\"{prefix}{delivery}.shop.public.orders\""),
                &format!("\"{input}\""),
            )
            .replace(
                &format!("\"{prefix}{delivery}.shop.public.customers\""),
                &format!("\"{customers}\""),
            );
        let path = dir.path().join(format!("{delivery}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cdcflow"));
        command
            .args(["run", "--config"])
            .arg(&path)
            .env("CDCFLOW_LOG", "warn")
            .stderr(Stdio::null());
        let (seconds, rss) = measure(command, || {
            committed(&bootstrap, &group, &input) >= records as i64
        });
        let rate = records as f64 / seconds;
        println!(
            "cdcflow {delivery:<14} {rate:>9.0} records/s ({seconds:.1}s), peak RSS {rss:.0} MiB, {:.0}% of the raw pipe",
            100.0 * rate / raw_rate
        );
    }
    if std::env::var("CDCFLOW_BENCH_KEEP_TOPICS").is_err() {
        delete_run_topics(&runtime, &admin, &probe, &prefix);
    }
}

/// Deletes every topic whose name starts with this run's prefix.
fn delete_run_topics(
    runtime: &tokio::runtime::Runtime,
    admin: &AdminClient<DefaultClientContext>,
    probe: &BaseConsumer,
    prefix: &str,
) {
    let metadata = probe
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let names: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|topic| topic.name())
        .filter(|name| name.starts_with(prefix))
        .collect();
    for result in runtime
        .block_on(admin.delete_topics(&names, &AdminOptions::new()))
        .expect("delete topics")
    {
        if let Err((topic, error)) = result {
            eprintln!("could not delete `{topic}`: {error}");
        }
    }
    eprintln!("deleted the run's {} topics", names.len());
}
