//! `gancho deliveries` and `gancho redeliver`: what was sent, and sending again.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub struct DeliverySummary {
    pub id: i64,
    pub webhook_id: String,
    pub endpoint: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Lists the newest deliveries, optionally of one status and one endpoint.
pub async fn list(
    client: &tokio_postgres::Client,
    status: Option<&str>,
    endpoint: Option<&str>,
    limit: i64,
) -> Result<Vec<DeliverySummary>, tokio_postgres::Error> {
    let rows = client
        .query(
            "select d.id, d.webhook_id, d.endpoint, e.type, d.status, d.attempts, d.created_at, d.last_error
             from gancho.delivery d join gancho.event e on e.id = d.event_id
             where ($1::text is null or d.status = $1) and ($2::text is null or d.endpoint = $2)
             order by d.id desc
             limit $3",
            &[&status, &endpoint, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| DeliverySummary {
            id: row.get(0),
            webhook_id: row.get(1),
            endpoint: row.get(2),
            event_type: row.get(3),
            status: row.get(4),
            attempts: row.get(5),
            created_at: row.get(6),
            last_error: row.get(7),
        })
        .collect())
}

/// Puts deliveries back in the queue with a fresh retry schedule. They keep
/// their webhook-id, so a receiver that already processed one can tell.
/// `ids` selects deliveries by id; with `all_dead` every dead delivery (of
/// `endpoint`, when given) is selected. Returns the ids queued again.
pub async fn redeliver(
    client: &tokio_postgres::Client,
    ids: &[i64],
    all_dead: bool,
    endpoint: Option<&str>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "update gancho.delivery
             set status = 'pending', attempts = 0, next_attempt_at = now(), lease_until = null, finished_at = null
             where (id = any($1) or ($2 and status = 'dead'))
               and ($3::text is null or endpoint = $3)
             returning id",
            &[&ids, &all_dead, &endpoint],
        )
        .await?;
    let mut queued: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    queued.sort_unstable();
    Ok(queued)
}
