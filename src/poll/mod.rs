//! SQL polling sources: the adaptive interval, the SQL of a poll and the records it writes
//! (pure), and the database side of a poll (sqlx, PostgreSQL or SQLite). The Kafka side is
//! `kafka::poll`.

pub mod clock;
pub mod database;
pub mod interval;
pub mod query;
pub mod record;

pub use database::{Horizon, PollDatabase, PollError};
pub use interval::{AdaptiveInterval, PollResult};
pub use query::{PollTable, SqlitePollTable, quote_identifier};
pub use record::{Cursor, PolledRecord, PolledRow, RecordError, RecordShape};
