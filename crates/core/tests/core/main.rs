//! Integration tests of the domain core: given/when/then cases for the generic commands,
//! property tests of the fold, and the public JSON Patch suite run through the core.

mod artifacts;
mod conformance;
mod given_when_then;
mod permissions;
mod processes;
mod properties;
mod purity;
