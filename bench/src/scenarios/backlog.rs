//! Backlog: changes written while the system is stopped, then the time to
//! deliver all of them once it starts, with its memory over the drain.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::analysis;
use crate::harness::{self, Bench, RunSpec, System};
use crate::process::Sample;
use crate::receiver::ArrivalMark;
use crate::report::{Table, megabytes, thousands, whole};
use crate::workload;

/// How long a freshly started system runs before its idle RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// How long the naive listener gets to deliver a backlog, which it cannot
/// see: Postgres delivers a notification only to sessions that were
/// listening when it was committed.
const NAIVE_GRACE: Duration = Duration::from_secs(5);

/// Points of the RSS series printed for a drain.
const SERIES_POINTS: usize = 10;

pub async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let sizes = bench.sizes.clone();
    let changes = sizes.backlog_changes;
    println!(
        "## backlog: {} changes written while the system is stopped",
        thousands(changes as u64)
    );
    println!();
    println!(
        "The system starts, idles for {} s (RSS idle), and stops. One connection then writes {} changes, \
         each transaction one UPDATE of {} bench_stock rows, and the system starts again. The drain time runs \
         from that start to the last verified arrival at the single endpoint. RSS is sampled every 100 ms; the \
         series shows it at {} evenly spaced points of the drain, from the restart (a process just started, \
         before it has loaded anything) to the last arrival. The naive listener gets {} s after its start: \
         Postgres delivers a notification only to sessions that were listening when it was committed, so a \
         naive listener that was down misses the whole backlog.",
        IDLE_SETTLE.as_secs(),
        thousands(changes as u64),
        thousands(sizes.backlog_chunk.min(sizes.stock_rows) as u64),
        SERIES_POINTS + 1,
        NAIVE_GRACE.as_secs(),
    );

    let mut table = Table::new(&[
        "system",
        "changes",
        "write time",
        "changes/s written",
        "drain time",
        "webhooks/s drained",
        "RSS idle",
        "RSS peak in drain",
        "CPU s per 1,000 webhooks",
        "delivered",
    ]);
    let mut rows = Vec::new();
    let mut series_lines = Vec::new();
    for system in [System::Gancho, System::Naive] {
        let spec = RunSpec {
            system,
            endpoints: 1,
            slow_endpoint: None,
            settings: bench.settings,
        };
        let running = harness::start_system(bench, &spec).await?;
        tokio::time::sleep(IDLE_SETTLE).await;
        let idle_rss = running
            .process
            .monitor
            .sample_now(running.process.pid())
            .map(|sample| sample.rss_kb);
        let setup = harness::stop_system(bench, running).await?;

        let log = bench.commit_log();
        let mark = ArrivalMark::new(&setup.endpoints);
        let write_time = workload::run_bulk_backlog(
            &bench.database.url,
            &log,
            changes,
            sizes.backlog_chunk,
            sizes.stock_rows,
        )
        .await?;
        eprintln!(
            "backlog: {}: wrote {changes} changes in {:.1} s",
            system.label(),
            write_time.as_secs_f64()
        );

        let endpoints = setup.endpoints.clone();
        let mut running = harness::launch(bench, setup).await?;
        let started = running.process.started;
        let pid = running.process.pid();
        let cpu_at_start = running.process.monitor.sample_now(pid).map(|sample| sample.cpu_seconds);
        let drained = match system {
            System::Gancho => {
                harness::wait_for_arrivals(&mark, changes as u64, sizes.stall_timeout, &mut running.process).await?
            }
            System::Naive => {
                tokio::time::sleep(NAIVE_GRACE).await;
                false
            }
        };
        let commits = log.snapshot();
        let check = analysis::check_all(&endpoints, &commits);
        bench.require_exact(system, "backlog", &check);
        let last = analysis::last_arrival(&endpoints, &commits);
        let end = last.unwrap_or_else(Instant::now);
        let end_sample = running.process.monitor.sample_now(pid);
        let samples = running.process.monitor.samples();
        harness::stop_system(bench, running).await?;

        let drain = end.saturating_duration_since(started);
        let peak = samples
            .iter()
            .filter(|sample| sample.at >= started && sample.at <= end)
            .map(|sample| sample.rss_kb)
            .max();
        let series = rss_series(&samples, started, end);
        let cpu = match (cpu_at_start, end_sample) {
            (Some(before), Some(after)) if check.arrived > 0 => {
                Some((after.cpu_seconds - before) / check.arrived as f64 * 1000.0)
            }
            _ => None,
        };
        let drain_rate = (check.arrived > 0).then(|| check.arrived as f64 / drain.as_secs_f64());
        eprintln!("backlog: {}: {}", system.label(), check.summary());

        table.row(vec![
            system.label().to_string(),
            thousands(changes as u64),
            format!("{:.1} s", write_time.as_secs_f64()),
            whole(changes as f64 / write_time.as_secs_f64()),
            if drained {
                format!("{:.1} s", drain.as_secs_f64())
            } else {
                "not drained".to_string()
            },
            drain_rate.map(whole).unwrap_or_else(|| "-".to_string()),
            idle_rss.map(megabytes).unwrap_or_default(),
            peak.map(megabytes).unwrap_or_default(),
            cpu.map(|value| format!("{value:.3}"))
                .unwrap_or_else(|| "-".to_string()),
            format!("{} of {}", thousands(check.arrived), thousands(check.expected)),
        ]);
        let series_text: Vec<String> = series
            .iter()
            .map(|(offset, kb)| format!("{:.1} s: {:.1}", offset.as_secs_f64(), *kb as f64 / 1024.0))
            .collect();
        if system == System::Gancho {
            series_lines.push(format!(
                "- {} RSS in MB during the drain: {}",
                system.label(),
                series_text.join(", ")
            ));
        }
        series_lines.push(format!("- {}: {}", system.label(), check.summary()));
        rows.push(json!({
            "system": system.label(),
            "changes": changes,
            "write_seconds": write_time.as_secs_f64(),
            "drained": drained,
            "drain_seconds": drained.then_some(drain.as_secs_f64()),
            "drain_webhooks_per_second": drain_rate,
            "rss_idle_kb": idle_rss,
            "rss_peak_drain_kb": peak,
            "rss_series_kb": series.iter().map(|(offset, kb)| json!([offset.as_secs_f64(), kb])).collect::<Vec<_>>(),
            "cpu_seconds_per_1000_webhooks": cpu,
            "check": check.to_json(),
        }));
    }
    table.print();
    for line in &series_lines {
        println!("{line}");
    }
    println!();
    Ok(json!({ "changes": changes, "runs": rows }))
}

/// RSS at evenly spaced points from `start` to `end`, as (offset, KiB).
fn rss_series(samples: &[Sample], start: Instant, end: Instant) -> Vec<(Duration, u64)> {
    let span = end.saturating_duration_since(start);
    (0..=SERIES_POINTS)
        .filter_map(|point| {
            let offset = span.mul_f64(point as f64 / SERIES_POINTS as f64);
            let at = start + offset;
            samples
                .iter()
                .rfind(|sample| sample.at <= at)
                .or_else(|| samples.first())
                .map(|sample| (offset, sample.rss_kb))
        })
        .collect()
}
