//! Outgoing webhooks, the pure parts: Standard Webhooks signatures ([`signature`]), what
//! happens after an attempt ([`retry`]), and the order of deliveries with the offsets that
//! may be committed ([`schedule`]). No I/O here: the HTTP client and the Kafka consumer that
//! drive them are adapters around these.

pub mod retry;
pub mod schedule;
pub mod signature;

pub use retry::{Abandoned, AttemptResult, Next, RetryPolicy, next_step};
pub use schedule::{Queued, Schedule};
pub use signature::{SigningSecret, VerifyError, signature_header, verify};
