//! A subscription's `when`: a CEL condition over the CloudEvent, checked before delivery.

use std::sync::Arc;

use cel::{Context, Env, Program, Value as CelValue};
use serde_json::Value;
use thiserror::Error;

use crate::engine::json_to_cel;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("`{source_text}` does not compile: {message}")]
    Compile {
        source_text: String,
        message: String,
    },
    #[error("`{source_text}` failed on this event: {message}")]
    Evaluate {
        source_text: String,
        message: String,
    },
    #[error("`{source_text}` gave {got}, not a bool")]
    NotBool { source_text: String, got: String },
}

/// A compiled `when`. `event` is the whole CloudEvent (`event.type`, `event.data.total`).
#[derive(Clone)]
pub struct EventFilter {
    source: String,
    env: Arc<Env>,
    program: Arc<Program>,
}

impl std::fmt::Debug for EventFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EventFilter").field(&self.source).finish()
    }
}

impl EventFilter {
    pub fn compile(source: &str) -> Result<EventFilter, FilterError> {
        let compile_error = |message: String| FilterError::Compile {
            source_text: source.to_owned(),
            message,
        };
        if source.trim().is_empty() {
            return Err(compile_error("the condition is empty".to_owned()));
        }
        let mut env = Env::stdlib();
        for extension in [
            cel::extensions::strings,
            cel::extensions::math,
            cel::extensions::lists,
        ] {
            env.add_extension(extension)
                .map_err(|error| compile_error(error.to_string()))?;
        }
        let program = env.compile(source).map_err(|errors| {
            compile_error(
                errors
                    .errors
                    .iter()
                    .map(|error| format!("{} at {}:{}", error.msg, error.pos.0, error.pos.1))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        Ok(EventFilter {
            source: source.to_owned(),
            env: Arc::new(env),
            program: Arc::new(program),
        })
    }

    /// Whether `event` is delivered.
    pub fn matches(&self, event: &Value) -> Result<bool, FilterError> {
        let mut context = Context::with_env(Arc::clone(&self.env));
        context.add_variable_from_value("event", json_to_cel(event));
        match self.program.execute(&context) {
            Ok(CelValue::Bool(flag)) => Ok(flag),
            Ok(other) => Err(FilterError::NotBool {
                source_text: self.source.clone(),
                got: format!("{other:?}"),
            }),
            Err(error) => Err(FilterError::Evaluate {
                source_text: self.source.clone(),
                message: error.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn paid(total: i64) -> Value {
        json!({"id": "e1", "type": "OrderPaid", "data": {"total": total, "currency": "EUR"}})
    }

    #[test]
    fn selects_by_attribute_and_data() {
        let filter =
            EventFilter::compile("event.type == 'OrderPaid' && event.data.total > 100").unwrap();
        assert_eq!(filter.matches(&paid(150)), Ok(true));
        assert_eq!(filter.matches(&paid(50)), Ok(false));
    }

    #[test]
    fn a_missing_field_is_an_error_not_a_silent_false() {
        let filter = EventFilter::compile("event.data.discount > 0").unwrap();
        assert!(matches!(
            filter.matches(&paid(1)),
            Err(FilterError::Evaluate { .. })
        ));
        let guarded =
            EventFilter::compile("has(event.data.discount) && event.data.discount > 0").unwrap();
        assert_eq!(guarded.matches(&paid(1)), Ok(false));
    }

    #[test]
    fn a_non_bool_result_and_bad_syntax_are_named() {
        let filter = EventFilter::compile("event.data.total").unwrap();
        assert!(matches!(
            filter.matches(&paid(1)),
            Err(FilterError::NotBool { .. })
        ));
        let error = EventFilter::compile("event.type ==").unwrap_err();
        assert!(error.to_string().contains("does not compile"), "{error}");
        assert!(EventFilter::compile("  ").is_err());
    }
}
