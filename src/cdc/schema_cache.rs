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

/// A memo of parsed schemas. Cloning gives an empty cache (each decoder fills its own).
#[derive(Debug, Default)]
pub(crate) struct SchemaCache {
    entries: Mutex<HashMap<u64, Bucket>>,
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
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = entries.get(&hash)
            && let Some((_, parsed)) = bucket.iter().find(|(text, _)| **text == *raw)
        {
            return Ok(Arc::clone(parsed));
        }
        let parsed = Arc::new(serde_json::from_str::<Value>(raw)?);
        if entries.len() >= MAX_SCHEMAS {
            entries.clear();
        }
        entries
            .entry(hash)
            .or_default()
            .push((raw.into(), Arc::clone(&parsed)));
        Ok(parsed)
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
}
