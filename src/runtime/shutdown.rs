//! The stop signal the drivers share: set once (SIGTERM, SIGINT, or a test's future), seen at
//! once by every waiting thread, so that no backoff sleep outlives it.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A stop request shared between the thread that asks for it and the threads that wait.
/// Cheap to clone; every clone sees the same request.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A shutdown that is requested when `signal` completes; the future runs on `runtime`.
    /// This is how `cdcflow run` takes its stop signal as a future (mini-redis' pattern), so
    /// that tests can start and stop the service in-process.
    pub fn from_future(
        runtime: &tokio::runtime::Handle,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Shutdown {
        let shutdown = Shutdown::new();
        let requester = shutdown.clone();
        runtime.spawn(async move {
            signal.await;
            requester.request();
        });
        shutdown
    }

    /// Asks every holder to stop; wakes every [`Shutdown::sleep`].
    pub fn request(&self) {
        let (requested, wake) = &*self.inner;
        *requested.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
    }

    pub fn is_requested(&self) -> bool {
        *self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps for `duration`, or less if shutdown is requested meanwhile. Returns `Err` when
    /// shutdown was requested (before or during the sleep).
    pub fn sleep(&self, duration: Duration) -> Result<(), Stopping> {
        let deadline = Instant::now() + duration;
        let (requested, wake) = &*self.inner;
        let mut stop = requested.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *stop {
                return Err(Stopping);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            stop = wake
                .wait_timeout(stop, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Shutdown was requested while waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping;

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop request ends a long sleep at once, on another thread.
    #[test]
    fn request_wakes_a_sleeper_at_once() {
        let shutdown = Shutdown::new();
        let sleeper = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                (shutdown.sleep(Duration::from_secs(60)), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        shutdown.request();
        let (result, slept) = sleeper.join().unwrap();
        assert_eq!(result, Err(Stopping));
        assert!(slept < Duration::from_secs(5), "slept {slept:?}");
        assert!(shutdown.is_requested());
        assert_eq!(shutdown.sleep(Duration::from_secs(60)), Err(Stopping));
    }

    /// Without a request, a sleep lasts its duration and reports no stop.
    #[test]
    fn sleep_without_request_lasts_its_duration() {
        let shutdown = Shutdown::new();
        let started = Instant::now();
        assert_eq!(shutdown.sleep(Duration::from_millis(30)), Ok(()));
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    /// A shutdown future completing requests the stop.
    #[test]
    fn a_completed_future_requests_the_stop() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (send, receive) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::from_future(runtime.handle(), async move {
            let _ = receive.await;
        });
        assert!(!shutdown.is_requested());
        send.send(()).unwrap();
        runtime.block_on(async {
            for _ in 0..100 {
                if shutdown.is_requested() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the stop was never requested");
        });
    }
}
