//! The dispatcher of one endpoint: takes the deliveries the processor hands
//! over, claims the other due deliveries, sends them with at most
//! `max_in_flight` requests at once, and records each attempt.
//!
//! Claiming takes a lease (`lease_until`) with `FOR UPDATE SKIP LOCKED`, so
//! several sidecars share the work without sending a delivery twice, and a
//! crashed sidecar's deliveries are taken over when its leases expire. Each
//! claim also increments `attempts`, and a result is recorded only while
//! `attempts` still has the claimed value. That fences off a sidecar whose
//! lease expired while its request was slow.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::handoff::Inbox;
use super::health::{self, Health};
use super::recorder::{self, Outcome, RecorderHandle, Verdict, verdict};
use super::send::{AttemptResult, ClaimedDelivery, http_client, send};
use crate::config::{Endpoint, SidecarSettings};
use crate::db;

/// Claims up to `$2` due deliveries of endpoint `$1` with a lease of `$3`
/// milliseconds. With ordering on (`$4`), only the oldest waiting delivery of
/// each source row may be claimed. A row's deliveries then go one at a time in
/// commit order, across retries and sidecars, and a failing row holds back
/// only its own later deliveries.
pub const CLAIM_SQL: &str = "with due as (
         select d.id from gancho.delivery d
         where d.endpoint = $1 and d.status = 'pending' and d.next_attempt_at <= now()
           and (d.lease_until is null or d.lease_until < now())
           and (not $4 or not exists (
               select 1 from gancho.delivery earlier
               where earlier.endpoint = d.endpoint and earlier.ordering_key = d.ordering_key
                 and earlier.status = 'pending' and earlier.id < d.id
           ))
         order by d.next_attempt_at, d.id
         limit $2
         for update of d skip locked
     )
     update gancho.delivery d
     set lease_until = now() + $3 * interval '1 millisecond', attempts = d.attempts + 1
     from due, gancho.event e
     where d.id = due.id and e.id = d.event_id
     returning d.id, d.webhook_id, d.attempts, e.id, e.type, e.data, e.occurred_at";

pub struct Dispatcher {
    endpoint: Arc<Endpoint>,
    pool: Pool,
    client: reqwest::Client,
    recorder: RecorderHandle,
    settings: SidecarSettings,
    inbox: Arc<Inbox>,
    shutdown: CancellationToken,
    /// Deliveries claimed and not yet recorded, released on shutdown.
    claimed: Arc<Mutex<HashSet<i64>>>,
    /// Set by an attempt that failed, once its outcome is recorded.
    failed: Arc<AtomicBool>,
    /// Successful attempts so far, for the pace of the hand-off.
    delivered: Arc<AtomicU64>,
}

impl Dispatcher {
    pub fn new(
        endpoint: Arc<Endpoint>,
        pool: Pool,
        settings: SidecarSettings,
        inbox: Arc<Inbox>,
        shutdown: CancellationToken,
    ) -> Dispatcher {
        let client = http_client(&endpoint);
        let recorder = recorder::start(Arc::clone(&endpoint), pool.clone());
        Dispatcher {
            endpoint,
            pool,
            client,
            recorder,
            settings,
            inbox,
            shutdown,
            claimed: Arc::default(),
            failed: Arc::default(),
            delivered: Arc::default(),
        }
    }

    pub async fn run(self) {
        if let Ok(client) = self.pool.get().await
            && let Err(error) = health::register(&**client, &self.endpoint.name).await
        {
            tracing::warn!(endpoint = %self.endpoint.name, error = %error, "cannot register the endpoint's state");
        }
        let max_in_flight = self.endpoint.max_in_flight;
        let semaphore = Arc::new(Semaphore::new(max_in_flight));
        let mut in_flight = JoinSet::new();
        // Claimed deliveries waiting for a request slot. Claiming up to one
        // batch ahead keeps the slots busy while the next claim runs, which
        // takes a few milliseconds.
        let mut queue: VecDeque<ClaimedDelivery> = VecDeque::new();
        // How many requests the endpoint's health allows at once, from the
        // last read: all, one probe, or none while paused or disabled.
        let mut allowed = usize::MAX;
        let mut failures = 0u32;
        // When the next claim from the database is due. Deliveries that the
        // processor hands over need none. A claim finds what it could not
        // hand over, retries that came due, deliveries that waited for an
        // earlier one of their row, and leases that expired elsewhere.
        let mut claim_at = Instant::now();
        let mut pace = Pace::new(max_in_flight, Instant::now());

        loop {
            if self.shutdown.is_cancelled() {
                break;
            }

            // A finished task keeps its memory, the size of its future,
            // until it is joined, so join every finished one on each turn.
            while in_flight.try_join_next().is_some() {}

            self.take_handed(&mut queue);

            // A failed attempt may have paused the endpoint: read its health
            // again before sending what waits. Claim at once, because the
            // claim then reads when the failed delivery's retry is due.
            if self.failed.swap(false, Ordering::AcqRel) {
                allowed = self
                    .check_health(&mut failures)
                    .await
                    .map(|(slots, _)| slots)
                    .unwrap_or(0);
                if allowed <= 1 {
                    self.release_queue(&mut queue).await;
                }
                claim_at = Instant::now();
            }
            while !queue.is_empty() && max_in_flight - semaphore.available_permits() < allowed {
                let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() else {
                    break;
                };
                let delivery = queue.pop_front().expect("the queue is not empty");
                in_flight.spawn(self.attempt_task(delivery, permit));
            }

            // Claim in batches of at least a quarter of the slots, so a busy
            // endpoint makes one query per batch instead of one per request.
            let mut wait = self.settings.poll_interval;
            // Attempts sent but not yet recorded are bounded too, to four
            // times the slots: a crash or a lost connection sends them again.
            let requests = max_in_flight - semaphore.available_permits();
            let unrecorded = in_flight.len().saturating_sub(requests);
            let outstanding = requests + queue.len();
            let room = if unrecorded >= 4 * max_in_flight {
                0
            } else {
                (2 * max_in_flight).saturating_sub(outstanding)
            };
            let handoff_room = if unrecorded >= 4 * max_in_flight {
                0
            } else {
                pace.capacity(self.delivered.load(Ordering::Acquire), Instant::now())
                    .saturating_sub(outstanding)
            };
            let min_claim = (max_in_flight / 4).max(1);
            if !in_flight.is_empty() && (room < min_claim || queue.len() >= max_in_flight) {
                self.inbox.offer(if allowed == usize::MAX { handoff_room } else { 0 });
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break,
                    // A slot frees up when a request succeeds, before its task ends.
                    permit = Arc::clone(&semaphore).acquire_owned(), if !queue.is_empty() => drop(permit),
                    _ = in_flight.join_next() => {}
                    _ = self.inbox.notified() => {}
                }
                continue;
            }

            // Claim unless the endpoint as a whole is paused or disabled. A
            // probe is a single request with nothing else outstanding.
            allowed = match self.check_health(&mut failures).await {
                Ok((slots, health_wait)) => {
                    wait = health_wait.unwrap_or(wait);
                    slots
                }
                Err(delay) => {
                    wait = delay;
                    0
                }
            };
            if allowed <= 1 {
                self.release_queue(&mut queue).await;
            }
            let limit = match allowed {
                0 => 0,
                1 if outstanding > 0 => 0,
                1 => 1,
                _ => room,
            };
            let mut claimed_count = 0;
            if limit == 0 {
                // Claim as soon as the endpoint may take work again.
                claim_at = Instant::now();
            } else if self.inbox.take_claim_request() || Instant::now() >= claim_at {
                match self.claim(limit).await {
                    Ok(deliveries) => {
                        failures = 0;
                        claimed_count = deliveries.len();
                        queue.extend(deliveries);
                        claim_at = if claimed_count < limit {
                            let next = self.time_until_next_due().await.unwrap_or(wait).min(wait);
                            Instant::now() + next
                        } else {
                            Instant::now()
                        };
                    }
                    Err(error) => {
                        failures += 1;
                        wait = db::reconnect_delay(failures);
                        claim_at = Instant::now() + wait;
                        tracing::warn!(endpoint = %self.endpoint.name, error = %error, retry_in_ms = wait.as_millis() as u64, "claiming deliveries failed");
                    }
                }
            }
            self.inbox.offer(if allowed == usize::MAX {
                handoff_room.saturating_sub(claimed_count)
            } else {
                0
            });
            if claimed_count > 0 {
                continue;
            }

            let until_claim = claim_at.saturating_duration_since(Instant::now());
            if !until_claim.is_zero() {
                wait = wait.min(until_claim);
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                _ = self.inbox.notified() => {}
                permit = Arc::clone(&semaphore).acquire_owned(), if !queue.is_empty() => drop(permit),
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }

        self.inbox.offer(0);
        self.drain(in_flight).await;
    }

    /// Lets requests in flight finish within the shutdown timeout, then
    /// releases the leases of those that did not, so another sidecar or the
    /// next start sends them at once instead of after the lease.
    async fn drain(&self, mut in_flight: JoinSet<()>) {
        let deadline = tokio::time::sleep(self.settings.shutdown_timeout);
        tokio::pin!(deadline);
        while !in_flight.is_empty() {
            tokio::select! {
                _ = &mut deadline => {
                    tracing::warn!(endpoint = %self.endpoint.name, requests = in_flight.len(), "shutdown timeout reached; abandoning requests in flight");
                    in_flight.abort_all();
                    while in_flight.join_next().await.is_some() {}
                    break;
                }
                _ = in_flight.join_next() => {}
            }
        }

        let mut leftover: Vec<i64> = self.claimed.lock().expect("claimed set lock").drain().collect();
        leftover.extend(self.inbox.take().iter().map(|delivery| delivery.id));
        self.release(&leftover).await;
    }

    /// Queues the deliveries the processor handed over, claimed like those
    /// of a claim.
    fn take_handed(&self, queue: &mut VecDeque<ClaimedDelivery>) {
        let handed = self.inbox.take();
        if handed.is_empty() {
            return;
        }
        self.claimed
            .lock()
            .expect("claimed set lock")
            .extend(handed.iter().map(|delivery| delivery.id));
        queue.extend(handed);
    }

    /// Releases the claimed deliveries that wait for a slot. A pause can
    /// outlast their leases, and a probe is one fresh claim, so holding them
    /// would only delay them.
    async fn release_queue(&self, queue: &mut VecDeque<ClaimedDelivery>) {
        let ids: Vec<i64> = queue.drain(..).map(|delivery| delivery.id).collect();
        self.release(&ids).await;
    }

    /// Gives claimed deliveries that were not sent back, undoing their claim,
    /// so another sidecar or the next turn sends them at once instead of
    /// after the lease.
    async fn release(&self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        {
            let mut claimed = self.claimed.lock().expect("claimed set lock");
            for id in ids {
                claimed.remove(id);
            }
        }
        let released = async {
            let client = self.pool.get().await.map_err(|error| error.to_string())?;
            client
                .execute(
                    "update gancho.delivery set lease_until = null, attempts = attempts - 1
                     where id = any($1) and status = 'pending'",
                    &[&ids],
                )
                .await
                .map_err(|error| error.to_string())
        };
        match released.await {
            Ok(count) => {
                tracing::info!(endpoint = %self.endpoint.name, deliveries = count, "released leases of unsent deliveries")
            }
            Err(error) => {
                tracing::warn!(endpoint = %self.endpoint.name, error = %error, "could not release leases; they expire on their own")
            }
        }
    }

    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedDelivery>, db::DbError> {
        let client = self.pool.get().await.map_err(db::DbError::Checkout)?;
        let lease_ms = self.settings.lease.as_millis() as f64;
        let claim = client.prepare_cached(CLAIM_SQL).await?;
        let rows = client
            .query(
                &claim,
                &[&self.endpoint.name, &(limit as i64), &lease_ms, &self.endpoint.ordered],
            )
            .await?;

        let mut deliveries: Vec<ClaimedDelivery> = rows
            .iter()
            .map(|row| ClaimedDelivery {
                id: row.get(0),
                webhook_id: row.get(1),
                attempt: row.get(2),
                event_id: row.get(3),
                event_type: row.get(4),
                data: Arc::new(row.get(5)),
                occurred_at: row.get(6),
            })
            .collect();
        deliveries.sort_by_key(|delivery| delivery.id);
        self.claimed
            .lock()
            .expect("claimed set lock")
            .extend(deliveries.iter().map(|delivery| delivery.id));
        Ok(deliveries)
    }

    /// Reads the endpoint's health and returns how many requests may start
    /// now, with how long to wait when none may. A database error returns the
    /// backoff delay instead.
    async fn check_health(&self, failures: &mut u32) -> Result<(usize, Option<Duration>), Duration> {
        let health = async {
            let client = self.pool.get().await.map_err(db::DbError::Checkout)?;
            health::read(&client, &self.endpoint).await.map_err(db::DbError::Query)
        }
        .await;
        match health {
            Ok(Health::Healthy) => Ok((usize::MAX, None)),
            Ok(Health::Probing) => Ok((1, None)),
            Ok(Health::Paused { until }) => {
                let remaining = (until - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
                Ok((
                    0,
                    Some(
                        remaining
                            .max(Duration::from_millis(10))
                            .min(self.settings.poll_interval),
                    ),
                ))
            }
            Ok(Health::Disabled { .. }) => Ok((0, Some(self.settings.poll_interval))),
            Err(error) => {
                *failures += 1;
                let delay = db::reconnect_delay(*failures);
                tracing::warn!(endpoint = %self.endpoint.name, error = %crate::sidecar::error_chain(&error), retry_in_ms = delay.as_millis() as u64, "reading the endpoint's health failed");
                Err(delay)
            }
        }
    }

    /// Returns how long until a pending delivery of this endpoint may be
    /// claimed, which is when its next attempt is due and its lease, if any,
    /// has expired. `greatest()` ignores a null lease.
    async fn time_until_next_due(&self) -> Option<Duration> {
        let client = self.pool.get().await.ok()?;
        let statement = client
            .prepare_cached(
                "select (extract(epoch from min(greatest(next_attempt_at, lease_until)) - now()) * 1000)::bigint
                 from gancho.delivery where endpoint = $1 and status = 'pending'",
            )
            .await
            .ok()?;
        let row = client.query_one(&statement, &[&self.endpoint.name]).await.ok()?;
        let millis: Option<i64> = row.get(0);
        millis.map(|millis| Duration::from_millis(millis.clamp(10, i64::MAX) as u64))
    }

    /// Sends one delivery and records the attempt, inside a span with its ids.
    fn attempt_task(
        &self,
        delivery: ClaimedDelivery,
        permit: OwnedSemaphorePermit,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let endpoint = Arc::clone(&self.endpoint);
        let client = self.client.clone();
        let recorder = self.recorder.clone();
        let claimed = Arc::clone(&self.claimed);
        let failed = Arc::clone(&self.failed);
        let delivered = Arc::clone(&self.delivered);
        let span = tracing::info_span!(
            "delivery",
            delivery_id = delivery.id,
            event_id = delivery.event_id,
            webhook_id = %delivery.webhook_id,
            endpoint = %endpoint.name,
            attempt = delivery.attempt,
        );

        async move {
            let result = send(&client, &endpoint, &delivery).await;
            let verdict = verdict(&endpoint, &delivery, &result);
            log_attempt(&delivery, &result, verdict);

            // After a success the request slot is free at once, while the
            // outcome waits for the recorder's next batch. After a failure it
            // is held until the outcome is written, so the dispatcher reads
            // the endpoint's health, which may now be paused, before its next
            // request.
            let recorded = recorder.submit(Outcome::new(&delivery, &result, verdict));
            if verdict == Verdict::Delivered {
                drop(permit);
                delivered.fetch_add(1, Ordering::Release);
            }
            let recorded = recorded.await;
            claimed.lock().expect("claimed set lock").remove(&delivery.id);
            if verdict != Verdict::Delivered {
                failed.store(true, Ordering::Release);
            }
            match recorded {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the lease was taken over while the request ran; the other sidecar's result stands")
                }
                // The lease expires and the delivery is sent again: at least once, never lost.
                Err(error) => {
                    tracing::warn!(error = %error, "could not record the attempt; the delivery will be retried after its lease")
                }
            }
        }
        .instrument(span)
    }
}

/// How many deliveries a dispatcher takes from the processor at most: what
/// the endpoint accepted in the last second. A fast endpoint then takes a
/// whole batch of the processor's without a claim, and a handed delivery
/// waits about a second, far less than its lease, before it is sent. Never
/// less than a claim would hold, never more than 4 times the endpoint's
/// slots. At 8 times, `gancho-bench throughput` with ten endpoints measured
/// about 10 MB more peak memory for little more throughput (2 vCPUs).
struct Pace {
    floor: usize,
    ceiling: usize,
    sampled_at: Instant,
    sampled_count: u64,
    per_second: f64,
}

impl Pace {
    fn new(max_in_flight: usize, now: Instant) -> Pace {
        Pace {
            floor: 2 * max_in_flight,
            ceiling: 4 * max_in_flight,
            sampled_at: now,
            sampled_count: 0,
            per_second: 0.0,
        }
    }

    /// `delivered` counts the endpoint's successful attempts since start.
    fn capacity(&mut self, delivered: u64, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.sampled_at);
        if elapsed >= Duration::from_secs(1) {
            self.per_second = delivered.saturating_sub(self.sampled_count) as f64 / elapsed.as_secs_f64();
            self.sampled_at = now;
            self.sampled_count = delivered;
        }
        (self.per_second as usize).clamp(self.floor, self.ceiling)
    }
}

/// Logs an attempt's outcome inside its delivery's span. A success is logged
/// at debug level, since every attempt is also kept in `gancho.attempt`.
fn log_attempt(delivery: &ClaimedDelivery, result: &AttemptResult, verdict: Verdict) {
    let latency_ms = (result.latency.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    let error = result.error.as_deref().unwrap_or("");
    match verdict {
        Verdict::Delivered => tracing::debug!(status = result.status_code, latency_ms, "delivered"),
        Verdict::Retry(delay) => tracing::warn!(
            status = result.status_code,
            error,
            retry_in_ms = delay.as_millis() as u64,
            "delivery attempt failed; will retry"
        ),
        Verdict::Dead => tracing::error!(
            status = result.status_code,
            error,
            attempts = delivery.attempt,
            "delivery dead after its last attempt"
        ),
        Verdict::Gone => tracing::error!(
            status = 410,
            "receiver answered 410 Gone; endpoint disabled until `gancho endpoint enable`"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_follows_the_endpoint_within_its_bounds() {
        let start = Instant::now();
        let mut pace = Pace::new(64, start);
        assert_eq!(pace.capacity(0, start), 128, "no pace yet: what a claim holds");

        // 1,000 a second is capped at 4 x 64.
        assert_eq!(pace.capacity(1_000, start + Duration::from_secs(1)), 256);

        // 200 a second, between the bounds.
        assert_eq!(pace.capacity(1_200, start + Duration::from_secs(2)), 200);

        // Within the second the last pace holds.
        assert_eq!(pace.capacity(9_999, start + Duration::from_millis(2_500)), 200);

        // A stalled endpoint falls back to the floor.
        assert_eq!(pace.capacity(1_200, start + Duration::from_secs(4)), 128);
    }
}
