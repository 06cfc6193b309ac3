//! The Kafka adapter of `cdcflow run`. The pure core decides; this module only moves bytes
//! and offsets. Every librdkafka call that blocks runs on the service's own thread, never on
//! a tokio worker.
//!
//! # Layout
//!
//! - [`service`](self::service): the entry, [`run_service`]: topics, clients, the group, the
//!   loop, shutdown (a future passed in), leaving the group.
//! - `admin`: topic set-up and the checks that refuse a topology cdcflow cannot serve.
//! - `clients`: librdkafka settings; those the guarantees depend on are fixed here.
//! - `rebalance`: the consumer context; on assignment: unsaved state to the store, stable
//!   committed offsets, changelog restore, explicit positions. On revocation: tell the loop.
//! - `restore`: rebuilding the store from a changelog partition (and re-reading a changelog
//!   that was recreated behind the store's checkpoint).
//! - `consume`: the loop: collect (records, bytes, time), process in the lanes
//!   ([`crate::runtime::Lanes`]), commit, settle; recovery and rewinds.
//! - `recovery`: a batch that did not commit (refusals learnt, rewind, retry or stop) and
//!   partitions taken away; `records`: owned records, offsets and the batch span.
//! - `commit`: what both protocols share, and how a failed batch is classified.
//! - `transactional`: the exactly-once protocol (one transaction per batch).
//! - `at_least_once`: outputs, then changelog, then offsets.
//! - `produce`: sending records and reading delivery reports back.
//! - `report`: one function per runtime event (logs and counts), and the clients' context.
//! - `features`: librdkafka's `builtin.features`, checked against what the config asks.
//! - `error`: [`ServiceError`], every reason the service stops.
//! - [`tools`](self::tools): reading topics to their end and writing records back, for the
//!   operator's commands (`cdcflow dlq`, `cdcflow state get --from-changelog`).
//!
//! Committed state is written behind by [`crate::store::WriteBehind`].

mod admin;
mod at_least_once;
mod clients;
mod commit;
mod consume;
mod deliver;
mod error;
mod features;
mod ingress;
mod poll;
mod produce;
mod rebalance;
mod records;
mod recovery;
mod report;
mod restore;
mod service;
pub mod tools;
mod transactional;

pub use deliver::{Subscription, deliver};
pub use error::ServiceError;
pub use features::{ClientLibrary, required_features};
pub use ingress::{IngressProducer, Written};
pub use poll::{PollRun, PollRunError, PollSummary, create_poll_topics, run_poll};
pub use service::{ServiceOptions, run_service};

/// The name of a pipeline's changelog topic: `<group_id>.<pipeline>.changelog`.
pub fn changelog_topic(group_id: &str, pipeline: &str) -> String {
    format!("{group_id}.{pipeline}.changelog")
}
