//! The `gancho` command line: parses arguments, loads the config, sets up
//! logging and hands over to the library. Exit codes: 0 success, 1 failure,
//! 2 invalid config or usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use gancho::config::Config;
use gancho::operations::{check, deliveries};
use gancho::{capture, db, demo, sidecar};

#[derive(Parser)]
#[command(
    name = "gancho",
    version,
    about = "Turns changes in a shop's Postgres tables into signed webhooks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Path of the TOML config file.
    #[arg(long, short, env = "GANCHO_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: capture events, evaluate rules, deliver webhooks.
    Run(ConfigArgs),
    /// Install or update the capture schema and triggers for a config.
    Install {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the SQL instead of running it, for a DBA to review and run with psql.
        #[arg(long)]
        print: bool,
    },
    /// Remove the triggers and the gancho schema, with its history.
    Uninstall {
        #[command(flatten)]
        config: ConfigArgs,
        /// Database to uninstall from, instead of the config's database_url.
        /// Only this flag overrides the config: a DATABASE_URL left in the
        /// shell must not point this destructive command at another database.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Validate a config against the live database.
    Check(ConfigArgs),
    /// List recent deliveries.
    Deliveries {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only deliveries with this status: pending, delivered or dead.
        #[arg(long, value_parser = ["pending", "delivered", "dead"])]
        status: Option<String>,
        /// Only deliveries to this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// Maximum number of deliveries listed, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Queue deliveries again, keeping their webhook-id.
    Redeliver {
        #[command(flatten)]
        config: ConfigArgs,
        /// Delivery ids, as `gancho deliveries` lists them.
        ids: Vec<i64>,
        /// Every dead delivery (of --endpoint, when given).
        #[arg(long)]
        dead: bool,
        /// Only deliveries to this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Show endpoint health, or enable or disable an endpoint.
    Endpoint {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        action: EndpointAction,
    },
    /// Show the three jobs end to end on a demo shop, with nothing to set up.
    Demo,
    /// Print a new random signing secret (whsec_...).
    Secret,
    /// Run a receiver that verifies and prints every webhook, to try a setup.
    Receive {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: std::net::SocketAddr,
        /// The endpoint's signing secret (whsec_...), to verify signatures.
        #[arg(long, env = "RECEIVER_SECRET", hide_env_values = true)]
        secret: String,
    },
}

#[derive(Subcommand)]
enum EndpointAction {
    /// List each endpoint's waiting and dead deliveries, breaker and status.
    List,
    /// Enable an endpoint again and send what waited for it at once.
    Enable { name: String },
    /// Stop sending to an endpoint; its deliveries wait until it is enabled.
    Disable { name: String },
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Failure {
        let error = error.into();
        let code = if error.downcast_ref::<gancho::config::ConfigError>().is_some() {
            2
        } else {
            1
        };
        Failure { code, error }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs would only interleave with it.
    let default_filter = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info,tokio_postgres=warn"
    };
    init_tracing(default_filter);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the Tokio runtime starts");
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// Logs to stderr; GANCHO_LOG takes the usual filter syntax (`debug`, `gancho=debug`).
fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANCHO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only for a person at a terminal, not in container logs.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr)
        .init();
}

fn load(args: &ConfigArgs) -> Result<Config, Failure> {
    let path: &Path = args.config.as_deref().ok_or(gancho::config::ConfigError::NoPath)?;
    Ok(Config::load(path)?)
}

async fn execute(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(args) => {
            let config = Arc::new(load(&args)?);
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            sidecar::run(config, shutdown).await?;
        }
        Command::Install { config, print } => {
            if print {
                // The SQL needs only the sources, so no secret or database is required.
                let path = config.config.as_deref().ok_or(gancho::config::ConfigError::NoPath)?;
                print!("{}", capture::install_script(&Config::load_for_capture(path)?));
                return Ok(ExitCode::SUCCESS);
            }
            let config = load(&config)?;
            let mut client = db::connect(&db::parse_url(&config.database_url)?).await?;
            capture::install(&mut client, &config).await?;
            for source in &config.sources {
                println!("watching {} as source \"{}\"", source.qualified_table(), source.name);
            }
            println!("gancho schema version {} installed", db::SCHEMA_VERSION);
        }
        Command::Uninstall { config, database_url } => {
            let url = match database_url {
                Some(url) => url,
                None => load(&config)?.database_url,
            };
            let mut client = db::connect(&db::parse_url(&url)?).await?;
            if let Err(db::DbError::NotInstalled) = db::check_schema(&client).await {
                println!("gancho is not installed in this database; nothing to remove");
                return Ok(ExitCode::SUCCESS);
            }
            let sources = capture::uninstall(&mut client).await?;
            for source in &sources {
                println!("removed the triggers of source \"{source}\"");
            }
            println!("gancho schema removed");
        }
        Command::Check(args) => return run_check(&args).await,
        Command::Deliveries {
            config,
            status,
            endpoint,
            limit,
        } => {
            let config = load(&config)?;
            let client = connect_installed(&config).await?;
            let rows = deliveries::list(&client, status.as_deref(), endpoint.as_deref(), limit).await?;
            println!(
                "{:>8}  {:<36}  {:<18}  {:<24}  {:<9}  {:>8}  {:<25}  last error",
                "id", "webhook-id", "endpoint", "type", "status", "attempts", "created"
            );
            for row in rows {
                println!(
                    "{:>8}  {:<36}  {:<18}  {:<24}  {:<9}  {:>8}  {:<25}  {}",
                    row.id,
                    row.webhook_id,
                    row.endpoint,
                    row.event_type,
                    row.status,
                    row.attempts,
                    row.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    row.last_error.unwrap_or_default()
                );
            }
        }
        Command::Redeliver {
            config,
            ids,
            dead,
            endpoint,
        } => {
            if ids.is_empty() && !dead {
                return Err(
                    anyhow::anyhow!("name delivery ids or pass --dead; see `gancho deliveries --status dead`").into(),
                );
            }
            let config = load(&config)?;
            if let Some(name) = &endpoint {
                require_endpoint(&config, name)?;
            }
            let client = connect_installed(&config).await?;
            let queued = deliveries::redeliver(&client, &ids, dead, endpoint.as_deref()).await?;
            println!("deliveries queued again: {}", queued.len());
            for id in &queued {
                println!("  {id}");
            }
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| !queued.contains(id))
                .map(i64::to_string)
                .collect();
            if !missing.is_empty() {
                return Err(anyhow::anyhow!(
                    "no delivery with id {}{}; see `gancho deliveries`",
                    missing.join(", "),
                    if endpoint.is_some() { " for that endpoint" } else { "" }
                )
                .into());
            }
        }
        Command::Endpoint { config, action } => {
            let config = load(&config)?;
            let client = connect_installed(&config).await?;
            match action {
                EndpointAction::List => print_endpoints(&client).await?,
                EndpointAction::Enable { name } => {
                    require_endpoint(&config, &name)?;
                    gancho::delivery::health::register(&client, &name).await?;
                    gancho::delivery::health::enable(&client, &name).await?;
                    println!("endpoint \"{name}\" enabled");
                }
                EndpointAction::Disable { name } => {
                    require_endpoint(&config, &name)?;
                    gancho::delivery::health::disable(&client, &name, "disabled by an operator").await?;
                    println!(
                        "endpoint \"{name}\" disabled; `gancho endpoint enable {name} --config FILE` sends what waits"
                    );
                }
            }
        }
        Command::Demo => {
            let url = std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty());
            demo::run(url).await?;
        }
        Command::Secret => println!("{}", gancho::delivery::sign::generate_secret()),
        Command::Receive { listen, secret } => {
            let key =
                gancho::config::parse_secret_text(&secret).map_err(|message| anyhow::anyhow!("--secret: {message}"))?;
            let receiver =
                demo::receiver::Receiver::start_on(listen, Some(gancho::config::Secret::from_key(key))).await?;
            receiver.on_receive(|webhook| {
                let check = if webhook.verified {
                    "signature ok"
                } else {
                    "SIGNATURE INVALID"
                };
                println!(
                    "{} {} {check} {}",
                    webhook.webhook_id,
                    webhook.event_type(),
                    String::from_utf8_lossy(&webhook.body)
                );
            });
            receiver.reject_invalid_signatures();
            println!("listening on http://{}/ (any path)", receiver.address());
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            shutdown.cancelled().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Connects to the config's database and fails with the fix when gancho is not installed there.
async fn connect_installed(config: &Config) -> Result<tokio_postgres::Client, Failure> {
    let client = db::connect(&db::parse_url(&config.database_url)?).await?;
    db::check_schema(&client).await?;
    Ok(client)
}

fn require_endpoint(config: &Config, name: &str) -> Result<(), Failure> {
    if config.endpoint(name).is_none() {
        let known: Vec<&str> = config.endpoints.iter().map(|endpoint| endpoint.name.as_str()).collect();
        return Err(anyhow::anyhow!("unknown endpoint {name:?}; the config has: {}", known.join(", ")).into());
    }
    Ok(())
}

async fn print_endpoints(client: &tokio_postgres::Client) -> Result<(), Failure> {
    println!(
        "{:<20}  {:>8}  {:>6}  {:>8}  status",
        "endpoint", "pending", "dead", "failures"
    );
    for row in gancho::operations::endpoints::list(client).await? {
        let status = match (&row.disabled_at, &row.paused_until) {
            (Some(_), _) => format!("disabled: {}", row.disabled_reason.unwrap_or_default()),
            (None, Some(until)) if *until > chrono::Utc::now() => {
                format!(
                    "paused until {}",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            }
            _ => "active".to_string(),
        };
        println!(
            "{:<20}  {:>8}  {:>6}  {:>8}  {status}",
            row.endpoint, row.pending, row.dead, row.consecutive_failures
        );
    }
    Ok(())
}

async fn run_check(args: &ConfigArgs) -> Result<ExitCode, Failure> {
    let config = load(args)?;
    let client = db::connect(&db::parse_url(&config.database_url)?).await?;
    let report = check::check(&client, &config).await?;
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for error in &report.errors {
        println!("error: {error}");
    }
    if report.errors.is_empty() {
        println!(
            "config ok: {} sources, {} rules, {} endpoints",
            config.sources.len(),
            config.rules.len(),
            config.endpoints.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problem(s) found", report.errors.len());
        Ok(ExitCode::from(2))
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "stopping"),
    }
    shutdown.cancel();
}
