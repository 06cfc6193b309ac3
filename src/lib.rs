//! cdcflow turns Debezium change streams into deduplicated, ordered business events.
//!
//! # Layout and the flow of one record
//!
//! ```text
//! RawRecord (bytes) ──cdc::decode──▶ Change ──engine::VersionGate──▶ Decision
//!                                              │ Applied
//!                                              ▼
//!                              engine::rules (CEL) ──▶ BusinessEvent (CloudEvents 1.0)
//! ```
//!
//! - [`cdc`]: Debezium decoding, bytes to [`cdc::Change`]. Pure: no I/O, no async.
//! - [`engine`]: the pure core: versions, decisions, rules, business events, DLQ and audit
//!   records. Pure: no I/O, no async.
//! - [`store`]: the per-entity state store (SQLite through sqlx, and in-memory for tests), and
//!   the write-behind of committed state. A store never takes an entity back to an older
//!   version.
//! - [`runtime`]: drivers that feed records through the core and persist its outcome
//!   (`replay` from JSON Lines), and what the service loop needs without Kafka: lanes,
//!   retries with jitter, the shutdown signal, health.
//! - [`kafka`]: `cdcflow run`, the consumer-group service: one file per protocol (rebalance,
//!   consume, the exactly-once and at-least-once commits, produce bookkeeping) and the
//!   changelog that backs state; its `//!` docs give the layout.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` endpoint of `cdcflow run`.
//! - [`config`]: the typed TOML configuration with validation and environment overrides.
//! - [`metrics`]: every Prometheus metric family in one place.
//! - [`ops`]: the operator's tools as pure functions: dead letters read back, filtered, and
//!   written back for a replay or a discard.
//! - [`webhook`]: outgoing webhooks: Standard Webhooks signatures, retry decisions, the
//!   per-entity delivery order, the offsets that may be committed and the `when` condition
//!   (pure), and the HTTP client of one attempt. The Kafka side is `kafka::deliver`.
//! - [`ingress`]: the webhook ingress: what a push must be (pure), the request-id store
//!   (PostgreSQL or SQLite through sqlx) and the HTTP server that writes each push once.
//! - [`poll`]: SQL polling sources: the adaptive interval, the SQL of a page below the
//!   horizon and the records it becomes (pure), and the database side (sqlx). The Kafka side
//!   (one owner per poll, rows and cursor in one transaction) is `kafka::poll`.
//! - [`reconcile`]: a pipeline's states against the source of truth (pure), the source rows
//!   (sqlx) and the records of a repair (pure).

pub mod cdc;
pub mod config;
pub mod engine;
pub mod http;
pub mod ingress;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod poll;
pub mod reconcile;
pub mod runtime;
pub mod store;
pub mod webhook;
