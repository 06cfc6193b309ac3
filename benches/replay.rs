//! `cdcflow replay` end to end with the SQLite store: 1,000,000 Debezium Postgres records over
//! 100,000 `orders` entities through the example pipelines (6 rules). Target (issue 2): at
//! least 100,000 records/s and peak RSS under 300 MiB.
//!
//! Run: `cargo bench --bench replay` (`CDCFLOW_BENCH_RECORDS` / `CDCFLOW_BENCH_ENTITIES`
//! change the size). The input file is generated first and not timed; the binary's wall time
//! and peak RSS (`VmHWM`, sampled every 10 ms) are reported.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/checkout.rs"]
mod checkout;
use checkout::root;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{env_number, order_changes, peak_rss_kib};

/// Writes `records` kcat lines of the benchmark workload.
fn generate(path: &Path, records: u64, entities: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    for (offset, (id, value)) in order_changes(records, entities).enumerate() {
        let line = json!({"topic": "shop.public.orders", "partition": 0, "offset": offset,
            "tstype": "create", "ts": 1_732_528_800_200u64 + offset as u64, "broker": 1,
            "headers": [], "key": format!("{{\"id\":{id}}}"), "payload": value.to_string()});
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|arg| arg == "--list") {
        return Ok(());
    }
    let records = env_number("CDCFLOW_BENCH_RECORDS", 1_000_000);
    let entities = env_number("CDCFLOW_BENCH_ENTITIES", 100_000);
    let temporary = tempfile::tempdir()?;
    // CDCFLOW_BENCH_DIR keeps the input and state for profiling.
    let dir = std::env::var_os("CDCFLOW_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temporary.path().to_owned());
    let input = dir.join("orders.jsonl");
    let started = Instant::now();
    generate(&input, records, entities)?;
    let input_bytes = std::fs::metadata(&input)?.len();
    eprintln!(
        "generated {records} records over {entities} entities ({:.0} MiB) in {:.1}s",
        input_bytes as f64 / 1_048_576.0,
        started.elapsed().as_secs_f64()
    );

    let root = root();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .current_dir(root)
        .args(["replay", "--config", "examples/shop.toml", "--state"])
        .arg(dir.join("state.db"))
        .arg(&input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut peak = 0;
    let status = loop {
        if let Some(rss) = peak_rss_kib(child.id()) {
            peak = peak.max(rss);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut summary = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        std::io::Read::read_to_string(&mut stderr, &mut summary)?;
    }
    if !status.success() {
        return Err(format!("cdcflow replay failed: {summary}").into());
    }
    eprintln!("{summary}");
    let rate = records as f64 / elapsed;
    let peak_mib = peak as f64 / 1024.0;
    println!(
        "replay_end_to_end: {records} records in {elapsed:.2}s = {rate:.0} records/s, peak RSS {peak_mib:.0} MiB"
    );
    let document = json!({
        "benchmark": "replay",
        "date": support::utc_now(),
        "machine": support::machine(),
        "results": [
            {"name": format!("{records} records over {entities} entities, SQLite"), "value": rate, "unit": "records/s"},
            {"name": "peak RSS", "value": peak_mib, "unit": "MiB"},
        ],
        "targets": [
            support::target("replay throughput", ">= 150,000 records/s", format!("{rate:.0} records/s"), rate >= 150_000.0),
            support::target("replay peak RSS", "<= 200 MiB", format!("{peak_mib:.0} MiB"), peak_mib <= 200.0),
        ],
    });
    let path = support::results_path(root, "replay");
    std::fs::write(&path, serde_json::to_string_pretty(&document)? + "\n")?;
    println!("results: {}", path.display());
    Ok(())
}
