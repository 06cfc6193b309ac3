//! The real Debezium stack of the end-to-end tests (PostgreSQL, MariaDB and Kafka Connect,
//! started once per suite by tests/run-all.sh through deploy/local/stack.sh): SQL through the
//! databases' own clients, connectors registered through deploy/local/connect.sh. Each test
//! gets its own database and topic prefix, so tests never see each other's rows.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;

/// Runs a deploy/local script with `args`, `stdin` fed in; panics with its stderr on failure.
fn script(name: &str, args: &[&str], envs: &[(&str, &str)], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(root().join("deploy/local").join(name))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{name} runs: {error}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A name usable as a database name, a Debezium topic prefix and a slot name: `[a-z0-9_]`.
pub fn sql_name(prefix: &str) -> String {
    unique(prefix).replace('-', "_")
}

/// Runs SQL in PostgreSQL database `database` as the application user, stopping at the first
/// error.
pub fn psql(database: &str, sql: &str) -> String {
    script(
        "postgres.sh",
        &[
            "psql",
            "-U",
            "cdcflow",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-A",
            "-t",
            "-f",
            "-",
        ],
        &[],
        sql,
    )
}

/// A fresh, empty PostgreSQL database owned by the application user; its URL.
pub fn empty_postgres_database(name: &str) -> String {
    create_postgres_database(name);
    let url = script("postgres.sh", &["url"], &[], "");
    let (server, _) = url
        .trim()
        .rsplit_once('/')
        .expect("the URL names a database");
    format!("{server}/{name}")
}

/// A fresh PostgreSQL database with the example schema and its seed rows.
pub fn postgres_database(name: &str) {
    create_postgres_database(name);
    let schema =
        std::fs::read_to_string(root().join("deploy/local/sql/postgres-shop.sql")).unwrap();
    psql(name, &schema);
}

fn create_postgres_database(name: &str) {
    script(
        "postgres.sh",
        &[
            "psql",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            &format!("CREATE DATABASE {name} OWNER cdcflow"),
        ],
        &[],
        "",
    );
}

/// Runs SQL in MariaDB database `database` (as root, the server's admin).
pub fn mariadb(database: &str, sql: &str) -> String {
    script(
        "mariadb.sh",
        &[
            "mysql",
            &format!("--database={database}"),
            "--batch",
            "--skip-column-names",
        ],
        &[],
        sql,
    )
}

/// A fresh MariaDB database with the example schema and its seed rows, readable by the
/// connector's user.
pub fn mariadb_database(name: &str) {
    mariadb(
        "mysql",
        &format!(
            "CREATE DATABASE {name}; GRANT ALL ON {name}.* TO 'cdcflow'@'%'; GRANT ALL ON {name}.* TO 'cdcflow'@'localhost';"
        ),
    );
    let schema = std::fs::read_to_string(root().join("deploy/local/sql/mariadb-shop.sql")).unwrap();
    mariadb(name, &schema);
}

/// Registers the connector config `file` (under deploy/debezium/) with its placeholders taken
/// from `envs`, and waits until it and its task run.
pub fn register_connector(file: &str, envs: &[(&str, &str)]) {
    let path = root().join("deploy/debezium").join(file);
    script(
        "connect.sh",
        &["register", path.to_str().unwrap()],
        envs,
        "",
    );
}

pub fn delete_connector(name: &str) {
    script("connect.sh", &["delete", name], &[], "");
}

/// Waits until `topic` exists (Debezium creates its topics with their first record).
pub fn wait_for_topic(topic: &str, timeout: Duration) {
    let reader = offset_reader("read_uncommitted", None);
    wait_until(&format!("topic `{topic}` exists"), timeout, || {
        reader
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .is_ok_and(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
    });
}

/// Kills Kafka Connect with SIGKILL (its pid file) and starts it again; the connectors resume
/// from their last flushed offsets.
pub fn kill_and_restart_connect() {
    let state =
        std::env::var("CDCFLOW_CONNECT_DIR").expect("CDCFLOW_CONNECT_DIR is set by run-all.sh");
    let pid = std::fs::read_to_string(std::path::Path::new(&state).join("connect.pid"))
        .expect("Connect's pid file");
    let status = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 of Connect failed");
    wait_until("Connect is gone", Duration::from_secs(30), || {
        !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
    });
    script("connect.sh", &["start"], &[], "");
}

/// The source offsets Kafka Connect has flushed for connector `name` (its REST API, KIP-875),
/// as text: what a restarted connector resumes from.
pub fn connector_offsets(name: &str) -> String {
    let port = std::env::var("CDCFLOW_CONNECT_PORT").unwrap_or_else(|_| "18083".to_owned());
    let output = Command::new("curl")
        .args([
            "-sf",
            &format!("http://127.0.0.1:{port}/connectors/{name}/offsets"),
        ])
        .output()
        .expect("curl runs");
    assert!(output.status.success(), "GET offsets of {name} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until connector `name` and its task run again (after a restart of Connect).
pub fn wait_for_connector_running(name: &str, timeout: Duration) {
    wait_until(&format!("connector {name} runs"), timeout, || {
        script("connect.sh", &["connectors"], &[], "")
            .lines()
            .any(|line| line.starts_with(name) && line.contains("tasks: 0=RUNNING"))
    });
}

/// How many records `topic` holds (all partitions, read_uncommitted end offsets).
pub fn record_count(topic: &str) -> i64 {
    end_offsets(topic).values().sum()
}
