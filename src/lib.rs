//! gancho turns changes in a shop's Postgres tables into signed webhooks.
//!
//! The flow of one change, module by module:
//!
//! - [`capture`]: the SQL triggers that write each change into the `gancho.outbox`
//!   table inside the shop's transaction, and the installer for them.
//! - [`config`]: the TOML file, validated once into typed sources, rules and endpoints.
//! - [`rules`]: threshold, transition, shift and change rules, enrichment queries, and
//!   the processor that turns outbox rows into events and deliveries in one transaction.
//! - [`delivery`]: Standard Webhooks signing, the retry schedule, and the per-endpoint
//!   dispatcher that sends HTTP requests and records every attempt.
//! - [`sidecar`]: the long-running `gancho run` process: the LISTEN connection, the
//!   connection pool, the tasks above and their shutdown.
//! - [`operations`]: operator commands (`check`, `deliveries`, `redeliver`).
//! - [`demo`]: `gancho demo`, with a throwaway Postgres cluster and a verifying receiver
//!   that the integration tests use as well.

pub mod capture;
pub mod config;
pub mod db;
pub mod delivery;
pub mod demo;
pub mod operations;
pub mod rules;
pub mod sidecar;
