//! Integration tests against a real Postgres and real HTTP receivers on 127.0.0.1.

mod capture;
mod cli;
mod delivery;
mod durability;
mod examples;
mod reliability;
mod rules;
mod support;
