//! End-to-end latency at a fixed input rate: the load generator stamps each Debezium record's
//! `source.ts_ms` with the wall clock as it sends it (as the database's commit time would be),
//! and a read_committed consumer of the output takes the wall clock as it receives each record.
//! The latency is the difference: from the source timestamp to the output being visible.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::kafka::send;
use crate::support::order_change_texts;

pub(crate) fn now_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as f64
        / 1000.0
}

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Latency {
    pub(crate) rate_rps: f64,
    pub(crate) duration_s: f64,
    pub(crate) sent: u64,
    pub(crate) samples: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

/// A generator producer batching as a Debezium connector's does: `linger.ms` 5, Kafka 4's
/// default for Connect's producers. Smaller batches cost the broker, on its one core, more
/// per record than the contenders' own traffic.
fn generator(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "262144")
        .create()
        .expect("generator producer")
}

/// The source timestamp an output record carries: an event's `time` (ISO-8601, milliseconds)
/// or, for the raw pipe's copies of the input, `source.ts_ms` (the first `ts_ms` of the
/// workload's text). Found by search, not parsed: the probe shares the broker's core.
fn source_ms(value: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(value).ok()?;
    if let Some(at) = text.find("\"time\":\"") {
        return iso_millis(text.get(at + 8..at + 8 + 24)?).map(|ms| ms as f64);
    }
    let at = text.find("\"ts_ms\":")? + 8;
    let digits = text[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse::<i64>().ok().map(|ms| ms as f64)
}

/// `2024-11-25T09:58:00.123Z` to epoch milliseconds (UTC, the form cdcflow writes).
fn iso_millis(text: &str) -> Option<i64> {
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let millis = match text.get(19..20) {
        Some(".") => number(20..23)?,
        _ => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60 * 1000 + second * 1000 + millis)
}

/// A read_committed consumer of `topics` from their beginning, recording every output's
/// latency in a background thread until stopped.
pub(crate) struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(f64, f64)>>,
}

impl Probe {
    pub(crate) fn start(bootstrap: &str, topics: &[String], partitions: i32) -> Probe {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "cdcflow-bench-latency-probe")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            // A fetch returns as soon as data is there; don't let the probe add its own wait.
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("probe consumer");
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..partitions {
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .expect("assignment");
            }
        }
        consumer.assign(&assignment).expect("assign");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            // (source ms, latency ms) of every output seen.
            let mut seen = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                    let received = now_ms_f64();
                    if let Some(source) = message.payload().and_then(source_ms) {
                        seen.push((source, received - source));
                    }
                }
            }
            seen
        });
        Probe { stop, thread }
    }

    pub(crate) fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("probe thread")
    }
}

/// Sends the workload to `input`, stamped with the send time, at `rate_rps`
/// until `until()` holds or `max` records went out. Returns the number sent.
fn send_paced(
    producer: &ThreadedProducer<DefaultProducerContext>,
    input: &str,
    changes: &mut impl Iterator<Item = (u64, String)>,
    rate_rps: f64,
    until: impl Fn(u64) -> bool,
) -> u64 {
    let started = Instant::now();
    let mut sent = 0u64;
    while !until(sent) {
        let due = (started.elapsed().as_secs_f64() * rate_rps) as u64 + 1;
        while sent < due && !until(sent) {
            let Some((id, payload)) = changes.next() else {
                return sent;
            };
            let key = format!("{{\"id\":{id}}}");
            send(producer, input, key.as_bytes(), payload.as_bytes());
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    sent
}

/// Measures one contender already running on `input`: warms it up at 20 records/s until its
/// first output is visible, then at `rate_rps` for three seconds, then sends at `rate_rps` for
/// `duration` and keeps reading until
/// the output has been quiet for two seconds.
pub(crate) fn measure(
    bootstrap: &str,
    input: &str,
    outputs: &[String],
    partitions: i32,
    entities: u64,
    rate_rps: f64,
    duration: Duration,
) -> Latency {
    let probe = Probe::start(bootstrap, outputs, partitions);
    let watermarks = Watermarks::new(bootstrap, partitions);
    let producer = generator(bootstrap);
    let mut changes = order_change_texts(u64::MAX, entities, |_| now_ms_f64() as u64);
    // Warm-up: the group has joined and the first output is through once the probe sees one.
    let warm_until = Instant::now() + Duration::from_secs(120);
    while watermarks.sum(outputs) == 0 {
        assert!(
            Instant::now() < warm_until,
            "no output on {outputs:?} within 120 s of warm-up"
        );
        send_paced(&producer, input, &mut changes, 20.0, |sent| sent >= 10);
    }
    // Three seconds at the rate, not measured: batches, fetch sessions and the JIT settle.
    let settled = Instant::now() + Duration::from_secs(3);
    send_paced(&producer, input, &mut changes, rate_rps, |_| {
        Instant::now() >= settled
    });
    let measured_from = now_ms_f64();
    let deadline = Instant::now() + duration;
    let sent = send_paced(&producer, input, &mut changes, rate_rps, |_| {
        Instant::now() >= deadline
    });
    producer.flush(Duration::from_secs(30)).expect("flush");
    let mut last = watermarks.sum(outputs);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = watermarks.sum(outputs);
        if now == last {
            break;
        }
        last = now;
    }
    std::thread::sleep(Duration::from_secs(1));
    let seen = probe.stop();
    if std::env::var_os("CDCFLOW_BENCH_LATENCY_TRACE").is_some() {
        for (source, latency) in seen.iter().step_by((seen.len() / 40).max(1)) {
            eprintln!(
                "  source {:.0} ms after start: {latency:.1} ms",
                source - measured_from
            );
        }
    }
    let mut latencies: Vec<f64> = seen
        .into_iter()
        .filter(|(source, _)| *source >= measured_from.floor())
        .map(|(_, latency)| latency)
        .collect();
    assert!(!latencies.is_empty(), "no measured output on {outputs:?}");
    latencies.sort_by(f64::total_cmp);
    // A latency below zero or of minutes means the timestamps were misread, not a slow contender.
    assert!(
        latencies[0] > -5.0 && latencies[latencies.len() / 2] < 60_000.0,
        "implausible latencies on {outputs:?}: min {} ms, median {} ms",
        latencies[0],
        latencies[latencies.len() / 2]
    );
    let at = |quantile: f64| latencies[((latencies.len() - 1) as f64 * quantile).round() as usize];
    Latency {
        rate_rps,
        duration_s: duration.as_secs_f64(),
        sent,
        samples: latencies.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: *latencies.last().expect("not empty"),
    }
}

/// Sums of the high watermarks of topics, through one metadata client.
pub(crate) struct Watermarks {
    consumer: BaseConsumer,
    partitions: i32,
}

impl Watermarks {
    pub(crate) fn new(bootstrap: &str, partitions: i32) -> Watermarks {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .expect("watermark consumer");
        Watermarks {
            consumer,
            partitions,
        }
    }

    /// Records written to `topics` so far (committed or not).
    pub(crate) fn sum(&self, topics: &[String]) -> i64 {
        topics
            .iter()
            .flat_map(|topic| (0..self.partitions).map(move |partition| (topic, partition)))
            .map(|(topic, partition)| {
                self.consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(5))
                    .map_or(0, |(_, high)| high)
            })
            .sum()
    }
}
