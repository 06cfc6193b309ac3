//! `cdcflow replay` end to end with the SQLite store: 1,000,000 Debezium Postgres records over
//! 100,000 `orders` entities through the example pipelines (6 rules). Target (issue 2): at
//! least 100,000 records/s and peak RSS under 300 MiB.
//!
//! Run: `cargo bench --bench replay` (`CDCFLOW_BENCH_RECORDS` / `CDCFLOW_BENCH_ENTITIES`
//! change the size). The input file is generated first and not timed; the binary's wall time
//! and peak RSS (`VmHWM`, sampled every 10 ms) are reported.

#[path = "support/mod.rs"]
mod support;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{env_number, peak_rss_kib};

const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];

/// Writes `records` kcat lines: one create per entity, then updates to random entities that
/// move the status forward or change the amount, with increasing LSNs.
fn generate(path: &Path, records: u64, entities: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut versions = vec![0u32; entities as usize];
    let mut random = 0x2545_f491_4f6c_dd1du64;
    for offset in 0..records {
        let id = if offset < entities {
            offset
        } else {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random % entities
        };
        let step = versions[id as usize];
        versions[id as usize] += 1;
        let lsn = 24_000_000 + offset * 64;
        let status = STATUSES[(step as usize).min(3) % 4];
        let amount = format!("{}.{:02}", 100 + (step / 2), (id % 100));
        let after = json!({"id": id, "customer_id": id % 977, "status": status, "amount": amount,
            "currency": "EUR", "created_at": "2024-11-25T09:58:00.000000Z", "note": null});
        let value = json!({
            "before": null, "after": after,
            "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "shop",
                "ts_ms": 1_732_528_800_000u64 + offset, "snapshot": "false", "db": "shop",
                "sequence": format!("[\"{}\",\"{}\"]", lsn - 32, lsn), "schema": "public",
                "table": "orders", "txId": 10_000 + offset, "lsn": lsn, "xmin": null},
            "op": if step == 0 { "c" } else { "u" }, "ts_ms": 1_732_528_800_100u64 + offset,
            "transaction": null});
        let line = json!({"topic": "shop.public.orders", "partition": 0, "offset": offset,
            "tstype": "create", "ts": 1_732_528_800_200u64 + offset, "broker": 1, "headers": [],
            "key": format!("{{\"id\":{id}}}"), "payload": value.to_string()});
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

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
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
    println!(
        "replay_end_to_end: {records} records in {elapsed:.2}s = {:.0} records/s, peak RSS {:.0} MiB",
        records as f64 / elapsed,
        peak as f64 / 1024.0
    );
    Ok(())
}
