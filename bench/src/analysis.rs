//! Compares what the receiver got with what the writers committed: exact
//! counts (missing, duplicates, bad signatures), arrivals in a time window,
//! and commit-to-arrival latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::receiver::{Arrival, EndpointLog};
use crate::report::Latencies;
use crate::workload::{Committed, commit_time};

/// One endpoint's deliveries of the changes of one commit log.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryCheck {
    pub expected: u64,
    /// Distinct changes that arrived.
    pub arrived: u64,
    pub missing: u64,
    /// Requests beyond the first for the same change.
    pub duplicates: u64,
    /// Of the duplicates, those with a webhook-id other than the first
    /// request's, which a receiver could not deduplicate.
    pub duplicates_with_new_id: u64,
    pub bad_signatures: u64,
    /// Requests to the endpoint whose body had no seq, which no writer sends.
    pub without_seq: u64,
}

impl DeliveryCheck {
    pub fn add(&mut self, other: DeliveryCheck) {
        self.expected += other.expected;
        self.arrived += other.arrived;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.duplicates_with_new_id += other.duplicates_with_new_id;
        self.bad_signatures += other.bad_signatures;
        // Both checks cover the same endpoints' requests without a seq.
        self.without_seq = self.without_seq.max(other.without_seq);
    }

    pub fn is_exact(&self) -> bool {
        self.missing == 0 && self.bad_signatures == 0 && self.without_seq == 0
    }

    pub fn summary(&self) -> String {
        format!(
            "{} of {} arrived, {} missing, {} duplicates ({} with a new webhook-id), {} bad signatures, {} without seq",
            self.arrived,
            self.expected,
            self.missing,
            self.duplicates,
            self.duplicates_with_new_id,
            self.bad_signatures,
            self.without_seq
        )
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "expected": self.expected,
            "arrived": self.arrived,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "duplicates_with_new_webhook_id": self.duplicates_with_new_id,
            "bad_signatures": self.bad_signatures,
            "requests_without_seq": self.without_seq,
        })
    }
}

/// Returns the arrivals of changes in `commits`, sorted by seq, then by arrival time.
fn arrivals_of(endpoint: &EndpointLog, commits: &[Committed]) -> Vec<Arrival> {
    let mut arrivals: Vec<Arrival> = endpoint
        .arrivals()
        .into_iter()
        .filter(|arrival| commit_time(commits, arrival.seq).is_some())
        .collect();
    arrivals.sort_by_key(|arrival| (arrival.seq, arrival.at));
    arrivals
}

/// Counts the endpoint's arrivals of the changes of `commits`: the distinct,
/// missing, duplicate and unverified ones.
pub fn check(endpoint: &EndpointLog, commits: &[Committed]) -> DeliveryCheck {
    let expected: u64 = commits.iter().map(|commit| commit.count as u64).sum();
    let arrivals = arrivals_of(endpoint, commits);
    let mut result = DeliveryCheck {
        expected,
        without_seq: endpoint.without_seq(),
        ..DeliveryCheck::default()
    };
    let mut previous: Option<Arrival> = None;
    for arrival in &arrivals {
        if !arrival.verified {
            result.bad_signatures += 1;
        }
        match previous {
            Some(first) if first.seq == arrival.seq => {
                result.duplicates += 1;
                if first.webhook_id != arrival.webhook_id {
                    result.duplicates_with_new_id += 1;
                }
            }
            _ => {
                result.arrived += 1;
                previous = Some(*arrival);
            }
        }
    }
    result.missing = expected.saturating_sub(result.arrived);
    result
}

pub fn check_all(endpoints: &[Arc<EndpointLog>], commits: &[Committed]) -> DeliveryCheck {
    let mut total = DeliveryCheck::default();
    for endpoint in endpoints {
        total.add(check(endpoint, commits));
    }
    // Requests without a seq belong to no commit log, so they are summed over
    // the endpoints here and never added up across logs.
    total.without_seq = endpoints.iter().map(|endpoint| endpoint.without_seq()).sum();
    total
}

/// Verified requests that arrived between two instants, over all endpoints.
pub fn arrivals_between(endpoints: &[Arc<EndpointLog>], from: Instant, to: Instant) -> u64 {
    endpoints
        .iter()
        .map(|endpoint| {
            endpoint
                .arrivals()
                .iter()
                .filter(|arrival| arrival.verified && arrival.at >= from && arrival.at < to)
                .count() as u64
        })
        .sum()
}

/// Returns the last arrival of any change in `commits`, over all endpoints.
pub fn last_arrival(endpoints: &[Arc<EndpointLog>], commits: &[Committed]) -> Option<Instant> {
    endpoints
        .iter()
        .filter_map(|endpoint| arrivals_of(endpoint, commits).iter().map(|arrival| arrival.at).max())
        .max()
}

/// Commit-to-arrival latency of the first arrival of each change in
/// `commits` (or only of those committed in `window`), on every endpoint.
pub fn latencies(
    endpoints: &[Arc<EndpointLog>],
    commits: &[Committed],
    window: Option<(Instant, Instant)>,
) -> Latencies {
    let commits: Vec<Committed> = match window {
        Some((from, to)) => commits
            .iter()
            .filter(|commit| commit.at >= from && commit.at < to)
            .copied()
            .collect(),
        None => commits.to_vec(),
    };
    let expected_per_endpoint: usize = commits.iter().map(|commit| commit.count as usize).sum();
    let mut arrived = Vec::new();
    let mut negative = 0;
    let mut missing = 0;
    for endpoint in endpoints {
        let arrivals = arrivals_of(endpoint, &commits);
        let mut distinct = 0;
        let mut previous_seq = None;
        for arrival in &arrivals {
            if previous_seq == Some(arrival.seq) {
                continue;
            }
            previous_seq = Some(arrival.seq);
            distinct += 1;
            let committed = commit_time(&commits, arrival.seq).expect("arrivals_of keeps committed seqs only");
            match arrival.at.checked_duration_since(committed) {
                Some(latency) => arrived.push(latency),
                None => {
                    negative += 1;
                    arrived.push(Duration::ZERO);
                }
            }
        }
        missing += expected_per_endpoint.saturating_sub(distinct);
    }
    Latencies::new(arrived, missing, negative)
}
