//! CEL conditions: compiling a `when` expression and evaluating it against a reading.
//!
//! # Numbers
//!
//! JSON has one number type; CEL has `int`, `uint` and `double`. Every JSON number in
//! a reading becomes a CEL `double`, as in CEL's own JSON mapping
//! (`google.protobuf.Value`). cel 0.15 compares `double` with `int` and `uint`
//! numerically (`<`, `<=`, `>`, `>=`, `==`, `!=`, `in`), so `temperature > 30` and
//! `temperature > 30.5` behave the same whether the device sent `31` or `31.5`.
//! Arithmetic does not mix types in CEL (`1.5 + 1` is an error), so with every field a
//! `double` an expression either always works or always fails, whatever the device
//! sends: `temperature + 1.0` works for `31` and `31.5` alike, and `temperature + 1`
//! fails for both rather than only for some readings.
//!
//! # Stack
//!
//! The CEL parser and interpreter recurse. Compiling runs on a thread with a big
//! stack (see [`COMPILE_STACK_SIZE`]); evaluating runs on the caller's thread, so
//! [`Condition::compile`] refuses expressions nested more than [`MAX_NESTING`]
//! brackets deep or whose syntax tree is deeper than [`MAX_DEPTH`], which keeps
//! evaluation well inside a 2 MiB thread stack (tokio's default), even in debug builds.

use crate::cost::{Cost, MAX_EVAL_STEPS};
use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::common::types::{CelBool, CelDouble, CelList, CelMap, CelMapKey, CelNull, CelString};
use cel::common::value::Val;
use cel::{Context, Env, ExecutionError, Program, Value};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// The longest `when` expression accepted, in bytes.
pub const MAX_EXPRESSION_LEN: usize = 1024;

/// How deep brackets (`(`, `[`, `{`) may nest in an expression. The CEL parser needs
/// about 180 KiB of stack per level in a debug build (8 KiB in release), and more
/// when the nesting is reached by other means; everything under these limits
/// compiles with a 6 MiB stack in a debug build, so [`COMPILE_STACK_SIZE`] leaves a
/// wide margin.
pub const MAX_NESTING: usize = 32;

/// How deep an expression's syntax tree may be. Each level costs the interpreter
/// about 40 KiB of stack in a debug build and 2 KiB in a release build, so the
/// deepest expression needs about 1 MiB in a debug build, 60 KiB in a release build:
/// it evaluates on a 2 MiB thread stack (tokio's default) with room to spare for the
/// caller. Real conditions are far shallower: `a > 1 && b < 2 || c == 3` is 4 levels
/// deep (`&&` and `||` chains are balanced), `a + b + c + d > 0` is 5.
pub const MAX_DEPTH: usize = 24;

/// How deep a reading's field values may nest (objects in objects, lists in lists)
/// to be visible to expressions. Deeper fields are left out; a rule that uses one
/// gets an [`EvalError`](crate::EvalError) saying so.
pub const MAX_VALUE_DEPTH: usize = 32;

/// Stack size of the thread [`RuleSet::compile`](crate::RuleSet::compile) parses on.
pub const COMPILE_STACK_SIZE: usize = 16 << 20;

/// The CEL environment every condition is compiled and evaluated with: the standard
/// library (operators, `size`, `contains`, `startsWith`, `endsWith`, `has`, `all`,
/// `exists`, `exists_one`, `map`, `filter`, `int`, `double`, `string`, ...), without
/// regular expressions, timestamps, durations or extensions.
pub(crate) fn new_env() -> Arc<Env> {
    Arc::new(Env::stdlib())
}

/// A compiled condition (`when` or `clear_when`).
#[derive(Debug)]
pub(crate) struct Condition {
    program: Program,
    /// Boxed: a rule's kind holds up to two conditions, and is kept small.
    shape: Box<Shape>,
    /// The key the expression was written under, for messages.
    key: &'static str,
}

/// What compiling a condition found out about its expression.
#[derive(Debug)]
struct Shape {
    /// The most work one evaluation can take, by the size of the reading.
    cost: Cost,
    /// Set when the expression is a [`Threshold`].
    threshold: Option<Threshold>,
}

/// A field compared with a number by `<`, `<=`, `>` or `>=` (`temperature > 80`,
/// `5 <= level`): the most common condition by far. [`Condition::threshold`]
/// answers it from the field alone, with cel's own comparison, instead of making
/// every field of the reading a CEL variable first, which was most of what a
/// threshold rule cost per reading. A reading it cannot answer the same way (the
/// field missing, or not a number) goes the whole way, for the interpreter's own
/// answer or error.
#[derive(Debug)]
struct Threshold {
    field: String,
    /// The number as written; the interpreter makes its value the same way.
    literal: LiteralValue,
    /// `field <op> literal` if true, `literal <op> field` if false.
    field_first: bool,
    /// Whether the left side ordering so against the right makes it true.
    holds: fn(Ordering) -> bool,
}

impl Threshold {
    fn of(root: &IdedExpr, cost: &Cost) -> Option<Threshold> {
        // Only where the interpreter's step limit can never refuse it, whatever the
        // reading's size: then the comparison is all there is to it.
        if cost.steps(u64::MAX) > MAX_EVAL_STEPS {
            return None;
        }
        let Expr::Call(call) = &root.expr else {
            return None;
        };
        let holds: fn(Ordering) -> bool = match call.func_name.as_str() {
            "_<_" => |o| o == Ordering::Less,
            "_<=_" => |o| o != Ordering::Greater,
            "_>_" => |o| o == Ordering::Greater,
            "_>=_" => |o| o != Ordering::Less,
            _ => return None,
        };
        if call.target.is_some() {
            return None;
        }
        let number = |e: &IdedExpr| match &e.expr {
            Expr::Literal(
                l @ (LiteralValue::Int(_) | LiteralValue::UInt(_) | LiteralValue::Double(_)),
            ) => Some(l.clone()),
            _ => None,
        };
        let ident = |e: &IdedExpr| match &e.expr {
            Expr::Ident(name) => Some(name.clone()),
            _ => None,
        };
        let [left, right] = call.args.as_slice() else {
            return None;
        };
        let (field, literal, field_first) = match (ident(left), number(right)) {
            (Some(field), Some(literal)) => (field, literal, true),
            _ => (ident(right)?, number(left)?, false),
        };
        Some(Threshold {
            field,
            literal,
            field_first,
            holds,
        })
    }
}

/// Why an expression did not compile, and where in the expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExprError {
    /// Byte offset into the expression; `None` when the mistake is the expression
    /// as a whole (empty, too long, too deep).
    pub offset: Option<usize>,
    pub message: String,
}

impl ExprError {
    fn at(offset: usize, message: impl Into<String>) -> Self {
        ExprError {
            offset: Some(offset),
            message: message.into(),
        }
    }

    fn whole(message: impl Into<String>) -> Self {
        ExprError {
            offset: None,
            message: message.into(),
        }
    }
}

impl Condition {
    /// Compiles `source`, written under `key` (`when`, `clear_when`), which names it
    /// in messages. Needs a big stack: call it on a thread with
    /// [`COMPILE_STACK_SIZE`].
    pub(crate) fn compile(
        env: &Env,
        key: &'static str,
        source: &str,
    ) -> Result<Condition, ExprError> {
        if source.trim().is_empty() {
            return Err(ExprError::whole(format!("`{key}` is empty")));
        }
        if source.len() > MAX_EXPRESSION_LEN {
            return Err(ExprError::whole(format!(
                "`{key}` is {} bytes long; the limit is {MAX_EXPRESSION_LEN}",
                source.len()
            )));
        }
        check_nesting(source)?;
        let program = match catch_unwind(AssertUnwindSafe(|| env.compile(source))) {
            Ok(Ok(program)) => program,
            Ok(Err(errors)) => return Err(parse_error(source, &errors, key)),
            Err(_) => {
                return Err(ExprError::whole(
                    "the CEL parser failed on this expression (a bug in the parser; \
                     try writing it differently)",
                ))
            }
        };
        if deeper_than(program.expression(), MAX_DEPTH) {
            return Err(ExprError::whole(too_deep_message(key)));
        }
        if let Some(message) = never_true(program.expression(), key) {
            return Err(ExprError::whole(message));
        }
        let cost = Cost::of(program.expression());
        let threshold = Threshold::of(program.expression(), &cost);
        Ok(Condition {
            program,
            shape: Box::new(Shape { cost, threshold }),
            key,
        })
    }

    pub(crate) fn cost(&self) -> &Cost {
        &self.shape.cost
    }

    /// The answer for a [`Threshold`] whose field is a number in `fields`; `None`
    /// otherwise, and [`evaluate`](Self::evaluate) answers. A field is the value of
    /// its own name (fields win over `device` and `source`) and every JSON number a
    /// `double`, as [`Bindings`] make them.
    pub(crate) fn threshold(
        &self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<bool> {
        let t = self.shape.threshold.as_ref()?;
        let field = CelDouble::from(fields.get(&t.field)?.as_number()?.as_f64()?);
        // As `evaluate` guards the interpreter: a panic in cel is no answer here,
        // and `evaluate` then reports it as an error.
        catch_unwind(AssertUnwindSafe(|| {
            let literal = t.literal.to_val();
            let ordering = if t.field_first {
                field.as_comparer()?.compare(literal.as_ref())
            } else {
                literal.as_comparer()?.compare(&field)
            };
            Some((t.holds)(ordering.ok()?))
        }))
        .ok()
        .flatten()
    }

    /// Evaluates the condition. `Err` carries a message for an
    /// [`EvalError`](crate::EvalError).
    pub(crate) fn evaluate(&self, bindings: &Bindings<'_>) -> Result<bool, String> {
        let steps = self.shape.cost.steps(bindings.size);
        if steps > MAX_EVAL_STEPS {
            let steps = if steps == u64::MAX {
                "more".to_owned()
            } else {
                format!("up to {steps}")
            };
            return Err(format!(
                "`{}` not evaluated: on a reading this large (size {}: its values plus the \
                 bytes of its strings and keys) it could take {steps} steps; the limit is \
                 {MAX_EVAL_STEPS}. Avoid a list macro inside another (`exists`, `all`, \
                 `map`, `filter`) on large lists",
                self.key, bindings.size
            ));
        }
        let result = catch_unwind(AssertUnwindSafe(|| self.program.execute(&bindings.context)));
        match result {
            Ok(Ok(Value::Bool(b))) => Ok(b),
            Ok(Ok(other)) => Err(format!(
                "`{}` must give true or false, but gave {}",
                self.key,
                describe(&other)
            )),
            Ok(Err(error)) => Err(execution_error(&error, bindings)),
            Err(_) => Err("the CEL interpreter failed on this reading (a bug in the \
                           interpreter)"
                .to_owned()),
        }
    }
}

/// The variables one reading makes visible to conditions, built once per reading and
/// shared by every rule. Values borrow from the reading.
pub(crate) struct Bindings<'r> {
    context: Context<'r, 'r>,
    /// Fields left out, and why: nested deeper than [`MAX_VALUE_DEPTH`], or a number
    /// that is not a finite `f64`.
    unusable: Vec<(&'r str, Unusable)>,
    /// The `n` of [`Cost::steps`]: every value the expressions can see, plus the bytes
    /// of every string and key (and of `device` and `source`).
    size: u64,
}

impl<'r> Bindings<'r> {
    /// Every field as a variable of its own name, plus `device` and `source` unless
    /// the reading has a field of that name (fields win).
    pub(crate) fn new(env: &Arc<Env>, reading: &crate::Reading<'r>) -> Self {
        let mut context = Context::with_env(Arc::clone(env));
        let mut unusable = Vec::new();
        let mut size = 0u64;
        for (name, value) in reading.fields {
            size = size.saturating_add(name.len() as u64);
            match to_val(value, 1, &mut size) {
                Ok(val) => context.add_variable_as_val(name.as_str(), val),
                Err(why) => unusable.push((name.as_str(), why)),
            }
        }
        for (name, value) in [("device", reading.device), ("source", reading.source)] {
            if !reading.fields.contains_key(name) {
                size = size.saturating_add(1 + value.len() as u64);
                context.add_variable_as_val(name, Box::new(CelString::from(value)));
            }
        }
        Bindings {
            context,
            unusable,
            size,
        }
    }
}

/// Why a field could not be made a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unusable {
    TooDeep,
    /// Only possible with serde_json's `arbitrary_precision` feature.
    NumberTooLarge,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::TooDeep => write!(f, "nests more than {MAX_VALUE_DEPTH} levels deep"),
            Unusable::NumberTooLarge => write!(f, "holds a number too large for a double"),
        }
    }
}

/// Converts a JSON value to a CEL value borrowing its strings (`depth` is this value's
/// level, from 1), adding its size to `size` (see [`Bindings`]); `Err` says why it
/// cannot be.
fn to_val<'r>(
    value: &'r serde_json::Value,
    depth: usize,
    size: &mut u64,
) -> Result<Box<dyn Val + 'r>, Unusable> {
    if depth > MAX_VALUE_DEPTH {
        return Err(Unusable::TooDeep);
    }
    *size = size.saturating_add(1);
    Ok(match value {
        serde_json::Value::Null => Box::new(CelNull),
        serde_json::Value::Bool(b) => Box::new(CelBool::from(*b)),
        // Every JSON number is a double; see the module docs. `as_f64` is `None` only
        // with serde_json's `arbitrary_precision` feature, for numbers out of range.
        serde_json::Value::Number(n) => {
            Box::new(CelDouble::from(n.as_f64().ok_or(Unusable::NumberTooLarge)?))
        }
        serde_json::Value::String(s) => {
            *size = size.saturating_add(s.len() as u64);
            Box::new(CelString::from(s.as_str()))
        }
        serde_json::Value::Array(items) => {
            let items = items
                .iter()
                .map(|item| to_val(item, depth + 1, size))
                .collect::<Result<Vec<_>, _>>()?;
            Box::new(CelList::from(items))
        }
        serde_json::Value::Object(map) => {
            let mut entries = HashMap::with_capacity(map.len());
            for (key, item) in map {
                *size = size.saturating_add(key.len() as u64);
                entries.insert(
                    CelMapKey::from(key.as_str()),
                    to_val(item, depth + 1, size)?,
                );
            }
            Box::new(CelMap::from(entries))
        }
    })
}

/// Checks bracket nesting before the parser sees the expression, skipping string
/// literals and `//` comments, and points at the first bracket too deep.
fn check_nesting(source: &str) -> Result<(), ExprError> {
    // Every byte looked at is ASCII, and UTF-8 continuation bytes never are, so
    // walking bytes cannot misread a multi-byte character.
    let bytes = source.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            quote @ (b'"' | b'\'') => {
                i = skip_string(bytes, i, quote);
                continue;
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(ExprError::at(
                        i,
                        format!("brackets nest too deeply; the limit is {MAX_NESTING} levels"),
                    ));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The index just past the string literal whose opening quote is at `start`
/// (or the end of `bytes` if it is not closed; the parser reports that).
fn skip_string(bytes: &[u8], start: usize, quote: u8) -> usize {
    let prefix = |back: usize| {
        start
            .checked_sub(back)
            .map(|i| bytes[i].to_ascii_lowercase())
    };
    let raw = prefix(1) == Some(b'r') || (prefix(1) == Some(b'b') && prefix(2) == Some(b'r'));
    let triple = bytes.get(start..start + 3) == Some(&[quote; 3][..]);
    let delimiter = if triple { 3 } else { 1 };
    let mut i = start + delimiter;
    while i < bytes.len() {
        if bytes[i] == b'\\' && !raw {
            i += 2;
            continue;
        }
        if bytes[i] == quote && bytes.get(i..i + delimiter) == Some(&[quote; 3][..delimiter]) {
            return i + delimiter;
        }
        if bytes[i] == b'\n' && !triple {
            return i;
        }
        i += 1;
    }
    bytes.len()
}

/// Whether the syntax tree under `root` is more than `limit` levels deep. Walks with
/// its own stack, so it is safe on any tree.
fn deeper_than(root: &IdedExpr, limit: usize) -> bool {
    let mut stack = vec![(root, 1usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth > limit {
            return true;
        }
        let next = depth + 1;
        match &node.expr {
            Expr::Call(call) => {
                stack.extend(call.target.as_deref().map(|target| (target, next)));
                stack.extend(call.args.iter().map(|arg| (arg, next)));
            }
            Expr::Comprehension(c) => stack.extend(
                [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ]
                .map(|child| (child, next)),
            ),
            Expr::List(list) => stack.extend(list.elements.iter().map(|e| (e, next))),
            Expr::Map(map) => {
                for e in &map.entries {
                    push_entry(&mut stack, &e.expr, next);
                }
            }
            Expr::Struct(s) => {
                for e in &s.entries {
                    push_entry(&mut stack, &e.expr, next);
                }
            }
            Expr::Select(select) => stack.push((&select.operand, next)),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
    false
}

/// The nodes of the syntax tree under `root`, parents before children. Walks with
/// its own stack, so it is safe on any tree.
fn nodes(root: &IdedExpr) -> Vec<&IdedExpr> {
    let mut stack = vec![root];
    let mut all = Vec::new();
    while let Some(node) = stack.pop() {
        all.push(node);
        match &node.expr {
            Expr::Call(call) => {
                stack.extend(call.target.as_deref());
                stack.extend(call.args.iter());
            }
            Expr::Comprehension(c) => stack.extend([
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]),
            Expr::List(list) => stack.extend(list.elements.iter()),
            Expr::Map(map) => {
                for e in &map.entries {
                    match &e.expr {
                        EntryExpr::MapEntry(e) => stack.extend([&e.key, &e.value]),
                        EntryExpr::StructField(f) => stack.push(&f.value),
                    }
                }
            }
            Expr::Struct(s) => {
                for e in &s.entries {
                    match &e.expr {
                        EntryExpr::MapEntry(e) => stack.extend([&e.key, &e.value]),
                        EntryExpr::StructField(f) => stack.push(&f.value),
                    }
                }
            }
            Expr::Select(select) => stack.push(&select.operand),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
    all
}

/// What the type of a literal says about comparing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiteralKind {
    Number,
    String,
    Bool,
    Bytes,
    Null,
}

impl LiteralKind {
    fn of(expr: &IdedExpr) -> Option<LiteralKind> {
        let Expr::Literal(literal) = &expr.expr else {
            return None;
        };
        Some(match literal {
            LiteralValue::Int(_) | LiteralValue::UInt(_) | LiteralValue::Double(_) => {
                LiteralKind::Number
            }
            LiteralValue::String(_) => LiteralKind::String,
            LiteralValue::Boolean(_) => LiteralKind::Bool,
            LiteralValue::Bytes(_) => LiteralKind::Bytes,
            LiteralValue::Null => LiteralKind::Null,
        })
    }

    fn name(self) -> &'static str {
        match self {
            LiteralKind::Number => "a number",
            LiteralKind::String => "a string",
            LiteralKind::Bool => "a bool",
            LiteralKind::Bytes => "bytes",
            LiteralKind::Null => "null",
        }
    }
}

/// Mistakes the types of literals give away: a condition that is a constant other
/// than a bool (`when = "1"`), or a comparison of two literals of different kinds
/// (`'open' > 3`, an error on every reading; `'1' == 1`, never true). What fields
/// hold is only known per reading, so nothing involving a field is judged here.
fn never_true(root: &IdedExpr, key: &str) -> Option<String> {
    if let Some(kind) = LiteralKind::of(root) {
        if kind != LiteralKind::Bool {
            return Some(format!(
                "`{key}` is {}, not a condition: it must give true or false",
                kind.name()
            ));
        }
    }
    for node in nodes(root) {
        let Expr::Call(call) = &node.expr else {
            continue;
        };
        let symbol = match call.func_name.as_str() {
            "_<_" => "<",
            "_<=_" => "<=",
            "_>_" => ">",
            "_>=_" => ">=",
            "_==_" => "==",
            "_!=_" => "!=",
            _ => continue,
        };
        let [left, right] = call.args.as_slice() else {
            continue;
        };
        let (Some(left), Some(right)) = (LiteralKind::of(left), LiteralKind::of(right)) else {
            continue;
        };
        let equality = symbol == "==" || symbol == "!=";
        if left == right || (equality && (left == LiteralKind::Null || right == LiteralKind::Null))
        {
            continue;
        }
        let outcome = if equality {
            if symbol == "==" {
                "never true"
            } else {
                "always true"
            }
        } else {
            "an error on every reading"
        };
        return Some(format!(
            "`{key}` compares {} with {} using `{symbol}`, which is {outcome}",
            left.name(),
            right.name()
        ));
    }
    None
}

/// `source` with comments dropped and whitespace cut to what separates tokens, so
/// that two ways of laying out one expression give the same text. String literals
/// are kept as written. Used for rule fingerprints.
pub(crate) fn canonical(source: &str) -> String {
    let bytes = source.as_bytes();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(source.len());
    let mut space = false;
    let mut i = 0;
    while i < bytes.len() {
        let Some(c) = source[i..].chars().next() else {
            break;
        };
        if c == '/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            space = true;
            continue;
        }
        if c.is_whitespace() {
            space = true;
            i += c.len_utf8();
            continue;
        }
        if space && out.chars().next_back().is_some_and(word) && word(c) {
            out.push(' ');
        }
        space = false;
        if c == '"' || c == '\'' {
            let end = skip_string(bytes, i, c as u8).min(bytes.len());
            out.push_str(source.get(i..end).unwrap_or(""));
            i = end.max(i + 1);
            continue;
        }
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn push_entry<'a>(stack: &mut Vec<(&'a IdedExpr, usize)>, entry: &'a EntryExpr, depth: usize) {
    match entry {
        EntryExpr::MapEntry(e) => stack.extend([(&e.key, depth), (&e.value, depth)]),
        EntryExpr::StructField(f) => stack.push((&f.value, depth)),
    }
}

fn too_deep_message(key: &str) -> String {
    format!(
        "`{key}` is nested too deeply (its syntax tree is more than {MAX_DEPTH} levels deep); \
         simplify it"
    )
}

/// The first syntax error (or else the first error), positioned in the expression.
///
/// The parser can report an internal complaint about an incomplete node at 1:1 ahead
/// of the syntax error that caused it; the syntax error is the one to show.
fn parse_error(source: &str, errors: &cel::ParseErrors, key: &str) -> ExprError {
    let first = errors
        .errors
        .iter()
        .find(|e| e.msg.starts_with("Syntax error: "))
        .or(errors.errors.first());
    let Some(first) = first else {
        return ExprError::whole(format!("`{key}` is not a valid CEL expression"));
    };
    if first.msg.contains("Recursion limit") {
        return ExprError::whole(too_deep_message(key));
    }
    let message = first
        .msg
        .strip_prefix("Syntax error: ")
        .unwrap_or(&first.msg);
    ExprError {
        offset: offset_of(source, first.pos.0, first.pos.1),
        message: format!("syntax error in `{key}`: {message}"),
    }
}

/// The byte offset of 1-based `line` and 1-based character `col` in `source`, or
/// `None` if they are not in it. The end of a line (or of the source) is in it.
fn offset_of(source: &str, line: isize, col: isize) -> Option<usize> {
    let line = usize::try_from(line).ok()?.checked_sub(1)?;
    let col = usize::try_from(col).ok()?.checked_sub(1)?;
    let mut start = 0;
    for _ in 0..line {
        start += source[start..].find('\n')? + 1;
    }
    let text = &source[start..];
    let text = &text[..text.find('\n').unwrap_or(text.len())];
    let (index, _) = text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
        .nth(col)?;
    Some(start + index)
}

/// An evaluation error in words an installer can act on.
fn execution_error(error: &ExecutionError, bindings: &Bindings<'_>) -> String {
    match error {
        ExecutionError::UndeclaredReference(name) => {
            match bindings
                .unusable
                .iter()
                .find(|(field, _)| *field == name.as_str())
            {
                Some((_, why)) => format!("field `{name}` {why}"),
                None => format!("no field or function `{name}` in this reading"),
            }
        }
        ExecutionError::NoSuchKey(key) => format!("no key `{key}`"),
        ExecutionError::UnsupportedBinaryOperator(op, lhs, rhs) => {
            let symbol = match *op {
                "add" => "+",
                "sub" => "-",
                "mul" => "*",
                "div" => "/",
                "rem" => "%",
                other => other,
            };
            let (lhs, rhs) = (type_name(lhs), type_name(rhs));
            let numbers = ["double", "int", "uint"];
            if *op == "rem" && (lhs == "double" || rhs == "double") {
                "`%` works on ints only, and fields are doubles: convert with `int(...)`, \
                 e.g. `int(count) % 2 == 0`"
                    .to_owned()
            } else if numbers.contains(&lhs) && numbers.contains(&rhs) {
                format!(
                    "`{symbol}` cannot mix a {lhs} and an {rhs}; fields are doubles, so write \
                     numbers next to them with a decimal point (`1.0`), or convert with \
                     `int(...)` or `double(...)`"
                )
                .replace("an double", "a double")
                .replace("an uint", "a uint")
            } else {
                format!("`{symbol}` cannot be applied to a {lhs} and a {rhs}")
            }
        }
        other => other.to_string(),
    }
}

/// The CEL name of a value's type.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Int(_) => "int",
        Value::UInt(_) => "uint",
        Value::Float(_) => "double",
        Value::String(_) => "string",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        Value::List(_) => "list",
        Value::Map(_) => "map",
        Value::Bytes(_) => "bytes",
        _ => "value",
    }
}

/// A short description of a value for an error message.
fn describe(value: &Value) -> String {
    match value {
        Value::Int(i) => format!("the int {i}"),
        Value::UInt(u) => format!("the uint {u}"),
        Value::Float(f) => format!("the double {f}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if short.len() < s.len() { "..." } else { "" };
            format!("the string {short:?}{more}")
        }
        Value::Null => "null".to_owned(),
        Value::List(_) => "a list".to_owned(),
        Value::Map(_) => "a map".to_owned(),
        Value::Bytes(_) => "bytes".to_owned(),
        _ => "a value that is not a bool".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    /// The key test expressions are written under.
    const W: &str = "when";

    fn eval_with(expr: &str, fields: serde_json::Value, device: &str) -> Result<bool, String> {
        let env = new_env();
        let condition = Condition::compile(&env, W, expr).map_err(|e| e.message)?;
        let serde_json::Value::Object(fields) = fields else {
            return Err("fields must be an object".into());
        };
        let reading = crate::Reading {
            source: "local",
            device,
            time: Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
            fields: &fields,
        };
        let bindings = Bindings::new(&env, &reading);
        condition.evaluate(&bindings)
    }

    fn eval(expr: &str, fields: serde_json::Value) -> Result<bool, String> {
        eval_with(expr, fields, "dev-1")
    }

    /// `condition` on `fields` through the interpreter, never the threshold's
    /// direct answer.
    fn interpret(
        env: &Arc<Env>,
        condition: &Condition,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<bool, String> {
        let reading = crate::Reading {
            source: "local",
            device: "dev-1",
            time: Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
            fields,
        };
        condition.evaluate(&Bindings::new(env, &reading))
    }

    fn fields_of(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match value {
            serde_json::Value::Object(fields) => fields,
            other => panic!("fields must be an object, not {other}"),
        }
    }

    #[test]
    fn a_threshold_is_answered_from_its_field_exactly_as_the_interpreter_answers() {
        let env = new_env();
        let values = [
            json!(0),
            json!(-0.0),
            json!(30),
            json!(30.0),
            json!(30.5),
            json!(29.999999999999996),
            json!(-1),
            json!(1e308),
            json!(-1e308),
            json!(5e-324),
            json!(9007199254740993u64),
            json!(18446744073709551615u64),
            json!(-9223372036854775807i64),
        ];
        let literals = [
            "30",
            "30.0",
            "30.5",
            "-1",
            "0",
            "-0.0",
            "30u",
            "0u",
            "9007199254740993",
            "18446744073709551615u",
            "-9223372036854775807",
            "1e308",
        ];
        let mut answered = 0;
        let mut asked = 0;
        for literal in literals {
            for op in ["<", "<=", ">", ">="] {
                for expr in [
                    format!("temperature {op} {literal}"),
                    format!("{literal} {op} temperature"),
                ] {
                    let condition = Condition::compile(&env, W, &expr).expect("compiles");
                    for value in &values {
                        let fields = fields_of(json!({ "temperature": value }));
                        let interpreted = interpret(&env, &condition, &fields);
                        asked += 1;
                        match condition.threshold(&fields) {
                            Some(answer) => {
                                answered += 1;
                                assert_eq!(interpreted, Ok(answer), "`{expr}` with {value}");
                            }
                            None => assert!(
                                interpreted.is_err(),
                                "`{expr}` with {value} left to the interpreter: {interpreted:?}"
                            ),
                        }
                    }
                }
            }
        }
        // Numbers always order against numbers: every one was answered directly.
        assert_eq!(answered, asked);
    }

    #[test]
    fn a_threshold_on_a_field_named_like_a_cel_type_or_function_reads_the_field() {
        let env = new_env();
        let names = [
            "int",
            "uint",
            "double",
            "bool",
            "string",
            "bytes",
            "list",
            "map",
            "type",
            "null_type",
            "dyn",
            "has",
            "size",
            "device",
            "source",
        ];
        for name in names {
            let expr = format!("{name} > 5");
            let condition = Condition::compile(&env, W, &expr).expect("compiles");
            for value in [4, 6] {
                let fields = fields_of(json!({ name: value }));
                let interpreted = interpret(&env, &condition, &fields);
                assert_eq!(interpreted, Ok(value > 5), "`{expr}` with {value}");
                assert_eq!(condition.threshold(&fields), Some(value > 5), "`{expr}`");
            }
        }
    }

    #[test]
    fn a_threshold_on_a_missing_or_non_number_field_is_left_to_the_interpreter() {
        let env = new_env();
        let condition = Condition::compile(&env, W, "temperature > 30").expect("compiles");
        for fields in [
            json!({}),
            json!({ "humidity": 31 }),
            json!({ "temperature": "31" }),
            json!({ "temperature": null }),
            json!({ "temperature": true }),
            json!({ "temperature": [31] }),
            json!({ "temperature": { "value": 31 } }),
        ] {
            assert_eq!(
                condition.threshold(&fields_of(fields.clone())),
                None,
                "{fields}"
            );
        }
    }

    #[test]
    fn only_a_field_compared_with_a_number_by_an_ordering_is_a_threshold() {
        let env = new_env();
        let fields = fields_of(json!({ "temperature": 31, "humidity": 20, "a": { "b": 1 } }));
        for expr in [
            "temperature > humidity",
            "temperature + 1.0 > 2.0",
            "temperature > 30 && humidity < 50",
            "temperature == 31",
            "temperature != 30",
            "a.b > 0",
            "double(temperature) > 30",
            "30 < 40",
        ] {
            let condition = Condition::compile(&env, W, expr).expect("compiles");
            assert_eq!(condition.threshold(&fields), None, "`{expr}`");
        }
    }

    #[test]
    fn an_int_reading_compares_with_an_int_literal() {
        assert_eq!(
            eval("temperature > 30", json!({"temperature": 31})),
            Ok(true)
        );
        assert_eq!(
            eval("temperature > 30", json!({"temperature": 30})),
            Ok(false)
        );
    }

    #[test]
    fn a_float_reading_compares_with_an_int_literal() {
        assert_eq!(
            eval("temperature > 30", json!({"temperature": 31.5})),
            Ok(true)
        );
        assert_eq!(
            eval("temperature > 30", json!({"temperature": 29.5})),
            Ok(false)
        );
    }

    #[test]
    fn an_int_reading_compares_with_a_float_literal() {
        assert_eq!(
            eval("temperature > 30.5", json!({"temperature": 31})),
            Ok(true)
        );
        assert_eq!(
            eval("temperature > 30.5", json!({"temperature": 30})),
            Ok(false)
        );
    }

    #[test]
    fn a_float_reading_compares_with_a_float_literal() {
        assert_eq!(
            eval("temperature > 30.5", json!({"temperature": 31.5})),
            Ok(true)
        );
        assert_eq!(
            eval("temperature > 30.5", json!({"temperature": 30.5})),
            Ok(false)
        );
    }

    #[test]
    fn every_comparison_operator_mixes_ints_and_floats() {
        let fields = json!({"t": 31});
        for expr in [
            "t == 31",
            "t == 31.0",
            "t != 30",
            "t >= 31",
            "t <= 31.0",
            "t < 31.5",
            "31 < t + 0.5",
            "t in [30, 31]",
            "-15 < t",
            "t > 30u",
        ] {
            assert_eq!(eval(expr, fields.clone()), Ok(true), "{expr}");
        }
    }

    #[test]
    fn negative_thresholds_work_for_freezers() {
        assert_eq!(
            eval("temperature > -15", json!({"temperature": -14})),
            Ok(true)
        );
        assert_eq!(
            eval("temperature > -15", json!({"temperature": -15.5})),
            Ok(false)
        );
    }

    #[test]
    fn arithmetic_with_a_float_literal_works_for_int_and_float_readings() {
        assert_eq!(eval("t * 1.8 + 32.0 > 87", json!({"t": 31})), Ok(true));
        assert_eq!(eval("t * 1.8 + 32.0 > 87", json!({"t": 31.5})), Ok(true));
    }

    #[test]
    fn arithmetic_between_fields_works_whatever_the_device_sends() {
        assert_eq!(
            eval("t - setpoint > 2", json!({"t": 31, "setpoint": 28.5})),
            Ok(true)
        );
        assert_eq!(
            eval("t - setpoint > 2", json!({"t": 31.5, "setpoint": 28})),
            Ok(true)
        );
    }

    #[test]
    fn arithmetic_with_an_int_literal_fails_for_every_reading_alike() {
        let mixed = "`+` cannot mix a double and an int; fields are doubles, so write numbers \
                     next to them with a decimal point (`1.0`), or convert with `int(...)` or \
                     `double(...)`";
        assert_eq!(eval("t + 1 > 30", json!({"t": 31})), Err(mixed.into()));
        assert_eq!(eval("t + 1 > 30", json!({"t": 31.5})), Err(mixed.into()));
        assert_eq!(eval("int(t) + 1 > 30", json!({"t": 31})), Ok(true));
    }

    #[test]
    fn nested_objects_are_maps() {
        let fields = json!({"bp": {"systolic": 150, "diastolic": 80}});
        assert_eq!(eval("bp.systolic > 140", fields.clone()), Ok(true));
        assert_eq!(eval("bp['diastolic'] > 90", fields.clone()), Ok(false));
        assert_eq!(eval("has(bp.pulse)", fields), Ok(false));
    }

    #[test]
    fn strings_bools_lists_and_null_are_visible() {
        let fields = json!({"door": "open", "alarm": true, "zones": [1, 2.5], "note": null});
        assert_eq!(eval("door == 'open'", fields.clone()), Ok(true));
        assert_eq!(eval("alarm", fields.clone()), Ok(true));
        assert_eq!(
            eval("alarm == true && size(zones) == 2", fields.clone()),
            Ok(true)
        );
        assert_eq!(eval("zones.exists(z, z > 2)", fields.clone()), Ok(true));
        assert_eq!(eval("note == null", fields.clone()), Ok(true));
        assert_eq!(eval("door.startsWith('op')", fields), Ok(true));
    }

    #[test]
    fn device_and_source_are_variables_unless_a_field_has_that_name() {
        assert_eq!(eval_with("device == 'fz-1'", json!({}), "fz-1"), Ok(true));
        assert_eq!(eval("source == 'local'", json!({})), Ok(true));
        assert_eq!(
            eval_with(
                "device == 'from-field'",
                json!({"device": "from-field"}),
                "fz-1"
            ),
            Ok(true)
        );
    }

    #[test]
    fn a_missing_field_is_an_error_not_a_panic() {
        let err = eval("humidity > 80", json!({"temperature": 1})).unwrap_err();
        assert_eq!(err, "no field or function `humidity` in this reading");
        let err = eval("bp.pulse > 80", json!({"bp": {}})).unwrap_err();
        assert_eq!(err, "no key `pulse`");
    }

    #[test]
    fn a_wrong_type_is_an_error_not_a_panic() {
        assert_eq!(
            eval("door > 3", json!({"door": "open"})),
            Err("found no matching overload for '_>_' applied to '(string, int)'".into())
        );
    }

    #[test]
    fn mixing_number_types_in_arithmetic_says_how_to_fix_it() {
        let err = eval("t + 1 > 30", json!({"t": 31})).unwrap_err();
        assert_eq!(
            err,
            "`+` cannot mix a double and an int; fields are doubles, so write numbers next \
             to them with a decimal point (`1.0`), or convert with `int(...)` or `double(...)`"
        );
        let err = eval("2u * t > 30", json!({"t": 31})).unwrap_err();
        assert!(
            err.starts_with("`*` cannot mix a uint and a double;"),
            "{err}"
        );
        let err = eval("count % 2 == 1", json!({"count": 7})).unwrap_err();
        assert!(err.starts_with("`%` works on ints only"), "{err}");
        assert_eq!(eval("int(count) % 2 == 1", json!({"count": 7})), Ok(true));
        let err = eval("s - 1.0 > 0", json!({"s": "x"})).unwrap_err();
        assert_eq!(err, "`-` cannot be applied to a string and a double");
    }

    #[test]
    fn a_non_bool_result_is_an_error() {
        let err = eval("temperature + 1.0", json!({"temperature": 1})).unwrap_err();
        assert_eq!(err, "`when` must give true or false, but gave the double 2");
        let err = eval("door", json!({"door": "x"})).unwrap_err();
        assert_eq!(
            err,
            "`when` must give true or false, but gave the string \"x\""
        );
    }

    #[test]
    fn literals_that_give_away_a_mistake_are_refused_when_compiling() {
        let message = |expr: &str| {
            Condition::compile(&new_env(), W, expr)
                .err()
                .map(|e| e.message)
        };
        assert_eq!(
            message("'x'").as_deref(),
            Some("`when` is a string, not a condition: it must give true or false")
        );
        assert_eq!(
            message("t > 1 && 'open' > 3").as_deref(),
            Some(
                "`when` compares a string with a number using `>`, which is an error on every \
                 reading"
            )
        );
        assert_eq!(
            message("'1' == 1").as_deref(),
            Some("`when` compares a string with a number using `==`, which is never true")
        );
        // Fields are only known per reading; numbers of any type compare; null
        // equality is a test; `false` is a valid (if idle) condition.
        for fine in [
            "door > 3",
            "1 < 2.5",
            "2u == 2",
            "x == null",
            "false",
            "t > -15",
        ] {
            assert_eq!(message(fine), None, "{fine}");
        }
    }

    #[test]
    fn canonical_text_ignores_layout_and_comments_but_not_strings() {
        assert_eq!(canonical("a > 1"), canonical("a>1"));
        assert_eq!(
            canonical("  a > 1 &&\n  // why\n  b in [1, 2]"),
            "a>1&&b in[1,2]"
        );
        assert_eq!(canonical("s == 'a  b'"), "s=='a  b'");
        assert_ne!(canonical("s == 'a  b'"), canonical("s == 'a b'"));
        assert_ne!(canonical("a > 1"), canonical("a > 2"));
    }

    #[test]
    fn a_field_nested_too_deeply_is_left_out_with_a_clear_error() {
        let mut deep = json!(1);
        for _ in 0..MAX_VALUE_DEPTH {
            deep = json!({ "a": deep });
        }
        let err = eval("deep.a == 1", json!({ "deep": deep, "t": 1 })).unwrap_err();
        assert_eq!(err, "field `deep` nests more than 32 levels deep");
        assert_eq!(
            eval("t == 1", json!({ "deep": deep })),
            Err("no field or function `t` in this reading".into())
        );
        assert_eq!(eval("t == 1", json!({ "deep": deep, "t": 1 })), Ok(true));
    }

    #[test]
    fn a_too_long_expression_is_refused() {
        let expr = format!("t > 1{}", " ".repeat(MAX_EXPRESSION_LEN));
        let err = Condition::compile(&new_env(), W, &expr).unwrap_err();
        assert_eq!(err.offset, None);
        assert_eq!(err.message, "`when` is 1029 bytes long; the limit is 1024");
    }

    #[test]
    fn an_empty_expression_is_refused() {
        let err = Condition::compile(&new_env(), W, "  ").unwrap_err();
        assert_eq!(err.message, "`when` is empty");
    }

    #[test]
    fn a_syntax_error_points_into_the_expression() {
        let err = Condition::compile(&new_env(), W, "a >").unwrap_err();
        assert_eq!(err.offset, Some(3));
        assert!(err
            .message
            .starts_with("syntax error in `when`: mismatched input '<EOF>'"));
        let err = Condition::compile(&new_env(), W, "a > 1 &&\n  ? b").unwrap_err();
        assert_eq!(err.offset, Some(11));
    }

    #[test]
    fn syntax_error_columns_count_characters() {
        let err = Condition::compile(&new_env(), W, "s == 'é' ? b").unwrap_err();
        assert_eq!(err.offset, Some("s == 'é' ? b".len()));
    }

    #[test]
    fn brackets_in_strings_and_comments_do_not_count_as_nesting() {
        let brackets = "(".repeat(MAX_NESTING + 1);
        for expr in [
            format!("s == '{brackets}'"),
            format!("s == \"{brackets}\""),
            format!("s == r'\\{brackets}'"),
            format!("s == '''{brackets}'''"),
            format!("s == 'it\\'s {brackets}'"),
            format!("s == '' // {brackets}\n"),
        ] {
            assert!(Condition::compile(&new_env(), W, &expr).is_ok(), "{expr}");
        }
    }

    #[test]
    fn brackets_nested_too_deeply_are_refused_at_the_first_bracket_too_deep() {
        let expr = format!("{}t{}", "(".repeat(500), ")".repeat(500));
        let err = Condition::compile(&new_env(), W, &expr).unwrap_err();
        assert_eq!(err.offset, Some(MAX_NESTING));
        assert_eq!(
            err.message,
            "brackets nest too deeply; the limit is 32 levels"
        );
    }

    type Shape = fn(usize) -> String;

    /// Expressions of every shape that makes the parser or the interpreter recurse,
    /// `k` levels deep.
    fn shapes() -> Vec<(&'static str, Shape)> {
        vec![
            ("parens", |k| format!("{}t{}", "(".repeat(k), ")".repeat(k))),
            ("lists", |k| {
                format!("{}1{} == [1]", "[".repeat(k), "]".repeat(k))
            }),
            ("maps", |k| {
                format!("size({}1{}) == 1", "{1:".repeat(k), "}".repeat(k))
            }),
            ("negations", |k| {
                format!("{}t{}", "!(".repeat(k), ")".repeat(k))
            }),
            ("minus", |k| {
                format!("{}1.0{} < 0", "-(".repeat(k), ")".repeat(k))
            }),
            ("calls", |k| {
                format!("{}1{} == 1", "int(".repeat(k), ")".repeat(k))
            }),
            ("sizes", |k| {
                format!("{}1{} > 0", "size([".repeat(k), "])".repeat(k))
            }),
            ("sums", |k| format!("{}1.0 > 0", "1.0 + ".repeat(k))),
            ("ands", |k| {
                format!("{}t{}", "t && (".repeat(k), ")".repeat(k))
            }),
            ("ternaries", |k| format!("{}t", "t ? t : ".repeat(k))),
            ("selects", |k| format!("m{} == 1", ".a".repeat(k))),
            ("indexes", |k| format!("m{} == 1", "['a']".repeat(k))),
            ("comprehensions", |k| {
                format!("{}true{}", "[1].all(x, ".repeat(k), ")".repeat(k))
            }),
        ]
    }

    #[test]
    fn the_deepest_expressions_allowed_compile_and_evaluate_on_a_2_mib_stack() {
        let env = new_env();
        // For each shape, the deepest expression that compiles, compiled on a
        // thread with the stack `RuleSet::compile` uses.
        let compiled = std::thread::Builder::new()
            .stack_size(COMPILE_STACK_SIZE)
            .spawn({
                let env = Arc::clone(&env);
                move || {
                    let mut deepest = Vec::new();
                    for (name, shape) in shapes() {
                        let (mut ok, mut too_deep) = (0, MAX_EXPRESSION_LEN);
                        let mut best = None;
                        while too_deep - ok > 1 {
                            let k = (ok + too_deep) / 2;
                            match Condition::compile(&env, W, &shape(k)) {
                                Ok(condition) => (ok, best) = (k, Some(condition)),
                                Err(_) => too_deep = k,
                            }
                        }
                        deepest.push((name, ok, best));
                    }
                    deepest
                }
            })
            .map(|thread| thread.join());
        let Ok(Ok(compiled)) = compiled else {
            panic!("the compiling thread failed");
        };
        for (name, k, _) in &compiled {
            // Deep enough to matter, and stopped by a limit well before the length cap.
            assert!(
                (6..=MAX_NESTING.max(MAX_DEPTH)).contains(k),
                "{name}: {k} levels"
            );
        }
        // Evaluate on tokio's default worker stack size.
        let evaluated = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let mut m = json!(1);
                for _ in 0..MAX_VALUE_DEPTH - 1 {
                    m = json!({ "a": m });
                }
                let fields = json!({"t": true, "m": m});
                let serde_json::Value::Object(fields) = fields else {
                    return Vec::new();
                };
                let reading = crate::Reading {
                    source: "s",
                    device: "d",
                    time: Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
                    fields: &fields,
                };
                let bindings = Bindings::new(&env, &reading);
                compiled
                    .into_iter()
                    .map(|(name, _, condition)| (name, condition.map(|c| c.evaluate(&bindings))))
                    .collect::<Vec<_>>()
            })
            .map(|thread| thread.join());
        let Ok(Ok(evaluated)) = evaluated else {
            panic!("the evaluating thread failed");
        };
        assert_eq!(evaluated.len(), shapes().len());
        for (name, result) in evaluated {
            assert!(matches!(result, Some(Ok(_))), "{name}: {result:?}");
        }
    }

    #[test]
    fn comparing_the_deepest_values_allowed_fits_on_a_2_mib_stack() {
        let result = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                // A map holding a list holding a map ..., `MAX_VALUE_DEPTH` levels.
                let mut m = json!(1);
                for _ in 0..(MAX_VALUE_DEPTH - 2) / 2 {
                    m = json!({ "a": [m] });
                }
                let m = json!({ "b": m });
                eval("m == n && size(m) == 1", json!({ "m": m, "n": m }))
            })
            .map(|thread| thread.join());
        assert!(matches!(result, Ok(Ok(Ok(true)))), "{result:?}");
    }

    #[test]
    fn depth_counts_the_levels_of_the_syntax_tree_as_documented() {
        let env = new_env();
        let depth = |expr: &str| {
            let program = env.compile(expr).ok()?;
            (1..100).find(|&limit| !deeper_than(program.expression(), limit))
        };
        assert_eq!(depth("t"), Some(1));
        assert_eq!(depth("a > 1 && b < 2 || c == 3"), Some(4));
        assert_eq!(depth("a + b + c + d > 0.0"), Some(5));
        assert_eq!(depth("((((t))))"), Some(1));
        // `&&` chains are balanced: 8 terms, 3 levels of `&&`, then `>` and `a`.
        assert_eq!(
            depth("a>1 && a>1 && a>1 && a>1 && a>1 && a>1 && a>1 && a>1"),
            Some(5)
        );
    }

    #[test]
    fn a_syntax_tree_deeper_than_the_limit_is_refused() {
        let expr = format!("{}1.0 > 0", "1.0 + ".repeat(MAX_DEPTH));
        let err = Condition::compile(&new_env(), W, &expr).unwrap_err();
        assert_eq!(
            err.message,
            "`when` is nested too deeply (its syntax tree is more than 24 levels deep); \
             simplify it"
        );
    }

    #[test]
    fn the_longest_nastiest_expressions_are_refused_or_evaluate() {
        // At the length cap, nothing the parser is given crashes it (on the compile
        // stack) and every one is either refused by a limit or shallow enough to
        // evaluate on a 2 MiB stack.
        let env = new_env();
        let compiled = std::thread::Builder::new()
            .stack_size(COMPILE_STACK_SIZE)
            .spawn({
                let env = Arc::clone(&env);
                move || {
                    let n = MAX_EXPRESSION_LEN;
                    let exprs = [
                        format!("{}t{}", "(".repeat(n / 2 - 1), ")".repeat(n / 2 - 1)),
                        format!("{}1{}", "[".repeat(n / 2 - 1), "]".repeat(n / 2 - 1)),
                        format!("{}true", "!".repeat(n - 4)),
                        format!("{}1", "-".repeat(n - 1)),
                        "1+".repeat(n / 2 - 1) + "1",
                        "t?t:".repeat(n / 4 - 1) + "t",
                        "m".to_string() + &".a".repeat(n / 2 - 1),
                        "t&&".repeat(n / 3 - 1) + "t",
                    ];
                    exprs
                        .iter()
                        .map(|expr| Condition::compile(&env, W, expr))
                        .collect::<Vec<_>>()
                }
            })
            .map(|thread| thread.join());
        let Ok(Ok(compiled)) = compiled else {
            panic!("the compiling thread failed");
        };
        let evaluated = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let fields = serde_json::Map::from_iter([("t".to_owned(), json!(true))]);
                let reading = crate::Reading {
                    source: "s",
                    device: "d",
                    time: Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
                    fields: &fields,
                };
                let bindings = Bindings::new(&env, &reading);
                compiled
                    .into_iter()
                    .map(|c| c.map(|c| c.evaluate(&bindings)))
                    .collect::<Vec<_>>()
            })
            .map(|thread| thread.join());
        let Ok(Ok(results)) = evaluated else {
            panic!("the evaluating thread failed");
        };
        let brackets = || {
            Err(ExprError::at(
                MAX_NESTING,
                "brackets nest too deeply; the limit is 32 levels",
            ))
        };
        let deep = || Err(ExprError::whole(too_deep_message(W)));
        assert_eq!(
            results,
            [
                brackets(),
                brackets(),
                Ok(Ok(true)),
                Ok(Err(
                    "`when` must give true or false, but gave the int -1".into()
                )),
                deep(),
                deep(),
                deep(),
                Ok(Ok(true)),
            ]
        );
    }
}
