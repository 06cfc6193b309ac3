//! `cdcflow run` as a child process: start, signal, stop and kill it, read its log (the
//! partitions it was assigned and holds, its HTTP address), and kill it inside an open
//! transaction. A failing test prints the end of the log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::offsets::poll_until;
use super::*;

/// A running `cdcflow run`.
pub struct Service {
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn start(config: &Path, log: &Path) -> Service {
        Service::start_logging(
            config,
            log,
            "info,cdcflow::kafka::service=debug,rdkafka=warn",
        )
    }

    /// Starts with the `CDCFLOW_LOG` filter `filter`.
    pub fn start_logging(config: &Path, log: &Path, filter: &str) -> Service {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .args(["run", "--config"])
            .arg(config)
            .env("CDCFLOW_LOG", filter)
            // Tests read the log (partition lists, errors): plain text, no ANSI colours.
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("cdcflow starts");
        Service {
            child,
            log: log.to_owned(),
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, then the exit status within `timeout` (at once if it has exited already).
    pub fn stop(mut self, timeout: Duration) -> std::process::ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.signal("KILL");
                panic!(
                    "cdcflow did not stop within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` and returns it; panics with the log after
    /// `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let mut log = String::new();
        if poll_until(timeout, || {
            log = self.log_text();
            log.contains(needle)
        }) {
            return log;
        }
        panic!("no `{needle}` in the log within {timeout:?}; log:\n{log}");
    }

    /// How often `needle` occurs in the log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// The partitions of each `partitions assigned` line, in log order (a line may name none:
    /// a cooperative rebalance can assign nothing new).
    pub fn assignments(&self) -> Vec<Vec<TopicPartition>> {
        self.log_text()
            .lines()
            .filter_map(|line| logged_partitions(line, ASSIGNED))
            .collect()
    }

    /// The partitions the log says the instance holds: assigned and not revoked since.
    pub fn held_partitions(&self) -> BTreeSet<TopicPartition> {
        let mut held = BTreeSet::new();
        for line in self.log_text().lines() {
            if let Some(assigned) = logged_partitions(line, ASSIGNED) {
                held.extend(assigned);
            } else if let Some(dropped) =
                logged_partitions(line, REVOKED).or_else(|| logged_partitions(line, DROPPED))
            {
                for partition in &dropped {
                    held.remove(partition);
                }
            }
        }
        held
    }

    /// `GET path` on the service's HTTP endpoint (its address is in the log): (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let log = self.log_text();
        let address = log
            .split("serving http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("the log names no HTTP address: {log}"));
        let mut stream = std::net::TcpStream::connect(address).expect("HTTP endpoint accepts");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        (status, body)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed wait or assertion: the end of the log usually says why.
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "last lines of {}:\n{}",
                self.log.display(),
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            );
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How much of a service's log a failing test prints.
const LOG_TAIL_LINES: usize = 60;

/// An input partition named in the log: (topic, partition).
pub type TopicPartition = (String, i32);

/// The log line of an assignment; its `partitions` field lists what was assigned.
pub const ASSIGNED: &str = "partitions assigned";
/// The log line of a revocation (`lost=true` when the session had expired).
pub const REVOKED: &str = "partitions revoked";
/// The log line of a failed rebalance, whose partitions are dropped.
const DROPPED: &str = "dropping the assignment";

/// The partitions a log line containing `needle` names after it, in the form
/// `partitions=[("<topic>", 3), ("<topic>", 7)]`; `None` for any other line.
fn logged_partitions(line: &str, needle: &str) -> Option<Vec<TopicPartition>> {
    let (_, fields) = line.split_once(needle)?;
    Some(
        fields
            .split('(')
            .skip(1)
            .filter_map(|tuple| {
                let (topic, partition) = tuple.split_once(')')?.0.rsplit_once(", ")?;
                Some((topic.trim_matches('"').to_owned(), partition.parse().ok()?))
            })
            .collect(),
    )
}

/// Kills `service` with SIGKILL inside an open transaction writing `topic`, trying up to
/// `timeout`: the process is frozen (SIGSTOP), the markers of a transaction it already
/// committed get time to land, and only records still past the last stable offset mean a
/// transaction the kill leaves open; otherwise it resumes (SIGCONT) and is tried again a moment
/// later. Returns whether the kill landed inside a transaction (at the timeout it kills anyway).
pub fn kill_inside_transaction(service: Service, topic: &str, timeout: Duration) -> bool {
    let probe = TransactionProbe::new(topic);
    let deadline = Instant::now() + timeout;
    let mut attempt = 0u64;
    loop {
        service.signal("STOP");
        std::thread::sleep(Duration::from_millis(300));
        let inside = probe.records_past_stable_offset();
        if inside || Instant::now() >= deadline {
            service.kill();
            return inside;
        }
        service.signal("CONT");
        attempt += 1;
        std::thread::sleep(Duration::from_millis(10 + attempt * 37 % 90));
    }
}
