//! Integration tests of the engine: the retry rule against a store that fails on demand, and
//! process managers run against a real store with an injected clock.

mod faults;
mod processes;
