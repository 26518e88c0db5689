//! Operator commands: checking a config against the live database, listing
//! deliveries and sending dead ones again.

pub mod check;
pub mod deliveries;
pub mod endpoints;
