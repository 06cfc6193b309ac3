//! The webhook ingress: pushed changes or events taken over HTTP, each written once to Kafka.
//!
//! [`accept`] decides, without I/O, whether a push is authentic and well formed and which
//! entity it names; [`store`] keeps processed request ids in PostgreSQL or SQLite, written in
//! groups by `batch`; [`server`]
//! is the HTTP adapter that ties them to the Kafka producer.

pub mod accept;
mod batch;
pub mod server;
pub mod store;

pub use accept::{Accepted, Authentication, PushHeaders, Refusal, accept};
pub use server::{Ingress, expire_ids, serve};
pub use store::{Claim, RequestStore, StoreError, StoredAnswer};
