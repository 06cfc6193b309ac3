//! Outgoing webhooks: Standard Webhooks signatures ([`signature`]), what happens after an
//! attempt ([`retry`]), and the order of deliveries with the offsets that may be committed
//! ([`schedule`]) and the `when` condition ([`filter`]), all pure; and the HTTP adapter that
//! makes one signed attempt ([`client`]).

pub mod client;
pub mod filter;
pub mod retry;
pub mod schedule;
pub mod signature;

pub use filter::{EventFilter, FilterError};
pub use retry::{Abandoned, AttemptResult, Next, RetryPolicy, next_step};
pub use schedule::{Queued, Schedule};
pub use signature::{SigningSecret, VerifyError, signature_header, verify};
