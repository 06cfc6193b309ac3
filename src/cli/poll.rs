//! `cdcflow poll` and the polls of `cdcflow run`: each `[[poll]]` writes the changed rows of
//! its table to its topic, owned by one instance of the group at a time. `cdcflow replay
//! --poll` runs a poll without Kafka, once, through the pipelines.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use cdcflow::config::{Config, KafkaConfig, PollConfig};
use cdcflow::kafka::{PollRun, create_poll_topics, run_poll};
use cdcflow::metrics::{Metrics, Tally};
use cdcflow::poll::{Cursor, PollDatabase, RecordShape};
use cdcflow::runtime::{ReplayOptions, SharedPipelines, replay};
use cdcflow::store::{SqliteStore, StateStore};

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

/// `cdcflow replay --poll NAME`: the rows of one poll, up to the horizon, straight through the
/// pipelines that read its topic, without Kafka. Page by page: a page's outputs are written
/// and its states saved, then the cursor (in the same store file) moves past it, so a crash
/// repeats at most a page, which the version gate drops.
pub(crate) async fn replay_poll<S: StateStore>(
    config: &Config,
    name: &str,
    pipelines: &SharedPipelines,
    store: Arc<S>,
    cursors: Option<&SqliteStore>,
    options: ReplayOptions,
) -> anyhow::Result<Tally> {
    let Some(poll) = config.polls.iter().find(|poll| poll.name == name) else {
        bail!("the config has no [[poll]] named `{name}`");
    };
    let database = PollDatabase::connect(poll).await?;
    let shape = RecordShape {
        cursor_column: poll.cursor_column.clone(),
        key: poll.key.clone(),
        soft_delete_column: poll.soft_delete_column.clone(),
    };
    let topic = poll.topic();
    let mut cursor: Option<Cursor> = match cursors {
        None => None,
        Some(store) => match store.poll_cursor(name).await? {
            None => None,
            Some(text) => serde_json::from_str(&text)
                .with_context(|| format!("the saved cursor of poll `{name}` is unreadable"))?,
        },
    };
    let stdout = std::io::stdout();
    let mut output = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut diagnostics = std::io::stderr();
    let mut total = Tally::default();
    let mut offset = 0_i64;
    loop {
        let horizon = database.horizon().await?;
        let rows = database.page(&horizon, cursor.as_ref()).await?;
        let count = rows.len();
        if count == 0 {
            break;
        }
        let mut lines = Vec::new();
        for row in rows {
            let record = shape
                .record(row)
                .with_context(|| format!("poll `{name}`"))?;
            let line = serde_json::json!({
                "topic": topic,
                "partition": 0,
                "offset": offset,
                "key": String::from_utf8_lossy(&record.key),
                "payload": String::from_utf8_lossy(&record.value),
            });
            offset += 1;
            serde_json::to_writer(&mut lines, &line)?;
            lines.push(b'\n');
            cursor = Some(record.cursor);
        }
        let tally = replay(
            Arc::clone(pipelines),
            Arc::clone(&store),
            Box::new(std::io::Cursor::new(lines)),
            &mut output,
            &mut diagnostics,
            options,
        )
        .await
        .with_context(|| format!("replay of poll `{name}` stopped"))?;
        output.flush().context("cannot flush stdout")?;
        total.merge(tally);
        if let Some(store) = cursors {
            store
                .save_poll_cursor(name, &serde_json::to_string(&cursor)?)
                .await?;
        }
        if count < poll.page_size {
            break;
        }
    }
    database.close().await;
    Ok(total)
}
