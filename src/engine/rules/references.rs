//! What a compiled expression reads: which rule variables, and which of their fields.
//!
//! Images are converted to CEL values per record, so converting only the fields a rule can
//! reach is the largest saving on the hot path (see shared/MEASURED.md). A variable read only
//! through field selections (`after.status`, `has(old.amount)`) or compared with `null` needs
//! just those fields; any other use (indexing, passing it whole, iterating it) needs all of it.

use std::collections::BTreeSet;

use cel::IdedExpr;
use cel::common::ast::{EntryExpr, Expr, LiteralValue};

use super::VARIABLES;

/// How one variable is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Use {
    /// Only these fields (possibly none: a null check).
    Fields(BTreeSet<String>),
    /// The whole value.
    Whole,
}

impl Use {
    fn add_field(slot: &mut Option<Use>, field: &str) {
        match slot {
            None => *slot = Some(Use::Fields(BTreeSet::from([field.to_owned()]))),
            Some(Use::Fields(fields)) => {
                fields.insert(field.to_owned());
            }
            Some(Use::Whole) => {}
        }
    }

    fn touch(slot: &mut Option<Use>) {
        if slot.is_none() {
            *slot = Some(Use::Fields(BTreeSet::new()));
        }
    }

    /// Combines two uses of the same variable.
    pub(crate) fn merge(slot: &mut Option<Use>, other: &Option<Use>) {
        match other {
            None => {}
            Some(Use::Whole) => *slot = Some(Use::Whole),
            Some(Use::Fields(fields)) => {
                Use::touch(slot);
                for field in fields {
                    Use::add_field(slot, field);
                }
            }
        }
    }
}

/// The variables an expression reads, and the identifiers it names that are not variables.
#[derive(Debug, Default)]
pub(crate) struct References {
    pub(crate) uses: [Option<Use>; VARIABLES.len()],
    /// Unknown identifiers with the id of the expression that names them.
    pub(crate) unknown: Vec<(String, u64)>,
}

impl References {
    pub(crate) fn of(expression: &IdedExpr) -> References {
        let mut references = References::default();
        let mut bound = Vec::new();
        references.walk(expression, &mut bound);
        references
    }

    fn variable(&self, name: &str, bound: &[String]) -> Option<usize> {
        if bound.iter().any(|local| local == name) {
            return None;
        }
        VARIABLES.iter().position(|variable| *variable == name)
    }

    fn walk(&mut self, expression: &IdedExpr, bound: &mut Vec<String>) {
        match &expression.expr {
            Expr::Ident(name) => match self.variable(name, bound) {
                Some(index) => self.uses[index] = Some(Use::Whole),
                None if bound.iter().any(|local| local == name) => {}
                None => self.unknown.push((name.clone(), expression.id)),
            },
            Expr::Select(select) => {
                if let Expr::Ident(name) = &select.operand.expr
                    && let Some(index) = self.variable(name, bound)
                {
                    Use::add_field(&mut self.uses[index], &select.field);
                } else {
                    self.walk(&select.operand, bound);
                }
            }
            Expr::Call(call) => {
                if let Some(index) = self.null_check(&call.func_name, &call.args, bound) {
                    Use::touch(&mut self.uses[index]);
                    return;
                }
                if let Some(target) = &call.target {
                    self.walk(target, bound);
                }
                for argument in &call.args {
                    self.walk(argument, bound);
                }
            }
            Expr::Comprehension(comprehension) => {
                self.walk(&comprehension.iter_range, bound);
                self.walk(&comprehension.accu_init, bound);
                let scope = bound.len();
                bound.push(comprehension.iter_var.clone());
                bound.extend(comprehension.iter_var2.clone());
                bound.push(comprehension.accu_var.clone());
                self.walk(&comprehension.loop_cond, bound);
                self.walk(&comprehension.loop_step, bound);
                self.walk(&comprehension.result, bound);
                bound.truncate(scope);
            }
            Expr::List(list) => {
                for element in &list.elements {
                    self.walk(element, bound);
                }
            }
            Expr::Map(map) => self.walk_entries(map.entries.iter().map(|e| &e.expr), bound),
            Expr::Struct(structure) => {
                self.walk_entries(structure.entries.iter().map(|e| &e.expr), bound)
            }
            Expr::Literal(_) | Expr::Unspecified => {}
        }
    }

    fn walk_entries<'e>(
        &mut self,
        entries: impl Iterator<Item = &'e EntryExpr>,
        bound: &mut Vec<String>,
    ) {
        for entry in entries {
            match entry {
                EntryExpr::MapEntry(entry) => {
                    self.walk(&entry.key, bound);
                    self.walk(&entry.value, bound);
                }
                EntryExpr::StructField(field) => self.walk(&field.value, bound),
            }
        }
    }

    /// `var == null` / `var != null` (either side): the variable index, if this is one.
    fn null_check(&self, function: &str, args: &[IdedExpr], bound: &[String]) -> Option<usize> {
        if !matches!(function, "_==_" | "_!=_") || args.len() != 2 {
            return None;
        }
        let is_null =
            |expression: &IdedExpr| matches!(expression.expr, Expr::Literal(LiteralValue::Null));
        let variable = |expression: &IdedExpr| match &expression.expr {
            Expr::Ident(name) => self.variable(name, bound),
            _ => None,
        };
        match (variable(&args[0]), variable(&args[1])) {
            (Some(index), None) if is_null(&args[1]) => Some(index),
            (None, Some(index)) if is_null(&args[0]) => Some(index),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(source: &str) -> References {
        let program = cel::Env::stdlib().compile(source).unwrap();
        References::of(program.expression())
    }

    fn fields(names: &[&str]) -> Option<Use> {
        Some(Use::Fields(names.iter().map(|n| (*n).to_owned()).collect()))
    }

    fn index(name: &str) -> usize {
        VARIABLES.iter().position(|v| *v == name).unwrap()
    }

    /// Field selections and null checks need only the selected fields.
    #[test]
    fn selections_and_null_checks_need_only_their_fields() {
        let refs =
            uses("op == 'u' && old != null && old.status != after.status && has(after.amount)");
        assert_eq!(refs.uses[index("op")], Some(Use::Whole));
        assert_eq!(refs.uses[index("old")], fields(&["status"]));
        assert_eq!(refs.uses[index("after")], fields(&["amount", "status"]));
        assert_eq!(refs.uses[index("before")], None);
        assert!(refs.unknown.is_empty());
    }

    /// Indexing or passing a variable whole needs all of it.
    #[test]
    fn other_uses_need_the_whole_value() {
        assert_eq!(
            uses("after['status'] == 'x'").uses[index("after")],
            Some(Use::Whole)
        );
        assert_eq!(
            uses("size(after) > 2").uses[index("after")],
            Some(Use::Whole)
        );
        assert_eq!(
            uses("after.status == 'a' && after == before").uses[index("after")],
            Some(Use::Whole)
        );
    }

    /// Comprehension variables are local, unknown identifiers are reported.
    #[test]
    fn scoping_and_unknown_identifiers() {
        let refs = uses("after.items.exists(i, i.qty > limit)");
        assert_eq!(refs.uses[index("after")], fields(&["items"]));
        let unknown: Vec<&str> = refs.unknown.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(unknown, ["limit"]);
    }
}
