//! A direct evaluator for the subset of CEL that most rules are written in: literals, `op`,
//! field selections on the images, `has()`, `'field' in changed`, comparisons, `!`, `&&`,
//! `||`, `?:` and map literals with string keys.
//!
//! The general path converts every image a rule reads into CEL values for each record and runs
//! the interpreter; for a status-transition rule that conversion costs more than the rule
//! itself. This evaluator reads the JSON images in place instead. It only answers when the
//! answer is certain: any case where CEL would raise an error (a missing field, a field of
//! null, mismatched types) or where its semantics are subtle (mixed numeric types, NaN) yields
//! `None`, and the caller asks the CEL interpreter, so results and error messages are CEL's
//! own. Expressions outside the subset are never compiled here. The tests below compare both
//! paths on generated expressions and inputs.

use cel::IdedExpr;
use cel::common::ast::{EntryExpr, Expr, LiteralValue, operators};
use serde_json::{Map, Number, Value};

/// The images and scalars a rule reads for one change.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scope<'a> {
    pub op: &'a str,
    pub before: Option<&'a Map<String, Value>>,
    pub after: Option<&'a Map<String, Value>>,
    pub previous: Option<&'a Map<String, Value>>,
    pub old: Option<&'a Map<String, Value>>,
    pub key: &'a Value,
    pub source: &'a Map<String, Value>,
}

/// A variable that holds a row-like value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Image {
    Before,
    After,
    Previous,
    Old,
    Key,
    Source,
}

impl Image {
    fn named(name: &str) -> Option<Image> {
        Some(match name {
            "before" => Image::Before,
            "after" => Image::After,
            "previous" => Image::Previous,
            "old" => Image::Old,
            "key" => Image::Key,
            "source" => Image::Source,
            _ => return None,
        })
    }

    fn value<'a>(self, scope: &Scope<'a>) -> Val<'a> {
        let row = match self {
            Image::Before => scope.before,
            Image::After => scope.after,
            Image::Previous => scope.previous,
            Image::Old => scope.old,
            Image::Source => Some(scope.source),
            Image::Key => return Val::from_json(scope.key),
        };
        row.map_or(Val::Null, Val::Row)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Comparison {
    Equal,
    NotEqual,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
}

impl Comparison {
    fn named(function: &str) -> Option<Comparison> {
        Some(match function {
            operators::EQUALS => Comparison::Equal,
            operators::NOT_EQUALS => Comparison::NotEqual,
            operators::LESS => Comparison::Less,
            operators::LESS_EQUALS => Comparison::LessOrEqual,
            operators::GREATER => Comparison::Greater,
            operators::GREATER_EQUALS => Comparison::GreaterOrEqual,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    String(String),
}

/// A compiled expression of the subset.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Native {
    Literal(Literal),
    Op,
    Image(Image),
    Field(Image, String),
    Has(Image, String),
    FieldChanged(String),
    Not(Box<Native>),
    And(Box<Native>, Box<Native>),
    Or(Box<Native>, Box<Native>),
    Compare(Comparison, Box<Native>, Box<Native>),
    Conditional(Box<Native>, Box<Native>, Box<Native>),
    Object(Vec<(String, Native)>),
}

/// A value during evaluation, borrowing from the images and the expression.
#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(&'a str),
    Row(&'a Map<String, Value>),
    List(&'a Value),
    Object(Map<String, Value>),
}

impl<'a> Val<'a> {
    /// The CEL value of a JSON value, as the general path converts it.
    fn from_json(value: &'a Value) -> Val<'a> {
        match value {
            Value::Null => Val::Null,
            Value::Bool(flag) => Val::Bool(*flag),
            Value::Number(number) => {
                if let Some(signed) = number.as_i64() {
                    Val::Int(signed)
                } else if let Some(unsigned) = number.as_u64() {
                    Val::UInt(unsigned)
                } else {
                    Val::Double(number.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(text) => Val::Str(text),
            Value::Array(_) => Val::List(value),
            Value::Object(row) => Val::Row(row),
        }
    }

    fn into_json(self) -> Option<Value> {
        Some(match self {
            Val::Null => Value::Null,
            Val::Bool(flag) => Value::Bool(flag),
            Val::Int(signed) => Value::from(signed),
            Val::UInt(unsigned) => Value::from(unsigned),
            Val::Double(double) => Value::Number(Number::from_f64(double)?),
            Val::Str(text) => Value::String(text.to_owned()),
            Val::Row(row) => Value::Object(row.clone()),
            Val::List(list) => list.clone(),
            Val::Object(object) => Value::Object(object),
        })
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Val::Bool(flag) => Some(*flag),
            _ => None,
        }
    }
}

impl Native {
    /// Compiles `expression` if it lies entirely in the subset.
    pub(super) fn compile(expression: &IdedExpr) -> Option<Native> {
        match &expression.expr {
            Expr::Literal(literal) => Some(Native::Literal(match literal {
                LiteralValue::Null => Literal::Null,
                LiteralValue::Boolean(flag) => Literal::Bool(*flag.inner()),
                LiteralValue::Int(signed) => Literal::Int(*signed.inner()),
                LiteralValue::UInt(unsigned) => Literal::UInt(*unsigned.inner()),
                LiteralValue::Double(double) => Literal::Double(*double.inner()),
                LiteralValue::String(text) => Literal::String(text.inner().to_owned()),
                LiteralValue::Bytes(_) => return None,
            })),
            Expr::Ident(name) if name == "op" => Some(Native::Op),
            Expr::Ident(name) => Image::named(name).map(Native::Image),
            Expr::Select(select) => {
                let Expr::Ident(name) = &select.operand.expr else {
                    return None;
                };
                let image = Image::named(name)?;
                Some(if select.test {
                    Native::Has(image, select.field.clone())
                } else {
                    Native::Field(image, select.field.clone())
                })
            }
            Expr::Call(call) if call.target.is_none() => {
                let compiled = |index: usize| call.args.get(index).and_then(Native::compile);
                let boxed = |index: usize| compiled(index).map(Box::new);
                match (call.func_name.as_str(), call.args.len()) {
                    (operators::LOGICAL_NOT, 1) => Some(Native::Not(boxed(0)?)),
                    (operators::LOGICAL_AND, 2) => Some(Native::And(boxed(0)?, boxed(1)?)),
                    (operators::LOGICAL_OR, 2) => Some(Native::Or(boxed(0)?, boxed(1)?)),
                    (operators::CONDITIONAL, 3) => {
                        Some(Native::Conditional(boxed(0)?, boxed(1)?, boxed(2)?))
                    }
                    (operators::IN, 2) => match (&call.args[0].expr, &call.args[1].expr) {
                        (Expr::Literal(LiteralValue::String(field)), Expr::Ident(list))
                            if list == "changed" =>
                        {
                            Some(Native::FieldChanged(field.inner().to_owned()))
                        }
                        _ => None,
                    },
                    (function, 2) => Some(Native::Compare(
                        Comparison::named(function)?,
                        boxed(0)?,
                        boxed(1)?,
                    )),
                    _ => None,
                }
            }
            Expr::Map(map) => map
                .entries
                .iter()
                .map(|entry| match &entry.expr {
                    EntryExpr::MapEntry(entry) if !entry.optional => match &entry.key.expr {
                        Expr::Literal(LiteralValue::String(name)) => {
                            Some((name.inner().to_owned(), Native::compile(&entry.value)?))
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                // CEL rejects duplicate keys at run time; leave that to it.
                .filter(|entries| {
                    let mut names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
                    names.sort_unstable();
                    names.windows(2).all(|pair| pair[0] != pair[1])
                })
                .map(Native::Object),
            _ => None,
        }
    }

    /// The value of a condition, or `None` when CEL must decide.
    pub(super) fn condition(&self, scope: &Scope<'_>) -> Option<bool> {
        self.eval(scope)?.as_bool()
    }

    /// The JSON value of a payload expression, or `None` when CEL must decide.
    pub(super) fn json(&self, scope: &Scope<'_>) -> Option<Value> {
        self.eval(scope)?.into_json()
    }

    fn eval<'a>(&'a self, scope: &Scope<'a>) -> Option<Val<'a>> {
        match self {
            Native::Literal(literal) => Some(match literal {
                Literal::Null => Val::Null,
                Literal::Bool(flag) => Val::Bool(*flag),
                Literal::Int(signed) => Val::Int(*signed),
                Literal::UInt(unsigned) => Val::UInt(*unsigned),
                Literal::Double(double) => Val::Double(*double),
                Literal::String(text) => Val::Str(text),
            }),
            Native::Op => Some(Val::Str(scope.op)),
            Native::Image(image) => Some(image.value(scope)),
            Native::Field(image, field) => match image.value(scope) {
                Val::Row(row) => row.get(field).map(Val::from_json),
                // A missing field, or a field of null or of a scalar, is a CEL error.
                _ => None,
            },
            Native::Has(image, field) => match image.value(scope) {
                Val::Row(row) => Some(Val::Bool(row.contains_key(field))),
                _ => None,
            },
            Native::FieldChanged(field) => Some(Val::Bool(field_changed(scope, field))),
            Native::Not(operand) => Some(Val::Bool(!operand.eval(scope)?.as_bool()?)),
            Native::And(left, right) => logical(left, right, false, scope),
            Native::Or(left, right) => logical(left, right, true, scope),
            Native::Compare(comparison, left, right) => {
                compare(*comparison, &left.eval(scope)?, &right.eval(scope)?).map(Val::Bool)
            }
            Native::Conditional(condition, then, otherwise) => {
                if condition.eval(scope)?.as_bool()? {
                    then.eval(scope)
                } else {
                    otherwise.eval(scope)
                }
            }
            Native::Object(entries) => {
                let mut object = Map::new();
                for (name, value) in entries {
                    object.insert(name.clone(), value.eval(scope)?.into_json()?);
                }
                Some(Val::Object(object))
            }
        }
    }
}

/// `&&` (`decisive` false) or `||` (`decisive` true). CEL's logical operators are commutative
/// over errors: `false && error` and `error && false` are both false, and so for `||` with true.
fn logical<'a>(
    left: &'a Native,
    right: &'a Native,
    decisive: bool,
    scope: &Scope<'a>,
) -> Option<Val<'a>> {
    let left = left.eval(scope).and_then(|v| v.as_bool());
    if left == Some(decisive) {
        return Some(Val::Bool(decisive));
    }
    match (left, right.eval(scope).and_then(|v| v.as_bool())) {
        (_, Some(right)) if right == decisive => Some(Val::Bool(decisive)),
        (Some(_), Some(_)) => Some(Val::Bool(!decisive)),
        _ => None,
    }
}

/// `'field' in changed`: the field's value differs between `old` and `after`, a missing
/// field counting as null (the definition of `changed`).
fn field_changed(scope: &Scope<'_>, field: &str) -> bool {
    let old = scope.old.and_then(|row| row.get(field));
    let after = scope.after.and_then(|row| row.get(field));
    old.unwrap_or(&Value::Null) != after.unwrap_or(&Value::Null)
}

/// A comparison whose CEL result is certain: same-type scalars, or null against anything.
fn compare(comparison: Comparison, left: &Val<'_>, right: &Val<'_>) -> Option<bool> {
    use std::cmp::Ordering;
    let ordering = match (left, right) {
        (Val::Null, Val::Null) => Some(Ordering::Equal),
        (Val::Null, _) | (_, Val::Null) => None,
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
        (Val::Int(a), Val::Int(b)) => Some(a.cmp(b)),
        (Val::UInt(a), Val::UInt(b)) => Some(a.cmp(b)),
        (Val::Double(a), Val::Double(b)) if !a.is_nan() && !b.is_nan() => a.partial_cmp(b),
        (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
        _ => return None,
    };
    let null_against_value = ordering.is_none();
    match comparison {
        Comparison::Equal => Some(ordering == Some(Ordering::Equal)),
        Comparison::NotEqual => Some(ordering != Some(Ordering::Equal)),
        // Ordering nulls or bools is left to CEL, whatever it decides.
        _ if null_against_value || matches!(left, Val::Null | Val::Bool(_)) => None,
        Comparison::Less => Some(ordering? == Ordering::Less),
        Comparison::LessOrEqual => Some(ordering? != Ordering::Greater),
        Comparison::Greater => Some(ordering? == Ordering::Greater),
        Comparison::GreaterOrEqual => Some(ordering? != Ordering::Less),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cel::{Context, Env, Value as CelValue};
    use proptest::prelude::*;
    use serde_json::json;

    use super::super::{changed_fields, json_to_cel};
    use super::*;

    const FIELDS: [&str; 3] = ["status", "amount", "id"];
    const IMAGES: [&str; 6] = ["before", "after", "previous", "old", "key", "source"];

    fn json_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-2i64..3).prop_map(Value::from),
            Just(json!(u64::MAX)),
            prop_oneof![Just(1.0), Just(0.5), Just(-2.5)].prop_map(Value::from),
            prop_oneof![Just("paid"), Just("pending"), Just("")].prop_map(Value::from),
            Just(json!([1, "a"])),
            Just(json!({"a": 1})),
        ]
    }

    fn row() -> impl Strategy<Value = Map<String, Value>> {
        proptest::collection::vec((proptest::sample::select(&FIELDS[..]), json_value()), 0..4)
            .prop_map(|fields| {
                fields
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value))
                    .collect()
            })
    }

    /// CEL source text over the subset and just outside it (functions, indexing, lists).
    fn expression() -> impl Strategy<Value = String> {
        let field = proptest::sample::select(&FIELDS[..]);
        let image = proptest::sample::select(&IMAGES[..]);
        let leaf = prop_oneof![
            proptest::sample::select(
                &[
                    "null",
                    "true",
                    "false",
                    "0",
                    "1",
                    "-2",
                    "3u",
                    "1.0",
                    "0.5",
                    "'paid'",
                    "'pending'",
                    "''",
                    "op",
                    "'u'",
                    "'d'",
                    "b'x'",
                    "[1]"
                ][..]
            )
            .prop_map(str::to_owned),
            image.clone().prop_map(str::to_owned),
            (image.clone(), field.clone()).prop_map(|(i, f)| format!("{i}.{f}")),
            (image.clone(), field.clone()).prop_map(|(i, f)| format!("has({i}.{f})")),
            field.clone().prop_map(|f| format!("'{f}' in changed")),
            (image, field).prop_map(|(i, f)| format!("{i}['{f}']")),
        ];
        leaf.prop_recursive(3, 24, 3, |inner| {
            let comparison = proptest::sample::select(&["==", "!=", "<", "<=", ">", ">="][..]);
            prop_oneof![
                inner.clone().prop_map(|e| format!("!({e})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
                (inner.clone(), comparison, inner.clone())
                    .prop_map(|(a, c, b)| format!("({a}) {c} ({b})")),
                (inner.clone(), inner.clone(), inner.clone())
                    .prop_map(|(c, a, b)| format!("({c}) ? ({a}) : ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{{'x': {a}, 'y': {b}}}")),
                inner.prop_map(|e| format!("size({e}) > 0")),
            ]
        })
    }

    #[derive(Debug, Clone)]
    struct Case {
        op: &'static str,
        before: Option<Map<String, Value>>,
        after: Option<Map<String, Value>>,
        previous: Option<Map<String, Value>>,
        key: Value,
        source: Map<String, Value>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            proptest::sample::select(&["c", "u", "d", "r"][..]),
            proptest::option::of(row()),
            proptest::option::of(row()),
            proptest::option::of(row()),
            prop_oneof![row().prop_map(Value::Object), json_value()],
            row(),
        )
            .prop_map(|(op, before, after, previous, key, source)| Case {
                op,
                before,
                after,
                previous,
                key,
                source,
            })
    }

    /// What CEL itself says, as JSON (`Err` for a CEL error or a non-JSON result).
    fn cel_answer(program: &cel::Program, scope: &Scope<'_>) -> Result<Value, String> {
        let mut context = Context::with_env(Arc::new(Env::stdlib()));
        let row = |row: Option<&Map<String, Value>>| {
            row.map_or(CelValue::Null, |row| {
                json_to_cel(&Value::Object(row.clone()))
            })
        };
        context.add_variable_from_value("op", CelValue::String(Arc::new(scope.op.to_owned())));
        context.add_variable_from_value("before", row(scope.before));
        context.add_variable_from_value("after", row(scope.after));
        context.add_variable_from_value("previous", row(scope.previous));
        context.add_variable_from_value("old", row(scope.old));
        context.add_variable_from_value("key", json_to_cel(scope.key));
        context.add_variable_from_value("source", row(Some(scope.source)));
        context.add_variable_from_value("changed", changed_fields(scope.old, scope.after));
        let value = program.execute(&context).map_err(|e| e.to_string())?;
        value.json().map_err(|e| format!("{e:?}"))
    }

    static ANSWERED: AtomicUsize = AtomicUsize::new(0);
    static COMPILED: AtomicUsize = AtomicUsize::new(0);

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Wherever the direct evaluator answers, CEL gives the same value without error.
        #[test]
        fn the_direct_evaluator_agrees_with_cel(source in expression(), case in case()) {
            let Ok(program) = Env::stdlib().compile(&source) else {
                return Ok(());
            };
            let Some(native) = Native::compile(program.expression()) else {
                return Ok(());
            };
            COMPILED.fetch_add(1, Ordering::Relaxed);
            let old = if case.op == "d" {
                case.previous.as_ref().or(case.before.as_ref())
            } else {
                case.before.as_ref().or(case.previous.as_ref())
            };
            let scope = Scope {
                op: case.op,
                before: case.before.as_ref(),
                after: case.after.as_ref(),
                previous: case.previous.as_ref(),
                old,
                key: &case.key,
                source: &case.source,
            };
            if let Some(answer) = native.json(&scope) {
                ANSWERED.fetch_add(1, Ordering::Relaxed);
                prop_assert_eq!(
                    cel_answer(&program, &scope),
                    Ok(answer),
                    "`{}` on op {}, before {:?}, after {:?}, previous {:?}, key {}",
                    source, case.op, case.before, case.after, case.previous, case.key
                );
            }
            if let Some(fires) = native.condition(&scope) {
                prop_assert_eq!(cel_answer(&program, &scope), Ok(Value::Bool(fires)));
            }
        }
    }

    /// The differential test above must not pass by never answering.
    #[test]
    fn the_direct_evaluator_answers_most_subset_expressions() {
        the_direct_evaluator_agrees_with_cel();
        let (compiled, answered) = (
            COMPILED.load(Ordering::Relaxed),
            ANSWERED.load(Ordering::Relaxed),
        );
        assert!(compiled > 1000, "only {compiled} expressions in the subset");
        assert!(
            answered * 10 > compiled,
            "answered {answered} of {compiled}"
        );
    }

    /// The example rules all lie in the subset.
    #[test]
    fn example_rules_compile_natively() {
        for source in [
            "op == 'u' && after.status == 'paid' && old != null && old.status != 'paid'",
            "op == 'u' && old != null && 'amount' in changed",
            "previous != null ? previous.status : null",
            "{'customer_id': after.id, 'from': old.credit_limit, 'to': after.credit_limit}",
            "key.id",
        ] {
            let program = Env::stdlib().compile(source).unwrap();
            assert!(Native::compile(program.expression()).is_some(), "{source}");
        }
        for outside in [
            "size(after) > 0",
            "after['status'] == 'x'",
            "after.items.exists(i, i > 0)",
        ] {
            let program = Env::stdlib().compile(outside).unwrap();
            assert!(Native::compile(program.expression()).is_none(), "{outside}");
        }
    }
}
