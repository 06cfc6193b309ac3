//! The long-running parts of a command (the pipeline service, webhook subscriptions, the
//! ingress) run side by side: SIGTERM stops them all, and one that fails stops the others.

use anyhow::Context as _;
use tokio::sync::broadcast;
use tokio::task::JoinSet;

pub(crate) struct Tasks {
    stop: broadcast::Sender<()>,
    running: JoinSet<anyhow::Result<()>>,
}

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks {
            stop: broadcast::channel(1).0,
            running: JoinSet::new(),
        }
    }

    /// Completes when the tasks are told to stop.
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.stop.subscribe();
        async move {
            let _ = receiver.recv().await;
        }
    }

    pub(crate) fn spawn(
        &mut self,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.running.spawn(task);
    }

    /// Runs until `shutdown`, or until a task ends (the others are then stopped); the first
    /// error is returned.
    pub(crate) async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut first: anyhow::Result<()> = Ok(());
        tokio::select! {
            () = shutdown => {}
            Some(ended) = self.running.join_next() => {
                first = ended.context("a task panicked").and_then(|result| result);
            }
        }
        let _ = self.stop.send(());
        while let Some(ended) = self.running.join_next().await {
            let result = ended.context("a task panicked").and_then(|result| result);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` for the commands without pipelines
/// (`deliver`, `ingress`): ready as soon as they run.
pub(crate) async fn serve_metrics(
    config: &cdcflow::config::Config,
    metrics: &cdcflow::metrics::Metrics,
) -> anyhow::Result<()> {
    if !config.http.enabled {
        return Ok(());
    }
    let listener = cdcflow::http::bind(config.http.listen).await?;
    let address = listener
        .local_addr()
        .context("the HTTP listener has no address")?;
    tracing::info!("serving http://{address}/metrics, /healthz and /readyz");
    let health = std::sync::Arc::new(cdcflow::runtime::Health::default());
    health.set_joined(true);
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let stall_after = std::time::Duration::from_secs(3_600);
        if let Err(error) = cdcflow::http::serve(listener, metrics, health, stall_after).await {
            tracing::error!(%error, "the HTTP endpoint stopped");
        }
    });
    Ok(())
}
