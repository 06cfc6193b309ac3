//! Parsed JsonConverter schemas, memoised by their text.
//!
//! With `schemas.enable=true` every record repeats its table's schema (2-3 KiB for a
//! typical table, several times the payload). Parsing it per record would dominate decoding,
//! so the decoder borrows the schema's raw text, hashes it, and parses it once per distinct
//! schema. The cache is bounded: past [`MAX_SCHEMAS`] distinct schemas it starts over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

/// Distinct schemas kept; a deployment has one or two per table (key and value).
const MAX_SCHEMAS: usize = 1024;

/// Schemas whose text hashes alike: (text, parsed).
type Bucket = Vec<(Box<str>, Arc<Value>)>;

/// Schemas most recently seen, checked by prefix before any parsing: a topic's records
/// repeat one value schema and one key schema.
const RECENT_SCHEMAS: usize = 4;

/// A memo of parsed schemas. Cloning gives an empty cache (each decoder fills its own).
#[derive(Debug, Default)]
pub(crate) struct SchemaCache {
    entries: Mutex<Memo>,
}

#[derive(Debug, Default)]
struct Memo {
    by_hash: HashMap<u64, Bucket>,
    /// Most recent first.
    recent: Vec<(Arc<str>, Arc<Value>)>,
}

impl Clone for SchemaCache {
    fn clone(&self) -> Self {
        SchemaCache::default()
    }
}

impl SchemaCache {
    /// The parsed schema for `raw`, parsing it on first sight.
    pub(crate) fn get(&self, raw: &str) -> Result<Arc<Value>, serde_json::Error> {
        let hash = fx_hash(raw.as_bytes());
        // A panic while holding the lock leaves at worst a missing entry: recover the guard.
        let mut memo = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let found = memo
            .by_hash
            .get(&hash)
            .and_then(|bucket| bucket.iter().find(|(text, _)| **text == *raw))
            .map(|(_, parsed)| Arc::clone(parsed));
        let parsed = match found {
            Some(parsed) => parsed,
            None => {
                let parsed = Arc::new(serde_json::from_str::<Value>(raw)?);
                if memo.by_hash.len() >= MAX_SCHEMAS {
                    memo.by_hash.clear();
                }
                memo.by_hash
                    .entry(hash)
                    .or_default()
                    .push((raw.into(), Arc::clone(&parsed)));
                parsed
            }
        };
        memo.recent.retain(|(text, _)| **text != *raw);
        memo.recent.insert(0, (raw.into(), Arc::clone(&parsed)));
        memo.recent.truncate(RECENT_SCHEMAS);
        Ok(parsed)
    }

    /// A recently seen schema that `text` starts with, and its length. A schema text already
    /// parsed once is a complete JSON value wherever it appears, so a byte comparison stands in
    /// for scanning it again (2-3 KiB per record with `schemas.enable=true`).
    pub(crate) fn recent_prefix(&self, text: &str) -> Option<(Arc<Value>, usize)> {
        let memo = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        memo.recent
            .iter()
            .find(|(schema, _)| text.starts_with(&**schema))
            .map(|(schema, parsed)| (Arc::clone(parsed), schema.len()))
    }
}

/// A fast non-cryptographic hash (the Fx multiply-rotate over 8-byte words). Collisions are
/// resolved by comparing the text, so only speed matters here.
fn fx_hash(bytes: &[u8]) -> u64 {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let mut hash = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(SEED);
    }
    for &byte in chunks.remainder() {
        hash = (hash.rotate_left(5) ^ u64::from(byte)).wrapping_mul(SEED);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same schema text yields the same parsed schema; different texts never share one.
    #[test]
    fn memoises_by_text() {
        let cache = SchemaCache::default();
        let a = cache.get(r#"{"type":"struct","fields":[]}"#).unwrap();
        let again = cache.get(r#"{"type":"struct","fields":[]}"#).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let b = cache.get(r#"{"type":"struct","fields":[1]}"#).unwrap();
        assert_ne!(a, b);
        assert!(cache.get("{").is_err());
    }

    /// Only a text that begins with a whole schema seen before matches, with that schema.
    #[test]
    fn recent_prefix_matches_whole_schemas_only() {
        let cache = SchemaCache::default();
        let schema = r#"{"type":"struct","fields":[]}"#;
        assert!(cache.recent_prefix(schema).is_none());
        let parsed = cache.get(schema).unwrap();
        let (found, length) = cache
            .recent_prefix(r#"{"type":"struct","fields":[]},"payload":{}}"#)
            .unwrap();
        assert!(Arc::ptr_eq(&found, &parsed));
        assert_eq!(length, schema.len());
        assert!(
            cache
                .recent_prefix(r#"{"type":"struct","fields":[1]}"#)
                .is_none()
        );
        assert!(cache.recent_prefix(r#"{"type":"struct""#).is_none());
    }
}
