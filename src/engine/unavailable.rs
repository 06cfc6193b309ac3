//! Debezium's placeholder for values it did not read: with Postgres' `REPLICA IDENTITY
//! DEFAULT`, an update that leaves a TOASTed column (a large text, jsonb, bytea or array value)
//! unchanged carries the connector's `unavailable.value.placeholder` instead of the value:
//!
//! ```json
//! {"op":"u","before":null,"after":{"id":7,"notes":"__debezium_unavailable_value",
//!  "picture":"X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==","tags":["__debezium_unavailable_value"]}}
//! ```
//!
//! Text and JSON columns carry the placeholder text; `bytea` carries its bytes, encoded as the
//! connector's `binary.handling.mode` says (base64 by default, or hex); text arrays carry a
//! list of placeholders, integer arrays the placeholder's bytes as their elements (seen with
//! Debezium 3.5: `[95,95,100,101,...]`). The placeholder must never reach the rules or the stored state as if it were
//! data: each such field takes the entity's stored value of that field, and where nothing is
//! stored it is left out and named, so the event can say which fields were unavailable.

use base64::Engine as _;
use serde_json::{Map, Value};

/// Debezium's default `unavailable.value.placeholder`.
pub const DEFAULT_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// The forms one placeholder takes in a JSON row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnavailablePlaceholder {
    text: String,
    /// The placeholder's bytes in standard and URL-safe base64 (bytea, default mode).
    base64: [String; 2],
    /// The placeholder's bytes in lowercase hex (bytea, `binary.handling.mode=hex`).
    hex: String,
}

impl Default for UnavailablePlaceholder {
    fn default() -> Self {
        UnavailablePlaceholder::new(DEFAULT_PLACEHOLDER)
    }
}

impl UnavailablePlaceholder {
    pub fn new(text: &str) -> UnavailablePlaceholder {
        let bytes = text.as_bytes();
        UnavailablePlaceholder {
            text: text.to_owned(),
            base64: [
                base64::engine::general_purpose::STANDARD.encode(bytes),
                base64::engine::general_purpose::URL_SAFE.encode(bytes),
            ],
            hex: bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `value` is the placeholder in one of its forms.
    pub fn matches(&self, value: &Value) -> bool {
        match value {
            Value::String(text) => self.matches_text(text),
            Value::Array(items) => {
                let all_placeholders = !items.is_empty()
                    && items
                        .iter()
                        .all(|item| item.as_str().is_some_and(|text| self.matches_text(text)));
                // An integer array carries the placeholder's bytes as its elements (seen with
                // Debezium 3.5 and an integer[] column).
                let placeholder_bytes = items.len() == self.text.len()
                    && items
                        .iter()
                        .zip(self.text.bytes())
                        .all(|(item, byte)| item.as_u64() == Some(u64::from(byte)));
                all_placeholders || placeholder_bytes
            }
            _ => false,
        }
    }

    fn matches_text(&self, text: &str) -> bool {
        text == self.text
            || self.base64.iter().any(|encoded| text == encoded)
            || text.eq_ignore_ascii_case(&self.hex)
    }

    /// Whether any field of `row` holds the placeholder: the cheap check before a copy.
    pub fn any_in(&self, row: &Map<String, Value>) -> bool {
        row.values().any(|value| self.matches(value))
    }

    /// Replaces every placeholder field of `row` with the value `stored` has for it; a field
    /// `stored` lacks is removed. Returns the removed fields' names, sorted.
    pub fn fill(
        &self,
        row: &mut Map<String, Value>,
        stored: Option<&Map<String, Value>>,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        row.retain(|name, value| {
            if !self.matches(value) {
                return true;
            }
            match stored.and_then(|image| image.get(name)) {
                Some(known) if !self.matches(known) => {
                    *value = known.clone();
                    true
                }
                _ => {
                    missing.push(name.clone());
                    false
                }
            }
        });
        missing.sort();
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Every form Debezium writes is recognised: text, base64 and hex bytes, arrays; data that
    /// merely contains the text is not.
    #[test]
    fn recognises_every_encoding() {
        let placeholder = UnavailablePlaceholder::default();
        for value in [
            json!("__debezium_unavailable_value"),
            json!("X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="),
            json!("5f5f646562657a69756d5f756e617661696c61626c655f76616c7565"),
            json!(["__debezium_unavailable_value"]),
            Value::from(
                "__debezium_unavailable_value"
                    .bytes()
                    .map(u64::from)
                    .collect::<Vec<_>>(),
            ),
        ] {
            assert!(placeholder.matches(&value), "{value}");
        }
        for value in [
            json!("a note about __debezium_unavailable_value"),
            json!([]),
            json!([95, 95, 100]),
            json!(["__debezium_unavailable_value", "real"]),
            json!(null),
            json!(7),
        ] {
            assert!(!placeholder.matches(&value), "{value}");
        }
        let custom = UnavailablePlaceholder::new("<toasted>");
        assert!(custom.matches(&json!("<toasted>")));
        assert!(!custom.matches(&json!("__debezium_unavailable_value")));
    }

    /// Placeholders take the stored value; without one the field is removed and named.
    #[test]
    fn fills_from_the_stored_image() {
        let placeholder = UnavailablePlaceholder::default();
        let mut row = json!({"id": 7, "notes": "__debezium_unavailable_value",
                             "tags": ["__debezium_unavailable_value"], "status": "paid"})
        .as_object()
        .cloned()
        .unwrap();
        let stored = json!({"id": 7, "notes": "long text", "status": "pending"});
        let missing = placeholder.fill(&mut row, stored.as_object());
        assert_eq!(missing, ["tags"]);
        assert_eq!(
            Value::Object(row),
            json!({"id": 7, "notes": "long text", "status": "paid"})
        );
    }

    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!("__debezium_unavailable_value")),
            Just(json!("X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==")),
            Just(json!(["__debezium_unavailable_value"])),
            "[a-z]{0,8}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
        ]
    }

    fn row() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map("[a-e]", field_value(), 0..6)
            .prop_map(|fields| fields.into_iter().collect())
    }

    proptest! {
        /// For any row and stored image: no placeholder is left; real values are untouched;
        /// a placeholder takes the stored real value when there is one, else it is removed and
        /// named exactly once.
        #[test]
        fn no_placeholder_survives_a_fill(incoming in row(), stored in prop::option::of(row())) {
            let placeholder = UnavailablePlaceholder::default();
            let mut filled = incoming.clone();
            let missing = placeholder.fill(&mut filled, stored.as_ref());
            prop_assert!(!placeholder.any_in(&filled));
            for (name, value) in &incoming {
                let known = stored
                    .as_ref()
                    .and_then(|image| image.get(name))
                    .filter(|known| !placeholder.matches(known));
                match (placeholder.matches(value), known) {
                    (false, _) => prop_assert_eq!(filled.get(name), Some(value)),
                    (true, Some(known)) => prop_assert_eq!(filled.get(name), Some(known)),
                    (true, None) => {
                        prop_assert!(!filled.contains_key(name));
                        prop_assert_eq!(missing.iter().filter(|m| *m == name).count(), 1);
                    }
                }
            }
            prop_assert_eq!(filled.len() + missing.len(), incoming.len());
        }
    }
}
