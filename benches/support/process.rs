//! The processes around a measurement: the broker and this harness pinned to one CPU, the
//! measured program alone on another, and that program run under GNU time so that its CPU
//! seconds and peak RSS come from the kernel's accounting of the whole process (`wait4`'s
//! rusage), not from sampling.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The CPU of the broker and of this harness (preload, load generator, probes).
pub(crate) const BROKER_CPU: usize = 0;
/// The CPU the measured program has to itself.
pub(crate) const CONTENDER_CPU: usize = 1;

/// Pins every thread of process `pid` to `cpus` (a taskset CPU list); threads it starts later
/// inherit the mask. False when taskset cannot.
pub(crate) fn pin_process(pid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Pins this harness to `cpu`, beside the broker, so that it takes nothing from the measured
/// program's CPU.
pub(crate) fn pin_harness(cpu: usize) {
    assert!(
        pin_process(std::process::id(), &cpu.to_string()),
        "taskset could not pin this harness"
    );
}

/// The broker to pin: `CDCFLOW_BENCH_BROKER_PID`, else the one `deploy/local/kafka.sh` runs.
/// `Err` says why neither named one.
pub(crate) fn broker_pid(root: &Path) -> Result<u32, String> {
    if let Ok(pid) = std::env::var("CDCFLOW_BENCH_BROKER_PID") {
        return Ok(pid.parse().expect("CDCFLOW_BENCH_BROKER_PID is a pid"));
    }
    let out = Command::new(root.join("deploy/local/kafka.sh"))
        .arg("pid")
        .output()
        .map_err(|error| format!("deploy/local/kafka.sh: {error}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    printed
        .trim()
        .parse()
        .map_err(|_| format!("`kafka.sh pid` printed {:?}", printed.trim()))
}

/// The broker pinned to one CPU for a run. Dropping it, at the end or while a failed bench
/// unwinds, gives the broker every CPU back: a broker left on one core would slow whatever
/// uses it next.
#[derive(Debug)]
pub(crate) struct PinnedBroker {
    pid: u32,
}

impl PinnedBroker {
    /// Pins every thread of the broker `pid` to `cpu`; `None` when taskset cannot.
    pub(crate) fn pin(pid: u32, cpu: usize) -> Option<PinnedBroker> {
        pin_process(pid, &cpu.to_string()).then_some(PinnedBroker { pid })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for PinnedBroker {
    fn drop(&mut self) {
        pin_process(self.pid, &format!("0-{}", super::cpus() - 1));
    }
}

/// A field of `/proc/PID/status` given in kB (`VmRSS`, `VmHWM`, `RssAnon`, ...), in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

const GNU_TIME: &str = "/usr/bin/time";
/// The figures GNU time writes, in the order of `Usage`'s fields.
const USAGE_FORMAT: &str = "%e %U %S %M";

/// What the kernel accounted to a finished program, as GNU time wrote it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) wall_s: f64,
    pub(crate) user_s: f64,
    pub(crate) system_s: f64,
    pub(crate) peak_rss_kib: u64,
}

impl Usage {
    fn read(path: &Path) -> Usage {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A program ended by a signal or with a non-zero status gets a line before the figures.
        let fields: Vec<f64> = text
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|field| field.parse().ok())
            .collect();
        match fields[..] {
            [wall_s, user_s, system_s, peak_rss_kib] => Usage {
                wall_s,
                user_s,
                system_s,
                peak_rss_kib: peak_rss_kib as u64,
            },
            _ => panic!("no usage in {path:?}: {text:?}"),
        }
    }

    /// User and system CPU seconds.
    pub(crate) fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }

    pub(crate) fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }
}

/// A program to run under GNU time: `taskset -c CPU /usr/bin/time -f FORMAT -o FILE PROGRAM`
/// when pinned, without taskset otherwise. taskset execs GNU time, which forks the program.
#[derive(Debug)]
pub(crate) struct TimedCommand {
    command: Command,
    usage_file: PathBuf,
}

impl TimedCommand {
    /// `program` on `cpu` (any CPU when `None`); GNU time writes its `Usage` to `usage_file`.
    pub(crate) fn new(program: &Path, cpu: Option<usize>, usage_file: PathBuf) -> TimedCommand {
        // A file left by an earlier run would pass for this run's figures.
        let _ = std::fs::remove_file(&usage_file);
        let mut command = match cpu {
            Some(cpu) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", &cpu.to_string(), GNU_TIME]);
                taskset
            }
            None => Command::new(GNU_TIME),
        };
        command
            .args(["-f", USAGE_FORMAT, "-o"])
            .arg(&usage_file)
            .arg(program);
        TimedCommand {
            command,
            usage_file,
        }
    }

    /// The command, for the program's arguments, environment and stdio.
    pub(crate) fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    pub(crate) fn spawn(mut self) -> std::io::Result<Timed> {
        let time = self.command.spawn()?;
        Ok(Timed {
            time,
            usage_file: self.usage_file,
            started: Instant::now(),
        })
    }
}

/// A program running under GNU time. Dropped while it runs (a failed bench), it kills the
/// program, so that no measured program outlives the bench.
#[derive(Debug)]
pub(crate) struct Timed {
    /// GNU time; the program is its only child.
    time: Child,
    usage_file: PathBuf,
    pub(crate) started: Instant,
}

impl Timed {
    /// The exit status of GNU time (the program's) once the program has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.time.try_wait().expect("wait on GNU time")
    }

    /// The program's pid, once GNU time has forked it.
    pub(crate) fn program_pid(&self) -> Option<u32> {
        // GNU time has one thread, so its main thread's children are all of its children.
        let pid = self.time.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The program's stderr, when the command piped it.
    pub(crate) fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.time.stderr.take()
    }

    /// Stops the program with SIGTERM, sent to the program itself since GNU time would not
    /// pass it on, and returns its exit status and usage. Panics when the program has not
    /// exited `grace` after the signal (the drop then kills it).
    pub(crate) fn stop(mut self, grace: Duration) -> (ExitStatus, Usage) {
        // Once GNU time has been waited for, its pid may belong to another process.
        if self.exited().is_none()
            && let Some(pid) = self.program_pid()
        {
            kill("TERM", pid);
        }
        let deadline = Instant::now() + grace;
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            assert!(
                Instant::now() <= deadline,
                "the program behind {:?} did not stop within {grace:?} of SIGTERM",
                self.usage_file
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, Usage::read(&self.usage_file))
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        if matches!(self.time.try_wait(), Ok(None)) {
            match self.program_pid() {
                Some(pid) => kill("KILL", pid),
                // Not forked yet: GNU time itself.
                None => {
                    let _ = self.time.kill();
                }
            }
            let _ = self.time.wait();
        }
    }
}

fn kill(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}
