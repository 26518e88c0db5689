//! gancho-bench: the benchmark suite of gancho. It measures the capture
//! triggers' cost to the shop's writes, end-to-end throughput, the drain of
//! a backlog, commit-to-arrival latency, memory, and isolation from a slow
//! endpoint. Each scenario runs gancho and the naive NOTIFY baseline side by
//! side and prints a Markdown table.
//!
//! Run it from the repository root:
//!
//! ```sh
//! cargo build --release && cargo run --release -p gancho-bench -- all
//! cargo run --release -p gancho-bench -- all --smoke    # tiny sizes, a few minutes
//! ```

mod analysis;
mod harness;
mod naive;
mod process;
mod receiver;
mod report;
mod scenarios;
mod setup;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

use harness::{Bench, Sizes};
use receiver::Receiver;
use setup::{Database, GanchoSettings};

#[derive(Parser)]
#[command(
    name = "gancho-bench",
    about = "Benchmarks gancho against a naive NOTIFY trigger and listener, on one machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// pgbench transactions per second with no trigger, gancho's triggers and a naive NOTIFY trigger.
    Capture(Options),
    /// One UPDATE of every bench_stock row, with each kind of trigger.
    Bulk(Options),
    /// Webhooks per second sustained from commit to a verified 200, with 1 and 10 endpoints.
    Throughput(Options),
    /// Changes written while the sidecar is stopped, and the time to drain them.
    Backlog(Options),
    /// Commit-to-arrival latency at 100 changes/s and at half the maximum throughput.
    Latency(Options),
    /// 20 endpoints, one of which responds after 10 s, against 20 that all respond at once.
    Isolation(Options),
    /// Every scenario above, in that order.
    All(Options),
    /// The naive baseline's listener, which the benchmark starts as a child process.
    #[command(hide = true)]
    NaiveListener(naive::NaiveArgs),
}

#[derive(clap::Args, Clone, Debug)]
struct Options {
    /// Run at tiny sizes (a few thousand rows, seconds per run), to check that the suite works.
    #[arg(long)]
    smoke: bool,
    /// Use this existing server (a postgres:// URL of a role that may create databases)
    /// instead of a throwaway cluster; the benchmark creates and drops the database
    /// gancho_bench_<pid> there.
    #[arg(long)]
    database_url: Option<String>,
    /// The gancho binary to measure; default: `gancho` next to this executable.
    #[arg(long)]
    gancho: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The latency scenario's second rate, in changes per second; default: half of
    /// gancho's throughput with one endpoint when the throughput scenario ran first.
    #[arg(long)]
    rate: Option<f64>,
    /// The endpoint counts of the throughput scenario, comma-separated.
    #[arg(long, value_delimiter = ',')]
    endpoints: Option<Vec<usize>>,
    /// Each gancho endpoint's max_in_flight.
    #[arg(long, default_value_t = 64)]
    max_in_flight: u32,
    /// Each gancho endpoint's `ordered` setting.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ordered: bool,
    /// The pgbench client counts of the capture scenario, comma-separated.
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<u32>>,
    /// Seconds per pgbench run of the capture scenario.
    #[arg(long)]
    capture_seconds: Option<u64>,
    /// Seconds of the measured window of the throughput and isolation scenarios.
    #[arg(long)]
    window: Option<u64>,
    /// Changes written for the backlog scenario.
    #[arg(long)]
    backlog: Option<i64>,
    /// Rows of bench_stock.
    #[arg(long)]
    rows: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Capture,
    Bulk,
    Throughput,
    Backlog,
    Latency,
    Isolation,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Capture => "capture",
            Scenario::Bulk => "bulk",
            Scenario::Throughput => "throughput",
            Scenario::Backlog => "backlog",
            Scenario::Latency => "latency",
            Scenario::Isolation => "isolation",
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::NaiveListener(args) => naive::run_listener(args).await,
            Command::Capture(options) => run(options, "capture", &[Scenario::Capture]).await,
            Command::Bulk(options) => run(options, "bulk", &[Scenario::Bulk]).await,
            Command::Throughput(options) => run(options, "throughput", &[Scenario::Throughput]).await,
            Command::Backlog(options) => run(options, "backlog", &[Scenario::Backlog]).await,
            Command::Latency(options) => run(options, "latency", &[Scenario::Latency]).await,
            Command::Isolation(options) => run(options, "isolation", &[Scenario::Isolation]).await,
            Command::All(options) => {
                let all = [
                    Scenario::Capture,
                    Scenario::Bulk,
                    Scenario::Throughput,
                    Scenario::Backlog,
                    Scenario::Latency,
                    Scenario::Isolation,
                ];
                run(options, "all", &all).await
            }
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gancho-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn sizes_for(options: &Options) -> Sizes {
    let mut sizes = if options.smoke { Sizes::smoke() } else { Sizes::full() };
    if let Some(endpoints) = &options.endpoints {
        sizes.throughput_endpoints = endpoints.clone();
    }
    if let Some(clients) = &options.clients {
        sizes.capture_clients = clients.clone();
    }
    if let Some(seconds) = options.capture_seconds {
        sizes.capture_seconds = seconds;
    }
    if let Some(seconds) = options.window {
        sizes.window = Duration::from_secs(seconds);
    }
    if let Some(changes) = options.backlog {
        sizes.backlog_changes = changes;
    }
    if let Some(rows) = options.rows {
        sizes.stock_rows = rows;
    }
    sizes
}

async fn run(options: Options, label: &str, scenarios: &[Scenario]) -> anyhow::Result<()> {
    let started = Instant::now();
    let gancho = process::find_gancho(options.gancho.as_deref())?;
    let sizes = sizes_for(&options);
    anyhow::ensure!(sizes.stock_rows >= 1_000, "--rows must be at least 1000");
    anyhow::ensure!(
        (1..=1024).contains(&options.max_in_flight),
        "--max-in-flight must be between 1 and 1024"
    );
    let settings = GanchoSettings {
        max_in_flight: options.max_in_flight,
        ordered: options.ordered,
        timeout: None,
    };

    let work_dir = std::env::temp_dir().join(format!("gancho-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let receiver = Receiver::start().await.context("starting the receiver on 127.0.0.1")?;
    let database = Database::create(options.database_url.as_deref()).await?;

    let outcome = async {
        let client = database.connect().await?;
        setup::create_tables(&client, sizes.stock_rows).await?;
        Ok::<_, anyhow::Error>(client)
    }
    .await;
    let client = match outcome {
        Ok(client) => client,
        Err(error) => {
            let _ = database.drop_database().await;
            return Err(error);
        }
    };

    let mut bench = Bench::new(
        sizes,
        options.smoke,
        gancho,
        settings,
        database,
        client,
        receiver,
        work_dir.clone(),
        options.rate,
    );
    let mut results = Map::new();
    let outcome = run_scenarios(&mut bench, &options, label, scenarios, &mut results).await;
    let failed_checks = bench.failed_checks();

    let Bench { database, client, .. } = bench;
    drop(client);
    let cleanup = database.drop_database().await;
    let elapsed = started.elapsed();
    println!("gancho-bench {label} finished in {}", format_elapsed(elapsed));
    match (&outcome, &cleanup) {
        (Ok(()), Ok(())) if failed_checks.is_empty() => {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        _ => eprintln!(
            "gancho-bench: configs and process logs are kept in {}",
            work_dir.display()
        ),
    }
    outcome?;
    cleanup?;
    if !failed_checks.is_empty() {
        anyhow::bail!(
            "gancho's delivery was not exact in {} run(s), so its figures are invalid:\n- {}",
            failed_checks.len(),
            failed_checks.join("\n- ")
        );
    }
    Ok(())
}

async fn run_scenarios(
    bench: &mut Bench,
    options: &Options,
    label: &str,
    scenarios: &[Scenario],
    results: &mut Map<String, Value>,
) -> anyhow::Result<()> {
    let environment = print_header(bench, label).await?;
    let mut durations = Map::new();
    let mut scenario_results = Map::new();
    let competing = watch_competing_processes();
    for scenario in scenarios {
        competing.lock().expect("competing process lock").clear();
        let started = Instant::now();
        let result = match scenario {
            Scenario::Capture => scenarios::capture::run(bench).await,
            Scenario::Bulk => scenarios::bulk::run(bench).await,
            Scenario::Throughput => scenarios::throughput::run(bench).await,
            Scenario::Backlog => scenarios::backlog::run(bench).await,
            Scenario::Latency => scenarios::latency::run(bench).await,
            Scenario::Isolation => scenarios::isolation::run(bench).await,
        }
        .with_context(|| format!("the {} scenario failed", scenario.name()))?;
        let elapsed = started.elapsed();
        println!("{} took {}.", scenario.name(), format_elapsed(elapsed));
        let seen: Vec<String> = competing
            .lock()
            .expect("competing process lock")
            .iter()
            .map(|(pid, command)| format!("{pid} {command}"))
            .collect();
        if !seen.is_empty() {
            println!(
                "WARNING: processes of another benchmark or gancho ran during this scenario and competed for \
                 the CPU, so its figures are not reliable:"
            );
            for line in &seen {
                println!("- {line}");
            }
        }
        println!();
        durations.insert(scenario.name().to_string(), json!(elapsed.as_secs_f64()));
        let mut result = result;
        if let Value::Object(fields) = &mut result {
            fields.insert("competing_processes".to_string(), json!(seen));
        }
        scenario_results.insert(scenario.name().to_string(), result);

        // Written after each scenario, so a later failure keeps the earlier results.
        *results = Map::new();
        results.insert("command".to_string(), json!(label));
        results.insert("smoke".to_string(), json!(bench.smoke));
        results.insert("environment".to_string(), environment.clone());
        results.insert("scenarios".to_string(), Value::Object(scenario_results.clone()));
        results.insert("durations_seconds".to_string(), Value::Object(durations.clone()));
        if let Some(path) = &options.out {
            let text = serde_json::to_string_pretty(&Value::Object(results.clone()))?;
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Prints the machine, the server and gancho's settings, and returns them as JSON.
async fn print_header(bench: &Bench, label: &str) -> anyhow::Result<Value> {
    let machine = setup::describe_machine();
    let (version, server_settings) = bench.database.describe_server().await?;
    let gancho_version = process::gancho_version(&bench.gancho).await;
    let server = if bench.database.is_throwaway() {
        "a throwaway cluster started by gancho-bench, on 127.0.0.1".to_string()
    } else {
        format!("an existing server, database {}", bench.database.name)
    };
    let sizes = &bench.sizes;
    let mode = if bench.smoke {
        " --smoke (tiny sizes, to check that the suite works: its figures mean nothing)"
    } else {
        ""
    };
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");

    println!("# gancho-bench {label}{mode}");
    println!();
    println!("- date: {date}");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!("- load average at start (1, 5, 15 min): {}", load.join(", "));
    let competing = process::competing_processes();
    if !competing.is_empty() {
        println!("- WARNING: other processes that compete for the CPU are running:");
        for (pid, command) in &competing {
            println!("  - {pid} {command}");
        }
    }
    let machine_text: Vec<String> = machine.iter().map(|(name, value)| format!("{name} {value}")).collect();
    println!("- machine: {}", machine_text.join(", "));
    println!("- Postgres: {version}");
    println!("- server: {server}");
    let settings_text: Vec<String> = server_settings
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    println!("- server settings: {}", settings_text.join(", "));
    println!("- gancho: {} ({gancho_version})", bench.gancho.display());
    println!(
        "- gancho config: source `stock` on bench_stock (key id; columns warehouse, count_on_hand, seq), \
         source `orders` on bench_orders, one `change` rule on stock (event inventory.changed); \
         endpoints e0..eN with events [\"inventory.changed\"], max_in_flight={}, ordered={}; \
         every other setting at gancho's default",
        bench.settings.max_in_flight, bench.settings.ordered
    );
    println!(
        "- workload: bench_stock with {} rows; saturating writers: {} connections, {} single-row updates \
         per transaction, at most {} webhooks written but not yet received",
        report::thousands(sizes.stock_rows as u64),
        sizes.writers,
        sizes.batch,
        report::thousands(sizes.flow_window)
    );
    println!(
        "- naive baseline: a per-row trigger `pg_notify('bench_naive', row_to_json(NEW)::text)` on both tables, and \
         a listener that POSTs each payload to each endpoint in turn, one request at a time, over one keep-alive \
         reqwest client, with no retries; it signs each request as Standard Webhooks requires"
    );
    println!(
        "- receiver: hyper HTTP/1.1 with keep-alive in the gancho-bench process, verifies every signature, \
         responds 200 with an empty body"
    );
    println!();

    let to_map = |pairs: &[(String, String)]| {
        Value::Object(
            pairs
                .iter()
                .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                .collect(),
        )
    };
    Ok(json!({
        "date": date.to_string(),
        "machine": to_map(&machine),
        "postgres_version": version,
        "server": server,
        "server_settings": to_map(&server_settings),
        "gancho": bench.gancho.display().to_string(),
        "gancho_version": gancho_version,
        "max_in_flight": bench.settings.max_in_flight,
        "ordered": bench.settings.ordered,
        "stock_rows": sizes.stock_rows,
        "writers": sizes.writers,
        "batch": sizes.batch,
        "flow_window_webhooks": sizes.flow_window,
    }))
}

/// Scans for competing processes every second, for as long as the runtime
/// runs, and collects them by pid. Figures measured while another benchmark
/// ran on the same cores are not comparable, so each scenario reports them.
fn watch_competing_processes() -> std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<i32, String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let task_seen = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let found = process::competing_processes();
            task_seen.lock().expect("competing process lock").extend(found);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    seen
}

pub fn format_elapsed(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    if seconds >= 60 {
        format!("{} min {} s", seconds / 60, seconds % 60)
    } else {
        format!("{:.1} s", elapsed.as_secs_f64())
    }
}
