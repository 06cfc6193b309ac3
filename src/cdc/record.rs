//! The transport-neutral Kafka record the core consumes.

use std::fmt;

/// One Kafka header. Values may be absent (Kafka allows null header values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// One Kafka message as it came off a topic (or out of a `kcat -J` replay file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub timestamp_ms: Option<i64>,
}

impl RawRecord {
    pub fn origin(&self) -> Origin {
        Origin {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// Bytes the record occupies for the size limit: key plus value.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Where a record came from: the causation of everything derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Origin {
    /// `topic/partition/offset`, the form used in `causationid` and DLQ headers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_origin(f, &self.topic, self.partition, self.offset)
    }
}

/// A record's [`Origin`] borrowed from it, for writing without copying the topic.
#[derive(Debug, Clone, Copy)]
pub struct OriginRef<'a>(&'a RawRecord);

impl RawRecord {
    pub fn origin_ref(&self) -> OriginRef<'_> {
        OriginRef(self)
    }
}

impl fmt::Display for OriginRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_origin(f, &self.0.topic, self.0.partition, self.0.offset)
    }
}

fn write_origin(
    f: &mut fmt::Formatter<'_>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> fmt::Result {
    write!(f, "{topic}/{partition}/{offset}")
}
