//! The families of cdcflow's edges: outgoing webhook subscriptions, the ingress and SQL polls.

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

use super::{Families, LATENCY_BUCKETS};

/// Per subscription (`[[webhook]]` name).
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    /// Delivery attempts by outcome: `2xx`, `3xx`, `4xx`, `429`, `5xx`, `timeout`,
    /// `unreachable`.
    pub attempts: IntCounterVec,
    pub attempt_seconds: HistogramVec,
    /// Events whose next attempt waits for a retry.
    pub retries_pending: IntGaugeVec,
    /// Events held (waiting or in flight).
    pub queued: IntGaugeVec,
    pub dlq_records: IntCounterVec,
    /// 1 while the last attempt got an answer other than 5xx, 429 or 408; 0 after such an
    /// answer, a timeout or a failed connection.
    pub endpoint_up: IntGaugeVec,
}

impl WebhookMetrics {
    pub(super) fn register(f: &mut Families) -> prometheus::Result<WebhookMetrics> {
        Ok(WebhookMetrics {
            attempts: f.counter(
                "cdcflow_webhook_attempts_total",
                "Webhook delivery attempts by subscription and outcome: 2xx, 3xx, 4xx, 429, \
                 5xx, timeout, unreachable.",
                &["subscription", "outcome"],
            )?,
            attempt_seconds: f.add(HistogramVec::new(
                HistogramOpts::new(
                    "cdcflow_webhook_attempt_duration_seconds",
                    "Time of one webhook delivery attempt, answered or not.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["subscription"],
            )?)?,
            retries_pending: f.gauge(
                "cdcflow_webhook_retries_pending",
                "Events of a subscription waiting for a retry.",
                &["subscription"],
            )?,
            queued: f.gauge(
                "cdcflow_webhook_queued_events",
                "Events a subscription holds, waiting or in flight.",
                &["subscription"],
            )?,
            dlq_records: f.counter(
                "cdcflow_webhook_dlq_records_total",
                "Events a subscription gave up on and wrote to its DLQ topic, by reason.",
                &["subscription", "reason"],
            )?,
            endpoint_up: f.gauge(
                "cdcflow_webhook_endpoint_up",
                "1 while the last attempt got an answer other than 5xx, 429 or 408; 0 after \
                 such an answer, a timeout or a failed connection.",
                &["subscription"],
            )?,
        })
    }
}

/// Per ingress route (its configured path; `unknown` for paths not configured).
#[derive(Debug, Clone)]
pub struct IngressMetrics {
    /// Requests answered, by route and status code.
    pub requests: IntCounterVec,
    /// Requests whose id was processed before (answered from the store, not written).
    pub duplicates: IntCounterVec,
    /// Requests refused before the store, by reason: `unauthorized`, `too_large`,
    /// `malformed`, `request_id`, `key`, `reused_id`.
    pub refused: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Request ids removed after the retention.
    pub expired_ids: IntCounterVec,
}

impl IngressMetrics {
    pub(super) fn register(f: &mut Families) -> prometheus::Result<IngressMetrics> {
        Ok(IngressMetrics {
            requests: f.counter(
                "cdcflow_ingress_requests_total",
                "Pushes answered by the ingress, by route and HTTP status.",
                &["route", "status"],
            )?,
            duplicates: f.counter(
                "cdcflow_ingress_duplicates_total",
                "Pushes whose request id was processed before: answered with the original \
                 status, not written again.",
                &["route"],
            )?,
            refused: f.counter(
                "cdcflow_ingress_refused_total",
                "Pushes refused by the ingress, by route and reason.",
                &["route", "reason"],
            )?,
            request_seconds: f.add(HistogramVec::new(
                HistogramOpts::new(
                    "cdcflow_ingress_request_duration_seconds",
                    "Time from a push's arrival to its answer (for an accepted push, this \
                     includes Kafka's acknowledgement).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )?)?,
            expired_ids: f.counter(
                "cdcflow_ingress_expired_ids_total",
                "Request ids forgotten after the retention.",
                &["backend"],
            )?,
        })
    }
}

/// Per SQL poll (`[[poll]]` name).
#[derive(Debug, Clone)]
pub struct PollMetrics {
    /// Polls by result: `full` (a full page), `partial`, `empty`, `error`.
    pub polls: IntCounterVec,
    pub rows: IntCounterVec,
    /// The current wait between polls, in seconds (without jitter).
    pub interval_seconds: GaugeVec,
    /// The database's `now()` less the cursor (the last row read), in seconds.
    pub cursor_lag_seconds: GaugeVec,
    /// The database's `now()` less the horizon rows are read below: above the grace period
    /// while a long transaction holds the poll back.
    pub horizon_lag_seconds: GaugeVec,
    /// 1 on the instance that owns the poll.
    pub owner: IntGaugeVec,
}

impl PollMetrics {
    pub(super) fn register(f: &mut Families) -> prometheus::Result<PollMetrics> {
        Ok(PollMetrics {
            polls: f.counter(
                "cdcflow_poll_polls_total",
                "SQL polls by result: full (a full page, more waiting), partial, empty, error.",
                &["poll", "result"],
            )?,
            rows: f.counter(
                "cdcflow_poll_rows_total",
                "Rows a SQL poll read and wrote to its topic.",
                &["poll"],
            )?,
            interval_seconds: f.add(GaugeVec::new(
                Opts::new(
                    "cdcflow_poll_interval_seconds",
                    "The current wait between two polls, before jitter: min_interval while \
                     polls return full pages, doubling up to max_interval while they return \
                     nothing.",
                ),
                &["poll"],
            )?)?,
            cursor_lag_seconds: f.add(GaugeVec::new(
                Opts::new(
                    "cdcflow_poll_cursor_lag_seconds",
                    "The database's now() less the cursor of the last row read.",
                ),
                &["poll"],
            )?)?,
            horizon_lag_seconds: f.add(GaugeVec::new(
                Opts::new(
                    "cdcflow_poll_horizon_lag_seconds",
                    "The database's now() less the horizon rows are read below (the grace \
                     period, or the start of the oldest open transaction).",
                ),
                &["poll"],
            )?)?,
            owner: f.gauge(
                "cdcflow_poll_owner",
                "1 on the instance that owns the poll (one per poll in a group).",
                &["poll"],
            )?,
        })
    }

    /// Creates the poll's series at 0, so that rates and alerts see the first poll.
    pub fn zero(&self, poll: &str) {
        for result in ["full", "partial", "empty", "error"] {
            self.polls.with_label_values(&[poll, result]);
        }
        self.rows.with_label_values(&[poll]);
        self.owner.with_label_values(&[poll]).set(0);
    }
}
