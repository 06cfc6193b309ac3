//! `cdcflow poll` and the polls of `cdcflow run`: each `[[poll]]` writes the changed rows of
//! its table to its topic, owned by one instance of the group at a time.

use std::path::Path;

use anyhow::{Context as _, bail};
use cdcflow::config::{Config, KafkaConfig, PollConfig};
use cdcflow::kafka::{PollRun, create_poll_topics, run_poll};
use cdcflow::metrics::Metrics;

use super::tasks::{Tasks, serve_metrics};

/// Creates the poll topics (retrying while the brokers are unreachable) and starts every
/// poll of the config as a task.
pub(crate) async fn spawn_all(
    tasks: &mut Tasks,
    kafka: &KafkaConfig,
    polls: &[PollConfig],
    metrics: &Metrics,
) -> anyhow::Result<()> {
    if polls.is_empty() {
        return Ok(());
    }
    // The pipelines that read these topics check at start that they exist.
    let mut waited = 0;
    while let Err(error) = create_poll_topics(kafka, polls).await {
        waited += 1;
        if waited > 30 {
            return Err(error).context("cannot create the poll topics");
        }
        tracing::warn!(%error, "cannot create the poll topics yet; retrying");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    for poll in polls {
        let run = PollRun {
            config: poll.clone(),
            metrics: metrics.polls.clone(),
            once: false,
        };
        let (kafka, stopped) = (kafka.clone(), tasks.stopped());
        tasks.spawn(async move {
            let name = run.config.name.clone();
            run_poll(&kafka, run, stopped)
                .await
                .map(|_| ())
                .with_context(|| format!("poll `{name}` stopped"))
        });
    }
    Ok(())
}

/// `cdcflow poll`: the polls alone, continuously or once up to the horizon.
pub(crate) async fn run(
    path: &Path,
    only: Option<&str>,
    once: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let chosen: Vec<PollConfig> = config
        .polls
        .iter()
        .filter(|poll| only.is_none_or(|name| poll.name == name))
        .cloned()
        .collect();
    if chosen.is_empty() {
        bail!(
            "{} has no [[poll]]{}",
            path.display(),
            only.map_or(String::new(), |name| format!(" named `{name}`"))
        );
    }
    let metrics = Metrics::new().context("cannot register the metrics")?;
    if !once {
        serve_metrics(&config, &metrics).await?;
        let mut tasks = Tasks::new();
        spawn_all(&mut tasks, &config.kafka, &chosen, &metrics).await?;
        return tasks.run_until(shutdown).await;
    }
    create_poll_topics(&config.kafka, &chosen)
        .await
        .context("cannot create the poll topics")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    for poll in chosen {
        let name = poll.name.clone();
        let run = PollRun {
            config: poll,
            metrics: metrics.polls.clone(),
            once: true,
        };
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let summary = run_poll(&config.kafka, run, shutdown)
            .await
            .with_context(|| format!("poll `{name}` failed"))?;
        eprintln!(
            "poll `{name}`: {} rows written in {} polls, up to the horizon",
            summary.rows, summary.polls
        );
    }
    Ok(())
}
