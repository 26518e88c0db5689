//! Delivery: signing, the retry schedule, and the per-endpoint dispatchers
//! that send each delivery and record every attempt.

pub mod dispatcher;
pub mod handoff;
pub mod health;
pub mod recorder;
pub mod retry;
pub mod send;
pub mod sign;

pub use dispatcher::Dispatcher;
