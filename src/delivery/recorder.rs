//! The recorder of one endpoint: writes the outcome of each attempt, batching
//! the attempts that finish while the previous batch is being written.
//!
//! Writing a batch in one statement and one commit lets a busy endpoint record
//! thousands of attempts per second, where one commit per attempt would queue
//! on the database. An attempt's delivery stays pending, and so holds back the
//! next delivery of its row on an ordered endpoint, until its outcome is
//! committed here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::health;
use super::retry::next_delay;
use super::send::{AttemptResult, ClaimedDelivery};
use crate::config::Endpoint;
use crate::db;

/// The maximum number of attempts written in one statement.
const MAX_BATCH: usize = 512;

/// The outcome of an attempt for its delivery.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Delivered,
    Retry(Duration),
    Dead,
    /// The receiver returned 410 Gone, so the endpoint is disabled and the
    /// delivery waits for it to be enabled again.
    Gone,
}

pub fn verdict(endpoint: &Endpoint, delivery: &ClaimedDelivery, result: &AttemptResult) -> Verdict {
    if result.succeeded() {
        return Verdict::Delivered;
    }
    if result.status_code == Some(410) {
        return Verdict::Gone;
    }
    match next_delay(&endpoint.retry_schedule, delivery.attempt as u32) {
        None => Verdict::Dead,
        Some(scheduled) => match result.retry_after {
            Some(requested) => Verdict::Retry(requested.min(health::MAX_RETRY_AFTER)),
            None => Verdict::Retry(scheduled),
        },
    }
}

/// One attempt's row in `gancho.attempt` and the new state of its delivery.
pub struct Outcome {
    pub delivery_id: i64,
    /// The attempt number that the claim gave; the delivery is updated only
    /// while it still has it.
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub latency_ms: f64,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub retry_after: Option<Duration>,
    pub verdict: Verdict,
}

impl Outcome {
    pub fn new(delivery: &ClaimedDelivery, result: &AttemptResult, verdict: Verdict) -> Outcome {
        Outcome {
            delivery_id: delivery.id,
            attempt: delivery.attempt,
            started_at: result.started_at,
            status_code: result.status_code.map(i32::from),
            // Microsecond precision is all a latency needs, and it reads well in logs.
            latency_ms: (result.latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            error: result.error.clone(),
            response_body: result.response_body.clone(),
            retry_after: result.retry_after,
            verdict,
        }
    }

    /// Returns the delivery's new status, the delay before its next attempt,
    /// and the attempts it has used.
    fn next_state(&self) -> (&'static str, Duration, i32) {
        match self.verdict {
            Verdict::Delivered => ("delivered", Duration::ZERO, self.attempt),
            Verdict::Retry(delay) => ("pending", delay, self.attempt),
            Verdict::Dead => ("dead", Duration::ZERO, self.attempt),
            // The attempt does not count, so the full schedule is left after re-enabling.
            Verdict::Gone => ("pending", Duration::ZERO, self.attempt - 1),
        }
    }
}

/// The result of writing one outcome: whether the delivery was updated (false
/// when another sidecar took the lease over), or why nothing was written.
pub type Recorded = Result<bool, String>;

type Request = (Outcome, oneshot::Sender<Recorded>);

/// The sending side, which attempts use to have their outcome written.
#[derive(Clone)]
pub struct RecorderHandle {
    sender: mpsc::UnboundedSender<Request>,
}

impl RecorderHandle {
    /// Queues one outcome for writing, and returns a future that resolves
    /// once it is committed.
    pub fn submit(&self, outcome: Outcome) -> impl std::future::Future<Output = Recorded> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.sender.send((outcome, reply)).is_ok();
        async move {
            if !queued {
                return Err("the recorder has stopped".to_string());
            }
            answer.await.map_err(|_| "the recorder has stopped".to_string())?
        }
    }
}

/// Starts the recorder of `endpoint`. It stops when every handle is dropped.
pub fn start(endpoint: std::sync::Arc<Endpoint>, pool: Pool) -> RecorderHandle {
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(run(endpoint, pool, receiver));
    RecorderHandle { sender }
}

async fn run(endpoint: std::sync::Arc<Endpoint>, pool: Pool, mut receiver: mpsc::UnboundedReceiver<Request>) {
    let mut batch: Vec<Request> = Vec::new();
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }

        let outcomes: Vec<&Outcome> = batch.iter().map(|(outcome, _)| outcome).collect();
        match write_batch(&pool, &endpoint, &outcomes).await {
            Ok(updated) => {
                for (outcome, reply) in batch.drain(..) {
                    let _ = reply.send(Ok(updated.contains(&outcome.delivery_id)));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}

/// Inserts the attempts of a batch, passed as arrays. The statements below
/// complete it.
const RECORD_SQL: &str = "with outcome as (
         select * from unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::int[], $5::float8[],
                              $6::text[], $7::text[], $8::text[], $9::float8[], $10::int[])
             as outcome (delivery_id, attempt, started_at, status_code, latency_ms,
                         error, response_body, status, delay_ms, attempts_used)
     ), recorded as (
         insert into gancho.attempt (delivery_id, attempt, started_at, status_code, latency_ms, error, response_body)
         select delivery_id, attempt, started_at, status_code, latency_ms, error, response_body from outcome
     ), ";

/// For a batch of successes only: the endpoint's failures are forgotten.
const HEALTHY_SQL: &str = "healthy as (
         update gancho.endpoint_state
         set consecutive_failures = 0, failing_since = null, paused_until = null, pause_ms = null
         where endpoint = $11 and (consecutive_failures > 0 or paused_until is not null or failing_since is not null)
     ), ";

/// The deliveries' new states, fenced by the attempt number each claim gave.
const UPDATE_SQL: &str = "updated as (
         update gancho.delivery d
         set status = o.status,
             next_attempt_at = now() + o.delay_ms * interval '1 millisecond',
             lease_until = null,
             attempts = o.attempts_used,
             finished_at = case when o.status = 'pending' then null else now() end,
             last_error = o.error
         from outcome o
         where d.id = o.delivery_id and d.attempts = o.attempt
         returning d.id
     )
     select id from updated";

/// Writes the attempts and the deliveries' new states in one statement, then
/// the endpoint's health. Returns the ids of the deliveries updated.
async fn write_batch(pool: &Pool, endpoint: &Endpoint, outcomes: &[&Outcome]) -> Result<Vec<i64>, db::DbError> {
    let mut client = pool.get().await.map_err(db::DbError::Checkout)?;

    let mut ids = Vec::with_capacity(outcomes.len());
    let mut attempts = Vec::with_capacity(outcomes.len());
    let mut started = Vec::with_capacity(outcomes.len());
    let mut status_codes = Vec::with_capacity(outcomes.len());
    let mut latencies = Vec::with_capacity(outcomes.len());
    let mut errors = Vec::with_capacity(outcomes.len());
    let mut bodies = Vec::with_capacity(outcomes.len());
    let mut statuses = Vec::with_capacity(outcomes.len());
    let mut delays = Vec::with_capacity(outcomes.len());
    let mut attempts_used = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let (status, delay, used) = outcome.next_state();
        ids.push(outcome.delivery_id);
        attempts.push(outcome.attempt);
        started.push(outcome.started_at);
        status_codes.push(outcome.status_code);
        latencies.push(outcome.latency_ms);
        errors.push(outcome.error.as_deref());
        bodies.push(outcome.response_body.as_deref());
        statuses.push(status);
        delays.push(delay.as_millis() as f64);
        attempts_used.push(used);
    }

    // The pool's sessions do not wait for the WAL flush. If the server
    // crashes before it, these deliveries are sent again after their lease,
    // with the same webhook ids: at least once still holds.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
        &ids,
        &attempts,
        &started,
        &status_codes,
        &latencies,
        &errors,
        &bodies,
        &statuses,
        &delays,
        &attempts_used,
    ];

    // The common case, a batch of successes, is one statement: the endpoint's
    // health is reset in it too, which changes no row when it was healthy.
    if outcomes.iter().all(|outcome| outcome.verdict == Verdict::Delivered) {
        let statement = client
            .prepare_cached(&format!("{RECORD_SQL}{HEALTHY_SQL}{UPDATE_SQL}"))
            .await?;
        let mut all_params = params.to_vec();
        all_params.push(&endpoint.name);
        let rows = client.query(&statement, &all_params).await?;
        return Ok(rows.iter().map(|row| row.get(0)).collect());
    }

    let transaction = client.transaction().await?;
    let statement = transaction.prepare_cached(&format!("{RECORD_SQL}{UPDATE_SQL}")).await?;
    let rows = transaction.query(&statement, &params).await?;
    let updated: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();

    record_health(&transaction, endpoint, outcomes).await?;
    transaction.commit().await?;
    Ok(updated)
}

/// Applies the batch's outcomes to the endpoint's health in the order the
/// attempts finished. A run of successes is one write, and a success that
/// finds the endpoint healthy changes no row.
async fn record_health(
    client: &tokio_postgres::Transaction<'_>,
    endpoint: &Endpoint,
    outcomes: &[&Outcome],
) -> Result<(), tokio_postgres::Error> {
    let mut pending_success = false;
    for outcome in outcomes {
        match outcome.verdict {
            Verdict::Delivered => pending_success = true,
            Verdict::Gone => {
                if pending_success {
                    health::record_success(client, &endpoint.name).await?;
                    pending_success = false;
                }
                health::disable(client, &endpoint.name, "the receiver answered 410 Gone").await?;
            }
            Verdict::Retry(_) | Verdict::Dead => {
                if pending_success {
                    health::record_success(client, &endpoint.name).await?;
                    pending_success = false;
                }
                let state = health::record_failure(client, endpoint, outcome.retry_after).await?;
                if state.disabled_now {
                    tracing::error!(
                        endpoint = %endpoint.name,
                        consecutive_failures = state.consecutive_failures,
                        "endpoint disabled after failing for {}; enable it with `gancho endpoint enable`",
                        crate::config::format_duration(endpoint.disable_after)
                    );
                } else if let Some(until) = state.paused_until {
                    tracing::warn!(endpoint = %endpoint.name, consecutive_failures = state.consecutive_failures, paused_until = %until, "endpoint paused");
                }
            }
        }
    }
    if pending_success {
        health::record_success(client, &endpoint.name).await?;
    }
    Ok(())
}
