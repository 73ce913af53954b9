//! CEL expressions (SPEC §4): compiled once when an artifact set loads, evaluated per command
//! against `state`, `next`, `command`, `event`, `principal` and `now`. A syntax error is a load
//! error; a run-time failure (a missing field, a type mismatch) is a clear refusal of the
//! command, never a crash.
//!
//! Evaluation cost is bounded (SPEC §8.3), with limits a deployment sets ([`ExprLimits`]):
//! - at load, the source length and the number of nodes of the compiled expression (macros
//!   such as `all` and `map` expanded);
//! - before each evaluation, an estimate of its cost and of the largest value it could build,
//!   computed from the expression and the sizes of the actual inputs (CEL has no loops or
//!   recursion: only comprehensions iterate, at most once per element of their range, and only
//!   `+` grows a value). An expression over its limits is refused (422) without running;
//! - after each evaluation, the size of the value it produced.

use std::cell::OnceCell;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{CallExpr, ComprehensionExpr, EntryExpr, Expr as Ast, LiteralValue};
use cel::parser::Expression;
use cel::{Context, Env, Program};
use serde_json::Value;

use crate::error::{DomainError, LimitKind};

pub use crate::limits::EXPR_LEN_MAX;

/// Limits on expressions (SPEC §8.3 "expression evaluation cost"); the server reads them from
/// `EXPR_BYTES_MAX`, `EXPR_NODES_MAX`, `EXPR_COST_MAX` and `EXPR_VALUE_BYTES_MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExprLimits {
    /// Longest source, in bytes (load).
    pub source_bytes_max: usize,
    /// Most nodes in the compiled expression, macros expanded (load).
    pub nodes_max: usize,
    /// Largest estimated cost of one evaluation, in steps (about one per node visited, plus
    /// one per byte copied or compared), checked before it runs.
    pub cost_max: u64,
    /// Largest value (serialized JSON bytes) one evaluation may build: estimated before it
    /// runs, and measured on its result.
    pub value_bytes_max: u64,
}

impl Default for ExprLimits {
    fn default() -> Self {
        Self { source_bytes_max: EXPR_LEN_MAX, nodes_max: 512, cost_max: 1_000_000, value_bytes_max: 1024 * 1024 }
    }
}

/// Why an evaluation gave no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExprError {
    /// It failed (a missing field, a type mismatch…): the message says how.
    Failed(String),
    /// It would cost, or did build, more than its limits allow.
    Limit {
        /// [`LimitKind::ExpressionCost`] or [`LimitKind::ExpressionValue`].
        kind: LimitKind,
        /// The limit.
        limit: u64,
        /// The estimate or measure.
        actual: u64,
        /// A sentence for a person.
        message: String,
    },
}

impl std::fmt::Display for ExprError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExprError::Failed(m) | ExprError::Limit { message: m, .. } => f.write_str(m),
        }
    }
}

impl From<ExprError> for DomainError {
    fn from(e: ExprError) -> Self {
        match e {
            ExprError::Failed(message) => DomainError::ExpressionFailed { message },
            ExprError::Limit { kind, limit, actual, message } => {
                DomainError::LimitExceeded { kind, limit, actual, message }
            }
        }
    }
}

/// The variables an expression may read; absent ones are bound to null.
#[derive(Clone, Debug, Default)]
pub struct Bindings<'a> {
    /// The aggregate before the command (null when it does not exist).
    pub state: Option<&'a Value>,
    /// The aggregate after the command.
    pub next: Option<&'a Value>,
    /// The command envelope, with `body`.
    pub command: Option<&'a Value>,
    /// The event being processed (process managers).
    pub event: Option<&'a Value>,
    /// Who sent the command.
    pub principal: Option<&'a Value>,
    /// The aggregate right after the event being processed (process managers).
    pub document: Option<&'a Value>,
    /// The process instance's key, as a JSON string (process managers).
    pub key: Option<&'a Value>,
    /// The process instance, `{"state", "startedAt", "data"}` (process managers).
    pub instance: Option<&'a Value>,
    /// The command's time, RFC 3339.
    pub now: Option<&'a str>,
    /// The inputs' measures, taken once for all the expressions evaluated with these bindings.
    pub sizes: OnceCell<[Stats; ROOTS.len()]>,
}

/// A compiled expression.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<Program>,
    limits: ExprLimits,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

fn env() -> Arc<Env> {
    // Building the standard library is costly (tens of µs): once per process.
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// The variables every expression sees; `now` last (it is bound as a string, not a value).
pub const ROOTS: [&str; 9] = ["state", "next", "command", "event", "principal", "document", "key", "instance", "now"];

impl Expr {
    /// Compiles `source` with the default limits; the error is a message for a person.
    pub fn compile(source: &str) -> Result<Expr, String> {
        Expr::compile_with(source, &ExprLimits::default())
    }

    /// Compiles `source` under `limits` (kept for its evaluations).
    pub fn compile_with(source: &str, limits: &ExprLimits) -> Result<Expr, String> {
        if source.trim().is_empty() {
            return Err("the expression is empty".to_owned());
        }
        if source.len() > limits.source_bytes_max {
            return Err(format!(
                "the expression is {} bytes, over the limit of {} (EXPR_BYTES_MAX)",
                source.len(),
                limits.source_bytes_max
            ));
        }
        let program = env().compile(source).map_err(|e| {
            // The parser's message repeats the source with a caret on later lines: keep one line.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim().trim_start_matches("ERROR: <input>:");
            format!("CEL syntax error at {first}")
        })?;
        let nodes = count_nodes(program.expression());
        if nodes > limits.nodes_max {
            return Err(format!(
                "the expression has {nodes} nodes (macros expanded), over the limit of {} (EXPR_NODES_MAX)",
                limits.nodes_max
            ));
        }
        Ok(Expr { source: source.into(), program: Arc::new(program), limits: *limits })
    }

    /// The variables the expression reads (identifiers not bound by one of its own
    /// comprehensions), so a loader can refuse names its expressions will never be given.
    pub fn free_variables(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        free_variables(self.program.expression(), &mut Vec::new(), &mut out);
        out
    }

    /// The expression's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The estimated cost (steps) and largest value (bytes) of evaluating over `b`.
    pub fn estimate(&self, b: &Bindings<'_>) -> (u64, u64) {
        let roots = [b.state, b.next, b.command, b.event, b.principal, b.document, b.key, b.instance];
        let stats = b.sizes.get_or_init(|| {
            let mut out = [Stats::SCALAR; ROOTS.len()];
            for (o, v) in out.iter_mut().zip(roots) {
                *o = v.map_or(Stats::SCALAR, Stats::of);
            }
            let now = b.now.map_or(0, str::len) as f64;
            out[ROOTS.len() - 1] = Stats { size: now + 2.0, len: now, elem: 0.0 };
            out
        });
        let mut scope: Vec<(&str, Est<'_>)> = Vec::with_capacity(ROOTS.len() + 4);
        for (i, name) in ROOTS.iter().enumerate() {
            let exact = roots.get(i).copied().flatten();
            scope.push((name, Est { stats: stats[i], peak: 0.0, exact }));
        }
        let mut cost = 0.0;
        let est = estimate(self.program.expression(), &mut scope, &mut cost, None);
        (saturate(cost), saturate(est.size().max(est.peak)))
    }

    /// Evaluates to a JSON value, within the limits.
    pub fn eval(&self, b: &Bindings<'_>) -> Result<Value, ExprError> {
        let (cost, size) = self.estimate(b);
        if cost > self.limits.cost_max {
            return Err(ExprError::Limit {
                kind: LimitKind::ExpressionCost,
                limit: self.limits.cost_max,
                actual: cost,
                message: format!(
                    "`{}` would cost about {cost} steps on this input, over the limit of {} (EXPR_COST_MAX)",
                    self.source, self.limits.cost_max
                ),
            });
        }
        if size > self.limits.value_bytes_max {
            return Err(self.too_large(size, "could build a value of about"));
        }
        let mut ctx = Context::with_env(env());
        let null = Value::Null;
        let bind = |ctx: &mut Context<'_, '_>, name: &str, v: Option<&Value>| {
            ctx.add_variable(name, v.unwrap_or(&null).clone())
                .map_err(|e| ExprError::Failed(format!("cannot bind {name}: {e}")))
        };
        bind(&mut ctx, "state", b.state)?;
        bind(&mut ctx, "next", b.next)?;
        bind(&mut ctx, "command", b.command)?;
        bind(&mut ctx, "event", b.event)?;
        bind(&mut ctx, "principal", b.principal)?;
        bind(&mut ctx, "document", b.document)?;
        bind(&mut ctx, "key", b.key)?;
        bind(&mut ctx, "instance", b.instance)?;
        ctx.add_variable("now", b.now.unwrap_or("")).map_err(|e| ExprError::Failed(format!("cannot bind now: {e}")))?;
        let out =
            self.program.execute(&ctx).map_err(|e| ExprError::Failed(format!("`{}` failed: {e}", self.source)))?;
        let value = out
            .json()
            .map_err(|e| ExprError::Failed(format!("`{}` gave a value that is not JSON: {e}", self.source)))?;
        let actual = crate::limits::serialized_len(&value) as u64;
        if actual > self.limits.value_bytes_max {
            return Err(self.too_large(actual, "built a value of"));
        }
        Ok(value)
    }

    fn too_large(&self, size: u64, what: &str) -> ExprError {
        ExprError::Limit {
            kind: LimitKind::ExpressionValue,
            limit: self.limits.value_bytes_max,
            actual: size,
            message: format!(
                "`{}` {what} {size} bytes on this input, over the limit of {} (EXPR_VALUE_BYTES_MAX)",
                self.source, self.limits.value_bytes_max
            ),
        }
    }

    /// Evaluates to a boolean; any other result is an error.
    pub fn eval_bool(&self, b: &Bindings<'_>) -> Result<bool, ExprError> {
        match self.eval(b)? {
            Value::Bool(x) => Ok(x),
            other => Err(ExprError::Failed(format!("`{}` must give true or false, not {other}", self.source))),
        }
    }
}

/// Adds to `out` the identifiers of `e` that none of `bound` (the comprehension variables in
/// scope) names.
fn free_variables<'e>(e: &'e Expression, bound: &mut Vec<&'e str>, out: &mut std::collections::BTreeSet<String>) {
    match &e.expr {
        Ast::Ident(name) if !name.starts_with('@') && !bound.contains(&name.as_str()) => {
            out.insert(name.clone());
        }
        Ast::Call(c) => {
            for x in c.target.iter().map(|t| &**t).chain(&c.args) {
                free_variables(x, bound, out);
            }
        }
        Ast::Comprehension(c) => {
            free_variables(&c.iter_range, bound, out);
            free_variables(&c.accu_init, bound, out);
            let depth = bound.len();
            bound.extend([c.iter_var.as_str(), c.accu_var.as_str()]);
            bound.extend(c.iter_var2.as_deref());
            for x in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(x, bound, out);
            }
            bound.truncate(depth);
        }
        Ast::List(l) => l.elements.iter().for_each(|x| free_variables(x, bound, out)),
        Ast::Map(m) => m.entries.iter().flat_map(entry_exprs).for_each(|x| free_variables(x, bound, out)),
        Ast::Struct(s) => s.entries.iter().flat_map(entry_exprs).for_each(|x| free_variables(x, bound, out)),
        Ast::Select(s) => free_variables(&s.operand, bound, out),
        Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => {}
    }
}

fn saturate(x: f64) -> u64 {
    if x.is_finite() && x < u64::MAX as f64 { x.ceil() as u64 } else { u64::MAX }
}

fn count_nodes(e: &Expression) -> usize {
    let mut n = 0;
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        n += 1;
        match &e.expr {
            Ast::Call(c) => {
                stack.extend(c.target.as_deref());
                stack.extend(&c.args);
            }
            Ast::Comprehension(c) => {
                stack.extend([&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result]);
            }
            Ast::List(l) => stack.extend(&l.elements),
            Ast::Map(m) => stack.extend(m.entries.iter().flat_map(entry_exprs)),
            Ast::Struct(s) => stack.extend(s.entries.iter().flat_map(entry_exprs)),
            Ast::Select(s) => stack.push(&s.operand),
            Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => {}
        }
    }
    n
}

/// `out`, a literal list, map or message, grown by the estimates of its parts: their sizes
/// add up, its largest element is the largest part, and (for lists and maps, `nested`) its
/// longest inner collection is the longest of theirs.
fn holding<'v>(mut out: Est<'v>, parts: impl Iterator<Item = Est<'v>>, nested: bool) -> Est<'v> {
    for v in parts {
        out.stats.size += v.size();
        if nested {
            out.stats.len = out.stats.len.max(v.stats.len);
        }
        out.stats.elem = out.stats.elem.max(v.size()).max(v.stats.elem);
        out.peak = out.peak.max(v.peak);
    }
    out
}

fn entry_exprs(e: &cel::common::ast::IdedEntryExpr) -> Vec<&Expression> {
    match &e.expr {
        EntryExpr::StructField(f) => vec![&f.value],
        EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
    }
}

/// Measures of an input: serialized size, the longest collection (or string) anywhere in it,
/// and the largest element of any collection in it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    size: f64,
    len: f64,
    elem: f64,
}

impl Stats {
    const SCALAR: Stats = Stats { size: 24.0, len: 0.0, elem: 0.0 };

    fn of(v: &Value) -> Stats {
        match v {
            Value::Null | Value::Bool(_) => Stats { size: 5.0, len: 0.0, elem: 0.0 },
            Value::Number(_) => Stats::SCALAR,
            Value::String(s) => Stats { size: s.len() as f64 + 2.0, len: s.len() as f64, elem: 0.0 },
            Value::Array(a) => Stats::collection(a.len(), a.iter().map(|c| (0, c))),
            Value::Object(o) => Stats::collection(o.len(), o.iter().map(|(k, c)| (k.len() + 3, c))),
        }
    }

    fn collection<'v>(n: usize, children: impl Iterator<Item = (usize, &'v Value)>) -> Stats {
        let mut out = Stats { size: 2.0 + n as f64, len: n as f64, elem: 0.0 };
        for (key, child) in children {
            let c = Stats::of(child);
            out.size += c.size + key as f64;
            out.len = out.len.max(c.len);
            out.elem = out.elem.max(c.size).max(c.elem);
        }
        out
    }
}

/// A bound on a value during estimation: its measures, the largest value built while computing
/// it (`peak`), and the value itself when it is known before running (an input or a path into
/// one), so that paths into inputs are measured exactly.
#[derive(Clone, Copy, Debug)]
struct Est<'v> {
    stats: Stats,
    peak: f64,
    exact: Option<&'v Value>,
}

impl<'v> Est<'v> {
    const SCALAR: Est<'static> = Est { stats: Stats::SCALAR, peak: 0.0, exact: None };

    fn new(size: f64, len: f64, elem: f64) -> Est<'v> {
        Est { stats: Stats { size, len, elem }, peak: 0.0, exact: None }
    }

    fn exact(v: &'v Value) -> Est<'v> {
        Est { stats: Stats::of(v), peak: 0.0, exact: Some(v) }
    }

    fn size(&self) -> f64 {
        self.stats.size
    }

    /// A part of this value (a field, an element): exact when this one is.
    fn part(&self, key: Option<&Value>) -> Est<'v> {
        if let (Some(v), Some(k)) = (self.exact, key) {
            let child = match (v, k) {
                (Value::Object(o), Value::String(k)) => o.get(k),
                (Value::Array(a), Value::Number(i)) => i.as_u64().and_then(|i| a.get(i as usize)),
                _ => None,
            };
            // A missing part fails the evaluation: nothing to bound.
            return child.map_or(Est::SCALAR, Est::exact);
        }
        let e = self.stats.elem;
        Est::new(e, self.stats.len.min(e), e)
    }
}

/// Estimates `e`'s value and adds the cost of computing it to `cost`. `accu` names the
/// accumulator of the comprehension being estimated: appending to it does not copy it (the
/// interpreter grows accumulators in place).
fn estimate<'e, 'v>(
    e: &'e Expression,
    scope: &mut Vec<(&'e str, Est<'v>)>,
    cost: &mut f64,
    accu: Option<&str>,
) -> Est<'v> {
    *cost += 1.0;
    match &e.expr {
        Ast::Literal(l) => match l {
            LiteralValue::String(s) => Est::new(s.inner().len() as f64 + 2.0, s.inner().len() as f64, 0.0),
            LiteralValue::Bytes(b) => Est::new(b.len() as f64 * 2.0 + 2.0, b.len() as f64, 0.0),
            _ => Est::SCALAR,
        },
        Ast::Ident(name) => {
            scope.iter().rev().find(|(n, _)| n == name).map_or(Est::SCALAR, |(_, est)| Est { peak: 0.0, ..*est })
        }
        Ast::Select(s) => {
            let operand = estimate(&s.operand, scope, cost, accu);
            if s.test { Est::SCALAR } else { operand.part(Some(&Value::String(s.field.clone()))) }
        }
        Ast::List(l) => {
            let out = Est::new(2.0 + l.elements.len() as f64, l.elements.len() as f64, 0.0);
            holding(out, l.elements.iter().map(|x| estimate(x, scope, cost, accu)), true)
        }
        Ast::Map(m) => {
            let out = Est::new(2.0 + 2.0 * m.entries.len() as f64, m.entries.len() as f64, 0.0);
            holding(out, m.entries.iter().flat_map(entry_exprs).map(|x| estimate(x, scope, cost, accu)), true)
        }
        Ast::Struct(st) => {
            let out = Est::new(2.0, st.entries.len() as f64, 0.0);
            holding(out, st.entries.iter().flat_map(entry_exprs).map(|x| estimate(x, scope, cost, accu)), false)
        }
        Ast::Call(c) => estimate_call(c, scope, cost, accu),
        Ast::Comprehension(c) => estimate_comprehension(c, scope, cost, accu),
        Ast::Unspecified => Est::SCALAR,
    }
}

/// A function or operator call: its operands, then what the function does with them.
fn estimate_call<'e, 'v>(
    c: &'e CallExpr,
    scope: &mut Vec<(&'e str, Est<'v>)>,
    cost: &mut f64,
    accu: Option<&str>,
) -> Est<'v> {
    let is_accu = |x: &Expression| matches!(&x.expr, Ast::Ident(n) if Some(n.as_str()) == accu);
    let operands: Vec<&Expression> = c.target.as_deref().into_iter().chain(&c.args).collect();
    let args: Vec<Est<'v>> = operands.iter().map(|x| estimate(x, scope, cost, accu)).collect();
    let peak = args.iter().map(|a| a.peak).fold(0.0, f64::max);
    let sum_size: f64 = args.iter().map(Est::size).sum();
    let max_elem = args.iter().map(|a| a.stats.elem).fold(0.0, f64::max);
    let mut out = match c.func_name.as_str() {
        "_+_" => {
            // Concatenation copies both sides, except an accumulator grown in place.
            let copied: f64 = operands.iter().zip(&args).filter(|(x, _)| !is_accu(x)).map(|(_, a)| a.size()).sum();
            *cost += copied;
            Est::new(sum_size, args.iter().map(|a| a.stats.len).sum(), max_elem)
        }
        "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => {
            *cost += args.iter().map(Est::size).fold(f64::INFINITY, f64::min).min(sum_size);
            Est::SCALAR
        }
        "_&&_" | "_||_" | "!_" | "@not_strictly_false" => Est::SCALAR,
        "_?_:_" => {
            let (a, b) = (args.get(1).copied().unwrap_or(Est::SCALAR), args.get(2).copied().unwrap_or(Est::SCALAR));
            Est::new(a.size().max(b.size()), a.stats.len.max(b.stats.len), a.stats.elem.max(b.stats.elem))
        }
        "_[_]" | "_[?_]" => {
            let key = operands.get(1).and_then(|k| match &k.expr {
                Ast::Literal(LiteralValue::String(s)) => Some(Value::String(s.inner().to_owned())),
                Ast::Literal(LiteralValue::Int(i)) => Some(Value::from(*i.inner())),
                _ => None,
            });
            args.first().map_or(Est::SCALAR, |a| a.part(key.as_ref()))
        }
        "size" | "int" | "uint" | "double" | "bool" | "has" | "-_" | "_-_" | "_*_" | "_/_" | "_%_" => Est::SCALAR,
        // Scans of their operands: cost linear in their size, a scalar out.
        "@in" | "contains" | "startsWith" | "endsWith" | "matches" => {
            *cost += sum_size;
            Est::SCALAR
        }
        // Anything else (conversions to string, timestamps, …): as large as its inputs.
        _ => {
            *cost += sum_size;
            Est::new(sum_size.max(24.0), args.iter().map(|a| a.stats.len).fold(0.0, f64::max), max_elem)
        }
    };
    out.peak = out.peak.max(peak);
    out
}

/// A comprehension (a macro such as `all`, `map`, `filter`): its range, one step measured to
/// know how the accumulator grows, then every iteration costed with the accumulator at its
/// largest.
fn estimate_comprehension<'e, 'v>(
    c: &'e ComprehensionExpr,
    scope: &mut Vec<(&'e str, Est<'v>)>,
    cost: &mut f64,
    accu: Option<&str>,
) -> Est<'v> {
    let range = estimate(&c.iter_range, scope, cost, accu);
    let init = estimate(&c.accu_init, scope, cost, accu);
    // At most one iteration per element (or key) of the range.
    let iterations = range.exact.map_or(range.stats.len, |v| match v {
        Value::Array(a) => a.len() as f64,
        Value::Object(o) => o.len() as f64,
        _ => 0.0,
    });
    let element = range.part(None);
    scope.push((c.iter_var.as_str(), element));
    if let Some(v2) = &c.iter_var2 {
        scope.push((v2.as_str(), element));
    }
    // The accumulator grows by what one step adds to it: measure one step…
    scope.push((c.accu_var.as_str(), init));
    let one = estimate(&c.loop_step, scope, &mut 0.0, Some(c.accu_var.as_str()));
    let grown = Est::new(
        init.size() + iterations * (one.size() - init.size()).max(0.0),
        init.stats.len + iterations * (one.stats.len - init.stats.len).max(0.0),
        init.stats.elem.max(one.stats.elem),
    );
    // …then cost every iteration with the accumulator at its largest.
    scope.pop();
    scope.push((c.accu_var.as_str(), grown));
    let mut step_cost = 0.0;
    let step = estimate(&c.loop_step, scope, &mut step_cost, Some(c.accu_var.as_str()));
    let cond = estimate(&c.loop_cond, scope, &mut step_cost, Some(c.accu_var.as_str()));
    *cost += iterations * step_cost;
    let result = estimate(&c.result, scope, cost, accu);
    scope.truncate(scope.len() - if c.iter_var2.is_some() { 3 } else { 2 });
    let mut out = Est { peak: 0.0, exact: None, ..result };
    out.peak = [grown.size(), step.peak, cond.peak, range.peak, init.peak, result.peak].into_iter().fold(0.0, f64::max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn evaluates_over_bindings() {
        let state = json!({"amount": 5, "lines": [{"q": 2}, {"q": 3}]});
        let command = json!({"body": {"senior": true}});
        let b = Bindings { state: Some(&state), command: Some(&command), ..Bindings::default() };
        assert!(Expr::compile("state.amount > 0 && command.body.senior == true").unwrap().eval_bool(&b).unwrap());
        assert_eq!(Expr::compile("state.lines.map(l, l.q)").unwrap().eval(&b).unwrap(), json!([2, 3]));
        assert_eq!(Expr::compile("size(state.lines)").unwrap().eval(&b).unwrap(), json!(2));
        assert!(Expr::compile("next == null").unwrap().eval_bool(&b).unwrap());
    }

    fn limits(cost_max: u64, value_bytes_max: u64) -> ExprLimits {
        ExprLimits { cost_max, value_bytes_max, ..ExprLimits::default() }
    }

    #[test]
    fn source_length_and_nodes_are_bounded_at_load() {
        let small = ExprLimits { source_bytes_max: 20, nodes_max: 5, ..ExprLimits::default() };
        let e = Expr::compile_with("state.amount > 0 && state.amount < 100", &small).unwrap_err();
        assert!(e.contains("over the limit of 20 (EXPR_BYTES_MAX)"), "{e}");
        let e = Expr::compile_with("a + b + c + d", &small).unwrap_err();
        assert_eq!(e, "the expression has 7 nodes (macros expanded), over the limit of 5 (EXPR_NODES_MAX)");
        Expr::compile_with("a + b", &small).unwrap();
        // Macros count as what they expand to.
        let e = Expr::compile_with("l.all(x, x)", &small).unwrap_err();
        assert!(e.contains("EXPR_NODES_MAX"), "{e}");
    }

    #[test]
    fn cost_grows_with_the_input_and_nesting_is_refused_before_running() {
        let lines = |n: usize| json!({"lines": (0..n).map(|i| json!({"qty": i + 1})).collect::<Vec<_>>()});
        let all = Expr::compile("state.lines.all(l, l.qty > 0)").unwrap();
        let cost = |e: &Expr, v: &Value| e.estimate(&Bindings { state: Some(v), ..Bindings::default() }).0;
        let (c10, c1000) = (cost(&all, &lines(10)), cost(&all, &lines(1000)));
        assert!(c1000 > 50 * c10 && c1000 < 200 * c10, "linear: {c10} then {c1000}");
        assert!(c1000 < 200_000, "{c1000}");
        let big = lines(2000);
        let b = Bindings { state: Some(&big), ..Bindings::default() };
        assert!(all.eval_bool(&b).unwrap());
        // Quadratic over 2000 elements: refused without running, naming the setting.
        let pairs = Expr::compile("state.lines.all(a, state.lines.exists(b, a.qty == b.qty))").unwrap();
        match pairs.eval_bool(&b).unwrap_err() {
            ExprError::Limit { kind: LimitKind::ExpressionCost, limit: 1_000_000, actual, message } => {
                assert!(actual > 4_000_000, "{actual}");
                assert!(message.contains("EXPR_COST_MAX"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The same expression on a small input runs.
        let small = lines(20);
        assert!(pairs.eval_bool(&Bindings { state: Some(&small), ..Bindings::default() }).unwrap());
    }

    #[test]
    fn values_an_expression_builds_are_bounded() {
        let s = "x".repeat(10_000);
        let state = json!({"s": s, "xs": (0..100).collect::<Vec<_>>()});
        let b = Bindings { state: Some(&state), ..Bindings::default() };
        let doubled = Expr::compile_with("state.s + state.s + state.s", &limits(1_000_000, 25_000)).unwrap();
        match doubled.eval(&b).unwrap_err() {
            ExprError::Limit { kind: LimitKind::ExpressionValue, limit: 25_000, actual, .. } => {
                assert!(actual >= 30_000, "{actual}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Expr::compile_with("size(state.s + state.s)", &limits(1_000_000, 25_000)).unwrap().eval(&b).unwrap(),
            json!(20_000)
        );
        // A comprehension's accumulator counts too: 100 copies of a 10 kB string.
        let copies = Expr::compile_with("state.xs.map(x, state.s)", &limits(10_000_000, 500_000)).unwrap();
        assert!(matches!(copies.eval(&b), Err(ExprError::Limit { kind: LimitKind::ExpressionValue, .. })));
        let fine = Expr::compile_with("state.xs.map(x, x + x)", &limits(1_000_000, 500_000)).unwrap();
        assert_eq!(fine.eval(&b).unwrap().as_array().unwrap().len(), 100);
    }

    #[test]
    fn estimates_bound_the_values_built() {
        let state = json!({"a": "abc", "n": 5, "xs": [1, 2, 3], "o": {"k": ["v", "w"]}, "ys": [{"z": "long string"}, {"z": ""}]});
        let command = json!({"body": {"amount": 12.5, "tags": ["a", "b"]}});
        for src in [
            "state.a + state.a",
            "state.xs + state.xs + [4]",
            "state.xs.map(x, [x, x])",
            "state.ys.map(y, y.z + y.z)",
            "state.ys.filter(y, size(y.z) > 0)",
            "state.o.k.map(k, k + state.a)",
            "{'a': state.xs, 'b': state.o}",
            "command.body.tags + state.o.k",
            "state.n > 3 ? state.o : state.xs",
            "string(state.n) + now",
            "state.xs[1]",
            "state.o['k']",
        ] {
            let b = Bindings {
                state: Some(&state),
                command: Some(&command),
                now: Some("2026-11-27T10:00:00Z"),
                ..Bindings::default()
            };
            let e = Expr::compile(src).unwrap();
            let (_, size) = e.estimate(&b);
            let actual = crate::limits::serialized_len(&e.eval(&b).unwrap()) as u64;
            assert!(actual <= size, "{src}: built {actual} bytes, estimated at most {size}");
        }
    }

    #[test]
    fn errors_are_messages() {
        assert!(Expr::compile("state.amount >").unwrap_err().contains("syntax"));
        assert!(Expr::compile("").is_err());
        let b = Bindings::default();
        assert!(Expr::compile("state.missing.deeper > 1").unwrap().eval_bool(&b).is_err());
        assert!(Expr::compile("1 + 1").unwrap().eval_bool(&b).unwrap_err().to_string().contains("true or false"));
    }
}
