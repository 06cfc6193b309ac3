//! The SQL polling source against a real PostgreSQL and a real broker: two `cdcflow run`
//! instances share a poll (one owns it), a concurrent workload with long transactions that
//! commit out of order (rows stamped older than rows already committed), a kill -9 of the
//! owner in the middle. Every row's final version comes out as an event, no event twice,
//! and the interval adapts as the metrics show.
#![cfg(feature = "kafka-it")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use kafka_support::*;
use sqlx::postgres::PgPoolOptions;

/// `name{labels} value` of one series in a Prometheus text page.
fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn metrics_of(service: &Service) -> String {
    service.wait_for_log("serving http://", Duration::from_secs(60));
    service.http_get("/metrics").1
}

fn write_config(path: &Path, prefix: &str, url: &str, instance: &str) {
    let state = path.with_extension(format!("{instance}.db"));
    std::fs::write(
        path.with_extension(format!("{instance}.toml")),
        format!(
            r#"
[state]
path = "{state}"

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}group"
instance_id = "{instance}"
batch_max_wait = "50ms"

[http]
listen = "127.0.0.1:0"

[[poll]]
name = "orders"
database_url = "{url}"
table = "orders"
cursor_column = "updated_at"
key = ["id"]
topic = "{prefix}orders"
page_size = 100
min_interval = "100ms"
max_interval = "1600ms"
grace = "200ms"

[[pipeline]]
name = "orders"
topics = ["{prefix}orders"]
format = "flattened"
dlq_topic = "{prefix}dlq"
version = {{ by = "column", column = "version" }}

[[pipeline.rule]]
name = "changed"
when = "true"
event_type = "OrderChanged"
topic = "{prefix}events"
"#,
            state = state.display(),
            bootstrap = bootstrap(),
        ),
    )
    .unwrap();
}

#[test]
fn polling_sees_every_row_once_through_long_transactions_and_an_owner_killed() {
    let prefix = format!("{}.", unique("poll"));
    let database = sql_name("poll");
    let url = empty_postgres_database(&database);
    psql(
        &database,
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL, \
         version bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO orders (id, status, version) \
         SELECT g, 'new', 1 FROM generate_series(1, 650) g;",
    );
    create_topics(&[
        (&format!("{prefix}events"), 1),
        (&format!("{prefix}dlq"), 1),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("poll");
    for instance in ["a", "b"] {
        write_config(&base, &prefix, &url, instance);
    }
    let first = Service::start(&base.with_extension("a.toml"), &dir.path().join("a.log"));
    // The backlog of 650 rows comes in full pages of 100, at the shortest interval.
    wait_until("the backlog is read", Duration::from_secs(60), || {
        metric(
            &metrics_of(&first),
            r#"cdcflow_poll_rows_total{poll="orders"}"#,
        ) == Some(650.0)
    });
    let page = metrics_of(&first);
    assert_eq!(
        metric(
            &page,
            r#"cdcflow_poll_polls_total{poll="orders",result="full"}"#
        ),
        Some(6.0),
        "{page}"
    );
    assert_eq!(
        metric(&page, r#"cdcflow_poll_owner{poll="orders"}"#),
        Some(1.0)
    );
    // Idle: the wait doubles up to max_interval.
    wait_until(
        "the interval reaches its maximum",
        Duration::from_secs(30),
        || {
            metric(
                &metrics_of(&first),
                r#"cdcflow_poll_interval_seconds{poll="orders"}"#,
            ) == Some(1.6)
        },
    );
    assert!(
        metric(
            &metrics_of(&first),
            r#"cdcflow_poll_polls_total{poll="orders",result="empty"}"#
        )
        .unwrap()
            >= 4.0
    );
    let second = Service::start(&base.with_extension("b.toml"), &dir.path().join("b.log"));
    wait_until(
        "the second instance runs its poll",
        Duration::from_secs(30),
        || second.log_text().contains("poll started"),
    );
    std::thread::sleep(Duration::from_secs(3));
    let owners: Vec<f64> = [&first, &second]
        .iter()
        .map(|service| {
            metric(&metrics_of(service), r#"cdcflow_poll_owner{poll="orders"}"#).unwrap()
        })
        .collect();
    assert_eq!(owners, vec![1.0, 0.0], "the first instance keeps the poll");

    let rt = runtime();
    let pool = rt
        .block_on(PgPoolOptions::new().max_connections(8).connect(&url))
        .unwrap();
    // Three long transactions insert and update rows stamped with their start, then commit in
    // reverse order, seconds after short transactions committed later-stamped rows.
    let long: Vec<_> = (0..3)
        .map(|index: i64| {
            let pool = pool.clone();
            rt.spawn(async move {
                let mut transaction = pool.begin().await.unwrap();
                sqlx::query(
                    "INSERT INTO orders (id, status, version) \
                     SELECT g, 'long', 1 FROM generate_series($1::bigint, $1::bigint + 19) g",
                )
                .bind(10_000 + index * 100)
                .execute(&mut *transaction)
                .await
                .unwrap();
                sqlx::query(
                    "UPDATE orders SET version = version + 1, status = 'long', updated_at = now() \
                     WHERE id BETWEEN $1::bigint AND $1::bigint + 19",
                )
                .bind(1 + index * 20)
                .execute(&mut *transaction)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(6_000 - 1_500 * index as u64)).await;
                transaction.commit().await.unwrap();
            })
        })
        .collect();
    let short = {
        let pool = pool.clone();
        rt.spawn(async move {
            for step in 0..300_i64 {
                if step % 3 == 0 {
                    sqlx::query("INSERT INTO orders (id, status, version) VALUES ($1, 'short', 1)")
                        .bind(20_000 + step)
                        .execute(&pool)
                        .await
                        .unwrap();
                } else {
                    sqlx::query(
                        "UPDATE orders SET version = version + 1, status = 'short', \
                         updated_at = now() WHERE id = $1",
                    )
                    .bind(100 + step % 400)
                    .execute(&pool)
                    .await
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // While the long transactions are open the horizon stays at their start.
    let mut held_back = 0.0_f64;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(200));
        held_back = held_back.max(
            metric(
                &metrics_of(&first),
                r#"cdcflow_poll_horizon_lag_seconds{poll="orders"}"#,
            )
            .unwrap_or(0.0),
        );
    }
    assert!(
        held_back > 2.0,
        "the horizon did not wait for the long transactions: {held_back}"
    );
    // Once they commit, a backlog and then a stream of changes: the wait comes down from
    // its maximum.
    wait_until("the interval comes down", Duration::from_secs(15), || {
        metric(
            &metrics_of(&first),
            r#"cdcflow_poll_interval_seconds{poll="orders"}"#,
        )
        .is_some_and(|seconds| seconds < 1.6)
    });
    // The owner dies in the middle of the workload; the other instance takes the poll over.
    first.kill();
    rt.block_on(async {
        for handle in long {
            handle.await.unwrap();
        }
        short.await.unwrap();
    });
    wait_until(
        "the second instance owns the poll",
        Duration::from_secs(60),
        || metric(&metrics_of(&second), r#"cdcflow_poll_owner{poll="orders"}"#) == Some(1.0),
    );
    let finals: BTreeMap<String, i64> = rt
        .block_on(
            sqlx::query_as::<_, (i64, i64)>("SELECT id, version FROM orders").fetch_all(&pool),
        )
        .unwrap()
        .into_iter()
        .map(|(id, version)| (id.to_string(), version))
        .collect();
    assert_eq!(finals.len(), 650 + 60 + 100);
    let events_topic = format!("{prefix}events");
    let mut seen: BTreeMap<(String, i64), usize> = BTreeMap::new();
    wait_until(
        "every row's final version is an event",
        Duration::from_secs(90),
        || {
            seen.clear();
            for record in read_topic(&events_topic, "read_committed", 500) {
                let event = record.json();
                let version = event["data"]["version"].as_i64().unwrap();
                *seen.entry((record.key.clone(), version)).or_default() += 1;
            }
            finals
                .iter()
                .all(|(id, version)| seen.contains_key(&(id.clone(), *version)))
        },
    );
    // The poll itself wrote each row version once: rows and cursor commit together, and the
    // new owner resumed from the cursor the dead one committed.
    let mut polled: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for record in read_topic(&format!("{prefix}orders"), "read_committed", 500) {
        let row = record.json();
        *polled
            .entry((row["id"].to_string(), row["version"].as_i64().unwrap()))
            .or_default() += 1;
    }
    let repeated: Vec<_> = polled.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        repeated.is_empty(),
        "rows the poll wrote twice: {repeated:?}"
    );
    let twice: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "events emitted twice: {twice:?}");
    let entities: BTreeSet<&String> = seen.keys().map(|(id, _)| id).collect();
    assert_eq!(
        entities.len(),
        finals.len(),
        "an event for a row that does not exist"
    );
    assert!(
        read_topic(&format!("{prefix}dlq"), "read_committed", 300).is_empty(),
        "dead letters"
    );
    assert_eq!(second.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn poll_once_writes_up_to_the_horizon_and_exits_and_a_second_run_writes_nothing() {
    let prefix = format!("{}.", unique("poll-once"));
    let database = sql_name("poll_once");
    let url = empty_postgres_database(&database);
    psql(
        &database,
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL, \
         version bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO orders (id, status, version, updated_at) \
         SELECT g, 'new', 1, now() - interval '1 hour' FROM generate_series(1, 250) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("once");
    write_config(&base, &prefix, &url, "once");
    let config = base.with_extension("once.toml");
    let once = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .args(["poll", "--once", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        stderr
    };
    let first = once();
    assert!(
        first.contains("poll `orders`: 250 rows written in 3 polls"),
        "{first}"
    );
    let second = once();
    assert!(second.contains("poll `orders`: 0 rows written"), "{second}");
    let records = read_topic(&format!("{prefix}orders"), "read_committed", 500);
    let ids: BTreeSet<String> = records
        .iter()
        .map(|record| record.json()["id"].to_string())
        .collect();
    assert_eq!((records.len(), ids.len()), (250, 250));
}
