//! Domain errors: why a command is refused. Validation collects every violation it finds.

use serde::Serialize;

use crate::ids::Version;
pub use crate::violation::Violation;

/// Which limit of SPEC §8.3 a command exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimitKind {
    /// JSON nesting depth of a body.
    JsonDepth,
    /// Number of operations in one patch.
    PatchOps,
    /// Serialized size of the document after the command.
    DocumentSize,
    /// Number of `/-` array appends in one patch.
    ArrayAppends,
    /// Estimated cost of evaluating an artifact expression.
    ExpressionCost,
    /// Size of a value an artifact expression builds.
    ExpressionValue,
}

/// Why a command cannot be carried out. Each variant maps to one problem `type` on the wire.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// The envelope or its body is malformed (400): every violation listed.
    #[error("invalid command: {}", summarize(.0))]
    InvalidCommand(Vec<Violation>),
    /// The aggregate does not exist (404).
    #[error("aggregate not found")]
    NotFound,
    /// The aggregate was deleted (410).
    #[error("aggregate was deleted at version {version}")]
    Deleted {
        /// The version of the deletion event.
        version: Version,
    },
    /// A create met an existing aggregate (409).
    #[error("aggregate already exists at version {version}")]
    AlreadyExists {
        /// Its current version.
        version: Version,
    },
    /// A patch could not be applied, or a `test` operation failed (422).
    #[error("patch operation {index} failed: {message}")]
    PatchFailed {
        /// Index of the failing operation in the patch array.
        index: usize,
        /// JSON Pointer, relative to the command envelope, of the member that made the operation
        /// fail (`/body/2/from`), or empty when the patch did not come from the command.
        pointer: String,
        /// The JSON Pointer that operation names (its `path`, or its `from` when that failed).
        path: String,
        /// Why it failed.
        message: String,
    },
    /// The command writes a server-owned field, `/id` or `/_meta` (422).
    #[error("server-owned fields cannot be written: {}", summarize(.0))]
    ProtectedField(Vec<Violation>),
    /// The command would change nothing (422); it is not stored.
    #[error("the command changes nothing")]
    NoOp,
    /// No custom command of this name is defined for the type (422).
    #[error("no command '{name}' is defined for this aggregate type")]
    UnknownCommand {
        /// The name asked for.
        name: String,
    },
    /// A lifecycle forbids the move of its state field (422); `allowed` lists the states this
    /// command may move to from `from`.
    #[error("illegal transition of {field} from {} to '{to}': {message}; allowed: {}", .from.as_deref().unwrap_or("(new)"), if .allowed.is_empty() { "none".to_owned() } else { .allowed.join(", ") })]
    IllegalTransition {
        /// The state field.
        field: String,
        /// The state before (None for a new aggregate).
        from: Option<String>,
        /// The state asked for.
        to: String,
        /// States this command may move to.
        allowed: Vec<String>,
        /// Why not.
        message: String,
    },
    /// Business rules refused the command (422): every violated rule, each named.
    #[error("rules violated: {}", summarize(.0))]
    RuleViolations(Vec<Violation>),
    /// A custom command's preconditions are not met (422): every failing one.
    #[error("preconditions failed: {}", summarize(.0))]
    PreconditionFailed(Vec<Violation>),
    /// A custom command's payload does not match its schema (422).
    #[error("invalid payload: {}", summarize(.0))]
    InvalidPayload(Vec<Violation>),
    /// An artifact expression failed at run time (422).
    #[error("an expression failed: {message}")]
    ExpressionFailed {
        /// What failed.
        message: String,
    },
    /// The resulting document is not acceptable (422): every violation listed.
    #[error("invalid document: {}", summarize(.0))]
    InvalidDocument(Vec<Violation>),
    /// A value cannot be stored exactly as sent (422): a number a 64-bit float or integer cannot
    /// hold, `-0`, or U+0000 in a string. Refused, never altered; every place listed.
    #[error("cannot be stored as sent: {}", summarize(.0))]
    UnstorableValue(Vec<Violation>),
    /// A configured limit was exceeded (413 for sizes, 422 otherwise).
    #[error("{message}")]
    LimitExceeded {
        /// Which limit.
        kind: LimitKind,
        /// The configured maximum.
        limit: u64,
        /// The value found.
        actual: u64,
        /// A sentence for a person.
        message: String,
    },
}

impl DomainError {
    /// A [`DomainError::LimitExceeded`]: `actual` is over `limit` of `kind`.
    pub fn over_limit(kind: LimitKind, limit: usize, actual: usize, message: String) -> Self {
        DomainError::LimitExceeded { kind, limit: limit as u64, actual: actual as u64, message }
    }
}

fn summarize(v: &[Violation]) -> String {
    let mut parts: Vec<String> = v
        .iter()
        .take(3)
        .map(|v| format!("{} {}", if v.pointer.is_empty() { "/" } else { &v.pointer }, v.message))
        .collect();
    if v.len() > 3 {
        parts.push(format!("and {} more", v.len() - 3));
    }
    parts.join("; ")
}
