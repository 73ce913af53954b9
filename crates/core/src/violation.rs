//! One problem found in a command or a document: the leaf every other module reports with.

use serde::Serialize;

/// One problem found in a command or a document, located by a JSON Pointer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON Pointer (RFC 6901) to the offending value, relative to the command envelope or
    /// the document, as the error's context says.
    pub pointer: String,
    /// What is wrong, for a person.
    pub message: String,
    /// The rule that found it, when a named rule did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl Violation {
    /// A violation at `pointer`.
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self { pointer: pointer.into(), message: message.into(), rule: None }
    }
}
