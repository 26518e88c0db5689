//! Connections to the shop's database: parsing the URL, the connection pool, and
//! the one place that decides which database errors are worth a retry.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL (the value of database_url): {0}")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("cannot connect to Postgres at {target}{hint}")]
    Connect {
        target: String,
        hint: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot build the connection pool")]
    Pool(#[source] deadpool_postgres::BuildError),
    #[error("no connection available from the pool")]
    Checkout(#[source] deadpool_postgres::PoolError),
    #[error("query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("gancho is not installed in this database; run `gancho install --config FILE` first")]
    NotInstalled,
    #[error(
        "this database has gancho schema version {found}, but this gancho needs version {expected}; run `gancho install --config FILE` to upgrade"
    )]
    WrongSchemaVersion { found: String, expected: String },
}

/// The schema version that sql/gancho.sql records and this binary expects.
pub const SCHEMA_VERSION: &str = "1";

/// Parses a database URL and sets TCP keepalives, so a connection to a server
/// that vanished without closing is noticed within about a minute instead of
/// the operating system's two hours.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(DbError::InvalidUrl)?;
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .connect_timeout(Duration::from_secs(10));
    // Timestamps in payloads and enrichment results are written in UTC,
    // whatever the server's default time zone.
    let options = format!("{} -c TimeZone=UTC", config.get_options().unwrap_or_default());
    config.options(options.trim());
    if config.get_application_name().is_none() {
        config.application_name("gancho");
    }
    Ok(config)
}

/// Opens one connection and drives it on a spawned task.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|source| connect_error(config, source))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "database connection closed");
        }
    });
    Ok(client)
}

/// Describes a failed connection with the server it tried, and a hint for
/// the one setting gancho cannot follow.
pub fn connect_error(config: &tokio_postgres::Config, source: tokio_postgres::Error) -> DbError {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().unwrap_or("(default database)");
    let hint = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        " (gancho does not support TLS to Postgres yet; use sslmode=disable or prefer)"
    } else {
        ""
    };
    DbError::Connect {
        target: format!("{}:{port}/{database}", hosts.join(",")),
        hint,
        source,
    }
}

/// Builds the sidecar's connection pool. Its sessions commit without waiting
/// for the WAL flush (`synchronous_commit = off`). A claim or an attempt
/// record lost in a server crash only means that the delivery is sent again
/// with the same webhook id, because the processor commits events and
/// deliveries synchronously before any of them can be claimed.
pub fn pool(config: &tokio_postgres::Config, size: usize) -> Result<Pool, DbError> {
    let mut config = config.clone();
    let options = format!("{} -c synchronous_commit=off", config.get_options().unwrap_or_default());
    config.options(options.trim());
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(DbError::Pool)
}

/// Fails with a clear message when the gancho schema is missing or of another version.
pub async fn check_schema(client: &tokio_postgres::Client) -> Result<(), DbError> {
    let row = client
        .query_one("select to_regclass('gancho.meta') is not null", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Err(DbError::NotInstalled);
    }
    let version: Option<String> = client
        .query_opt("select value from gancho.meta where key = 'schema_version'", &[])
        .await?
        .map(|row| row.get(0));
    match version {
        Some(found) if found == SCHEMA_VERSION => Ok(()),
        Some(found) => Err(DbError::WrongSchemaVersion {
            found,
            expected: SCHEMA_VERSION.to_string(),
        }),
        None => Err(DbError::NotInstalled),
    }
}

/// Whether an error is passing (the server restarting, a lost connection, a
/// serialization conflict) so the same work should simply be tried again.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    let Some(code) = error.code() else {
        // No SQLSTATE means an I/O or protocol failure on the connection.
        return true;
    };
    code == &SqlState::T_R_SERIALIZATION_FAILURE
        || code == &SqlState::T_R_DEADLOCK_DETECTED
        || code == &SqlState::ADMIN_SHUTDOWN
        || code == &SqlState::CRASH_SHUTDOWN
        || code == &SqlState::CANNOT_CONNECT_NOW
        || code == &SqlState::QUERY_CANCELED
        || code == &SqlState::LOCK_NOT_AVAILABLE
        || code == &SqlState::TOO_MANY_CONNECTIONS
        || code.code().starts_with("08")
}

/// Exponential backoff for reconnecting: 0.5 s doubling to 30 s, with up to
/// a quarter of random jitter so replicas do not reconnect in step.
pub fn reconnect_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << failures.min(6));
    let capped = base.min(Duration::from_secs(30));
    let jitter = capped.mul_f64(rand::random::<f64>() * 0.25);
    capped + jitter
}
