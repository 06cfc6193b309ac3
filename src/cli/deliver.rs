//! `cdcflow deliver`: every `[[webhook]]` subscription of the config, until SIGTERM; and the
//! same subscriptions inside `cdcflow run`.

use std::path::Path;

use anyhow::{Context as _, bail};
use cdcflow::config::{Config, KafkaConfig, Secret, WebhookConfig};
use cdcflow::kafka::{Subscription, deliver};
use cdcflow::webhook::{EventFilter, SigningSecret};

use super::tasks::{Tasks, serve_metrics};

/// Signing secrets: inline, then from the environment variable `env` (space-separated).
/// `key` is the config key errors name (`webhook[0]`, `ingress`).
pub(crate) fn signing_secrets(
    key: &str,
    inline: &[Secret],
    env: Option<&str>,
) -> anyhow::Result<Vec<SigningSecret>> {
    let mut texts: Vec<String> = inline
        .iter()
        .map(|secret| secret.expose().to_owned())
        .collect();
    if let Some(variable) = env {
        let value = std::env::var(variable).with_context(|| {
            format!(
                "config key `{key}.secrets_env`: the environment variable `{variable}` is not set"
            )
        })?;
        texts.extend(value.split_whitespace().map(str::to_owned));
    }
    texts
        .iter()
        .map(|text| {
            SigningSecret::parse(text).with_context(|| format!("config key `{key}.secrets`"))
        })
        .collect()
}

/// A subscription's secrets; it needs at least one.
fn secrets(index: usize, webhook: &WebhookConfig) -> anyhow::Result<Vec<SigningSecret>> {
    let key = format!("webhook[{index}]");
    let secrets = signing_secrets(&key, &webhook.secrets, webhook.secrets_env.as_deref())?;
    if secrets.is_empty() {
        bail!(
            "config key `{key}.secrets`: a subscription needs at least one signing secret \
             (`whsec_` + base64 of 24 to 64 random bytes), inline or in `secrets_env`"
        );
    }
    Ok(secrets)
}

/// The subscriptions of `config` (only the one named `only`, if given), ready to run.
pub(crate) fn subscriptions(
    config: &Config,
    only: Option<&str>,
    metrics: &cdcflow::metrics::Metrics,
) -> anyhow::Result<Vec<Subscription>> {
    config
        .webhooks
        .iter()
        .enumerate()
        .filter(|(_, webhook)| only.is_none_or(|name| name == webhook.name))
        .map(|(index, webhook)| {
            let filter = webhook
                .when
                .as_deref()
                .map(EventFilter::compile)
                .transpose()
                .with_context(|| format!("config key `webhook[{index}].when`"))?;
            Ok(Subscription {
                config: webhook.clone(),
                secrets: secrets(index, webhook)?,
                filter,
                metrics: metrics.clone(),
            })
        })
        .collect()
}

/// Starts each subscription as a task of `tasks`.
pub(crate) fn spawn_all(tasks: &mut Tasks, kafka: &KafkaConfig, subscriptions: Vec<Subscription>) {
    for subscription in subscriptions {
        let kafka = kafka.clone();
        let stopped = tasks.stopped();
        tasks.spawn(async move {
            let name = subscription.config.name.clone();
            deliver(&kafka, subscription, stopped)
                .await
                .with_context(|| format!("webhook subscription `{name}` stopped"))
        });
    }
}

/// `cdcflow deliver`.
pub(crate) async fn run(
    path: &Path,
    only: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let metrics = cdcflow::metrics::Metrics::new().context("cannot register the metrics")?;
    let chosen = subscriptions(&config, only, &metrics)?;
    if chosen.is_empty() {
        bail!(
            "{} has no [[webhook]] subscription{}",
            path.display(),
            only.map_or(String::new(), |name| format!(" named `{name}`"))
        );
    }
    serve_metrics(&config, &metrics).await?;
    let mut tasks = Tasks::new();
    spawn_all(&mut tasks, &config.kafka, chosen);
    tasks.run_until(shutdown).await
}
