//! The embedded default: `cdcflow replay --poll` reads the changed rows of a SQLite table up to
//! the horizon, straight through the pipeline, without Kafka, and keeps its cursor in the
//! state file. Each change comes out once across runs; a soft delete is a delete; rows
//! younger than the grace period wait for the next run.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

fn write_config(dir: &Path, database: &Path) -> std::path::PathBuf {
    let config = dir.join("poll.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[state]
path = "{state}"

[[poll]]
name = "orders"
database_url = "sqlite://{database}"
table = "orders"
cursor_column = "updated_at"
key = ["id"]
page_size = 100
grace = "2s"
deletes = "soft"
soft_delete_column = "deleted"

[[pipeline]]
name = "orders"
topics = ["cdcflow.poll.orders"]
format = "flattened"
version = {{ by = "column", column = "version" }}

[[pipeline.rule]]
name = "changed"
when = "true"
event_type = "OrderChanged"
topic = "orders.events"
"#,
            state = dir.join("state.db").display(),
            database = database.display(),
        ),
    )
    .unwrap();
    config
}

/// (entity, version column, entityversion) of each event a replay of the poll writes; a
/// delete's entityversion ends in `.1` (ordered after an update with the same column value).
fn replay_poll(config: &Path) -> Vec<(String, i64, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .args(["replay", "--config"])
        .arg(config)
        .args(["--poll", "orders"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["kind"] == "event")
        .map(|line| {
            let event: Value = serde_json::from_str(line["payload"].as_str().unwrap()).unwrap();
            (
                event["subject"].as_str().unwrap().to_owned(),
                event["data"]["version"].as_i64().unwrap(),
                event["entityversion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

async fn execute(pool: &SqlitePool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap();
}

#[test]
fn replay_poll_reads_each_change_once_with_its_cursor_in_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("shop.db");
    let config = write_config(dir.path(), &database);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pool = runtime.block_on(async {
        let options = SqliteConnectOptions::new()
            .filename(&database)
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        // 250 rows stamped over the last hour: three full pages' worth at 100 a page.
        execute(
            &pool,
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL, \
             version INTEGER NOT NULL, updated_at TEXT NOT NULL, deleted INTEGER); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250) \
             INSERT INTO orders SELECT i, 'new', 1, \
             strftime('%Y-%m-%d %H:%M:%f', 'now', '-3600 seconds', (i % 7) || ' seconds'), NULL \
             FROM n;",
        )
        .await;
        pool
    });
    let first = replay_poll(&config);
    assert_eq!(first.len(), 250, "every row once");
    assert!(first.iter().all(|(_, version, _)| *version == 1));
    assert!(replay_poll(&config).is_empty(), "the cursor was saved");

    // Two updates and a soft delete, stamped now: within the grace period, they wait.
    runtime.block_on(execute(
        &pool,
        "UPDATE orders SET status = 'paid', version = 2, \
         updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id IN (7, 8); \
         UPDATE orders SET deleted = 1, version = 2, \
         updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = 9;",
    ));
    assert!(
        replay_poll(&config).is_empty(),
        "rows younger than grace wait"
    );
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let mut later = replay_poll(&config);
    later.sort();
    assert_eq!(
        later
            .iter()
            .map(|(id, v, _)| (id.as_str(), *v))
            .collect::<Vec<_>>(),
        vec![("7", 2), ("8", 2), ("9", 2)]
    );
    let markers: Vec<&str> = later
        .iter()
        .map(|(_, _, v)| v.rsplit('.').next().unwrap())
        .collect();
    assert_eq!(
        markers,
        vec!["0", "0", "1"],
        "a soft delete is a delete: {later:?}"
    );
    assert!(replay_poll(&config).is_empty());
    runtime.block_on(pool.close());
}
