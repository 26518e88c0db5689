//! The LISTEN connection: wakes the processor when a shop transaction commits
//! a change, and keeps itself alive across restarts and silent networks.
//!
//! Each (re)connection LISTENs first and only then wakes the processor for a
//! full scan, so a change committed during the gap is either seen by that scan
//! or announced by a notification that arrives after the LISTEN.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::db;

/// The channel that the capture trigger notifies.
pub const CHANNEL: &str = "gancho";

/// The maximum wait for the liveness query's result.
const MAX_LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);

/// The share of the server's notification queue above which a warning is
/// logged: when the queue fills, every NOTIFY and so every shop write fails.
const QUEUE_WARNING_LEVEL: f64 = 0.5;

/// Runs the LISTEN connection until `shutdown`. Every `liveness_interval` the
/// connection runs a query, on top of TCP keepalives, so a server that went
/// silent without closing the connection is noticed in bounded time.
pub async fn run(
    mut config: tokio_postgres::Config,
    liveness_interval: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    // A name of its own, so operators can tell it from the pool in pg_stat_activity.
    config.application_name("gancho-listener");
    let mut failures = 0u32;
    loop {
        let reason = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            reason = listen_once(&config, liveness_interval, &wake, &mut failures) => reason,
        };

        failures += 1;
        let delay = db::reconnect_delay(failures);
        tracing::warn!(error = %reason, attempt = failures, retry_in_ms = delay.as_millis() as u64, "listen connection lost; reconnecting");
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Runs one LISTEN connection until it fails, and returns why.
async fn listen_once(
    config: &tokio_postgres::Config,
    liveness_interval: Duration,
    wake: &Notify,
    failures: &mut u32,
) -> String {
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(pair) => pair,
        Err(error) => return format!("connect failed: {error}"),
    };

    // Forward the connection's messages; the channel closes when it ends.
    let (sender, mut notifications) = mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |context| connection.poll_message(context));
    let driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if sender.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => return format!("connection error: {error}"),
            }
        }
        "connection closed".to_string()
    });

    if let Err(error) = client.batch_execute(&format!("listen {CHANNEL}")).await {
        driver.abort();
        return format!("LISTEN failed: {error}");
    }
    if *failures > 0 {
        tracing::info!(attempts = *failures, "listen connection restored");
    } else {
        tracing::info!("listening for changes");
    }
    *failures = 0;
    wake.notify_one();

    let liveness_timeout = liveness_interval.min(MAX_LIVENESS_TIMEOUT);
    let mut liveness = tokio::time::interval(liveness_interval);
    liveness.tick().await;
    loop {
        tokio::select! {
            received = notifications.recv() => {
                if received.is_none() {
                    return match driver.await {
                        Ok(reason) => reason,
                        Err(error) => format!("connection task failed: {error}"),
                    };
                }
                wake.notify_one();
            }
            _ = liveness.tick() => {
                let check = client.query_one("select pg_notification_queue_usage()", &[]);
                match tokio::time::timeout(liveness_timeout, check).await {
                    Ok(Ok(row)) => {
                        let usage: f64 = row.get(0);
                        if usage > QUEUE_WARNING_LEVEL {
                            tracing::warn!(usage_percent = (usage * 100.0).round(), "the Postgres notification queue is more than half full; a session that LISTENs without reading (or sits idle in a transaction) holds it");
                        }
                    }
                    Ok(Err(error)) => {
                        driver.abort();
                        return format!("liveness query failed: {error}");
                    }
                    Err(_) => {
                        driver.abort();
                        return format!("liveness query timed out after {}", crate::config::format_duration(liveness_timeout));
                    }
                }
            }
        }
    }
}
