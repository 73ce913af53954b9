//! CEL expressions (SPEC §4): compiled once when an artifact set loads, evaluated per command
//! against `state`, `next`, `command`, `event`, `principal` and `now`. A syntax error is a load
//! error; a run-time failure (a missing field, a type mismatch) is a clear refusal of the
//! command, never a crash.

use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program};
use serde_json::Value;

/// Longest expression accepted, in bytes: with input documents bounded too, this bounds the
/// cost of any evaluation (CEL has no loops or recursion).
pub const EXPR_LEN_MAX: usize = 4_096;

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
    /// The command's time, RFC 3339.
    pub now: Option<&'a str>,
}

/// A compiled expression.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<Program>,
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

impl Expr {
    /// Compiles `source`; the error is a message for a person.
    pub fn compile(source: &str) -> Result<Expr, String> {
        if source.trim().is_empty() {
            return Err("the expression is empty".to_owned());
        }
        if source.len() > EXPR_LEN_MAX {
            return Err(format!("the expression is {} bytes, over the limit of {EXPR_LEN_MAX}", source.len()));
        }
        let program = env().compile(source).map_err(|e| {
            // The parser's message repeats the source with a caret on later lines: keep one line.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim().trim_start_matches("ERROR: <input>:");
            format!("CEL syntax error at {first}")
        })?;
        Ok(Expr { source: source.into(), program: Arc::new(program) })
    }

    /// The expression's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a JSON value.
    pub fn eval(&self, b: &Bindings<'_>) -> Result<Value, String> {
        let mut ctx = Context::with_env(env());
        let null = Value::Null;
        let bind = |ctx: &mut Context<'_, '_>, name: &str, v: Option<&Value>| {
            ctx.add_variable(name, v.unwrap_or(&null).clone()).map_err(|e| format!("cannot bind {name}: {e}"))
        };
        bind(&mut ctx, "state", b.state)?;
        bind(&mut ctx, "next", b.next)?;
        bind(&mut ctx, "command", b.command)?;
        bind(&mut ctx, "event", b.event)?;
        bind(&mut ctx, "principal", b.principal)?;
        ctx.add_variable("now", b.now.unwrap_or("")).map_err(|e| format!("cannot bind now: {e}"))?;
        let out = self.program.execute(&ctx).map_err(|e| format!("`{}` failed: {e}", self.source))?;
        out.json().map_err(|e| format!("`{}` gave a value that is not JSON: {e}", self.source))
    }

    /// Evaluates to a boolean; any other result is an error.
    pub fn eval_bool(&self, b: &Bindings<'_>) -> Result<bool, String> {
        match self.eval(b)? {
            Value::Bool(x) => Ok(x),
            other => Err(format!("`{}` must give true or false, not {other}", self.source)),
        }
    }
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

    #[test]
    fn errors_are_messages() {
        assert!(Expr::compile("state.amount >").unwrap_err().contains("syntax"));
        assert!(Expr::compile("").is_err());
        let b = Bindings::default();
        assert!(Expr::compile("state.missing.deeper > 1").unwrap().eval_bool(&b).is_err());
        assert!(Expr::compile("1 + 1").unwrap().eval_bool(&b).unwrap_err().contains("true or false"));
    }
}
