//! Every fixed limit of the store crate (the `*_MAX` constants), in one place: what a
//! deployment cannot set. docs/limits.md lists them all with their meaning; the limits a
//! deployment sets are settings.

// Used by lib.rs.
/// Most events one append may carry.
pub const APPEND_EVENTS_MAX: usize = 1_000;
/// Most rows one read may return, whatever the caller asks.
pub const READ_LIMIT_MAX: usize = 10_000;

// Used by sqlite.rs.
/// Most read connections a store may open.
pub const READERS_MAX: usize = 64;
/// Most appends one commit may carry.
pub const BATCH_APPENDS_MAX: usize = 65_536;
/// Most appends that may wait for the writer.
pub const QUEUE_CAPACITY_MAX: usize = 1 << 20;

// Used by postgres/mod.rs.
/// Most connections a pool may hold.
pub const POOL_SIZE_MAX: usize = 1_024;
/// Most events one commit may carry (an append alone may carry up to
/// [`APPEND_EVENTS_MAX`](crate::APPEND_EVENTS_MAX)).
pub const BATCH_EVENTS_MAX: usize = 20_000;
/// Longest time any wait may be configured to last.
pub const TIMEOUT_MS_MAX: u64 = 600_000;
