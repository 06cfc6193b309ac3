//! The operator's commands: `cdcflow dlq list|replay|discard` and `cdcflow state get|stats`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use cdcflow::cdc::format_epoch_millis;
use cdcflow::config::Config;
use cdcflow::engine::EntityState;
use cdcflow::kafka::changelog_topic;
use cdcflow::kafka::tools::{ReadSummary, read_topics, write_records};
use cdcflow::ops::{DeadLetter, DlqFilter, Reinjection, parse_origin, parse_time};
use cdcflow::runtime::now_ms;
use cdcflow::store::{SqliteStore, StateStore, changelog};
use clap::{Args, Subcommand};

/// Which dead letters a command takes: every filter given must match.
#[derive(Debug, Args)]
pub(crate) struct DlqSelection {
    /// The TOML config file (its pipelines name the DLQ topics).
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// Only this pipeline's DLQ.
    #[arg(long)]
    pipeline: Option<String>,
    /// Only this reason (`rule_error`, `malformed_json`, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only this entity: its key as cdcflow writes it (`42`; sorted compact JSON for a
    /// composite key), or the record's Kafka key text.
    #[arg(long)]
    key: Option<String>,
    /// Dead-lettered at or after: RFC 3339, epoch ms, or an age (`30m`, `12h`, `7d`).
    #[arg(long)]
    since: Option<String>,
    /// Dead-lettered before (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Only the DLQ record at `topic/partition/offset` (as `dlq list` shows it).
    #[arg(long, value_name = "TOPIC/PARTITION/OFFSET")]
    at: Option<String>,
    /// At most this many dead letters (the oldest first, per DLQ partition).
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqAction {
    /// Lists dead letters: where each is, when, pipeline, reason, entity and message.
    List {
        #[command(flatten)]
        selection: DlqSelection,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Writes the selected dead letters' original records back to the partitions they came
    /// from, for the running service to process again after a fix (a rule corrected, a
    /// schema added). The version gate makes it safe to repeat: a change already applied
    /// emits nothing. For `dlq_policy = "park"` the entity's parked changes follow it.
    Replay {
        #[command(flatten)]
        selection: DlqSelection,
        /// Show what would be written, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Releases the entities parked behind the selected dead letters (`dlq_policy = "park"`)
    /// without processing the dead-lettered changes: their parked changes are then processed
    /// in order. Needs --key or --at.
    Discard {
        #[command(flatten)]
        selection: DlqSelection,
        /// Show what would be written, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum StateAction {
    /// Prints one entity's stored version, image and parked changes, as JSON.
    Get {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The pipeline's name.
        pipeline: String,
        /// The entity key as cdcflow writes it: `42`, or sorted compact JSON for a composite
        /// key (`{"line":2,"order_id":7}`).
        entity: String,
        /// State file to read instead of the config's `[state] path`.
        #[arg(long, value_name = "FILE", conflicts_with = "from_changelog")]
        state: Option<PathBuf>,
        /// Read the pipeline's changelog topic instead of a local store (the default when
        /// the local store file does not exist).
        #[arg(long)]
        from_changelog: bool,
    },
    /// Entities per pipeline, changelog checkpoints and size of a local store.
    Stats {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// State file to read instead of the config's `[state] path`.
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
}

impl DlqSelection {
    fn filter(&self) -> anyhow::Result<DlqFilter> {
        let now = now_ms();
        let time = |option: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|value| parse_time(option, value, now))
                .transpose()
        };
        let location = match &self.at {
            Some(text) => Some(parse_origin(text).with_context(|| {
                format!("`--at {text}` is not a DLQ location; give topic/partition/offset")
            })?),
            None => None,
        };
        Ok(DlqFilter {
            pipeline: self.pipeline.clone(),
            reason: self.reason.clone(),
            key: self.key.clone(),
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            location,
        })
    }

    /// Reads the selected dead letters of the config's DLQ topics.
    fn read(&self) -> anyhow::Result<(Config, Vec<DeadLetter>)> {
        let config = Config::load(&self.config)?;
        let pipelines = config.build_pipelines()?;
        let mut topics: Vec<String> = pipelines
            .iter()
            .filter(|(_, pipeline)| self.pipeline.as_ref().is_none_or(|p| p == pipeline.name()))
            .map(|(_, pipeline)| pipeline.settings().dlq_topic.clone())
            .collect();
        if topics.is_empty() {
            bail!(
                "no pipeline is named `{}` in {}",
                self.pipeline.as_deref().unwrap_or_default(),
                self.config.display()
            );
        }
        topics.sort();
        topics.dedup();
        let filter = self.filter()?;
        let mut letters = Vec::new();
        let mut unreadable = 0u64;
        let summary = read_topics(&config.kafka, &topics, |record| {
            match DeadLetter::from_record(&record) {
                Ok(letter) if filter.matches(&letter) => letters.push(letter),
                Ok(_) => {}
                Err(error) => {
                    unreadable += 1;
                    eprintln!("skipped: {error}");
                }
            }
            if self.limit.is_some_and(|limit| letters.len() >= limit) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        report_read(&summary, unreadable);
        Ok((config, letters))
    }
}

fn report_read(summary: &ReadSummary, unreadable: u64) {
    let mut err = io::stderr().lock();
    for topic in &summary.missing_topics {
        let _ = writeln!(
            err,
            "note: `{topic}` does not exist yet (nothing dead-lettered)"
        );
    }
    if !summary.incomplete.is_empty() {
        let _ = writeln!(
            err,
            "warning: stopped before the end of {:?}: an open transaction holds it back",
            summary.incomplete
        );
    }
    if unreadable > 0 {
        let _ = writeln!(
            err,
            "warning: {unreadable} record(s) were not cdcflow dead letters"
        );
    }
}

pub(crate) async fn dlq(action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { selection, json } => {
            let (_, letters) = blocking(move || selection.read()).await?;
            print_letters(&letters, json)
        }
        DlqAction::Replay { selection, dry_run } => {
            let (config, letters) = blocking(move || selection.read()).await?;
            let mut records = Vec::new();
            for letter in &letters {
                match letter.replay() {
                    Ok(record) => records.push((letter, record)),
                    Err(error) => eprintln!("not replayed: {error}"),
                }
            }
            reinject(&config, records, dry_run, "replayed").await
        }
        DlqAction::Discard { selection, dry_run } => {
            if selection.key.is_none() && selection.at.is_none() {
                bail!("`dlq discard` needs --key or --at: it releases parked entities one by one");
            }
            let (config, letters) = blocking(move || selection.read()).await?;
            let records = letters
                .iter()
                .map(|letter| (letter, letter.discard()))
                .collect();
            reinject(&config, records, dry_run, "discarded").await
        }
    }
}

/// Writes records back in their original order (per input partition, by offset).
async fn reinject(
    config: &Config,
    mut records: Vec<(&DeadLetter, Reinjection)>,
    dry_run: bool,
    done: &str,
) -> anyhow::Result<()> {
    records.sort_by(|(a, _), (b, _)| {
        (
            &a.first_origin.topic,
            a.first_origin.partition,
            a.first_origin.offset,
        )
            .cmp(&(
                &b.first_origin.topic,
                b.first_origin.partition,
                b.first_origin.offset,
            ))
    });
    let mut out = io::stdout().lock();
    for (letter, record) in &records {
        writeln!(
            out,
            "{} {} -> {}/{} (entity {}, {})",
            if dry_run { "would write" } else { "writing" },
            letter.location,
            record.topic,
            record.partition,
            letter.entity.as_deref().unwrap_or("?"),
            letter.reason
        )?;
    }
    drop(out);
    if dry_run {
        println!("dry run: {} record(s), nothing written", records.len());
        return Ok(());
    }
    let records: Vec<Reinjection> = records.into_iter().map(|(_, record)| record).collect();
    let written = write_records(&config.kafka, &records).await?;
    println!("{done}: {written} dead letter(s) written back to their input partitions");
    Ok(())
}

fn print_letters(letters: &[DeadLetter], json: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        for letter in letters {
            writeln!(out, "{}", letter.to_json())?;
        }
        return Ok(());
    }
    let mut by_reason: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for letter in letters {
        *by_reason
            .entry((&letter.pipeline, &letter.reason))
            .or_default() += 1;
        let entity = letter.entity.clone().or_else(|| letter.key_text());
        writeln!(
            out,
            "{}  {}  {}  {}  entity={}  origin={}\n    {}",
            letter.location,
            letter
                .timestamp_ms
                .map(format_epoch_millis)
                .unwrap_or_default(),
            letter.pipeline,
            letter.reason,
            entity.as_deref().unwrap_or("-"),
            letter.origin,
            letter.message
        )?;
    }
    writeln!(out, "{} dead letter(s)", letters.len())?;
    for ((pipeline, reason), count) in by_reason {
        writeln!(out, "  {pipeline}: {reason} x{count}")?;
    }
    Ok(())
}

pub(crate) async fn state(action: StateAction) -> anyhow::Result<()> {
    match action {
        StateAction::Get {
            config,
            pipeline,
            entity,
            state,
            from_changelog,
        } => {
            let config = Config::load(&config)?;
            if !config.pipelines.iter().any(|p| p.name == pipeline) {
                bail!("no pipeline is named `{pipeline}` in the config");
            }
            let path = state.unwrap_or_else(|| config.state.path.clone());
            let found = if from_changelog || !path.exists() {
                let topic = changelog_topic(&config.kafka.group_id, &pipeline);
                eprintln!("reading changelog `{topic}`");
                let wanted = entity.clone();
                blocking(move || from_changelog_topic(&config, &topic, &wanted)).await?
            } else {
                let store = SqliteStore::open(&path).await?;
                let mut states = store.load(&pipeline, &[entity.as_str()]).await?;
                store.close().await;
                states
                    .remove(&entity)
                    .map(|state| (state, format!("store {}", path.display())))
            };
            match found {
                Some((state, source)) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&state_json(&pipeline, &state, &source))?
                    );
                    Ok(())
                }
                None => bail!("pipeline `{pipeline}` holds no state for entity `{entity}`"),
            }
        }
        StateAction::Stats { config, state } => {
            let config = Config::load(&config)?;
            let path = state.unwrap_or_else(|| config.state.path.clone());
            if !path.exists() {
                bail!(
                    "no state store at {} (see [state] path, or --state)",
                    path.display()
                );
            }
            let store = SqliteStore::open(&path).await?;
            let stats = store.stats().await?;
            store.close().await;
            println!(
                "store {} ({} bytes on disk)",
                path.display(),
                stats.size_bytes
            );
            for pipeline in &config.pipelines {
                let entities = stats.entities.get(&pipeline.name).copied().unwrap_or(0);
                let parked = stats
                    .parked_entities
                    .get(&pipeline.name)
                    .copied()
                    .unwrap_or(0);
                println!(
                    "  pipeline {}: {entities} entities, {parked} parked behind a dead letter",
                    pipeline.name
                );
            }
            for (pipeline, entities) in &stats.entities {
                if !config.pipelines.iter().any(|p| &p.name == pipeline) {
                    println!("  pipeline {pipeline} (not in the config): {entities} entities");
                }
            }
            for checkpoint in &stats.checkpoints {
                println!(
                    "  changelog {}/{} restored up to offset {}",
                    checkpoint.topic, checkpoint.partition, checkpoint.offset
                );
            }
            Ok(())
        }
    }
}

/// The last state of `entity` in a changelog topic.
fn from_changelog_topic(
    config: &Config,
    topic: &str,
    entity: &str,
) -> anyhow::Result<Option<(EntityState, String)>> {
    let mut last = None;
    let summary = read_topics(&config.kafka, &[topic.to_owned()], |record| {
        if record.key.as_deref() == Some(entity.as_bytes()) {
            last = Some(record);
        }
        ControlFlow::Continue(())
    })?;
    report_read(&summary, 0);
    let Some(record) = last else {
        return Ok(None);
    };
    let value = record.value.as_deref().unwrap_or_default();
    let state = changelog::decode(value)
        .with_context(|| format!("changelog record {} is unreadable", record.origin()))?;
    Ok(Some((state, format!("changelog {}", record.origin()))))
}

fn state_json(pipeline: &str, state: &EntityState, source: &str) -> serde_json::Value {
    let image = state.image.as_deref().map(|text| {
        serde_json::from_str::<serde_json::Value>(text).unwrap_or_else(|_| text.into())
    });
    let parked = state.parked.as_ref().map(|parked| {
        serde_json::json!({
            "behind": parked.blocker.to_string(),
            "entity_absent": parked.entity_absent,
            "changes": parked
                .changes
                .iter()
                .map(|change| change.origin().to_string())
                .collect::<Vec<_>>(),
        })
    });
    serde_json::json!({
        "pipeline": pipeline,
        "version": state.version.sequence(),
        "deleted": state.is_deleted(),
        "updated_at": format_epoch_millis(state.updated_at_ms),
        "image": image,
        "parked": parked,
        "source": source,
    })
}

/// Runs blocking librdkafka work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("the command's worker thread panicked")?
}
