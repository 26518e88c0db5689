//! One module per scenario. Each prints its method and a Markdown table, and
//! returns its figures as JSON.

pub mod backlog;
pub mod bulk;
pub mod capture;
pub mod isolation;
pub mod latency;
pub mod throughput;
