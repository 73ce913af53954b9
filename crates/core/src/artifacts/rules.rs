//! Business rules (SPEC §4.3): named CEL conditions per type, selected by command, that reject
//! a command or only warn. Every rule is evaluated and every violation reported together.

use serde::Deserialize;
use serde_json::Value;

use super::expr::{Expr, ExprLimits};
use super::from_json;

/// What a failed rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The command is refused (422).
    Reject,
    /// The command is accepted and the reply carries a warning.
    Warn,
}

/// One rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Its index in the file, for problem locations.
    pub index: usize,
    /// Its name, reported with every violation.
    pub name: String,
    /// The commands it applies to (custom names or `create`/`patch`/`replace`/`delete`); all
    /// when `None`.
    pub on: Option<Vec<String>>,
    /// Must be true.
    pub require: Expr,
    /// Said when it is false.
    pub message: String,
    /// Reject or warn.
    pub severity: Severity,
}

impl Rule {
    /// Whether the rule applies to a command of this name.
    pub fn applies_to(&self, command: &str) -> bool {
        self.on.as_ref().is_none_or(|on| on.iter().any(|c| c == command))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    on: Option<Vec<String>>,
    require: String,
    message: String,
    severity: Option<Severity>,
}

/// A rule's name and the commands it names, also for a rule whose expression does not compile,
/// so that the check across files reports its unknown commands in the same run.
#[derive(Clone, Debug)]
pub struct RuleTargets {
    /// Its index in the file, for problem locations.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// The commands its `on` names (empty when it has none).
    pub on: Vec<String>,
}

/// What `rules.yaml` held: the rules that could be read, every rule's targets, and every
/// problem.
pub type Parsed = (Vec<Rule>, Vec<RuleTargets>, Vec<(String, String)>);

/// Parses `rules.yaml`: `{rules: [{name, on, require, message, severity}]}`. Returns the rules
/// that could be read and every rule's targets beside every problem, so that checks across
/// files still see them (a set with any problem is never used).
pub fn parse(doc: &Value, limits: &ExprLimits) -> Parsed {
    let raw: RawRules = match from_json(doc, "") {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Vec::new(), e),
    };
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    let mut targets = Vec::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        targets.push(RuleTargets { index: i, name: r.name.clone(), on: r.on.clone().unwrap_or_default() });
        if r.name.trim().is_empty() {
            problems.push((format!("/rules/{i}/name"), "a rule needs a name".to_owned()));
        }
        if rules.iter().any(|x: &Rule| x.name == r.name) {
            problems.push((format!("/rules/{i}/name"), format!("rule '{}' is defined twice", r.name)));
        }
        match Expr::compile_with(&r.require, limits) {
            Ok(require) => rules.push(Rule {
                index: i,
                name: r.name,
                on: r.on,
                require,
                message: r.message,
                severity: r.severity.unwrap_or(Severity::Reject),
            }),
            Err(m) => problems.push((format!("/rules/{i}/require"), m)),
        }
    }
    (rules, targets, problems)
}
