//! Helpers shared by the benchmark harnesses.
#![allow(dead_code)]

pub(crate) mod kafka;
pub(crate) mod process;

/// A numeric setting from the environment, or its default.
pub(crate) fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of a running process (`VmHWM`), in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    process::status_kib(pid, "VmHWM")
}

const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];

/// The benchmark workload: Debezium Postgres changes of an `orders` table without the schema
/// wrapper, one create per entity, then updates to random entities that move the status
/// forward and change the amount, with increasing LSNs. Yields (entity id, envelope).
pub(crate) fn order_changes(
    records: u64,
    entities: u64,
) -> impl Iterator<Item = (u64, serde_json::Value)> {
    order_change_texts(records, entities, |offset| 1_732_528_800_000 + offset).map(|(id, text)| {
        let value = serde_json::from_str(&text).expect("the workload is JSON");
        (id, value)
    })
}

/// The same workload as JSON text, written directly (a load generator cannot afford a
/// `serde_json::Value` per record on the broker's core), `source.ts_ms` from `source_ts_ms`
/// of the record's offset. `source` comes before the envelope's own `ts_ms`.
pub(crate) fn order_change_texts(
    records: u64,
    entities: u64,
    source_ts_ms: impl Fn(u64) -> u64,
) -> impl Iterator<Item = (u64, String)> {
    let mut steps = vec![0u32; entities as usize];
    let mut random = 0x2545_f491_4f6c_dd1du64;
    (0..records).map(move |offset| {
        let id = if offset < entities {
            offset
        } else {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random % entities
        };
        let step = steps[id as usize];
        steps[id as usize] += 1;
        let lsn = 24_000_000 + offset * 64;
        let text = format!(
            concat!(
                r#"{{"before":null,"after":{{"id":{id},"customer_id":{customer},"status":"{status}","#,
                r#""amount":"{major}.{minor:02}","currency":"EUR","created_at":"2024-11-25T09:58:00.000000Z","#,
                r#""note":null}},"source":{{"version":"2.7.3.Final","connector":"postgresql","name":"shop","#,
                r#""ts_ms":{source_ts},"snapshot":"false","db":"shop","sequence":"[\"{previous_lsn}\",\"{lsn}\"]","#,
                r#""schema":"public","table":"orders","txId":{tx},"lsn":{lsn},"xmin":null}},"#,
                r#""op":"{op}","ts_ms":{ts},"transaction":null}}"#
            ),
            id = id,
            customer = id % 977,
            status = STATUSES[(step as usize).min(3)],
            major = 100 + step / 2,
            minor = id % 100,
            source_ts = source_ts_ms(offset),
            previous_lsn = lsn - 32,
            lsn = lsn,
            tx = 10_000 + offset,
            op = if step == 0 { "c" } else { "u" },
            ts = 1_732_528_800_100u64 + offset,
        );
        (id, text)
    })
}

/// The machine a result was measured on, for the JSON results.
pub(crate) fn machine() -> serde_json::Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split(':').nth(1))
        .map_or_else(String::new, |model| model.trim().to_owned());
    let memory_mib = read("/proc/meminfo")
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024);
    let command_line = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|out| {
                // `java -version` writes to stderr.
                let text = if out.stdout.is_empty() {
                    out.stderr
                } else {
                    out.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
    };
    serde_json::json!({
        "cpus": cpus(),
        "cpu_model": cpu_model,
        "memory_mib": memory_mib,
        "kernel": command_line("uname", &["-r"]),
        "rustc": command_line("rustc", &["-V"]),
        "java": command_line("java", &["-version"]),
    })
}

/// CPUs of the machine (not of this process's affinity mask, which pinning narrows).
pub(crate) fn cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|line| line.starts_with("processor"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// Now as UTC ISO-8601 (seconds), without a date crate.
pub(crate) fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Where a bench writes its JSON results: `$CDCFLOW_BENCH_RESULTS`, else `<repo>/target/bench`.
pub(crate) fn results_path(root: &std::path::Path, name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("CDCFLOW_BENCH_RESULTS")
        .map_or_else(|| root.join("target/bench"), std::path::PathBuf::from);
    std::fs::create_dir_all(&dir).expect("results dir");
    dir.join(format!("{name}.json"))
}

/// One target line of the JSON results.
pub(crate) fn target(name: &str, wanted: &str, measured: String, met: bool) -> serde_json::Value {
    serde_json::json!({"name": name, "target": wanted, "measured": measured, "met": met})
}
