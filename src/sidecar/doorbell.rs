//! The doorbell: a flag that the capture trigger reads to decide whether to NOTIFY.
//!
//! A transaction that issues NOTIFY holds a cluster-wide lock from its commit
//! until the commit is on disk, so notifying writers commit one at a time
//! instead of sharing a WAL flush. The trigger therefore notifies only while
//! the sequence `gancho.doorbell` is 1, which the processor sets just before
//! it waits, and sets back to 0 when it wakes. Under load the processor is
//! always busy, and the shop's transactions do not notify at all.
//!
//! The trigger reads the doorbell after writing its outbox row, before its
//! transaction commits. A writer that read 0 just before the processor set 1
//! would not notify, and its commit could come after the processor's last
//! look at the outbox. So after setting 1 the processor notes the
//! transactions then in progress, and looks at the outbox again as they end:
//! every writer that read 0 is among them, since it had a transaction id
//! before it read.

use std::time::Duration;

use deadpool_postgres::Client;

/// Sets the doorbell to 1 and returns the ids of the transactions in progress
/// at that moment. The snapshot is taken by a second statement, after the
/// `setval` has taken effect, so it includes every writer that read 0.
pub async fn arm(client: &Client) -> Result<Vec<i64>, tokio_postgres::Error> {
    let set = client.prepare_cached("select setval('gancho.doorbell', 1)").await?;
    client.execute(&set, &[]).await?;
    let snapshot = client
        .prepare_cached(
            "select coalesce(array_agg(xid::text::bigint), '{}') from pg_snapshot_xip(pg_current_snapshot()) xid",
        )
        .await?;
    let row = client.query_one(&snapshot, &[]).await?;
    Ok(row.get(0))
}

/// Sets the doorbell to 0: the processor is at work and will look at the
/// outbox again before it waits.
pub async fn disarm(client: &Client) -> Result<(), tokio_postgres::Error> {
    let reset = client.prepare_cached("select setval('gancho.doorbell', 0)").await?;
    client.execute(&reset, &[]).await?;
    Ok(())
}

/// Returns those of `transactions` that are still in progress.
pub async fn still_running(client: &Client, transactions: &[i64]) -> Result<Vec<i64>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(
            "select coalesce(array_agg(xid), '{}') from unnest($1::bigint[]) xid
             where pg_xact_status(xid::text::xid8) = 'in progress'",
        )
        .await?;
    let row = client.query_one(&statement, &[&transactions]).await?;
    Ok(row.get(0))
}

/// Returns the wait before the next look at transactions that were in
/// progress when the doorbell was set: short at first, since most shop transactions end
/// within milliseconds, then doubling up to `max`, for the rare long one.
pub fn next_check_delay(previous: Option<Duration>, max: Duration) -> Duration {
    match previous {
        None => Duration::from_millis(2),
        Some(delay) => (delay * 2).min(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_delay_doubles_up_to_max() {
        let max = Duration::from_millis(10);
        let first = next_check_delay(None, max);
        assert_eq!(first, Duration::from_millis(2));
        let second = next_check_delay(Some(first), max);
        assert_eq!(second, Duration::from_millis(4));
        let third = next_check_delay(Some(second), max);
        assert_eq!(third, Duration::from_millis(8));
        assert_eq!(next_check_delay(Some(third), max), max);
    }
}
