//! Integration tests of sourced-auth: the JWT attack corpus (`tests/data/jwt/cases.json`) and
//! the API keys and authenticator end to end.

mod jwt;
mod keys;
