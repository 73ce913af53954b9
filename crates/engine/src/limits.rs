//! Every fixed limit of the engine crate (the `*_MAX` constants), in one place: what a
//! deployment cannot set. docs/limits.md lists them all with their meaning; the limits a
//! deployment sets are settings.

// Used by process.rs.
/// Most events a process runner reads from the feed in one round.
pub const PROCESS_EVENTS_PER_ROUND_MAX: usize = 256;
/// Most due instances a process runner takes in one round.
pub const PROCESS_WAKES_PER_ROUND_MAX: usize = 64;
/// Longest a process runner without its lease (another process runs the process) waits before
/// it asks for the lease again: how soon it takes over from a runner that died.
pub const PROCESS_LEASE_WAIT_MS_MAX: u64 = 1_000;
/// Most steps `GET /processes/{name}/{key}` shows of an instance (its latest).
pub const PROCESS_STEPS_SHOWN_MAX: usize = 100;

// Used by subscriptions.rs.
/// Bounds of the live buffer (events kept for receivers that have not taken them yet).
pub const LIVE_BUFFER_EVENTS_MAX: usize = 1 << 20;
