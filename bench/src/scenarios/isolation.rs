//! Isolation: 20 endpoints, one of which responds only after 10 s, compared
//! with 20 endpoints that all respond at once. What counts is what the other
//! 19 endpoints get: their latency at a moderate rate, and their throughput
//! when the system is saturated.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::analysis;
use crate::harness::{self, Bench, RunSpec, System};
use crate::receiver::{ArrivalMark, EndpointLog};
use crate::report::{Latencies, Table, percent_change, whole};
use crate::setup::GanchoSettings;
use crate::workload;

/// The endpoints' request timeout. gancho's default of 10 s equals the slow
/// endpoint's delay, so its requests would time out and be retried. With
/// this timeout they succeed, slowly. Both runs use it, so they differ only
/// in the delay.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the naive listener gets after the writers stop while its slow
/// endpoint blocks it. Catching up would take 10 s per change.
const NAIVE_GRACE: Duration = Duration::from_secs(2);

pub async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let sizes = bench.sizes.clone();
    let count = sizes.isolation_endpoints;
    let slow_index = count - 1;
    let settings = GanchoSettings {
        timeout: Some(ENDPOINT_TIMEOUT),
        ..bench.settings
    };
    println!("## isolation: one slow endpoint among {count}");
    println!();
    println!(
        "{count} endpoints receive every change. In one run all of them respond at once; in the other, e{slow_index} \
         responds only after {} s. gancho's endpoints use timeout = \"{}s\" in both runs, so the slow endpoint's \
         requests succeed instead of timing out. Both runs measure the same {} endpoints, e0 to e{}, in two \
         phases. First the saturating writers run, with flow control on those endpoints only, and the table \
         counts webhooks/s over a {} s window after a {} s warm-up. Then an open-loop writer runs for {} s at a \
         fixed rate, for the latency of every change to every measured endpoint. That rate is half of what each \
         measured endpoint got in the run without a slow endpoint, at most {} changes/s, and the same in both runs. \
         The naive listener POSTs to the endpoints in turn, so one slow endpoint blocks all the others. With its \
         slow endpoint on, it gets {} s after each phase instead of a full drain.",
        sizes.slow_delay.as_secs(),
        ENDPOINT_TIMEOUT.as_secs(),
        count - 1,
        slow_index - 1,
        sizes.window.as_secs(),
        sizes.warmup.as_secs(),
        sizes.latency_duration.as_secs(),
        sizes.isolation_rate,
        NAIVE_GRACE.as_secs(),
    );

    let mut table = Table::new(&[
        "system",
        "slow endpoint",
        "measured endpoints: webhooks/s",
        "change",
        "fixed rate (changes/s)",
        "p50 at fixed rate",
        "p99 at fixed rate",
        "p99 change",
        "arrived at fixed rate",
        "e19 requests",
    ]);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for system in [System::Gancho, System::Naive] {
        // Set by the run without a slow endpoint, which goes first.
        let mut baseline: Option<(f64, Option<Duration>)> = None;
        let mut fixed_rate = sizes.isolation_rate;
        for slow in [false, true] {
            let spec = RunSpec {
                system,
                endpoints: count,
                slow_endpoint: slow.then_some(slow_index),
                settings,
            };
            let mut running = harness::start_system(bench, &spec).await?;
            let endpoints = running.setup.endpoints.clone();
            // The same endpoints are measured in both runs: all but the one
            // that is slow in the second run.
            let fast: Vec<Arc<EndpointLog>> = endpoints[..slow_index].to_vec();
            let waits_for_drain = system == System::Gancho || !slow;
            tokio::time::sleep(Duration::from_secs(1)).await;

            // Phase 1: throughput, saturated.
            let saturation = harness::saturate(bench, &mut running, fast.clone()).await?;
            let rate = saturation.webhooks_per_second();
            if waits_for_drain {
                let written = saturation.log.changes();
                harness::wait_for_arrivals(&saturation.mark, written, sizes.stall_timeout, &mut running.process)
                    .await?;
            } else {
                tokio::time::sleep(NAIVE_GRACE).await;
            }
            if !slow {
                // Half of the fast endpoints' capacity, so the latency phase
                // measures delivery rather than a growing queue.
                let capacity = rate / fast.len() as f64;
                fixed_rate = sizes.isolation_rate.min((capacity / 2.0).floor()).max(1.0);
            }

            // Phase 2: latency at a fixed rate.
            let fixed_log = bench.commit_log();
            let mark = ArrivalMark::new(&fast);
            workload::run_open_loop(
                &bench.database.url,
                fixed_log.clone(),
                fixed_rate,
                sizes.latency_duration,
                sizes.open_loop_connections,
                sizes.stock_rows,
            )
            .await?;
            if waits_for_drain {
                harness::wait_for_arrivals(&mark, fixed_log.changes(), sizes.stall_timeout, &mut running.process)
                    .await?;
            } else {
                tokio::time::sleep(NAIVE_GRACE).await;
            }
            let fixed_commits = fixed_log.snapshot();
            let latencies = analysis::latencies(&fast, &fixed_commits, None);

            let mut check = analysis::check_all(&fast, &saturation.log.snapshot());
            check.add(analysis::check_all(&fast, &fixed_commits));
            let run = if slow {
                "isolation with the slow endpoint"
            } else {
                "isolation without the slow endpoint"
            };
            bench.require_exact(system, run, &check);
            let slow_requests = endpoints[slow_index].received();
            let log_lines = running.process.warning_lines(3);
            harness::stop_system(bench, running).await?;

            let p99 = latencies.percentile(0.99);
            let (rate_change, p99_change) = match baseline {
                Some((base_rate, base_p99)) => (
                    percent_change(rate, base_rate),
                    match (p99, base_p99) {
                        (Some(value), Some(base)) => percent_change(value.as_secs_f64(), base.as_secs_f64()),
                        _ => "n/a".to_string(),
                    },
                ),
                None => {
                    baseline = Some((rate, p99));
                    ("(baseline)".to_string(), "(baseline)".to_string())
                }
            };
            let label = if slow {
                format!("slow ({} s)", sizes.slow_delay.as_secs())
            } else {
                "fast".to_string()
            };
            eprintln!(
                "isolation: {} with e{slow_index} {label}: {rate:.0} webhooks/s to the fast endpoints, p99 {}",
                system.label(),
                Latencies::describe(p99)
            );
            table.row(vec![
                system.label().to_string(),
                label.clone(),
                whole(rate),
                rate_change,
                whole(fixed_rate),
                Latencies::describe(latencies.percentile(0.5)),
                Latencies::describe(p99),
                p99_change,
                format!("{} of {}", latencies.arrived(), latencies.expected()),
                slow_requests.to_string(),
            ]);
            notes.push(format!(
                "- {} with e{slow_index} {label}: measured endpoints {}{}",
                system.label(),
                check.summary(),
                if waits_for_drain {
                    ""
                } else {
                    " (not drained: the slow endpoint blocks every request)"
                }
            ));
            notes.extend(log_lines.iter().map(|line| format!("  - log: {line}")));
            rows.push(json!({
                "system": system.label(),
                "slow_endpoint": slow,
                "fast_endpoints": fast.len(),
                "fast_webhooks_per_second": rate,
                "fixed_rate": fixed_rate,
                "latency_at_fixed_rate": latencies.to_json(),
                "slow_endpoint_requests": slow_requests,
                "drained": waits_for_drain,
                "check": check.to_json(),
            }));
        }
    }
    table.print();
    println!("Delivery checks of the measured endpoints:");
    for line in &notes {
        println!("{line}");
    }
    println!();
    Ok(json!({
        "endpoints": count,
        "slow_delay_seconds": sizes.slow_delay.as_secs_f64(),
        "endpoint_timeout_seconds": ENDPOINT_TIMEOUT.as_secs_f64(),
        "runs": rows,
    }))
}
