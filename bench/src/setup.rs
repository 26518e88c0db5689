//! The database under test and its surroundings. The database lives on a
//! throwaway cluster with durable settings, or is created on an existing
//! server. This module also creates the workload tables, installs each
//! system's capture triggers, and describes the machine and the server.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use gancho::demo::cluster::TempCluster;
use tokio_postgres::{Client, NoTls};

use crate::process::run_gancho_command;

/// Server settings of the throwaway cluster. Durability stays as in
/// production (fsync, full-page writes and synchronous commit on), so a
/// commit waits for its WAL flush. max_wal_size is raised so that checkpoints
/// come from the benchmark's own CHECKPOINT between runs rather than from WAL
/// volume in the middle of a run.
pub const CLUSTER_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("full_page_writes", "on"),
    ("synchronous_commit", "on"),
    ("shared_buffers", "256MB"),
    ("max_connections", "200"),
    ("max_wal_size", "8GB"),
];

/// The settings printed at the top of a run.
const REPORTED_SETTINGS: &[&str] = &[
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "shared_buffers",
    "wal_level",
    "max_connections",
    "max_wal_size",
    "checkpoint_timeout",
];

/// The NOTIFY channel of the naive baseline.
pub const NAIVE_CHANNEL: &str = "bench_naive";

/// The naive baseline's trigger, as a shop would hand-write it: the whole
/// row as JSON in a notification, on every insert and update.
const NAIVE_TRIGGER_SQL: &str = "
create or replace function bench_naive_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('bench_naive', row_to_json(NEW)::text);
    return NEW;
end
$$;
create trigger bench_naive after insert or update on bench_stock
    for each row execute function bench_naive_notify();
create trigger bench_naive after insert or update on bench_orders
    for each row execute function bench_naive_notify();
";

/// The capture triggers on the workload tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Triggers {
    None,
    Gancho,
    Naive,
}

impl Triggers {
    pub fn label(self) -> &'static str {
        match self {
            Triggers::None => "no trigger",
            Triggers::Gancho => "gancho",
            Triggers::Naive => "naive NOTIFY",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Triggers::None => "none",
            Triggers::Gancho => "gancho",
            Triggers::Naive => "naive",
        }
    }
}

/// The server of the benchmark database.
enum Server {
    Cluster(TempCluster),
    Existing,
}

/// The benchmark's own database, dropped by [`Database::drop_database`].
pub struct Database {
    server: Server,
    /// URL of the server's maintenance database, to create and drop ours.
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl Database {
    /// Starts a throwaway cluster, or uses the server at `existing`, and
    /// creates the database `gancho_bench_<pid>` there.
    pub async fn create(existing: Option<&str>) -> anyhow::Result<Database> {
        let (server, admin_url) = match existing {
            Some(url) => (Server::Existing, url.to_string()),
            None => {
                let cluster = tokio::task::spawn_blocking(|| TempCluster::start_with(CLUSTER_SETTINGS))
                    .await
                    .context("the cluster start-up panicked")?
                    .context("starting a throwaway Postgres cluster (or pass --database-url)")?;
                let url = cluster.url("postgres");
                (Server::Cluster(cluster), url)
            }
        };
        let name = format!("gancho_bench_{}", std::process::id());
        let url = with_database(&admin_url, &name)?;
        let admin = connect(&admin_url).await?;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .with_context(|| format!("creating the database {name}"))?;
        Ok(Database {
            server,
            admin_url,
            name,
            url,
        })
    }

    pub fn is_throwaway(&self) -> bool {
        matches!(self.server, Server::Cluster(_))
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }

    /// Drops the database, then stops the throwaway cluster if there is one.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("drop database if exists {} with (force)", self.name))
            .await
            .with_context(|| format!("dropping the database {}", self.name))?;
        drop(admin);
        if let Server::Cluster(cluster) = self.server {
            tokio::task::spawn_blocking(|| drop(cluster))
                .await
                .context("stopping the cluster panicked")?;
        }
        Ok(())
    }

    /// The server version and settings, one line each, for the header.
    pub async fn describe_server(&self) -> anyhow::Result<(String, Vec<(String, String)>)> {
        let client = self.connect().await?;
        let version: String = client.query_one("select version()", &[]).await?.get(0);
        let mut settings = Vec::new();
        for name in REPORTED_SETTINGS {
            let value: String = client.query_one(&format!("show {name}"), &[]).await?.get(0);
            settings.push((name.to_string(), value));
        }
        Ok((version, settings))
    }
}

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Returns the same postgres:// URL with another database.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url)
        .with_context(|| format!("--database-url must be a postgres:// URL, not {}", redact(url)))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        bail!("--database-url must be a postgres:// URL, not {}", redact(url));
    }
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

/// Returns the URL with its password masked, for messages and output.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => "(an invalid URL)".to_string(),
    }
}

/// Creates the workload tables with `stock_rows` rows of stock.
pub async fn create_tables(client: &Client, stock_rows: i64) -> anyhow::Result<()> {
    client
        .batch_execute(
            "drop table if exists bench_stock, bench_orders;
             create table bench_stock (
                 id bigint primary key,
                 warehouse int,
                 count_on_hand int,
                 seq bigint
             );
             create table bench_orders (
                 id bigserial primary key,
                 stock_id bigint,
                 quantity int,
                 state text,
                 created_at timestamptz default now()
             );",
        )
        .await
        .context("creating the workload tables")?;
    client
        .execute(
            "insert into bench_stock (id, warehouse, count_on_hand, seq)
             select g, g % 10, 1000, 0 from generate_series(1, $1::bigint) g",
            &[&stock_rows],
        )
        .await
        .context("filling bench_stock")?;
    client.batch_execute("vacuum analyze bench_stock").await?;
    Ok(())
}

/// Leaves the workload tables with exactly one system's triggers, an empty
/// bench_orders, and an empty gancho schema when that system is gancho:
/// uninstalls gancho, drops the naive triggers, truncates bench_orders, then
/// installs the requested triggers. The truncation comes first because
/// gancho records a TRUNCATE as a change of its own.
pub async fn set_triggers(client: &Client, gancho: &Path, config: &Path, triggers: Triggers) -> anyhow::Result<()> {
    let installed: bool = client
        .query_one(
            "select exists (select 1 from pg_namespace where nspname = 'gancho')",
            &[],
        )
        .await?
        .get(0);
    if installed {
        run_gancho_command(gancho, "uninstall", config).await?;
    }
    client
        .batch_execute(
            "drop trigger if exists bench_naive on bench_stock;
             drop trigger if exists bench_naive on bench_orders;
             drop function if exists bench_naive_notify();
             truncate bench_orders;",
        )
        .await?;
    match triggers {
        Triggers::None => {}
        Triggers::Gancho => run_gancho_command(gancho, "install", config).await?,
        Triggers::Naive => client.batch_execute(NAIVE_TRIGGER_SQL).await?,
    }
    Ok(())
}

/// Brings the tables to a comparable state before a measured run: vacuums
/// them, and writes a checkpoint so that every run starts with the same
/// full-page-write cost.
pub async fn reset_between_runs(client: &Client) -> anyhow::Result<()> {
    // One statement per call: a multi-statement string runs as one
    // transaction, and VACUUM cannot run inside one.
    for statement in [
        "vacuum analyze bench_stock",
        "vacuum analyze bench_orders",
        "checkpoint",
    ] {
        client
            .batch_execute(statement)
            .await
            .with_context(|| format!("running `{statement}` between runs"))?;
    }
    Ok(())
}

/// Waits until a session of this database with this application_name has
/// run LISTEN, which is when a listener is ready to receive notifications.
pub async fn wait_for_listener(client: &Client, application_name: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let listening: bool = client
            .query_one(
                "select exists (
                     select 1 from pg_stat_activity
                     where datname = current_database() and application_name = $1 and query ilike 'listen%'
                 )",
                &[&application_name],
            )
            .await?
            .get(0);
        if listening {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no session named {application_name} was listening after {}s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One endpoint of a gancho config.
pub struct EndpointConfig {
    pub url: String,
    pub secret: String,
}

/// The gancho settings that a benchmark run varies.
#[derive(Debug, Clone, Copy)]
pub struct GanchoSettings {
    pub max_in_flight: u32,
    pub ordered: bool,
    /// The endpoints' request timeout; None keeps gancho's default.
    pub timeout: Option<Duration>,
}

/// Writes the gancho config for the workload tables and these endpoints.
pub fn write_config(
    path: &Path,
    database_url: &str,
    endpoints: &[EndpointConfig],
    settings: GanchoSettings,
) -> anyhow::Result<PathBuf> {
    let mut text = String::from("# Written by gancho-bench for one benchmark run.\n");
    writeln!(text, "database_url = {}", toml_string(database_url))?;
    text.push_str(
        r#"
[[source]]
name = "stock"
table = "public.bench_stock"
key = ["id"]
columns = ["warehouse", "count_on_hand", "seq"]

[[source]]
name = "orders"
table = "public.bench_orders"
key = ["id"]
columns = ["stock_id", "quantity", "state"]

[[rule]]
name = "stock-changed"
source = "stock"
kind = "change"
event = "inventory.changed"
"#,
    );
    for (index, endpoint) in endpoints.iter().enumerate() {
        writeln!(text, "\n[[endpoint]]")?;
        writeln!(text, "name = \"e{index}\"")?;
        writeln!(text, "url = {}", toml_string(&endpoint.url))?;
        writeln!(text, "secret = {}", toml_string(&endpoint.secret))?;
        writeln!(text, "events = [\"inventory.changed\"]")?;
        writeln!(text, "max_in_flight = {}", settings.max_in_flight)?;
        writeln!(text, "ordered = {}", settings.ordered)?;
        if let Some(timeout) = settings.timeout {
            writeln!(text, "timeout = \"{}s\"", timeout.as_secs())?;
        }
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Quotes a value as a TOML basic string. gancho expands `${NAME}` in the URL and secret, so a
/// literal `$` is written `$$`. JSON's string escapes are valid in TOML.
fn toml_string(value: &str) -> String {
    serde_json::to_string(&value.replace('$', "$$")).expect("a string serializes")
}

/// Describes the machine: core count, CPU model, memory and kernel, from /proc.
pub fn describe_machine() -> Vec<(String, String)> {
    let cores = std::thread::available_parallelism()
        .map(|count| count.to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|value| value.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    vec![
        ("cores (nproc)".to_string(), cores),
        ("CPU".to_string(), model),
        ("memory".to_string(), memory),
        ("Linux".to_string(), kernel),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_string_escapes_dollar_and_quotes() {
        assert_eq!(toml_string(r#"pa$s"w"#), r#""pa$$s\"w""#);
    }

    #[test]
    fn with_database_replaces_path() {
        let url = with_database("postgres://postgres@127.0.0.1:5432/postgres", "gancho_bench_1").unwrap();
        assert_eq!(url, "postgres://postgres@127.0.0.1:5432/gancho_bench_1");
    }
}
