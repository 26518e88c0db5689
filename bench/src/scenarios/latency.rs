//! Latency: commit-to-arrival time of single-row changes written open-loop
//! at a fixed rate, one change per transaction, with one endpoint.

use std::time::Duration;

use serde_json::{Value, json};

use crate::analysis;
use crate::harness::{self, Bench, RunSpec, System};
use crate::receiver::ArrivalMark;
use crate::report::{Latencies, Table, megabytes, whole};
use crate::workload;

/// The first rate, in changes per second.
const BASE_RATE: f64 = 100.0;

/// Pause between the system's start and the first change.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let sizes = bench.sizes.clone();
    let mut rates = vec![(BASE_RATE, "100 changes/s".to_string())];
    let second = match (bench.rate_option, bench.max_changes_per_second) {
        (Some(rate), _) => Some((rate, "--rate".to_string())),
        (None, Some(max)) => Some(((max / 2.0).floor().max(1.0), "half of gancho's max".to_string())),
        (None, None) => None,
    };
    rates.extend(second.clone());

    println!("## latency: commit to arrival");
    println!();
    println!(
        "An open-loop writer schedules one single-row change per transaction at a fixed rate for {} s, over {} \
         connections, and records when each COMMIT returned; the receiver records when each webhook arrived, \
         in the same process and on the same monotonic clock. One endpoint. Both systems run at the same rates. \
         'late' counts changes that started more than 10 ms after their scheduled time because every writer \
         connection was busy. A webhook that never arrived counts as slower than all others. 'negative' \
         counts webhooks that arrived before their writer saw its COMMIT return (the naive trigger's \
         notification leaves at commit); they count as 0 ms. The delivery check of each run follows the table.",
        sizes.latency_duration.as_secs(),
        sizes.open_loop_connections
    );
    match &second {
        Some((rate, source)) => println!("The second rate is {rate:.0} changes/s ({source})."),
        None => println!(
            "NOTE: no second rate: it is half of gancho's maximum from the throughput scenario, so run `all`, or \
             give one with --rate N."
        ),
    }

    let mut table = Table::new(&[
        "system",
        "target changes/s",
        "achieved",
        "late",
        "p50",
        "p99",
        "max",
        "arrived",
        "negative",
        "RSS peak",
    ]);
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for (rate, source) in &rates {
        for system in [System::Gancho, System::Naive] {
            let spec = RunSpec {
                system,
                endpoints: 1,
                slow_endpoint: None,
                settings: bench.settings,
            };
            let mut running = harness::start_system(bench, &spec).await?;
            tokio::time::sleep(SETTLE).await;
            let log = bench.commit_log();
            let mark = ArrivalMark::new(&running.setup.endpoints);
            let written = workload::run_open_loop(
                &bench.database.url,
                log.clone(),
                *rate,
                sizes.latency_duration,
                sizes.open_loop_connections,
                sizes.stock_rows,
            )
            .await?;
            let endpoints = running.setup.endpoints.clone();
            harness::wait_for_arrivals(&mark, log.changes(), sizes.stall_timeout, &mut running.process).await?;
            let commits = log.snapshot();
            let latencies = analysis::latencies(&endpoints, &commits, None);
            let check = analysis::check_all(&endpoints, &commits);
            bench.require_exact(system, &format!("latency at {rate:.0} changes/s"), &check);
            let peak = running
                .process
                .monitor
                .peak_rss_between(running.ready_at, std::time::Instant::now());
            harness::stop_system(bench, running).await?;

            let achieved = written.changes as f64 / written.elapsed.as_secs_f64();
            eprintln!(
                "latency: {} at {rate:.0}/s: p50 {}, p99 {}; {}",
                system.label(),
                Latencies::describe(latencies.percentile(0.5)),
                Latencies::describe(latencies.percentile(0.99)),
                check.summary()
            );
            table.row(vec![
                system.label().to_string(),
                if source.starts_with(&format!("{rate:.0} ")) {
                    whole(*rate)
                } else {
                    format!("{} ({source})", whole(*rate))
                },
                whole(achieved),
                written.late.to_string(),
                Latencies::describe(latencies.percentile(0.50)),
                Latencies::describe(latencies.percentile(0.99)),
                Latencies::describe(latencies.max()),
                format!("{} of {}", latencies.arrived(), latencies.expected()),
                latencies.negative.to_string(),
                peak.map(megabytes).unwrap_or_default(),
            ]);
            checks.push(format!("- {} at {rate:.0}/s: {}", system.label(), check.summary()));
            rows.push(json!({
                "system": system.label(),
                "target_rate": rate,
                "rate_source": source,
                "achieved_rate": achieved,
                "late_starts": written.late,
                "latency": latencies.to_json(),
                "check": check.to_json(),
                "rss_peak_kb": peak,
            }));
        }
    }
    table.print();
    println!();
    println!("Delivery checks:");
    for line in &checks {
        println!("{line}");
    }
    println!();
    Ok(json!({
        "seconds_per_run": sizes.latency_duration.as_secs_f64(),
        "writer_connections": sizes.open_loop_connections,
        "runs": rows,
    }))
}
