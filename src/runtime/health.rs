//! What the service reports as its health: `/healthz` answers while the process runs,
//! `/readyz` only while it is doing its job.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use super::now_ms;

/// Liveness and readiness of `cdcflow run`, updated by the service and read by the HTTP
/// endpoint.
#[derive(Debug, Default)]
pub struct Health {
    /// When the process loop last showed progress (Unix ms; 0 before it started).
    heartbeat_ms: AtomicI64,
    joined: AtomicBool,
    restoring: AtomicBool,
    failing: AtomicBool,
    stopping: AtomicBool,
    brokers_unreachable: AtomicBool,
}

impl Health {
    /// The process loop is alive: called on every turn of the consume loop and while a long
    /// restore makes progress.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `Ok` while the loop has shown progress within `stall_after` (or has not started yet:
    /// start-up waits for brokers with its own limits); otherwise how long it has been stuck.
    pub fn liveness(&self, stall_after: Duration) -> Result<(), Duration> {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        if last == 0 {
            return Ok(());
        }
        let silent = Duration::from_millis((now_ms() - last).max(0) as u64);
        if silent > stall_after {
            Err(silent)
        } else {
            Ok(())
        }
    }

    /// The service has prepared its topics and joined its consumer group.
    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::SeqCst);
    }

    /// Assigned partitions are being restored from their changelog.
    pub fn set_restoring(&self, restoring: bool) {
        self.restoring.store(restoring, Ordering::SeqCst);
    }

    /// The last batch failed and is being retried (transient errors: broker, store).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Whether the consumer can reach any broker (librdkafka's statistics say so every
    /// second).
    pub fn set_brokers_reachable(&self, reachable: bool) {
        self.brokers_unreachable.store(!reachable, Ordering::SeqCst);
    }

    pub fn brokers_reachable(&self) -> bool {
        !self.brokers_unreachable.load(Ordering::SeqCst)
    }

    /// Shutdown has begun.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready; otherwise why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::SeqCst) {
            Err("stopping")
        } else if !self.joined.load(Ordering::SeqCst) {
            Err("starting: waiting for Kafka and the consumer group")
        } else if self.brokers_unreachable.load(Ordering::SeqCst) {
            Err("no Kafka broker is reachable")
        } else if self.restoring.load(Ordering::SeqCst) {
            Err("restoring state of assigned partitions from their changelog")
        } else if self.failing.load(Ordering::SeqCst) {
            Err("the last batch failed and is being retried")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ready only once joined, and not while restoring, retrying, cut off from the brokers or
    /// stopping.
    #[test]
    fn readiness_follows_the_service() {
        let health = Health::default();
        assert!(health.readiness().is_err());
        health.set_joined(true);
        assert_eq!(health.readiness(), Ok(()));
        health.set_restoring(true);
        assert!(health.readiness().unwrap_err().contains("restoring"));
        health.set_restoring(false);
        health.set_failing(true);
        assert!(health.readiness().unwrap_err().contains("retried"));
        health.set_failing(false);
        health.set_brokers_reachable(false);
        assert!(health.readiness().unwrap_err().contains("broker"));
        health.set_brokers_reachable(true);
        assert_eq!(health.readiness(), Ok(()));
        health.set_stopping();
        assert_eq!(health.readiness(), Err("stopping"));
    }

    /// Alive before the loop starts and while it beats; stuck once it has not beaten for
    /// longer than the limit.
    #[test]
    fn liveness_follows_the_heartbeat() {
        let health = Health::default();
        assert_eq!(health.liveness(Duration::from_secs(1)), Ok(()));
        health.beat();
        assert_eq!(health.liveness(Duration::from_secs(60)), Ok(()));
        health
            .heartbeat_ms
            .store(now_ms() - 5_000, Ordering::Relaxed);
        let stuck = health.liveness(Duration::from_secs(2)).unwrap_err();
        assert!(stuck >= Duration::from_secs(5), "{stuck:?}");
    }
}
