//! Every fixed limit of the auth crate (the `*_MAX` constants), in one place: what a
//! deployment cannot set. docs/limits.md lists them all with their meaning; the limits a
//! deployment sets are settings.

// Used by jwks.rs.
/// Most keys one JWKS may hold.
pub const JWKS_KEYS_MAX: usize = 100;

// Used by keys.rs.
/// Most entries one keys file may hold.
pub const KEYS_MAX: usize = 100_000;

// Used by lib.rs.
/// Longest credential (API key or token) looked at, in bytes: anything longer is refused before
/// it is parsed.
pub const CREDENTIAL_BYTES_MAX: usize = 8 * 1024;
