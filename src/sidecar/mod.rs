//! The sidecar behind `gancho run`: one LISTEN connection, a small pool, the
//! processor and one dispatcher per endpoint, all stopped by one token.

pub mod doorbell;
pub mod listener;
pub mod maintenance;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, DbError};
use crate::delivery::Dispatcher;
use crate::delivery::handoff::Inbox;
use crate::rules::processor::Processor;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Database(#[from] DbError),
}

/// Runs until `shutdown` is cancelled, then stops claiming work and lets
/// requests in flight finish within the configured shutdown timeout.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), SidecarError> {
    let pg_config = db::parse_url(&config.database_url)?;

    // Wait for Postgres, which may start after the sidecar (as in docker compose).
    let Some(client) = connect_with_retry(&pg_config, &shutdown).await else {
        return Ok(());
    };
    db::check_schema(&client).await?;
    warn_about_install_drift(&client, &config).await;
    drop(client);
    for warning in &config.warnings {
        tracing::warn!(key = %warning.key, "{}", warning.message);
    }

    let pool = db::pool(&pg_config, config.sidecar.pool_size)?;
    let processor_wake = Arc::new(Notify::new());
    let inboxes: HashMap<String, Arc<Inbox>> = config
        .endpoints
        .iter()
        .map(|endpoint| (endpoint.name.clone(), Arc::default()))
        .collect();

    let mut tasks = JoinSet::new();
    tasks.spawn(listener::run(
        pg_config.clone(),
        config.sidecar.liveness_interval,
        Arc::clone(&processor_wake),
        shutdown.clone(),
    ));
    tasks.spawn(process_loop(
        Arc::clone(&config),
        pool.clone(),
        Arc::clone(&processor_wake),
        inboxes.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(maintenance::run(Arc::clone(&config), pool.clone(), shutdown.clone()));
    for endpoint in &config.endpoints {
        let dispatcher = Dispatcher::new(
            Arc::new(endpoint.clone()),
            pool.clone(),
            config.sidecar.clone(),
            Arc::clone(&inboxes[&endpoint.name]),
            shutdown.clone(),
        );
        tasks.spawn(dispatcher.run());
    }
    tracing::info!(
        sources = config.sources.len(),
        rules = config.rules.len(),
        endpoints = config.endpoints.len(),
        "gancho started"
    );

    // A task that panics takes the sidecar down, so a supervisor restarts it
    // instead of it running on with a part missing.
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            tracing::error!(error = %error, "a sidecar task failed; shutting down");
            shutdown.cancel();
        }
    }
    pool.close();
    tracing::info!("gancho stopped");
    Ok(())
}

async fn connect_with_retry(
    pg_config: &tokio_postgres::Config,
    shutdown: &CancellationToken,
) -> Option<tokio_postgres::Client> {
    let mut failures = 0u32;
    loop {
        match db::connect(pg_config).await {
            Ok(client) => return Some(client),
            Err(error) => {
                failures += 1;
                let delay = db::reconnect_delay(failures);
                tracing::warn!(error = %error_chain(&error), attempt = failures, retry_in_ms = delay.as_millis() as u64, "cannot reach Postgres; retrying");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Warns when the installed triggers do not capture what the config expects,
/// which happens when the config changed after `gancho install`.
async fn warn_about_install_drift(client: &tokio_postgres::Client, config: &Config) {
    let rows = match client
        .query(
            "select source, table_schema, table_name, key_columns, columns, fire_always from gancho.watched",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(error) => {
            tracing::warn!(error = %error, "cannot read gancho.watched");
            return;
        }
    };
    type Installed = (String, String, Vec<String>, Vec<String>, bool);
    let installed: HashMap<String, Installed> = rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3), row.get(4), row.get(5))))
        .collect();

    for source in &config.sources {
        let expected = (
            source.schema.clone(),
            source.table.clone(),
            source.key.clone(),
            source.columns.clone(),
            source.fire_in_replica_mode,
        );
        match installed.get(&source.name) {
            None => tracing::warn!(source = %source.name, "source has no triggers; run `gancho install --config FILE`"),
            Some(found) if *found != expected => tracing::warn!(
                source = %source.name,
                "installed triggers differ from the config; run `gancho install --config FILE` to update them"
            ),
            Some(_) => {}
        }
    }
}

/// Processes the outbox whenever woken, and every poll interval in case a
/// notification was missed. Before it waits it sets the doorbell, and looks
/// at the outbox again as the transactions that may have read it too early end.
async fn process_loop(
    config: Arc<Config>,
    pool: deadpool_postgres::Pool,
    wake: Arc<Notify>,
    inboxes: HashMap<String, Arc<Inbox>>,
    shutdown: CancellationToken,
) {
    let processor = Processor::new(Arc::clone(&config), inboxes);
    let mut failures = 0u32;
    let mut armed = false;
    let mut woken = false;
    loop {
        let mut wait = config.sidecar.poll_interval;
        if armed && woken {
            let disarmed = async {
                let client = pool.get().await.map_err(DbError::Checkout)?;
                doorbell::disarm(&client).await.map_err(DbError::Query)
            };
            match disarmed.await {
                Ok(()) => armed = false,
                Err(error) => tracing::debug!(error = %error_chain(&error), "could not reset the doorbell"),
            }
        }

        if let Err(delay) = drain(&processor, &pool, &shutdown, &mut failures).await {
            wait = delay;
        } else if !shutdown.is_cancelled() {
            let armed_now = async {
                let client = pool.get().await.map_err(DbError::Checkout)?;
                doorbell::arm(&client).await.map_err(DbError::Query)
            };
            match armed_now.await {
                Ok(in_progress) => {
                    armed = true;
                    let drained = drain(&processor, &pool, &shutdown, &mut failures).await;
                    if drained.is_ok() {
                        let waited =
                            wait_for_writers(&processor, &pool, &wake, &shutdown, in_progress, &config, &mut failures)
                                .await;
                        if let Err(delay) = waited {
                            wait = delay;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "could not set the doorbell; polling instead");
                }
            }
        }

        // Only a notification stops the doorbell: a writer rang, and while
        // this loop drains, more rings would only slow the writers down.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => woken = true,
            _ = tokio::time::sleep(wait) => woken = false,
        }
    }

    // With no sidecar waiting, a NOTIFY would only make the shop's writers
    // queue on the notify lock. Another sidecar that still waits sets the
    // doorbell again after its next look at the outbox, at most a poll
    // interval later. A sidecar killed outright leaves the doorbell as it
    // was until a sidecar runs again.
    let disarmed = async {
        let client = pool.get().await.map_err(DbError::Checkout)?;
        doorbell::disarm(&client).await.map_err(DbError::Query)
    };
    if let Err(error) = disarmed.await {
        tracing::warn!(error = %error_chain(&error), "could not reset the doorbell; shop transactions notify until a sidecar runs");
    }
}

/// Processes outbox batches until one comes back short, waking the
/// dispatchers of the endpoints that got deliveries after each commit.
/// Returns the backoff delay when processing failed.
async fn drain(
    processor: &Processor,
    pool: &deadpool_postgres::Pool,
    shutdown: &CancellationToken,
    failures: &mut u32,
) -> Result<(), std::time::Duration> {
    while !shutdown.is_cancelled() {
        let result = async {
            let mut client = pool.get().await.map_err(DbError::Checkout)?;
            processor.process_batch(&mut client).await.map_err(DbError::Query)
        }
        .await;
        match result {
            Ok(outcome) => {
                *failures = 0;
                if outcome.changes > 0 {
                    tracing::debug!(
                        changes = outcome.changes,
                        events = outcome.events,
                        deliveries = outcome.deliveries,
                        handed = outcome.handed,
                        "outbox batch processed"
                    );
                }
                if !outcome.full {
                    return Ok(());
                }
            }
            Err(error) => {
                *failures += 1;
                let delay = db::reconnect_delay(*failures);
                tracing::warn!(error = %error_chain(&error), retry_in_ms = delay.as_millis() as u64, "processing the outbox failed; retrying");
                return Err(delay);
            }
        }
    }
    Ok(())
}

/// Looks at the outbox again each time some of the transactions that were in
/// progress when the doorbell was set have ended, until none is left. One of
/// them may have read the doorbell before it was set, and so not notify.
#[allow(clippy::too_many_arguments)]
async fn wait_for_writers(
    processor: &Processor,
    pool: &deadpool_postgres::Pool,
    wake: &Notify,
    shutdown: &CancellationToken,
    mut in_progress: Vec<i64>,
    config: &Config,
    failures: &mut u32,
) -> Result<(), std::time::Duration> {
    let mut delay = None;
    while !in_progress.is_empty() {
        let next = doorbell::next_check_delay(delay, config.sidecar.poll_interval);
        delay = Some(next);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            // A notification means new work: leave the wait to the main loop.
            _ = wake.notified() => {
                wake.notify_one();
                return Ok(());
            }
            _ = tokio::time::sleep(next) => {}
        }

        let still = async {
            let client = pool.get().await.map_err(DbError::Checkout)?;
            doorbell::still_running(&client, &in_progress)
                .await
                .map_err(DbError::Query)
        };
        let still = match still.await {
            Ok(still) => still,
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "could not read transaction status");
                return Ok(());
            }
        };
        if still.len() < in_progress.len() {
            drain(processor, pool, shutdown, failures).await?;
        }
        in_progress = still;
    }
    Ok(())
}

/// Formats an error with all its causes on one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
