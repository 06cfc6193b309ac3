//! The `cdcflow` command line: parse arguments, load the config, call the library.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use cdcflow::config::Config;
use cdcflow::kafka::ClientLibrary;
use cdcflow::metrics::{self, Tally};
use cdcflow::runtime::{ReplayOptions, SharedPipelines, replay};
use cdcflow::store::{MemoryStore, SqliteStore, StateStore};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod cli;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// cdcflow turns Debezium change streams into deduplicated, ordered business events.
#[derive(Debug, Parser)]
#[command(name = "cdcflow", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: `text` (human-readable) or `json` (one object per line, with the
    /// span's fields: pipeline, partitions, offsets). The level comes from `CDCFLOW_LOG`
    /// (default `info`; e.g. `CDCFLOW_LOG=debug,rdkafka=info`).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CDCFLOW_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDCFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay Debezium records from JSON Lines (the format `kcat -C -J` writes) through the
    /// pipelines, with no Kafka: business events, DLQ and audit records go to stdout as JSON
    /// Lines, a summary to stderr. State persists in the SQLite file of `[state] path`, so
    /// replaying the same input again emits nothing.
    ///
    /// Example: cdcflow replay --config examples/shop.toml examples/orders.jsonl
    Replay {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Input files of kcat JSON Lines, read in order; `-` or none reads stdin.
        #[arg(value_name = "INPUT")]
        inputs: Vec<PathBuf>,
        /// State file to use instead of the config's `[state] path`.
        #[arg(long, value_name = "FILE", conflicts_with = "in_memory")]
        state: Option<PathBuf>,
        /// Keep state in memory only: nothing is read from or written to a state file.
        #[arg(long)]
        in_memory: bool,
        /// Read the changed rows of this `[[poll]]` (PostgreSQL or SQLite) instead of input
        /// files, up to the horizon, from the cursor saved in the state file, and save the
        /// cursor there after each page.
        #[arg(long, value_name = "NAME", conflicts_with = "inputs")]
        poll: Option<String>,
    },
    /// Run the service: join the Kafka consumer group over the pipelines' topics, turn changes
    /// into business events, and publish them with the configured delivery guarantee
    /// (`[kafka] delivery`: exactly_once or at_least_once). State lives in the SQLite file of
    /// `[state] path`, backed by a compacted changelog topic per pipeline; deleting the file
    /// loses nothing. The config's `[[webhook]]` subscriptions, `[ingress]` and `[[poll]]` run beside the
    /// pipelines. SIGTERM or Ctrl-C finishes the batch, commits, leaves the group and exits 0.
    Run {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Deliver business events to the `[[webhook]]` endpoints of the config: each
    /// subscription consumes its topics as its own consumer group and POSTs every event,
    /// signed (Standard Webhooks), in per-entity order, with retries and a DLQ topic.
    Deliver {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Only this subscription.
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Serve the `[ingress]` of the config: pushes over HTTP, signature-checked, deduplicated
    /// by request id (`webhook-id` or `Idempotency-Key`) in a database, each written once to
    /// Kafka and answered only after the broker acknowledged it.
    Ingress {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the `[[poll]]` sources of the config: each reads the changed rows of its table by
    /// its cursor column and writes them, with the cursor, to its topic in one Kafka
    /// transaction. One instance of the group owns a poll at a time.
    Poll {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Only this poll.
        #[arg(long)]
        name: Option<String>,
        /// Poll until the table is read up to the horizon, then exit (for a cron job or a
        /// backfill).
        #[arg(long)]
        once: bool,
    },
    /// Compare a pipeline's state (its changelog, or a store file) with the source of truth
    /// (`[pipeline.reconcile]`, a SQL query) at one point in time: entities missing, extra,
    /// or at another version or image, as JSON on stdout and a summary on stderr.
    Reconcile(cli::reconcile::ReconcileArgs),
    /// Look into and act on the dead-letter topics: list, replay after a fix, discard.
    Dlq {
        #[command(subcommand)]
        action: cli::operate::DlqAction,
    },
    /// Look into the entity state: one entity (from the local store or the changelog), or
    /// the store's totals.
    State {
        #[command(subcommand)]
        action: cli::operate::StateAction,
    },
    /// Validate a config and print the compiled pipelines; exits non-zero with the key and
    /// the fix when the config is invalid.
    Check {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::command()
        .long_version(long_version())
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    init_logs(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Deliver {
            config,
            subscription,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async {
                cli::deliver::run(&config, subscription.as_deref(), stop_signal()?).await
            })
        }
        Command::Ingress { config } => {
            // A worker per CPU the process may use (its affinity): pinned to one CPU, one
            // worker hands requests between threads less than two (`cargo bench --bench
            // webhooks`, SQLite: p99 28.5 ms -> 20.2 ms, 90 -> 70 CPU µs per request).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async { cli::ingress::run(&config, stop_signal()?).await })
        }
        Command::Poll { config, name, once } => small_runtime()?.block_on(async {
            cli::poll::run(&config, name.as_deref(), once, stop_signal()?).await
        }),
        Command::Reconcile(args) => {
            let fail_on_divergence = args.fail_on_divergence();
            let diverged = small_runtime()?.block_on(cli::reconcile::reconcile(args))?;
            if diverged && fail_on_divergence {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Dlq { action } => small_runtime()?.block_on(cli::operate::dlq(action)),
        Command::State { action } => small_runtime()?.block_on(cli::operate::state(action)),
        Command::Run { config } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async { cli::run::run(&config, stop_signal()?).await })
        }
        Command::Replay {
            config,
            inputs,
            state,
            in_memory,
            poll,
        } => {
            // Two workers: the replay task, and the background state saves beside it.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(replay_command(config, inputs, state, in_memory, poll))
        }
    }
}

/// A runtime for the operator's commands: one worker, blocking reads on their own threads.
fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A database URL with its password hidden.
fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `cdcflow --version`: the build, and what its librdkafka can do (TLS, SASL, codecs).
fn long_version() -> String {
    let library = ClientLibrary::linked();
    format!(
        "{} (git {}, rustc {})\nlibrdkafka {}\nbuiltin.features: {}",
        metrics::BUILD_VERSION,
        metrics::BUILD_GIT_SHA,
        metrics::BUILD_RUSTC,
        library.version,
        library.features.join(",")
    )
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let pipelines = config.build_pipelines()?;
    ClientLibrary::linked().check(&config.kafka)?;
    // Secrets are read (inline and from the environment) as `run` reads them.
    let metrics = metrics::Metrics::new().context("cannot register the metrics")?;
    let subscriptions = cli::deliver::subscriptions(&config, None, &metrics)?;
    if let Some(ingress) = &config.ingress {
        cli::deliver::signing_secrets("ingress", &ingress.secrets, ingress.secrets_env.as_deref())?;
    }
    println!(
        "config `{}` is valid: {} pipeline(s), {} webhook subscription(s), {}",
        path.display(),
        pipelines.len(),
        subscriptions.len(),
        if config.ingress.is_some() {
            "an ingress"
        } else {
            "no ingress"
        }
    );
    println!(
        "kafka: {} ({})",
        config.kafka.bootstrap_servers,
        config.kafka.client_security.summary()
    );
    for (pipeline_config, (_, pipeline)) in config.pipelines.iter().zip(&pipelines) {
        let settings = pipeline.settings();
        println!("\npipeline `{}`", settings.name);
        println!("  topics:   {:?}", pipeline_config.topics);
        if let Some(pattern) = &pipeline_config.topic_pattern {
            println!("  pattern:  {pattern}");
        }
        println!("  format:   {:?}", settings.decoder.format);
        println!("  version:  {:?}", settings.version);
        println!("  dlq:      {}", settings.dlq_topic);
        if let Some(audit) = &settings.audit_topic {
            println!("  audit:    {audit}");
        }
        for rule in settings.rules.specs() {
            println!(
                "  rule `{}` -> {} on topic `{}`",
                rule.name, rule.event_type, rule.topic
            );
            println!("    when:    {}", rule.when);
            println!("    payload: {:?}", rule.payload);
        }
    }
    for subscription in &subscriptions {
        let webhook = &subscription.config;
        println!("\nwebhook `{}`", webhook.name);
        println!("  topics:   {:?}", webhook.topics);
        println!("  url:      {}", webhook.url);
        println!("  group:    {}", webhook.group_id(&config.kafka.group_id));
        println!("  secrets:  {}", subscription.secrets.len());
        if !webhook.event_types.is_empty() {
            println!("  types:    {:?}", webhook.event_types);
        }
        if let Some(when) = &webhook.when {
            println!("  when:     {when}");
        }
        println!("  dlq:      {}", webhook.dlq_topic());
    }
    if let Some(ingress) = &config.ingress {
        println!("\ningress on {}", ingress.listen);
        println!(
            "  database: {}",
            redact_password(&ingress.database_url(&config.state.path))
        );
        for route in &ingress.routes {
            println!(
                "  route {} -> {} keyed by {:?}",
                route.path, route.topic, route.key
            );
        }
    }
    for poll in &config.polls {
        println!(
            "
poll `{}`",
            poll.name
        );
        println!(
            "  database: {}",
            poll.database_url()
                .map_or("(unset)".to_owned(), |url| redact_password(&url))
        );
        println!(
            "  table:    {} by ({}, {})",
            poll.table,
            poll.cursor_column,
            poll.key.join(", ")
        );
        println!("  topic:    {}", poll.topic());
        println!("  group:    {}", poll.group_id(&config.kafka.group_id));
        println!(
            "  interval: {:?} to {:?}, {} rows per page",
            poll.min_interval, poll.max_interval, poll.page_size
        );
        match &poll.soft_delete_column {
            Some(column) => println!("  deletes:  soft, by `{column}`"),
            None => println!("  deletes:  not seen (hard deletes are not supported by polling)"),
        }
    }
    Ok(())
}

/// A future that completes at SIGTERM or SIGINT: the service then finishes its batch and
/// stops.
pub(crate) fn stop_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: finishing the batch, then stopping"),
            _ = interrupt.recv() => tracing::info!("SIGINT: finishing the batch, then stopping"),
        }
    })
}

async fn replay_command(
    config_path: PathBuf,
    inputs: Vec<PathBuf>,
    state: Option<PathBuf>,
    in_memory: bool,
    poll: Option<String>,
) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    config.require_pipelines()?;
    let pipelines = std::sync::Arc::new(config.build_pipelines()?);
    let options = ReplayOptions {
        batch_size: config.replay.batch_size,
        cache_entries: config.state.cache_entries,
        flush_records: config.state.flush_records,
    };
    let started = Instant::now();
    let tally = if in_memory {
        let store = Arc::new(MemoryStore::new());
        match &poll {
            Some(name) => {
                cli::poll::replay_poll(&config, name, &pipelines, store, None, options).await?
            }
            None => run_inputs(&pipelines, store, &inputs, options).await?,
        }
    } else {
        let path = state.unwrap_or_else(|| config.state.path.clone());
        let store = Arc::new(SqliteStore::open(&path).await?);
        let tally = match &poll {
            Some(name) => {
                cli::poll::replay_poll(
                    &config,
                    name,
                    &pipelines,
                    Arc::clone(&store),
                    Some(store.as_ref()),
                    options,
                )
                .await?
            }
            None => run_inputs(&pipelines, Arc::clone(&store), &inputs, options).await?,
        };
        if let Ok(store) = Arc::try_unwrap(store) {
            store.close().await;
        }
        tally
    };
    print_summary(&tally, started.elapsed());
    Ok(())
}

async fn run_inputs<S: StateStore>(
    pipelines: &SharedPipelines,
    store: Arc<S>,
    inputs: &[PathBuf],
    options: ReplayOptions,
) -> anyhow::Result<Tally> {
    let stdout = io::stdout();
    let mut output = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut diagnostics = io::stderr();
    let stdin_only = [PathBuf::from("-")];
    let inputs = if inputs.is_empty() {
        &stdin_only[..]
    } else {
        inputs
    };
    let mut total = Tally::default();
    for path in inputs {
        let (reader, size): (Box<dyn BufRead + Send>, Option<u64>) = if path.as_os_str() == "-" {
            (Box::new(BufReader::new(io::stdin())), None)
        } else {
            let file = File::open(path)
                .with_context(|| format!("cannot open replay input `{}`", path.display()))?;
            let size = file.metadata().ok().map(|metadata| metadata.len());
            (Box::new(BufReader::with_capacity(1 << 16, file)), size)
        };
        let progress = io::stderr()
            .is_terminal()
            .then(|| cli::progress::ReplayProgress::new(path, size));
        let reader: Box<dyn BufRead + Send> = match &progress {
            Some(progress) => Box::new(progress.wrap(reader)),
            None => reader,
        };
        let tally = replay(
            Arc::clone(pipelines),
            Arc::clone(&store),
            reader,
            &mut output,
            &mut diagnostics,
            options,
        )
        .await
        .with_context(|| format!("replay of `{}` stopped", path.display()))?;
        if let Some(progress) = progress {
            progress.finish();
        }
        total.merge(tally);
    }
    output.flush().context("cannot flush stdout")?;
    Ok(total)
}

fn print_summary(tally: &Tally, elapsed: std::time::Duration) {
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        tally.records_read as f64 / seconds
    } else {
        0.0
    };
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "--- cdcflow replay summary ---");
    let _ = writeln!(
        err,
        "records read: {}  (unrouted: {}, malformed input lines: {})",
        tally.records_read, tally.unrouted, tally.malformed_lines
    );
    let _ = writeln!(
        err,
        "decisions: applied {}, duplicate {}, stale {}",
        tally.decisions("applied"),
        tally.decisions("duplicate"),
        tally.decisions("stale")
    );
    // A pipeline no record reached has no name in the tally: nothing to show.
    for counts in tally
        .pipelines
        .iter()
        .filter(|counts| !counts.name.is_empty())
    {
        let _ = writeln!(err, "pipeline `{}`:", counts.name);
        let _ = writeln!(err, "  decisions: {:?}", counts.decisions);
        if !counts.skipped.is_empty() {
            let _ = writeln!(err, "  skipped:   {:?}", counts.skipped);
        }
        let _ = writeln!(err, "  events:    {:?}", counts.events);
        if !counts.dlq.is_empty() {
            let _ = writeln!(err, "  dlq:       {:?}", counts.dlq);
        }
        if counts.audit_records > 0 {
            let _ = writeln!(err, "  audit records: {}", counts.audit_records);
        }
    }
    let _ = writeln!(
        err,
        "events: {}  dlq records: {}  elapsed: {:.3}s  rate: {:.0} records/s",
        tally.events_total(),
        tally.dlq_total(),
        seconds,
        rate
    );
}
