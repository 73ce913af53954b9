//! Every fixed limit of the server crate (the `*_MAX` constants), in one place: what a
//! deployment cannot set. docs/limits.md lists them all with their meaning; the limits a
//! deployment sets are settings.

// Used by artifacts.rs.
/// Deepest directory nesting read in an artifact directory.
pub const ARTIFACT_DIR_DEPTH_MAX: usize = 8;

// Used by config.rs.
/// Most fields `INDEXES` may name: each index costs every write.
pub const INDEXES_MAX: usize = 32;

// Used by ws/mod.rs.
/// Longest subscription name.
pub const SUB_NAME_BYTES_MAX: usize = 128;
/// Once the writer has fed this many messages to the socket it takes no more queued items
/// before a flush (the last item may bring up to [`WAKE_EVENTS_MAX`] more).
pub const WRITE_BATCH_MAX: usize = 64;
/// Most events a subscription takes at one wake: one `{"op":"events"}` frame (subscriptions
/// opened with `"batch": true`), or one run of `{"op":"event"}` frames in one queue slot.
pub const WAKE_EVENTS_MAX: usize = 256;

// Used by ratelimit.rs.
/// Most callers whose rate-limit buckets are remembered (least recently seen forgotten first).
pub const RATE_LIMIT_BUCKETS_MAX: usize = 100_000;

// Used by auth.rs.
/// Most verified tokens remembered until their `exp` (least recently used forgotten first).
pub const JWT_CACHE_MAX: usize = 10_000;

// Used by jwks_fetch.rs.
/// Largest JWKS document read from `JWT_JWKS=https://…`.
pub const JWKS_BYTES_MAX: usize = 1024 * 1024;

// Used by tls.rs.
/// Most TLS handshakes under way at once; beyond it new connections wait in the kernel's queue.
pub const TLS_HANDSHAKES_MAX: usize = 1_024;
/// Most connections whose handshake is done waiting for the HTTP server to take them.
pub const TLS_ACCEPTED_QUEUE_MAX: usize = 64;
/// Most certificates in `TLS_CERT` (the server's and its chain).
pub const TLS_CHAIN_CERTS_MAX: usize = 16;

// Used by metrics.rs.
/// Most aggregate types outside the artifact set that get a label of their own in the metrics
/// (clients name types; the rest are counted as `(other)`).
pub const METRIC_TYPES_MAX: usize = 64;

// Used by trace.rs.
/// Longest `X-Request-Id` taken from a client (a longer or odd one is replaced by a UUID).
pub const REQUEST_ID_BYTES_MAX: usize = 128;
