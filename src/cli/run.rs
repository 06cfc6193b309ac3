//! `cdcflow run`: the pipelines as a consumer-group service, with the config's webhook
//! subscriptions, ingress and SQL polls beside them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cdcflow::config::Config;
use cdcflow::kafka::{ServiceOptions, run_service};
use cdcflow::metrics::Metrics;
use cdcflow::runtime::Health;
use cdcflow::store::SqliteStore;

use super::tasks::Tasks;

pub(crate) async fn run(
    config_path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let metrics = Metrics::new().context("cannot register the metrics")?;
    let health = Arc::new(Health::default());
    let mut tasks = Tasks::new();
    // The edges start first: a bad secret or a taken port stops the start before the group
    // is joined.
    let subscriptions = super::deliver::subscriptions(&config, None, &metrics)?;
    super::ingress::spawn(&mut tasks, &config, &metrics).await?;
    super::deliver::spawn_all(&mut tasks, &config.kafka, subscriptions);
    super::poll::spawn_all(&mut tasks, &config.kafka, &config.polls, &metrics).await?;
    let store = if config.pipelines.is_empty() {
        // Webhooks or an ingress alone: nothing to join a group for, ready at once.
        health.set_joined(true);
        None
    } else {
        Some(Arc::new(SqliteStore::open(&config.state.path).await?))
    };
    if config.http.enabled {
        let listener = cdcflow::http::bind(config.http.listen).await?;
        let address = listener
            .local_addr()
            .context("the HTTP listener has no address")?;
        tracing::info!("serving http://{address}/metrics, /healthz and /readyz");
        let (metrics, health) = (metrics.clone(), Arc::clone(&health));
        // A batch may wait for stable offsets (3 transaction timeouts) and retry its commit:
        // only a loop silent well beyond that is stuck.
        let stall_after = config.kafka.transaction_timeout * 6 + Duration::from_secs(60);
        tokio::spawn(async move {
            if let Err(error) = cdcflow::http::serve(listener, metrics, health, stall_after).await {
                tracing::error!(%error, "the HTTP endpoint stopped");
            }
        });
    }
    if let Some(store) = &store {
        let pipelines = Arc::new(config.build_pipelines()?);
        let store_stats = tokio::spawn(report_store_stats(Arc::clone(store), metrics.clone()));
        let options = ServiceOptions {
            kafka: config.kafka.clone(),
            cache_entries: config.state.cache_entries,
            flush_records: config.state.flush_records,
            metrics,
            health,
        };
        let handle = tokio::runtime::Handle::current();
        let service_store = Arc::clone(store);
        let stopped = tasks.stopped();
        tasks.spawn(async move {
            // librdkafka's transactional and commit calls block: the service owns a thread.
            let result = tokio::task::spawn_blocking(move || {
                run_service(options, pipelines, service_store, handle, stopped)
            })
            .await
            .context("the service thread panicked");
            // The stats task holds the store: it ends before the store closes.
            store_stats.abort();
            let _ = store_stats.await;
            Ok(result??)
        });
    }
    let result = tasks.run_until(shutdown).await;
    if let Some(store) = store
        && let Ok(store) = Arc::try_unwrap(store)
    {
        store.close().await;
    }
    result
}

/// Updates the store's size and entity counts every 15 seconds (counting scans the key).
async fn report_store_stats(store: Arc<SqliteStore>, metrics: Metrics) {
    let mut every = tokio::time::interval(Duration::from_secs(15));
    loop {
        every.tick().await;
        match store.stats().await {
            Ok(stats) => metrics.store_stats(&stats),
            Err(error) => tracing::warn!(%error, "cannot read the state store's size"),
        }
    }
}
