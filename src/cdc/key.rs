//! Entity keys: the canonical text that identifies one row across records.

use std::fmt;

use serde_json::{Map, Value};

/// The identity of one entity: canonical text of its key fields, plus the fields themselves for
/// rules. Same row, same canonical text, whatever the JSON field order.
///
/// A single-field key is the field's scalar text (`{"id": 42}` is `42`), the form users expect
/// as a Kafka key downstream; a composite key is compact JSON with sorted field names
/// (`{"order_id":7,"line":2}` is `{"line":2,"order_id":7}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityKey {
    canonical: String,
    fields: Value,
}

impl EntityKey {
    /// Builds the key from a decoded record key (a Connect struct or a primitive).
    pub fn from_json(fields: Value) -> EntityKey {
        let canonical = match &fields {
            Value::Object(map) if map.len() == 1 => {
                map.values().next().map_or_else(String::new, scalar_or_json)
            }
            other => scalar_or_json(other),
        };
        EntityKey { canonical, fields }
    }

    /// Builds the key from named fields of a row image; `None` if one of them is absent.
    pub fn from_row(row: &Map<String, Value>, names: &[String]) -> Option<EntityKey> {
        let mut fields = Map::new();
        for name in names {
            fields.insert(name.clone(), row.get(name)?.clone());
        }
        Some(EntityKey::from_json(Value::Object(fields)))
    }

    /// The key of the table-level pseudo-entity that truncates are ordered against.
    pub fn table() -> EntityKey {
        EntityKey {
            canonical: String::new(),
            fields: Value::Null,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    pub fn fields(&self) -> &Value {
        &self.fields
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// serde_json's default `Map` is a `BTreeMap`, so `to_string` already sorts object keys.
fn scalar_or_json(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Field order in the record key never changes the entity's identity.
    #[test]
    fn composite_keys_are_order_independent() {
        let a = EntityKey::from_json(serde_json::from_str(r#"{"order_id":7,"line":2}"#).unwrap());
        let b = EntityKey::from_json(serde_json::from_str(r#"{"line":2,"order_id":7}"#).unwrap());
        assert_eq!(a.as_str(), b.as_str());
        assert_eq!(a.as_str(), r#"{"line":2,"order_id":7}"#);
    }

    /// Single-field keys are their scalar text, as downstream Kafka keys.
    #[test]
    fn single_field_keys_are_scalar_text() {
        assert_eq!(EntityKey::from_json(json!({"id": 42})).as_str(), "42");
        assert_eq!(EntityKey::from_json(json!({"id": "a-1"})).as_str(), "a-1");
        assert_eq!(EntityKey::from_json(json!("plain")).as_str(), "plain");
    }

    /// Keys can come from row fields when the record has no key.
    #[test]
    fn keys_from_row_fields() {
        let row = json!({"id": 3, "name": "x"}).as_object().unwrap().clone();
        let key = EntityKey::from_row(&row, &["id".to_owned()]).unwrap();
        assert_eq!(key.as_str(), "3");
        assert!(EntityKey::from_row(&row, &["missing".to_owned()]).is_none());
    }
}
