//! Images to CEL values, per record: JSON to CEL (integers stay `int`), the `changed` list, and
//! the [`Conversion`] of each rule variable that converts only the fields a rule can reach.
//!
//! Pure data conversion: it never compiles or evaluates an expression, and it never decides
//! which image `old` is (that is the rule's evaluation, in the parent module).

use std::collections::HashMap;
use std::sync::Arc;

use cel::Value as CelValue;
use cel::objects::{Key, Map as CelMap};
use serde_json::{Map, Value};

use super::references::Use;

/// How one variable becomes a CEL value for a record.
#[derive(Debug, Clone, Default)]
pub(super) enum Conversion {
    #[default]
    Unused,
    /// Only these fields, with their CEL keys built once.
    Fields(Vec<(String, Key)>),
    Whole,
}

impl Conversion {
    pub(super) fn from_use(usage: Option<&Use>) -> Conversion {
        match usage {
            None => Conversion::Unused,
            Some(Use::Whole) => Conversion::Whole,
            Some(Use::Fields(fields)) => Conversion::Fields(
                fields
                    .iter()
                    .map(|field| (field.clone(), Key::String(Arc::new(field.clone()))))
                    .collect(),
            ),
        }
    }

    pub(super) fn row(&self, row: Option<&Map<String, Value>>) -> CelValue {
        match (self, row) {
            (_, None) => CelValue::Null,
            (Conversion::Fields(fields), Some(row)) => {
                let mut map = HashMap::with_capacity(fields.len());
                for (name, key) in fields {
                    if let Some(value) = row.get(name) {
                        map.insert(key.clone(), json_to_cel(value));
                    }
                }
                CelValue::Map(CelMap { map: Arc::new(map) })
            }
            (_, Some(row)) => row_to_cel(row),
        }
    }
}

/// Field names whose values differ between two images, sorted.
pub(super) fn changed_fields(
    old: Option<&Map<String, Value>>,
    new: Option<&Map<String, Value>>,
) -> CelValue {
    let empty = Map::new();
    let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    let mut names: Vec<&String> = old
        .iter()
        .filter(|(name, value)| new.get(*name).unwrap_or(&Value::Null) != *value)
        .map(|(name, _)| name)
        .chain(
            new.iter()
                .filter(|(name, value)| !value.is_null() && !old.contains_key(*name))
                .map(|(name, _)| name),
        )
        .collect();
    names.sort();
    names.dedup();
    CelValue::List(Arc::new(
        names
            .into_iter()
            .map(|name| CelValue::String(Arc::new(name.clone())))
            .collect(),
    ))
}

fn row_to_cel(row: &Map<String, Value>) -> CelValue {
    let mut map = HashMap::with_capacity(row.len());
    for (name, value) in row {
        map.insert(Key::String(Arc::new(name.clone())), json_to_cel(value));
    }
    CelValue::Map(CelMap { map: Arc::new(map) })
}

/// JSON to CEL. Integers become `int` (so `after.id == 1` holds), integers above `i64::MAX`
/// become `uint`, other numbers `double`.
pub(crate) fn json_to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(flag) => CelValue::Bool(*flag),
        Value::Number(number) => {
            if let Some(signed) = number.as_i64() {
                CelValue::Int(signed)
            } else if let Some(unsigned) = number.as_u64() {
                CelValue::UInt(unsigned)
            } else {
                CelValue::Float(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(text) => CelValue::String(Arc::new(text.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(row) => row_to_cel(row),
    }
}
