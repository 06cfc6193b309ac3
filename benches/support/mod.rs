//! Helpers shared by the benchmark harnesses.
#![allow(dead_code)]

/// A numeric setting from the environment, or its default.
pub(crate) fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of a running process (`VmHWM`), in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];

/// The benchmark workload: Debezium Postgres changes of an `orders` table without the schema
/// wrapper, one create per entity, then updates to random entities that move the status
/// forward and change the amount, with increasing LSNs. Yields (entity id, envelope).
pub(crate) fn order_changes(
    records: u64,
    entities: u64,
) -> impl Iterator<Item = (u64, serde_json::Value)> {
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
        let value = serde_json::json!({
            "before": null,
            "after": {"id": id, "customer_id": id % 977, "status": STATUSES[(step as usize).min(3)],
                      "amount": format!("{}.{:02}", 100 + step / 2, id % 100), "currency": "EUR",
                      "created_at": "2024-11-25T09:58:00.000000Z", "note": null},
            "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "shop",
                       "ts_ms": 1_732_528_800_000u64 + offset, "snapshot": "false", "db": "shop",
                       "sequence": format!("[\"{}\",\"{lsn}\"]", lsn - 32), "schema": "public",
                       "table": "orders", "txId": 10_000 + offset, "lsn": lsn, "xmin": null},
            "op": if step == 0 { "c" } else { "u" }, "ts_ms": 1_732_528_800_100u64 + offset,
            "transaction": null});
        (id, value)
    })
}
