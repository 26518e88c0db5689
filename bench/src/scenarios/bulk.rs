//! Bulk statements: one UPDATE of every bench_stock row in one statement,
//! with no trigger, gancho's triggers and the naive trigger.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Bench;
use crate::report::{Table, milliseconds, percent_change, thousands};
use crate::setup::{self, Triggers};

const MODES: [Triggers; 3] = [Triggers::None, Triggers::Gancho, Triggers::Naive];

pub async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let sizes = &bench.sizes;
    let config = bench.install_config()?;
    println!("## bulk: one UPDATE of {} rows", thousands(sizes.stock_rows as u64));
    println!();
    println!(
        "`update bench_stock set count_on_hand = count_on_hand + 1` in one statement, timed from the client \
         until it returned (autocommit, so the commit is included); {} runs per mode, alternating between the \
         modes, each after installing the mode's triggers anew, a vacuum and a CHECKPOINT. The gancho sidecar is \
         not running and no session listens to the naive trigger's notifications.",
        sizes.bulk_repeats
    );

    let mut times: Vec<(Triggers, Vec<Duration>)> = MODES.iter().map(|mode| (*mode, Vec::new())).collect();
    for _ in 0..sizes.bulk_repeats {
        for (mode, runs) in times.iter_mut() {
            bench.set_triggers(&config, *mode).await?;
            setup::reset_between_runs(&bench.client).await?;
            let started = Instant::now();
            let updated = bench
                .client
                .execute("update bench_stock set count_on_hand = count_on_hand + 1", &[])
                .await?;
            let elapsed = started.elapsed();
            anyhow::ensure!(updated == sizes.stock_rows as u64, "the update changed {updated} rows");
            eprintln!("bulk: {}: {}", mode.label(), milliseconds(elapsed));
            runs.push(elapsed);
        }
    }
    bench.set_triggers(&config, Triggers::None).await?;

    let median = |runs: &[Duration]| {
        let mut sorted = runs.to_vec();
        sorted.sort();
        sorted[sorted.len() / 2]
    };
    let baseline = median(&times[0].1);
    let mut headers = vec!["mode".to_string()];
    headers.extend((1..=sizes.bulk_repeats).map(|run| format!("run {run}")));
    headers.extend(["median".to_string(), "vs no trigger".to_string()]);
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut table = Table::new(&header_refs);
    let mut rows = Vec::new();
    for (mode, runs) in &times {
        let middle = median(runs);
        let mut cells = vec![mode.label().to_string()];
        cells.extend(runs.iter().map(|run| milliseconds(*run)));
        cells.push(milliseconds(middle));
        cells.push(format!(
            "{:.2}x ({})",
            middle.as_secs_f64() / baseline.as_secs_f64(),
            percent_change(middle.as_secs_f64(), baseline.as_secs_f64())
        ));
        table.row(cells);
        rows.push(json!({
            "mode": mode.key(),
            "runs_ms": runs.iter().map(|run| run.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
            "median_ms": middle.as_secs_f64() * 1000.0,
        }));
    }
    table.print();
    Ok(json!({ "rows_updated": sizes.stock_rows, "modes": rows }))
}
