//! The health of an endpoint as a whole, shared by every sidecar through
//! `gancho.endpoint_state`: the circuit breaker that pauses an endpoint after
//! consecutive failures, Retry-After pauses, and disabling.
//!
//! While paused or disabled, the endpoint's dispatcher claims nothing, so
//! its deliveries wait without using up their retry schedules. Once a pause
//! ends, a dispatcher sends a single request as a probe; a success closes the
//! breaker.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::config::{Endpoint, format_duration};

/// The first pause when the breaker opens; each failed probe doubles it.
pub const BREAKER_BASE_PAUSE: Duration = Duration::from_secs(5);
pub const BREAKER_MAX_PAUSE: Duration = Duration::from_secs(300);
/// The longest Retry-After that is honoured; longer values are cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The endpoint's state, as far as its dispatcher is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Send up to `max_in_flight` requests.
    Healthy,
    /// The breaker is open but its pause is over: send one request as a probe.
    Probing,
    Paused {
        until: DateTime<Utc>,
    },
    Disabled {
        reason: String,
    },
}

/// Creates the endpoint's state row if it does not exist yet.
pub async fn register(client: &impl GenericClient, endpoint: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "insert into gancho.endpoint_state (endpoint) values ($1) on conflict (endpoint) do nothing",
            &[&endpoint],
        )
        .await?;
    Ok(())
}

pub async fn read(client: &deadpool_postgres::Client, endpoint: &Endpoint) -> Result<Health, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "select consecutive_failures, paused_until, disabled_reason, disabled_at is not null, now()
             from gancho.endpoint_state where endpoint = $1",
        )
        .await?;
    let row = client.query_opt(&statement, &[&endpoint.name]).await?;
    let Some(row) = row else {
        return Ok(Health::Healthy);
    };
    let failures: i32 = row.get(0);
    let paused_until: Option<DateTime<Utc>> = row.get(1);
    let disabled: bool = row.get(3);
    let now: DateTime<Utc> = row.get(4);

    if disabled {
        let reason: Option<String> = row.get(2);
        return Ok(Health::Disabled {
            reason: reason.unwrap_or_default(),
        });
    }
    match paused_until {
        Some(until) if until > now => Ok(Health::Paused { until }),
        _ if failures as u32 >= endpoint.breaker_threshold => Ok(Health::Probing),
        _ => Ok(Health::Healthy),
    }
}

/// Closes the breaker after a success. Touches the row only when it is not
/// already healthy, so healthy endpoints do not contend on one row lock.
pub async fn record_success(client: &impl GenericClient, endpoint: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "update gancho.endpoint_state
             set consecutive_failures = 0, failing_since = null, paused_until = null, pause_ms = null
             where endpoint = $1 and (consecutive_failures > 0 or paused_until is not null or failing_since is not null)",
            &[&endpoint],
        )
        .await?;
    Ok(())
}

/// The state after a failed attempt, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureState {
    pub consecutive_failures: i32,
    pub paused_until: Option<DateTime<Utc>>,
    /// Set when this failure disabled the endpoint.
    pub disabled_now: bool,
}

/// Counts a failed attempt: opens the breaker after `breaker_threshold`
/// failures in a row, pauses the endpoint for a Retry-After, and disables it
/// once it has failed without a success for `disable_after`.
pub async fn record_failure(
    client: &impl GenericClient,
    endpoint: &Endpoint,
    retry_after: Option<Duration>,
) -> Result<FailureState, tokio_postgres::Error> {
    let retry_after_ms = retry_after.map(|delay| delay.min(MAX_RETRY_AFTER).as_millis() as f64);
    let threshold = endpoint.breaker_threshold as i32;
    register(client, &endpoint.name).await?;
    let reason = format!(
        "failing without a success for {}",
        format_duration(endpoint.disable_after)
    );
    let row = client
        .query_one(
            // A failure opens the breaker only when the endpoint is not already
            // paused: requests that were in flight when it opened fail too, and
            // must not stretch the pause. Each failed probe doubles the pause.
            "update gancho.endpoint_state
             set consecutive_failures = consecutive_failures + 1,
                 failing_since = coalesce(failing_since, now()),
                 pause_ms = case when coalesce(paused_until, '-infinity') <= now() and consecutive_failures + 1 >= $2
                     then least(coalesce(pause_ms * 2, $3::float8), $4::float8) else pause_ms end,
                 paused_until = greatest(
                     case when coalesce(paused_until, '-infinity') <= now() and consecutive_failures + 1 >= $2
                         then now() + least(coalesce(pause_ms * 2, $3::float8), $4::float8) * interval '1 millisecond'
                         else paused_until end,
                     now() + $5::float8 * interval '1 millisecond'
                 ),
                 disabled_at = case when disabled_at is null and now() - coalesce(failing_since, now()) >= $6::float8 * interval '1 millisecond'
                     then now() else disabled_at end,
                 disabled_reason = case when disabled_at is null and now() - coalesce(failing_since, now()) >= $6::float8 * interval '1 millisecond'
                     then $7 else disabled_reason end
             where endpoint = $1
             returning consecutive_failures, paused_until, disabled_at = now()",
            &[
                &endpoint.name,
                &threshold,
                &(BREAKER_BASE_PAUSE.as_millis() as f64),
                &(BREAKER_MAX_PAUSE.as_millis() as f64),
                &retry_after_ms,
                &(endpoint.disable_after.as_millis() as f64),
                &reason,
            ],
        )
        .await?;
    Ok(FailureState {
        consecutive_failures: row.get(0),
        paused_until: row.get(1),
        disabled_now: row.get::<_, Option<bool>>(2).unwrap_or(false),
    })
}

/// Disables an endpoint at once, as after a 410 Gone.
pub async fn disable(client: &impl GenericClient, endpoint: &str, reason: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "insert into gancho.endpoint_state (endpoint, disabled_at, disabled_reason) values ($1, now(), $2)
             on conflict (endpoint) do update set disabled_at = now(), disabled_reason = excluded.disabled_reason",
            &[&endpoint, &reason],
        )
        .await?;
    Ok(())
}

/// Enables an endpoint again and closes its breaker; what waited is sent next.
/// Returns whether the endpoint has a state row.
pub async fn enable(client: &tokio_postgres::Client, endpoint: &str) -> Result<bool, tokio_postgres::Error> {
    let updated = client
        .execute(
            "update gancho.endpoint_state
             set disabled_at = null, disabled_reason = null, consecutive_failures = 0, failing_since = null,
                 paused_until = null, pause_ms = null
             where endpoint = $1",
            &[&endpoint],
        )
        .await?;
    client
        .execute(
            "update gancho.delivery set next_attempt_at = now() where endpoint = $1 and status = 'pending' and next_attempt_at > now()",
            &[&endpoint],
        )
        .await?;
    Ok(updated > 0)
}
