//! Declarative rules in CEL: a condition over the change and the stored image, an event type, an
//! output topic and a payload mapping. Compiled once; evaluated per applied change.
//!
//! Variables a rule sees:
//! - `op`: `"c"`, `"u"`, `"d"`, `"r"` or `"t"`;
//! - `before`, `after`: the change's images (maps, or null);
//! - `previous`: the stored image of the entity before this change (map, or null);
//! - `old`: `before` when the change carries it, else `previous`; the image to compare
//!   `after` against when Postgres sends `before: null` (REPLICA IDENTITY DEFAULT);
//! - `key`: the record key fields; `source`: the Debezium `source` block;
//! - `changed`: the names of the fields whose value differs between `old` and `after` (a
//!   missing image counts as all nulls), so `'status' in changed` reads "status changed".

mod convert;
mod native;
mod references;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use cel::{Context, Env, Program, Value as CelValue};
use serde_json::{Map, Value};
use thiserror::Error;

pub(crate) use convert::json_to_cel;
use convert::{Conversion, changed_fields};
use native::{Native, Scope};
use references::{References, Use};

pub(crate) const VARIABLES: [&str; 8] = [
    "op", "before", "after", "previous", "old", "key", "source", "changed",
];

/// One rule as written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub name: String,
    /// CEL condition; the rule fires when it is `true`.
    pub when: String,
    /// CloudEvents `type`.
    pub event_type: String,
    pub topic: String,
    pub payload: PayloadSpec,
}

/// How the event's `data` is built.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PayloadSpec {
    /// The newest row image (`after`, or `before` for a delete).
    #[default]
    Row,
    /// One CEL expression per field of `data`.
    Fields(Vec<(String, String)>),
    /// One CEL expression that evaluates to the whole `data`.
    Expression(String),
}

/// A rule that failed to compile: names the pipeline, the rule, the part and the position.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("pipeline `{pipeline}`, rule `{rule}`, {part}: {message}")]
pub struct RuleCompileError {
    pub pipeline: String,
    pub rule: String,
    /// `when`, or `payload.<field>`.
    pub part: String,
    pub message: String,
}

/// A rule that failed on one record at run time: the record goes to the DLQ.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("rule `{rule}`, {part}: {message}")]
pub struct RuleError {
    pub rule: String,
    pub part: String,
    pub message: String,
}

#[derive(Debug)]
struct CompiledExpression {
    source: String,
    program: Program,
    /// The same expression for the direct evaluator, when it lies in its subset.
    native: Option<Native>,
}

#[derive(Debug)]
enum CompiledPayload {
    Row,
    Fields(Vec<(String, CompiledExpression)>),
    Expression(CompiledExpression),
}

#[derive(Debug)]
struct CompiledRule {
    spec: RuleSpec,
    when: CompiledExpression,
    payload: CompiledPayload,
}

/// What the rules of one pipeline see for one change.
#[derive(Debug, Clone, Copy)]
pub struct RuleInput<'a> {
    pub op: &'a str,
    pub before: Option<&'a Map<String, Value>>,
    pub after: Option<&'a Map<String, Value>>,
    pub previous: Option<&'a Map<String, Value>>,
    pub key: &'a Value,
    pub source: &'a Map<String, Value>,
}

/// The rules of one pipeline, compiled.
pub struct CompiledRules {
    env: Arc<Env>,
    rules: Vec<CompiledRule>,
    /// How each of [`VARIABLES`] is converted per record: unread variables never are, and
    /// images read only through fields get just those fields.
    conversions: [Conversion; VARIABLES.len()],
}

impl std::fmt::Debug for CompiledRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRules")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// A rule that fired on a change, with its evaluated payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired<'r> {
    pub rule: &'r RuleSpec,
    pub data: Value,
}

impl CompiledRules {
    pub fn compile(pipeline: &str, specs: &[RuleSpec]) -> Result<CompiledRules, RuleCompileError> {
        let mut env = Env::stdlib();
        for extension in [
            cel::extensions::strings,
            cel::extensions::math,
            cel::extensions::lists,
        ] {
            // The standard extensions never conflict with the standard library.
            env.add_extension(extension)
                .map_err(|error| RuleCompileError {
                    pipeline: pipeline.to_owned(),
                    rule: String::new(),
                    part: "environment".to_owned(),
                    message: error.to_string(),
                })?;
        }
        let mut used: [Option<Use>; VARIABLES.len()] = Default::default();
        let mut rules = Vec::with_capacity(specs.len());
        for spec in specs {
            let compile =
                |part: String, source: &str, used: &mut [Option<Use>; VARIABLES.len()]| {
                    compile_expression(&env, source, used).map_err(|message| RuleCompileError {
                        pipeline: pipeline.to_owned(),
                        rule: spec.name.clone(),
                        part,
                        message,
                    })
                };
            let when = compile("when".to_owned(), &spec.when, &mut used)?;
            let payload = match &spec.payload {
                PayloadSpec::Row => CompiledPayload::Row,
                PayloadSpec::Fields(fields) => CompiledPayload::Fields(
                    fields
                        .iter()
                        .map(|(name, source)| {
                            compile(format!("payload.{name}"), source, &mut used)
                                .map(|expression| (name.clone(), expression))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                PayloadSpec::Expression(source) => {
                    CompiledPayload::Expression(compile("payload".to_owned(), source, &mut used)?)
                }
            };
            rules.push(CompiledRule {
                spec: spec.clone(),
                when,
                payload,
            });
        }
        Ok(CompiledRules {
            env: Arc::new(env),
            rules,
            conversions: used
                .each_ref()
                .map(|usage| Conversion::from_use(usage.as_ref())),
        })
    }

    pub fn specs(&self) -> impl Iterator<Item = &RuleSpec> {
        self.rules.iter().map(|rule| &rule.spec)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule reads the stored image (`previous`, `old` or `changed`).
    pub fn reads_previous(&self) -> bool {
        ["previous", "old", "changed"]
            .iter()
            .any(|name| !matches!(self.conversions[index_of(name)], Conversion::Unused))
    }

    /// Evaluates every rule; returns those that fired, in declaration order.
    /// The fields of the stored image the rules read (as `previous`, `old` or through
    /// `changed`); `None` when they read it as a whole.
    pub fn previous_fields_read(&self) -> Option<Vec<String>> {
        let mut fields = Vec::new();
        for name in ["previous", "old", "changed"] {
            match &self.conversions[index_of(name)] {
                Conversion::Unused => {}
                Conversion::Fields(read) if name != "changed" => {
                    fields.extend(read.iter().map(|(field, _)| field.clone()));
                }
                _ => return None,
            }
        }
        fields.sort();
        fields.dedup();
        Some(fields)
    }

    /// The `source` fields the rules read; `None` when they read the block as a whole.
    pub fn source_fields_read(&self) -> Option<Vec<String>> {
        match &self.conversions[index_of("source")] {
            Conversion::Unused => Some(Vec::new()),
            Conversion::Fields(fields) => {
                Some(fields.iter().map(|(name, _)| name.clone()).collect())
            }
            Conversion::Whole => None,
        }
    }

    pub fn evaluate(&self, input: &RuleInput<'_>) -> Result<Vec<Fired<'_>>, RuleError> {
        if self.rules.is_empty() {
            return Ok(Vec::new());
        }
        // A delete's `before` holds only the key columns under Postgres' default replica
        // identity, so for deletes the stored image is the better old image.
        let old = if input.op == "d" {
            input.previous.or(input.before)
        } else {
            input.before.or(input.previous)
        };
        let scope = Scope {
            op: input.op,
            before: input.before,
            after: input.after,
            previous: input.previous,
            old,
            key: input.key,
            source: input.source,
        };
        // The CEL context is built only if an expression needs the interpreter.
        let mut context = None;
        let mut fired = Vec::new();
        for rule in &self.rules {
            let error = |part: &str, message: String| RuleError {
                rule: rule.spec.name.clone(),
                part: part.to_owned(),
                message,
            };
            let fires = match rule.when.native.as_ref().and_then(|n| n.condition(&scope)) {
                Some(fires) => fires,
                None => {
                    let context = context.get_or_insert_with(|| self.context(input, old));
                    match rule.when.program.execute(context) {
                        Ok(CelValue::Bool(fires)) => fires,
                        Ok(other) => {
                            return Err(error(
                                "when",
                                format!(
                                    "`{}` evaluated to {:?}, expected a boolean",
                                    rule.when.source, other
                                ),
                            ));
                        }
                        Err(failure) => {
                            return Err(error(
                                "when",
                                format!("`{}`: {failure}", rule.when.source),
                            ));
                        }
                    }
                }
            };
            if !fires {
                continue;
            }
            let mut value_of = |expression: &CompiledExpression| match expression
                .native
                .as_ref()
                .and_then(|n| n.json(&scope))
            {
                Some(value) => Ok(value),
                None => evaluate_to_json(
                    expression,
                    context.get_or_insert_with(|| self.context(input, old)),
                ),
            };
            let data = match &rule.payload {
                CompiledPayload::Row => input
                    .after
                    .or(input.before)
                    .map_or(Value::Null, |row| Value::Object(row.clone())),
                CompiledPayload::Expression(expression) => {
                    value_of(expression).map_err(|m| error("payload", m))?
                }
                CompiledPayload::Fields(fields) => {
                    let mut data = Map::new();
                    for (name, expression) in fields {
                        let value = value_of(expression)
                            .map_err(|m| error(&format!("payload.{name}"), m))?;
                        data.insert(name.clone(), value);
                    }
                    Value::Object(data)
                }
            };
            fired.push(Fired {
                rule: &rule.spec,
                data,
            });
        }
        Ok(fired)
    }

    /// The CEL context of a change: every variable a rule reads, converted.
    fn context(
        &self,
        input: &RuleInput<'_>,
        old: Option<&Map<String, Value>>,
    ) -> Context<'static, 'static> {
        let mut context = Context::with_env(Arc::clone(&self.env));
        #[cfg(any(test, feature = "fault-injection"))]
        add_fault_functions(&mut context);
        for (name, conversion) in VARIABLES.iter().zip(&self.conversions) {
            if matches!(conversion, Conversion::Unused) {
                continue;
            }
            let value = match *name {
                "op" => CelValue::String(Arc::new(input.op.to_owned())),
                "before" => conversion.row(input.before),
                "after" => conversion.row(input.after),
                "previous" => conversion.row(input.previous),
                "old" => conversion.row(old),
                "key" => match input.key {
                    Value::Object(fields) => conversion.row(Some(fields)),
                    other => json_to_cel(other),
                },
                "source" => conversion.row(Some(input.source)),
                _ => changed_fields(old, input.after),
            };
            context.add_variable_from_value(*name, value);
        }
        context
    }
}

/// Test builds only: `cdcflow_fault_panic(message)` panics, so that tests can prove a bug in a
/// rule costs one record (to the DLQ as `internal_error`), not the partition.
#[cfg(any(test, feature = "fault-injection"))]
fn add_fault_functions(context: &mut Context<'static, 'static>) {
    let declared = context.add_function("cdcflow_fault_panic", |message: Arc<String>| -> bool {
        panic!("fault injected by a test rule: {message}")
    });
    debug_assert!(
        declared.is_ok(),
        "cdcflow_fault_panic clashes with a CEL overload"
    );
}

fn index_of(variable: &str) -> usize {
    VARIABLES
        .iter()
        .position(|name| *name == variable)
        .unwrap_or_default()
}

fn compile_expression(
    env: &Env,
    source: &str,
    used: &mut [Option<Use>; VARIABLES.len()],
) -> Result<CompiledExpression, String> {
    if source.trim().is_empty() {
        return Err("the expression is empty".to_owned());
    }
    let program = env.compile(source).map_err(|errors| {
        errors
            .errors
            .iter()
            .map(|error| format!("{} at {}:{}", error.msg, error.pos.0, error.pos.1))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let references = References::of(program.expression());
    if let Some((name, id)) = references.unknown.first() {
        let at = program
            .source_info()
            .offset_for(*id)
            .map(|(start, _)| line_and_column(source, start as usize))
            .map_or_else(String::new, |(line, column)| format!(" at {line}:{column}"));
        return Err(format!(
            "unknown variable `{name}`{at} in `{source}`; rules can read {}",
            VARIABLES.join(", ")
        ));
    }
    for (slot, usage) in used.iter_mut().zip(&references.uses) {
        Use::merge(slot, usage);
    }
    Ok(CompiledExpression {
        source: source.to_owned(),
        native: Native::compile(program.expression()),
        program,
    })
}

/// 1-based line and column of a character offset.
fn line_and_column(source: &str, offset: usize) -> (usize, usize) {
    let before: String = source.chars().take(offset).collect();
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

fn evaluate_to_json(
    expression: &CompiledExpression,
    context: &Context<'_, '_>,
) -> Result<Value, String> {
    let value = expression
        .program
        .execute(context)
        .map_err(|failure| format!("`{}`: {failure}", expression.source))?;
    value
        .json()
        .map_err(|failure| format!("`{}`: result is not JSON: {failure:?}", expression.source))
}
