//! `cdcflow ingress`: the `[ingress]` of the config, until SIGTERM; and the same ingress
//! inside `cdcflow run`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cdcflow::config::Config;
use cdcflow::ingress::{Authentication, Ingress, RequestStore, expire_ids, serve};
use cdcflow::kafka::IngressProducer;
use cdcflow::metrics::Metrics;

use super::deliver::signing_secrets;
use super::tasks::{Tasks, serve_metrics};

/// Opens the request-id store, creates the producer, binds the port, and starts serving
/// (with the expiry of old ids) as tasks of `tasks`. Does nothing without `[ingress]`.
pub(crate) async fn spawn(
    tasks: &mut Tasks,
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let Some(settings) = &config.ingress else {
        return Ok(());
    };
    let secrets = signing_secrets(
        "ingress",
        &settings.secrets,
        settings.secrets_env.as_deref(),
    )?;
    if secrets.is_empty() && !settings.allow_unsigned {
        bail!(
            "config key `ingress.secrets`: no signing secret was found (`secrets_env` is empty); \
             set one, or allow_unsigned = true"
        );
    }
    let url = settings.database_url(&config.state.path);
    let store = RequestStore::open(&url, settings.pool_size).await?;
    let producer = IngressProducer::new(&config.kafka, settings.produce_timeout)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| {
            format!(
                "config key `ingress.listen`: cannot listen on {}; pick a free port",
                settings.listen
            )
        })?;
    let address = listener
        .local_addr()
        .context("the ingress has no address")?;
    let wait_for_owner = settings.produce_timeout + Duration::from_secs(2);
    let ingress = Arc::new(Ingress {
        routes: settings
            .routes
            .iter()
            .map(|route| (route.path.clone(), route.clone()))
            .collect(),
        authentication: Authentication {
            secrets,
            allow_unsigned: settings.allow_unsigned,
            tolerance_s: i64::try_from(settings.timestamp_tolerance.as_secs()).unwrap_or(i64::MAX),
        },
        store: store.clone(),
        producer,
        metrics: metrics.ingress.clone(),
        max_body_bytes: settings.max_body_bytes,
        wait_for_owner,
        stale_after: wait_for_owner * 2,
    });
    // Series exist at 0 from the start, so an alert's `increase()` sees the first one.
    let counters = &metrics.ingress;
    for route in &settings.routes {
        let path = route.path.as_str();
        counters.duplicates.with_label_values(&[path]).reset();
        for status in ["202", "400", "401", "409", "413", "422", "503"] {
            counters.requests.with_label_values(&[path, status]).reset();
        }
        for reason in [
            "unauthorized",
            "too_large",
            "malformed",
            "request_id",
            "key",
            "reused_id",
        ] {
            counters.refused.with_label_values(&[path, reason]).reset();
        }
    }
    tracing::info!(
        backend = store.backend(),
        routes = settings.routes.len(),
        "ingress listening on http://{address}"
    );
    let expiry = tokio::spawn(expire_ids(
        store,
        settings.retention,
        metrics.ingress.clone(),
    ));
    let stopped = tasks.stopped();
    tasks.spawn(async move {
        let served = serve(listener, ingress, stopped).await;
        expiry.abort();
        served.context("the ingress stopped")
    });
    Ok(())
}

/// `cdcflow ingress`.
pub(crate) async fn run(
    path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    if config.ingress.is_none() {
        bail!("{} has no [ingress] section", path.display());
    }
    let metrics = Metrics::new().context("cannot register the metrics")?;
    serve_metrics(&config, &metrics).await?;
    let mut tasks = Tasks::new();
    spawn(&mut tasks, &config, &metrics).await?;
    tasks.run_until(shutdown).await
}
