//! `cdcflow reconcile`: a pipeline's state against the source of truth, reported as JSON and
//! as a summary, with metrics for a CronJob; `--repair` sends the rows that diverge through
//! the pipeline as snapshot reads.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use cdcflow::config::{Config, VersionBy};
use cdcflow::engine::EntityState;
use cdcflow::kafka::{changelog_topic, tools};
use cdcflow::reconcile::{Report, compare, repair::repair, source::read_rows};
use cdcflow::store::{SqliteStore, StateStore, changelog};

#[derive(Debug, clap::Args)]
pub(crate) struct ReconcileArgs {
    /// The TOML config file.
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// The pipeline to reconcile (it needs a `[pipeline.reconcile]`).
    pipeline: String,
    /// Read the state from this store file instead of the pipeline's changelog topic.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Write the source rows of the entities that diverge to the pipeline's input topic as
    /// snapshot reads (and a delete for each entity the source no longer has): the version
    /// gate applies each only where it is newer, so missed events come out once.
    #[arg(long)]
    repair: bool,
    /// Write the JSON report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Write the run's metrics in the Prometheus text format (for node_exporter's textfile
    /// collector).
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
    /// Push the run's metrics to this Prometheus Pushgateway (`http://pushgateway:9091`).
    #[arg(long, value_name = "URL")]
    pushgateway: Option<String>,
    /// Exit with status 2 when anything diverges (a CronJob then shows as failed).
    #[arg(long)]
    fail_on_divergence: bool,
}

/// Runs the reconciliation; `Ok(true)` when something diverged.
pub(crate) async fn reconcile(args: ReconcileArgs) -> anyhow::Result<bool> {
    let config = Config::load(&args.config)?;
    let Some(pipeline) = config.pipelines.iter().find(|p| p.name == args.pipeline) else {
        bail!("no pipeline is named `{}` in the config", args.pipeline);
    };
    let Some(truth) = &pipeline.reconcile else {
        bail!(
            "pipeline `{}` has no [pipeline.reconcile]: add its database_url, query and key",
            pipeline.name
        );
    };
    let started_ms = now_ms();
    let (states, state_source) = match &args.state {
        Some(path) => (
            from_store(path, &pipeline.name).await?,
            path.display().to_string(),
        ),
        None => {
            let topic = changelog_topic(&config.kafka.group_id, &pipeline.name);
            let (kafka, read) = (config.kafka.clone(), topic.clone());
            let states = tokio::task::spawn_blocking(move || from_changelog(&kafka, &read))
                .await
                .context("the changelog reader panicked")??;
            (states, format!("changelog {topic}"))
        }
    };
    let version = pipeline.version.to_spec();
    let rows = read_rows(truth, &version)
        .await
        .with_context(|| format!("cannot read the source of truth of `{}`", pipeline.name))?;
    let report = compare(
        states
            .iter()
            .map(|(key, state)| (key.clone(), state.clone())),
        rows.values().cloned(),
        &truth.ignore_columns,
    );
    let mut repaired = 0;
    let mut not_repairable = Vec::new();
    if args.repair && !report.divergences.is_empty() {
        if pipeline.version.by != VersionBy::Column {
            bail!(
                "--repair needs pipeline `{}` to version by a column (version.by = \"column\"): \
                 a snapshot read carries no source position, so the gate could not tell \
                 whether it is newer",
                pipeline.name
            );
        }
        let [topic] = pipeline.topics.as_slice() else {
            bail!(
                "--repair writes to the pipeline's input topic: pipeline `{}` must name exactly \
                 one topic (it names {:?})",
                pipeline.name,
                pipeline.topics
            );
        };
        let plan = repair(
            &report,
            &rows,
            &states,
            &truth.key,
            pipeline.format.to_format(),
            started_ms,
        );
        repaired = tools::write_keyed(&config.kafka, topic, &plan.records).await?;
        not_repairable = plan.not_repairable;
        eprintln!("repair: {repaired} record(s) written to `{topic}`");
        for reason in &not_repairable {
            eprintln!("  not repairable: {reason}");
        }
    }
    let json = serde_json::json!({
        "pipeline": pipeline.name,
        "at": cdcflow::cdc::format_epoch_millis(started_ms),
        "state": state_source,
        "compared": report.compared,
        "matching": report.matching,
        "counts": counts_json(&report),
        "divergences": report.divergences,
        "repaired_records": repaired,
        "not_repairable": not_repairable,
    });
    let text = serde_json::to_string_pretty(&json)?;
    match &args.output {
        Some(path) => std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => writeln!(std::io::stdout(), "{text}")?,
    }
    eprintln!("pipeline `{}`: {}", pipeline.name, report.summary());
    let page = metrics_page(&pipeline.name, &report, repaired, started_ms);
    if let Some(path) = &args.metrics_file {
        // Written whole then renamed: the textfile collector never reads half a page.
        let partial = path.with_extension("prom.partial");
        std::fs::write(&partial, &page)
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(url) = &args.pushgateway {
        push(url, &pipeline.name, page).await?;
    }
    Ok(!report.divergences.is_empty())
}

impl ReconcileArgs {
    pub(crate) fn fail_on_divergence(&self) -> bool {
        self.fail_on_divergence
    }
}

async fn from_store(
    path: &std::path::Path,
    pipeline: &str,
) -> anyhow::Result<BTreeMap<String, EntityState>> {
    if !path.exists() {
        bail!("no state store at {}", path.display());
    }
    let store = SqliteStore::open(path).await?;
    let entities = store.entities(pipeline).await?;
    let mut states = BTreeMap::new();
    for chunk in entities.chunks(5_000) {
        let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
        states.extend(store.load(pipeline, &keys).await?);
    }
    store.close().await;
    Ok(states)
}

/// The last state of every entity in a changelog topic (a tombstone removes one).
fn from_changelog(
    kafka: &cdcflow::config::KafkaConfig,
    topic: &str,
) -> anyhow::Result<BTreeMap<String, EntityState>> {
    let mut states = BTreeMap::new();
    let mut failure = None;
    let summary = tools::read_topics(kafka, &[topic.to_owned()], |record| {
        let Some(key) = record.key.as_deref() else {
            return ControlFlow::Continue(());
        };
        let key = String::from_utf8_lossy(key).into_owned();
        match record.value.as_deref().filter(|value| !value.is_empty()) {
            None => {
                states.remove(&key);
            }
            Some(value) => match changelog::decode(value) {
                Ok(state) => {
                    states.insert(key, state);
                }
                Err(error) => {
                    failure = Some(format!("changelog record {}: {error}", record.origin()));
                    return ControlFlow::Break(());
                }
            },
        }
        ControlFlow::Continue(())
    })?;
    if let Some(failure) = failure {
        bail!(failure);
    }
    if !summary.missing_topics.is_empty() {
        bail!("changelog topic `{topic}` does not exist: has the pipeline run in this group?");
    }
    if !summary.incomplete.is_empty() {
        bail!(
            "the changelog's end was not reached in {:?}: is a transaction stuck open?",
            summary.incomplete
        );
    }
    Ok(states)
}

fn counts_json(report: &Report) -> serde_json::Value {
    let [missing, extra, version, image] = report.counts();
    serde_json::json!({"missing": missing, "extra": extra, "version": version, "image": image})
}

/// The run's metrics, in the Prometheus text format.
fn metrics_page(pipeline: &str, report: &Report, repaired: usize, at_ms: i64) -> String {
    let [missing, extra, version, image] = report.counts();
    let mut page = String::new();
    let mut family = |name: &str, kind: &str, help: &str, series: &[(&str, f64)]| {
        page.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in series {
            page.push_str(&format!(
                "{name}{{pipeline=\"{pipeline}\"{labels}}} {value}\n"
            ));
        }
    };
    family(
        "cdcflow_reconcile_last_run_timestamp_seconds",
        "gauge",
        "When the last reconciliation of the pipeline ran (Unix time).",
        &[("", at_ms as f64 / 1000.0)],
    );
    family(
        "cdcflow_reconcile_entities_compared",
        "gauge",
        "Entities the last reconciliation compared.",
        &[("", report.compared as f64)],
    );
    family(
        "cdcflow_reconcile_divergences",
        "gauge",
        "Entities the last reconciliation found diverging from the source, by kind.",
        &[
            (",kind=\"missing\"", missing as f64),
            (",kind=\"extra\"", extra as f64),
            (",kind=\"version\"", version as f64),
            (",kind=\"image\"", image as f64),
        ],
    );
    family(
        "cdcflow_reconcile_repaired_records",
        "gauge",
        "Records the last reconciliation wrote to the input topic (--repair).",
        &[("", repaired as f64)],
    );
    page
}

async fn push(url: &str, pipeline: &str, page: String) -> anyhow::Result<()> {
    let target = format!(
        "{}/metrics/job/cdcflow_reconcile/pipeline/{pipeline}",
        url.trim_end_matches('/')
    );
    let response = reqwest::Client::new()
        .put(&target)
        .header("content-type", "text/plain; version=0.0.4")
        .body(page)
        .send()
        .await
        .with_context(|| format!("cannot push the metrics to {target}"))?;
    if !response.status().is_success() {
        bail!("the Pushgateway at {target} answered {}", response.status());
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}
