//! Running one contender as a child process pinned to its own core, with its CPU time and peak
//! RSS taken from the kernel's accounting (GNU time's `wait4` rusage), not from sampling.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// CPUs of the benchmark: the broker (and this harness: preload, load generator, probes) on
/// one, the contender alone on the other.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pinning {
    pub(crate) broker_cpu: usize,
    pub(crate) contender_cpu: usize,
}

impl Pinning {
    /// Pins every thread of the broker and of this process to the broker's CPU. Threads
    /// started later inherit the mask.
    pub(crate) fn apply(&self, broker_pid: u32) {
        let cpu = self.broker_cpu.to_string();
        for pid in [broker_pid, std::process::id()] {
            let status = Command::new("taskset")
                .args(["-a", "-p", "-c", &cpu, &pid.to_string()])
                .stdout(Stdio::null())
                .status()
                .expect("taskset runs (util-linux)");
            assert!(status.success(), "taskset could not pin pid {pid}");
        }
    }

    /// Gives the broker every CPU back.
    pub(crate) fn release(&self, broker_pid: u32, cpus: usize) {
        let all = format!("0-{}", cpus - 1);
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &all, &broker_pid.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

/// What the kernel accounted to a finished contender.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) user_s: f64,
    pub(crate) system_s: f64,
    pub(crate) peak_rss_kib: u64,
}

impl Usage {
    pub(crate) fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }
}

/// A contender started under `taskset -c CPU /usr/bin/time -f '%U %S %M' -o FILE`.
pub(crate) struct Running {
    /// The `time` process (taskset execs it); the contender is its only child.
    child: Child,
    usage_file: PathBuf,
    pub(crate) started: Instant,
}

impl Running {
    pub(crate) fn spawn(
        name: &str,
        cpu: usize,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: &Path,
    ) -> Running {
        let usage_file = log.with_extension("usage");
        let _ = std::fs::remove_file(&usage_file);
        let log_file = std::fs::File::create(log).expect("contender log");
        let mut command = Command::new("taskset");
        command
            .args([
                "-c",
                &cpu.to_string(),
                "/usr/bin/time",
                "-f",
                "%U %S %M",
                "-o",
            ])
            .arg(&usage_file)
            .arg(program)
            .args(args)
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("{name}: could not start {program:?}: {error}"));
        Running {
            child,
            usage_file,
            started: Instant::now(),
        }
    }

    /// `Some(success)` once the contender has exited.
    pub(crate) fn exited(&mut self) -> Option<bool> {
        self.child
            .try_wait()
            .expect("wait on contender")
            .map(|status| status.success())
    }

    /// Asks the contender (not `time`, which would not pass the signal on) to stop.
    pub(crate) fn terminate(&self) {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
                .unwrap_or_default();
        for pid in children.split_whitespace() {
            let _ = Command::new("kill").args(["-TERM", pid]).status();
        }
    }

    /// Waits for the exit (SIGKILL after `grace`) and reads the accounting.
    pub(crate) fn finish(mut self, grace: Duration) -> Usage {
        let deadline = Instant::now() + grace;
        while self.exited().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.usage_file).unwrap_or_default();
        // A contender ended by a signal gets a "Command terminated by signal" line first.
        let fields: Vec<f64> = text
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        match fields[..] {
            [user_s, system_s, peak_rss_kib] => Usage {
                user_s,
                system_s,
                peak_rss_kib: peak_rss_kib as u64,
            },
            _ => panic!("no usage in {:?}: {text:?}", self.usage_file),
        }
    }
}
