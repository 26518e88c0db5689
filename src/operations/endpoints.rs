//! `gancho endpoint`: the health of each endpoint, and enabling one again.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub struct EndpointSummary {
    pub endpoint: String,
    pub pending: i64,
    pub dead: i64,
    pub consecutive_failures: i32,
    pub paused_until: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

/// Lists every endpoint that has a state row or deliveries.
pub async fn list(client: &tokio_postgres::Client) -> Result<Vec<EndpointSummary>, tokio_postgres::Error> {
    let rows = client
        .query(
            "with counts as (
                 select endpoint,
                        count(*) filter (where status = 'pending') as pending,
                        count(*) filter (where status = 'dead') as dead
                 from gancho.delivery where status <> 'delivered' group by endpoint
             )
             select coalesce(s.endpoint, c.endpoint), coalesce(c.pending, 0), coalesce(c.dead, 0),
                    coalesce(s.consecutive_failures, 0), s.paused_until, s.disabled_at, s.disabled_reason
             from gancho.endpoint_state s full join counts c on c.endpoint = s.endpoint
             order by 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| EndpointSummary {
            endpoint: row.get(0),
            pending: row.get(1),
            dead: row.get(2),
            consecutive_failures: row.get(3),
            paused_until: row.get(4),
            disabled_at: row.get(5),
            disabled_reason: row.get(6),
        })
        .collect())
}
