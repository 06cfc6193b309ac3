//! The operator's tools: what `cdcflow dlq` and `cdcflow state` read and write, as pure
//! functions over records (the Kafka reading and writing is in [`crate::kafka::tools`]).

pub mod dlq;

pub use dlq::{
    DeadLetter, DlqError, DlqFilter, Reinjection, parse_origin, parse_time, replay_headers,
};
