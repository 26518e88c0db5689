//! End-to-end throughput: webhooks per second from commit to a verified 200,
//! with the system saturated, for each endpoint count, for gancho and the
//! naive baseline. Every change fans out to every endpoint.

use std::time::Duration;

use serde_json::{Value, json};

use crate::analysis;
use crate::harness::{self, Bench, RunSpec, System};
use crate::report::{Table, megabytes, whole};

/// How long a freshly started system runs before its idle RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

pub async fn run(bench: &mut Bench) -> anyhow::Result<Value> {
    let sizes = bench.sizes.clone();
    println!("## throughput: webhooks per second, saturated");
    println!();
    println!(
        "The saturating writers keep at most {} webhooks written but not yet received; after a warm-up of {} s \
         the table counts the verified webhooks that arrived in the next {} s. After the window the writers \
         stop, the system delivers what is left, and every change is checked to have reached every endpoint. \
         RSS idle is read {} s after the system started listening; peak RSS and CPU time are sampled from \
         /proc every 100 ms during the window. 'cores' are CPU seconds per second of the window: the system \
         under test, gancho-bench (writers and receiver), and the whole machine (of {} cores), of which the \
         rest is mostly Postgres.",
        sizes.flow_window,
        sizes.warmup.as_secs(),
        sizes.window.as_secs(),
        IDLE_SETTLE.as_secs(),
        std::thread::available_parallelism()
            .map(|count| count.get())
            .unwrap_or(0),
    );

    let mut table = Table::new(&[
        "system",
        "endpoints",
        "webhooks/s",
        "changes/s",
        "RSS idle",
        "RSS peak under load",
        "CPU s per 1,000 webhooks",
        "cores: system",
        "cores: bench",
        "cores: machine",
        "delivery check",
    ]);
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for &endpoints in &sizes.throughput_endpoints {
        for system in [System::Gancho, System::Naive] {
            let spec = RunSpec {
                system,
                endpoints,
                slow_endpoint: None,
                settings: bench.settings,
            };
            let mut running = harness::start_system(bench, &spec).await?;
            tokio::time::sleep(IDLE_SETTLE).await;
            let idle_rss = running
                .process
                .monitor
                .sample_now(running.process.pid())
                .map(|sample| sample.rss_kb);

            let tracked = running.setup.endpoints.clone();
            let saturation = harness::saturate(bench, &mut running, tracked.clone()).await?;
            let written = saturation.log.changes();
            let drained =
                harness::wait_for_arrivals(&saturation.mark, written, sizes.stall_timeout, &mut running.process)
                    .await?;
            let commits = saturation.log.snapshot();
            let check = analysis::check_all(&tracked, &commits);
            bench.require_exact(system, &format!("throughput, {endpoints} endpoints"), &check);
            let (warnings, errors) = running.process.warnings_and_errors();
            let log_lines = running.process.warning_lines(3);
            harness::stop_system(bench, running).await?;

            let rate = saturation.webhooks_per_second();
            let changes_rate = rate / endpoints as f64;
            if system == System::Gancho && endpoints == 1 {
                bench.max_changes_per_second = Some(changes_rate);
            }
            let cpu_per_thousand = if saturation.webhooks > 0 {
                saturation.system_cpu / saturation.webhooks as f64 * 1000.0
            } else {
                f64::NAN
            };
            let seconds = saturation.seconds();
            let verdict = if check.is_exact() && drained {
                "exact".to_string()
            } else {
                "INCOMPLETE".to_string()
            };
            eprintln!(
                "throughput: {} with {endpoints} endpoints: {rate:.0} webhooks/s; {}",
                system.label(),
                check.summary()
            );
            table.row(vec![
                system.label().to_string(),
                endpoints.to_string(),
                whole(rate),
                whole(changes_rate),
                idle_rss.map(megabytes).unwrap_or_default(),
                saturation.peak_rss_kb.map(megabytes).unwrap_or_default(),
                format!("{cpu_per_thousand:.3}"),
                format!("{:.2}", saturation.system_cpu / seconds),
                format!("{:.2}", saturation.bench_cpu / seconds),
                format!(
                    "{:.2}",
                    saturation.machine_busy * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64
                ),
                verdict,
            ]);
            checks.push(format!(
                "- {} with {endpoints} endpoint(s): {} changes written; {}; log: {warnings} warnings, {errors} errors",
                system.label(),
                written,
                check.summary()
            ));
            checks.extend(log_lines.iter().map(|line| format!("  - log: {line}")));
            rows.push(json!({
                "system": system.label(),
                "endpoints": endpoints,
                "webhooks_per_second": rate,
                "changes_per_second": changes_rate,
                "window_seconds": seconds,
                "webhooks_in_window": saturation.webhooks,
                "rss_idle_kb": idle_rss,
                "rss_peak_under_load_kb": saturation.peak_rss_kb,
                "cpu_seconds_per_1000_webhooks": cpu_per_thousand,
                "system_cores": saturation.system_cpu / seconds,
                "bench_cores": saturation.bench_cpu / seconds,
                "machine_busy_share": saturation.machine_busy,
                "changes_written": written,
                "drained": drained,
                "check": check.to_json(),
                "log_warnings": warnings,
                "log_errors": errors,
            }));
        }
    }
    table.print();
    println!("Delivery checks after the drain:");
    for line in &checks {
        println!("{line}");
    }
    println!();
    Ok(json!({
        "warmup_seconds": sizes.warmup.as_secs_f64(),
        "window_seconds": sizes.window.as_secs_f64(),
        "runs": rows,
    }))
}
