//! `cdcflow deliver`: every `[[webhook]]` subscription of the config, until SIGTERM.

use std::path::Path;

use anyhow::{Context as _, bail};
use cdcflow::config::{Config, WebhookConfig};
use cdcflow::kafka::{Subscription, deliver};
use cdcflow::webhook::SigningSecret;

/// The subscription's signing secrets: inline, then from `secrets_env` (space-separated).
fn secrets(index: usize, webhook: &WebhookConfig) -> anyhow::Result<Vec<SigningSecret>> {
    let mut texts: Vec<String> = webhook
        .secrets
        .iter()
        .map(|secret| secret.expose().to_owned())
        .collect();
    if let Some(variable) = &webhook.secrets_env {
        let value = std::env::var(variable).with_context(|| {
            format!("config key `webhook[{index}].secrets_env`: the environment variable `{variable}` is not set")
        })?;
        texts.extend(value.split_whitespace().map(str::to_owned));
    }
    if texts.is_empty() {
        bail!(
            "config key `webhook[{index}].secrets`: a subscription needs at least one signing \
             secret (`whsec_` + base64 of 24 to 64 random bytes), inline or in `secrets_env`"
        );
    }
    texts
        .iter()
        .map(|text| {
            SigningSecret::parse(text)
                .with_context(|| format!("config key `webhook[{index}].secrets`"))
        })
        .collect()
}

pub(crate) async fn run(
    path: &Path,
    only: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let chosen: Vec<(usize, &WebhookConfig)> = config
        .webhooks
        .iter()
        .enumerate()
        .filter(|(_, webhook)| only.is_none_or(|name| name == webhook.name))
        .collect();
    if chosen.is_empty() {
        bail!(
            "{} has no [[webhook]] subscription{}",
            path.display(),
            only.map_or(String::new(), |name| format!(" named `{name}`"))
        );
    }
    let metrics = cdcflow::metrics::Metrics::new().context("cannot register the metrics")?;
    if config.http.enabled {
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
    }
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut running = tokio::task::JoinSet::new();
    for (index, webhook) in chosen {
        let subscription = Subscription {
            config: webhook.clone(),
            secrets: secrets(index, webhook)?,
            metrics: metrics.clone(),
        };
        let kafka = config.kafka.clone();
        let mut stopped = stop.subscribe();
        running.spawn(async move {
            let name = subscription.config.name.clone();
            deliver(&kafka, subscription, async move {
                let _ = stopped.recv().await;
            })
            .await
            .with_context(|| format!("webhook subscription `{name}` stopped"))
        });
    }
    tokio::select! {
        () = shutdown => {
            let _ = stop.send(());
        }
        Some(first) = running.join_next() => {
            let _ = stop.send(());
            first.context("a webhook subscription panicked")??;
        }
    }
    while let Some(result) = running.join_next().await {
        result.context("a webhook subscription panicked")??;
    }
    Ok(())
}
