//! Capture overhead: pgbench transactions per second of a checkout-like
//! transaction (one single-row stock update and one order insert) with no
//! trigger, with gancho's triggers (sidecar not running, so this measures the
//! triggers alone) and with the naive NOTIFY trigger.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::harness::Bench;
use crate::report::{Table, percent_change};
use crate::setup::{self, Triggers};

const MODES: [Triggers; 3] = [Triggers::None, Triggers::Gancho, Triggers::Naive];

pub async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let sizes = &bench.sizes;
    let pgbench = find_pgbench();
    let script = bench.work_file("capture", "sql");
    std::fs::write(&script, script_text(sizes.stock_rows)).context("writing the pgbench script")?;
    let config = bench.install_config()?;

    println!("## capture: the triggers' cost to the shop's transactions");
    println!();
    println!(
        "Each pgbench transaction updates one random bench_stock row and inserts one bench_orders row:\n\
         `{} -n -f SCRIPT -c C -j min(C,2) -T {}`. Modes: no trigger; gancho's triggers from `gancho install` \
         with the sidecar stopped, so the outbox only grows; the naive trigger with no listener. Before each run \
         the benchmark truncates bench_orders, installs that mode's triggers (gancho's anew, so the outbox starts \
         empty), vacuums both tables and runs CHECKPOINT. Runs alternate between the modes for each \
         client count, so a slow drift of the machine affects all three alike.",
        pgbench.display(),
        sizes.capture_seconds
    );

    let mut tps: HashMap<(u32, Triggers), f64> = HashMap::new();
    for &clients in &sizes.capture_clients {
        for mode in MODES {
            bench.set_triggers(&config, mode).await?;
            setup::reset_between_runs(&bench.client).await?;
            let measured = run_pgbench(&pgbench, &script, clients, sizes.capture_seconds, &bench.database.url).await?;
            eprintln!("capture: {clients} clients, {}: {measured:.0} TPS", mode.label());
            tps.insert((clients, mode), measured);
        }
    }
    bench.set_triggers(&config, Triggers::None).await?;

    let mut table = Table::new(&[
        "clients",
        "no trigger TPS",
        "gancho TPS",
        "gancho vs none",
        "naive TPS",
        "naive vs none",
    ]);
    let mut rows = Vec::new();
    for &clients in &sizes.capture_clients {
        let none = tps[&(clients, Triggers::None)];
        let gancho = tps[&(clients, Triggers::Gancho)];
        let naive = tps[&(clients, Triggers::Naive)];
        table.row(vec![
            clients.to_string(),
            format!("{none:.0}"),
            format!("{gancho:.0}"),
            percent_change(gancho, none),
            format!("{naive:.0}"),
            percent_change(naive, none),
        ]);
        rows.push(json!({
            "clients": clients,
            "tps_no_trigger": none,
            "tps_gancho": gancho,
            "tps_naive": naive,
        }));
    }
    table.print();
    Ok(json!({ "seconds_per_run": sizes.capture_seconds, "runs": rows }))
}

fn script_text(stock_rows: i64) -> String {
    format!(
        "\\set id random(1, {stock_rows})\n\
         \\set delta random(-5, 5)\n\
         begin;\n\
         update bench_stock set count_on_hand = count_on_hand + :delta, seq = seq + 1 where id = :id;\n\
         insert into bench_orders (stock_id, quantity, state) values (:id, :delta, 'cart');\n\
         commit;\n"
    )
}

/// pgbench from the folder of the server programs, which matches the server
/// (following a symlink such as /usr/local/bin/postgres to its real folder),
/// then from `pg_config --bindir`, then the one on PATH.
fn find_pgbench() -> PathBuf {
    let mut folders = Vec::new();
    if let Some(folder) = gancho::demo::cluster::find_server_programs() {
        if let Some(real) = std::fs::canonicalize(folder.join("postgres"))
            .ok()
            .and_then(|path| path.parent().map(Path::to_path_buf))
        {
            folders.push(real);
        }
        folders.push(folder);
    }
    if let Ok(output) = std::process::Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        folders.push(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    }
    folders
        .into_iter()
        .map(|folder| folder.join("pgbench"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// Runs pgbench and returns its transactions per second.
async fn run_pgbench(pgbench: &Path, script: &Path, clients: u32, seconds: u64, url: &str) -> anyhow::Result<f64> {
    let output = Command::new(pgbench)
        .arg("-n")
        .arg("-f")
        .arg(script)
        .args(["-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string()])
        .args(["-T", &seconds.to_string()])
        .arg(url)
        .output()
        .await
        .with_context(|| format!("running {} (install the postgresql-client package)", pgbench.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench with {clients} clients failed with {}:\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // "tps = 1234.567890 (without initial connection time)"
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("pgbench printed no tps line:\n{stdout}"))
}
