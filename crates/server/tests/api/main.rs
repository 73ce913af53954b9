//! Integration tests of the service: the HTTP API through the router (no socket), the JSON
//! Patch suite through PATCH, races over real sockets, idempotency across restarts, a crash
//! test of a child `sourced` process, and the WebSocket and SSE APIs over loopback.

mod common;

mod architecture;
mod artifacts;
mod auth;
mod cli;
mod openapi;
mod reload;
mod scenarios;

mod concurrency;
mod conditional;
mod conformance;
mod crash;
mod faithful;
mod http_api;
mod idempotency;
mod limits;
mod metrics;
mod postgres;
mod problems;
mod processes;
mod queries;
mod rebuild;
mod socketio;
mod sse;
mod time_travel;
mod timeouts;
mod tls;
mod transfer;
mod ws;
mod ws_auth;
