//! Integration tests of the service: the HTTP API through the router (no socket), the JSON
//! Patch suite through PATCH, races over real sockets, idempotency across restarts, and a
//! crash test of a child `sourced` process.

mod common;

mod cli;

mod concurrency;
mod conformance;
mod crash;
mod http_api;
mod idempotency;
