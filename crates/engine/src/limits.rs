//! Every fixed limit of the engine crate (the `*_MAX` constants), in one place: what a
//! deployment cannot set. docs/limits.md lists them all with their meaning; the limits a
//! deployment sets are settings.

// Used by subscriptions.rs.
/// Bounds of the live buffer (events kept for receivers that have not taken them yet).
pub const LIVE_BUFFER_EVENTS_MAX: usize = 1 << 20;
