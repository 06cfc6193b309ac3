//! JSON read one level deep, and objects read for a chosen set of fields.
//!
//! A Debezium value is parsed once into its top-level fields with their values left as text
//! ([`ShallowObject`]); only the parts a pipeline uses are then parsed further. That spares a
//! string and a map entry for every field nobody reads (most of `source`), and it keeps the
//! `after` image's own text, which becomes the stored state without being serialised again.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A JSON object's fields in input order, each value still unparsed text.
pub(super) struct ShallowObject<'t> {
    fields: Vec<(Cow<'t, str>, &'t RawValue)>,
}

impl<'t> ShallowObject<'t> {
    /// The value of `name`; the last one when the name repeats, as a parsed map would keep.
    pub(super) fn get(&self, name: &str) -> Option<&'t RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(field, _)| field == name)
            .map(|(_, value)| *value)
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(name, _)| name.as_ref())
    }

    pub(super) fn into_fields(self) -> impl Iterator<Item = (Cow<'t, str>, &'t RawValue)> {
        self.fields.into_iter()
    }
}

impl<'de> Deserialize<'de> for ShallowObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = ShallowObject<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(8);
                while let Some(FieldName(name)) = map.next_key()? {
                    fields.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(ShallowObject { fields })
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// A field name borrowed from the input, or owned when it held an escape.
struct FieldName<'t>(Cow<'t, str>);

impl<'de> Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = FieldName<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a field name")
            }

            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Borrowed(name)))
            }

            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// Which fields of an object to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FieldSelection {
    #[default]
    All,
    /// Only these names; every other field is skipped without being built.
    Only(Vec<String>),
}

impl FieldSelection {
    fn keeps(&self, name: &str) -> bool {
        match self {
            FieldSelection::All => true,
            FieldSelection::Only(names) => names.iter().any(|kept| kept == name),
        }
    }
}

/// Parses the JSON object `text` into a map of the selected fields.
pub fn selected_fields(
    text: &str,
    selection: &FieldSelection,
) -> serde_json::Result<Map<String, Value>> {
    if *selection == FieldSelection::All {
        return serde_json::from_str(text);
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let fields = SelectedFields(selection).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(fields)
}

struct SelectedFields<'s>(&'s FieldSelection);

impl<'de> DeserializeSeed<'de> for SelectedFields<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SelectedFields<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        while let Some(FieldName(name)) = map.next_key()? {
            if self.0.keeps(&name) {
                fields.insert(name.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn fields_keep_their_text_and_order() {
        let object: ShallowObject<'_> =
            serde_json::from_str(r#"{"b": [1, 2], "a": {"x": "y"}, "c": null}"#).unwrap();
        let names: Vec<&str> = object.names().collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(object.get("b").unwrap().get(), "[1, 2]");
        assert_eq!(object.get("a").unwrap().get(), r#"{"x": "y"}"#);
        assert_eq!(object.get("c").unwrap().get(), "null");
        assert!(object.get("d").is_none());
    }

    #[test]
    fn a_repeated_name_reads_as_its_last_value_like_a_map() {
        let object: ShallowObject<'_> = serde_json::from_str(r#"{"a": 1, "a": 2}"#).unwrap();
        assert_eq!(object.get("a").unwrap().get(), "2");
    }

    #[test]
    fn escaped_names_are_unescaped() {
        let object: ShallowObject<'_> = serde_json::from_str(r#"{"a\"b": 1}"#).unwrap();
        assert_eq!(object.get("a\"b").unwrap().get(), "1");
    }

    #[test]
    fn malformed_values_are_rejected_although_unparsed() {
        assert!(serde_json::from_str::<ShallowObject<'_>>(r#"{"a": [1, }"#).is_err());
        assert!(serde_json::from_str::<ShallowObject<'_>>(r#"{"a": tru}"#).is_err());
        assert!(serde_json::from_str::<ShallowObject<'_>>("[1]").is_err());
    }

    #[test]
    fn a_selection_skips_other_fields_and_checks_the_whole_text() {
        let only = FieldSelection::Only(vec!["lsn".into(), "ts_ms".into()]);
        let text = r#"{"name": "shop", "lsn": 7, "nested": {"deep": [1]}, "ts_ms": 5}"#;
        assert_eq!(
            Value::Object(selected_fields(text, &only).unwrap()),
            json!({"lsn": 7, "ts_ms": 5})
        );
        assert!(selected_fields(r#"{"lsn": 7, "x": [}"#, &only).is_err());
        assert!(selected_fields(r#"{"lsn": 7} trailing"#, &only).is_err());
    }

    proptest! {
        /// Reading one level deep and parsing each value agrees with parsing the whole object.
        #[test]
        fn shallow_then_parsed_equals_parsed(object in prop::collection::btree_map(
            "[a-z\"\\\\]{0,4}",
            prop_oneof![
                Just(json!(null)), any::<i64>().prop_map(|n| json!(n)),
                "[ -~]{0,6}".prop_map(|s| json!(s)),
                prop::collection::vec(any::<bool>(), 0..3).prop_map(|v| json!(v)),
            ],
            0..6,
        )) {
            let text = serde_json::to_string(&object).unwrap();
            let shallow: ShallowObject<'_> = serde_json::from_str(&text).unwrap();
            let rebuilt: Map<String, Value> = shallow
                .into_fields()
                .map(|(name, raw)| (name.into_owned(), serde_json::from_str(raw.get()).unwrap()))
                .collect();
            prop_assert_eq!(rebuilt, object.into_iter().collect::<Map<String, Value>>());
        }
    }
}
