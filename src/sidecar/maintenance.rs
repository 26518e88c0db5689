//! Background upkeep: retention of old history, and warnings when a watched
//! table no longer has a captured column.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::DbError;
use crate::operations::check::table_columns;

/// How often retention and the column check run.
const INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per statement, so pruning never holds long locks or builds a huge transaction.
pub const PRUNE_BATCH: i64 = 5000;
/// The advisory lock that lets one sidecar at a time prune.
const PRUNE_LOCK: i64 = 0x67_61_6e_63_68_70;

pub async fn run(config: Arc<Config>, pool: Pool, shutdown: CancellationToken) {
    loop {
        if let Err(error) = warn_about_missing_columns(&config, &pool).await {
            tracing::debug!(error = %crate::sidecar::error_chain(&error), "column check skipped");
        }
        match prune(&pool, config.sidecar.retention).await {
            Ok(removed) if removed.total() > 0 => tracing::info!(
                outbox = removed.outbox,
                events = removed.events,
                retention = %crate::config::format_duration(config.sidecar.retention),
                "pruned old history"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %crate::sidecar::error_chain(&error), "pruning old history failed; will retry")
            }
        }

        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub outbox: u64,
    /// Events removed, each with its deliveries and their attempts.
    pub events: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.outbox + self.events
    }
}

/// Deletes, in batches, processed outbox rows and events older than
/// `retention` whose deliveries all succeeded. Pending and dead deliveries
/// are never pruned, so a dead delivery can be sent again whatever its age.
pub async fn prune(pool: &Pool, retention: Duration) -> Result<Pruned, DbError> {
    let mut client = pool.get().await.map_err(DbError::Checkout)?;
    let retention_ms = retention.as_millis() as f64;
    let mut pruned = Pruned::default();

    loop {
        let transaction = client.transaction().await?;
        let locked: bool = transaction
            .query_one("select pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(pruned);
        }

        let outbox = transaction
            .execute(
                "delete from gancho.outbox where id in (
                     select id from gancho.outbox
                     where processed_at < now() - $1 * interval '1 millisecond'
                     order by processed_at limit $2
                 )",
                &[&retention_ms, &PRUNE_BATCH],
            )
            .await?;
        let events = transaction
            .execute(
                "delete from gancho.event where id in (
                     select e.id from gancho.event e
                     where e.created_at < now() - $1 * interval '1 millisecond'
                       and not exists (
                           select 1 from gancho.delivery d where d.event_id = e.id and d.status <> 'delivered'
                       )
                     order by e.created_at limit $2
                 )",
                &[&retention_ms, &PRUNE_BATCH],
            )
            .await?;
        transaction.commit().await?;

        pruned.outbox += outbox;
        pruned.events += events;
        if outbox < PRUNE_BATCH as u64 && events < PRUNE_BATCH as u64 {
            return Ok(pruned);
        }
    }
}

/// Logs each captured or key column that no longer exists in its table. The
/// trigger keeps working (the column reads as null), so only the log and
/// `gancho check` show the drift.
async fn warn_about_missing_columns(config: &Config, pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await.map_err(DbError::Checkout)?;
    for source in &config.sources {
        let Some(columns) = table_columns(&client, source).await? else {
            tracing::warn!(source = %source.name, table = %source.qualified_table(), "watched table not found; fix the source's table in the config or restore the table");
            continue;
        };
        for column in source.key.iter().chain(&source.columns) {
            if !columns.iter().any(|(name, _)| name == column) {
                tracing::warn!(
                    source = %source.name,
                    table = %source.qualified_table(),
                    column = %column,
                    "captured column does not exist in the table (renamed, dropped or misspelt) and reads as null; fix the source's columns and run `gancho install`"
                );
            }
        }
    }
    Ok(())
}
