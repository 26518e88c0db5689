//! The parts that every scenario shares: the options and sizes, the
//! database, the receiver, and a running system under test (gancho's sidecar
//! or the naive listener) with its endpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::Client;

use crate::analysis::DeliveryCheck;
use crate::process::{self, Measured};
use crate::receiver::{ArrivalMark, EndpointLog, EndpointSpec, Receiver, secret_key};
use crate::setup::{self, Database, EndpointConfig, GanchoSettings, Triggers};
use crate::workload::CommitLog;
use crate::workload::{self, FlowControl, SaturatingShape};
use crate::{analysis, naive};

/// The sizes and durations of a run: the full defaults, or tiny ones for `--smoke`.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub stock_rows: i64,
    pub capture_clients: Vec<u32>,
    pub capture_seconds: u64,
    pub bulk_repeats: usize,
    pub warmup: Duration,
    pub window: Duration,
    pub throughput_endpoints: Vec<usize>,
    pub backlog_changes: i64,
    /// Rows per transaction of the backlog writer.
    pub backlog_chunk: i64,
    pub latency_duration: Duration,
    pub isolation_endpoints: usize,
    /// The maximum changes per second of the isolation scenario's latency phase.
    pub isolation_rate: f64,
    /// Delay of the isolation scenario's slow endpoint.
    pub slow_delay: Duration,
    /// The saturating writers' bound on webhooks written but not yet received.
    pub flow_window: u64,
    pub writers: usize,
    pub batch: usize,
    /// Connections of the open-loop writer.
    pub open_loop_connections: usize,
    /// The maximum time without a new arrival before a drain stops waiting.
    pub stall_timeout: Duration,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            stock_rows: 100_000,
            capture_clients: vec![1, 4, 16, 64],
            capture_seconds: 15,
            bulk_repeats: 3,
            warmup: Duration::from_secs(5),
            window: Duration::from_secs(30),
            throughput_endpoints: vec![1, 10],
            backlog_changes: 1_000_000,
            backlog_chunk: 50_000,
            latency_duration: Duration::from_secs(20),
            isolation_endpoints: 20,
            isolation_rate: 100.0,
            slow_delay: Duration::from_secs(10),
            flow_window: 20_000,
            writers: 2,
            batch: 200,
            open_loop_connections: 32,
            stall_timeout: Duration::from_secs(60),
        }
    }

    pub fn smoke() -> Sizes {
        Sizes {
            stock_rows: 5_000,
            capture_seconds: 2,
            warmup: Duration::from_secs(1),
            window: Duration::from_secs(3),
            backlog_changes: 20_000,
            backlog_chunk: 5_000,
            latency_duration: Duration::from_secs(2),
            flow_window: 5_000,
            stall_timeout: Duration::from_secs(30),
            ..Sizes::full()
        }
    }
}

/// The system that turns committed changes into webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Gancho,
    Naive,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Gancho => "gancho",
            System::Naive => "naive",
        }
    }

    pub fn triggers(self) -> Triggers {
        match self {
            System::Gancho => Triggers::Gancho,
            System::Naive => Triggers::Naive,
        }
    }
}

/// The benchmark's shared state, for the length of one `gancho-bench` run.
pub struct Bench {
    pub sizes: Sizes,
    pub smoke: bool,
    pub gancho: PathBuf,
    pub settings: GanchoSettings,
    pub database: Database,
    pub client: Client,
    pub receiver: Receiver,
    pub work_dir: PathBuf,
    /// The source of seq values for every commit log, so no two runs share a seq.
    seq_source: Arc<AtomicI64>,
    run_counter: std::sync::atomic::AtomicU32,
    /// gancho's changes per second with one endpoint, from the throughput
    /// scenario, for the latency scenario's second rate.
    pub max_changes_per_second: Option<f64>,
    pub rate_option: Option<f64>,
    /// gancho runs whose delivery check failed, reported at the end of the
    /// run so that a broken delivery fails the benchmark (and CI's smoke run).
    failed_checks: std::sync::Mutex<Vec<String>>,
}

impl Bench {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sizes: Sizes,
        smoke: bool,
        gancho: PathBuf,
        settings: GanchoSettings,
        database: Database,
        client: Client,
        receiver: Receiver,
        work_dir: PathBuf,
        rate_option: Option<f64>,
    ) -> Bench {
        Bench {
            sizes,
            smoke,
            gancho,
            settings,
            database,
            client,
            receiver,
            work_dir,
            seq_source: Arc::new(AtomicI64::new(1)),
            run_counter: std::sync::atomic::AtomicU32::new(0),
            max_changes_per_second: None,
            rate_option,
            failed_checks: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records a gancho run whose delivery was not exact: a change missing,
    /// a bad signature, a request without a seq, or one change sent under
    /// two webhook-ids. The naive baseline's losses are expected and not
    /// recorded.
    pub fn require_exact(&self, system: System, run: &str, check: &DeliveryCheck) {
        if system != System::Gancho || (check.is_exact() && check.duplicates_with_new_id == 0) {
            return;
        }
        self.failed_checks
            .lock()
            .expect("failed checks lock")
            .push(format!("{run}: {}", check.summary()));
    }

    pub fn failed_checks(&self) -> Vec<String> {
        self.failed_checks.lock().expect("failed checks lock").clone()
    }

    /// Creates an empty commit log.
    pub fn commit_log(&self) -> Arc<CommitLog> {
        Arc::new(CommitLog::new(Arc::clone(&self.seq_source)))
    }

    /// Returns a fresh file name in the work folder, numbered per run.
    pub fn work_file(&self, stem: &str, extension: &str) -> PathBuf {
        let number = self.run_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.work_dir.join(format!("{number:03}-{stem}.{extension}"))
    }

    /// Writes a gancho config for `endpoints` receiver paths, and returns its
    /// path and the endpoints' secrets.
    pub fn gancho_config(&self, endpoints: usize, settings: GanchoSettings) -> anyhow::Result<(PathBuf, Vec<String>)> {
        let secrets: Vec<String> = (0..endpoints)
            .map(|_| gancho::delivery::sign::generate_secret())
            .collect();
        let configs: Vec<EndpointConfig> = secrets
            .iter()
            .enumerate()
            .map(|(index, secret)| EndpointConfig {
                url: self.receiver.url(index),
                secret: secret.clone(),
            })
            .collect();
        let path = self.work_file("gancho", "toml");
        setup::write_config(&path, &self.database.url, &configs, settings)?;
        Ok((path, secrets))
    }

    /// Writes a config with one endpoint and the run's settings, for
    /// scenarios that only install the triggers.
    pub fn install_config(&self) -> anyhow::Result<PathBuf> {
        Ok(self.gancho_config(1, self.settings)?.0)
    }

    pub async fn set_triggers(&self, config: &Path, triggers: Triggers) -> anyhow::Result<()> {
        setup::set_triggers(&self.client, &self.gancho, config, triggers).await
    }
}

/// A system under test with its config and receiver endpoints, stopped or running.
pub struct SystemSetup {
    pub system: System,
    pub config: PathBuf,
    pub secrets: Vec<String>,
    pub endpoints: Vec<Arc<EndpointLog>>,
}

/// A running system under test.
pub struct Running {
    pub setup: SystemSetup,
    pub process: Measured,
    /// When the system was ready: its LISTEN connection was up.
    pub ready_at: Instant,
}

/// The system to start, its endpoint count and its slow endpoint.
pub struct RunSpec {
    pub system: System,
    pub endpoints: usize,
    pub slow_endpoint: Option<usize>,
    pub settings: GanchoSettings,
}

/// Installs the system's triggers on clean tables, resets the receiver and
/// starts the system, waiting until it listens.
pub async fn start_system(bench: &Bench, spec: &RunSpec) -> anyhow::Result<Running> {
    let (config, secrets) = bench.gancho_config(spec.endpoints, spec.settings)?;
    bench.set_triggers(&config, spec.system.triggers()).await?;
    setup::reset_between_runs(&bench.client).await?;
    let endpoints = prepare_endpoints(bench, spec, &secrets)?;
    let setup = SystemSetup {
        system: spec.system,
        config,
        secrets,
        endpoints,
    };
    launch(bench, setup).await
}

/// Resets the receiver to one fresh path per secret, the slow one delayed.
fn prepare_endpoints(bench: &Bench, spec: &RunSpec, secrets: &[String]) -> anyhow::Result<Vec<Arc<EndpointLog>>> {
    let specs = secrets
        .iter()
        .enumerate()
        .map(|(index, secret)| {
            Ok(EndpointSpec {
                key: secret_key(secret)?,
                delay: (spec.slow_endpoint == Some(index)).then_some(bench.sizes.slow_delay),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(bench.receiver.reset(specs))
}

/// Starts the system's process and waits until it listens.
pub async fn launch(bench: &Bench, setup: SystemSetup) -> anyhow::Result<Running> {
    let log = bench.work_file(setup.system.label(), "log");
    let (mut process, application_name) = match setup.system {
        System::Gancho => {
            let args = vec![
                "run".to_string(),
                "--config".to_string(),
                setup.config.display().to_string(),
            ];
            // gancho logs at its default level, as in production.
            let process = Measured::spawn(
                "gancho run",
                &bench.gancho,
                &args,
                &[("GANCHO_LOG", None), ("DATABASE_URL", None)],
                &log,
            )?;
            (process, "gancho-listener")
        }
        System::Naive => {
            let exe = std::env::current_exe().context("finding the path of gancho-bench")?;
            let mut args = vec![
                "naive-listener".to_string(),
                "--database-url".to_string(),
                bench.database.url.clone(),
            ];
            for (index, secret) in setup.secrets.iter().enumerate() {
                args.extend(["--url".to_string(), bench.receiver.url(index)]);
                args.extend(["--secret".to_string(), secret.clone()]);
            }
            let process = Measured::spawn("the naive listener", &exe, &args, &[], &log)?;
            (process, naive::APPLICATION_NAME)
        }
    };
    if let Err(error) = setup::wait_for_listener(&bench.client, application_name, Duration::from_secs(30)).await {
        process.check_alive()?;
        return Err(error.context(process.log_tail()));
    }
    Ok(Running {
        setup,
        process,
        ready_at: Instant::now(),
    })
}

/// Stops the system with SIGTERM, failing if it had died on its own.
pub async fn stop_system(bench: &Bench, running: Running) -> anyhow::Result<SystemSetup> {
    running.process.stop().await?;
    let unknown = bench.receiver.unknown_paths();
    if unknown > 0 {
        eprintln!("warning: the receiver got {unknown} requests for paths that are not endpoints of this run");
    }
    Ok(running.setup)
}

/// Waits until every endpoint of `mark` has received at least `expected`
/// requests since the mark, or until no request arrived for `stall_timeout`.
/// Returns whether the count was reached.
pub async fn wait_for_arrivals(
    mark: &ArrivalMark,
    expected: u64,
    stall_timeout: Duration,
    process: &mut Measured,
) -> anyhow::Result<bool> {
    let mut last_total = 0;
    let mut last_progress = Instant::now();
    loop {
        let counts = mark.received_since();
        if counts.iter().all(|count| *count >= expected) {
            return Ok(true);
        }
        let total: u64 = counts.iter().sum();
        if total != last_total {
            last_total = total;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > stall_timeout {
            return Ok(false);
        }
        process.check_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Figures of a saturated window.
pub struct Saturation {
    pub log: Arc<CommitLog>,
    /// The tracked endpoints' request counts when the writers started.
    pub mark: ArrivalMark,
    pub window_start: Instant,
    pub window_end: Instant,
    /// Verified webhooks that arrived at the tracked endpoints in the window.
    pub webhooks: u64,
    /// CPU seconds of the system under test in the window.
    pub system_cpu: f64,
    /// CPU seconds of gancho-bench itself (writers and receiver) in the window.
    pub bench_cpu: f64,
    /// Share of the machine's CPU time that was busy in the window, 0 to 1.
    pub machine_busy: f64,
    /// The system's peak RSS in the window, in KiB.
    pub peak_rss_kb: Option<u64>,
}

impl Saturation {
    pub fn seconds(&self) -> f64 {
        (self.window_end - self.window_start).as_secs_f64()
    }

    pub fn webhooks_per_second(&self) -> f64 {
        self.webhooks as f64 / self.seconds()
    }
}

/// Runs the saturating writers for the warm-up and the window, with flow
/// control on the `tracked` endpoints, and measures the window. The writers
/// are stopped when it returns; what they wrote may still be in flight.
pub async fn saturate(
    bench: &Bench,
    running: &mut Running,
    tracked: Vec<Arc<EndpointLog>>,
) -> anyhow::Result<Saturation> {
    let sizes = &bench.sizes;
    let log = bench.commit_log();
    let mark = ArrivalMark::new(&tracked);
    let flow = Arc::new(FlowControl {
        tracked: mark.clone(),
        window: sizes.flow_window,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let shape = SaturatingShape {
        writers: sizes.writers,
        batch: sizes.batch,
        stock_rows: sizes.stock_rows,
    };
    let writers = tokio::spawn(workload::run_saturating(
        bench.database.url.clone(),
        Arc::clone(&log),
        shape,
        flow,
        Arc::clone(&stop),
    ));

    let pid = running.process.pid();
    let own_pid = std::process::id() as i32;
    tokio::time::sleep(sizes.warmup).await;
    running.process.check_alive()?;
    let window_start = Instant::now();
    let system_before = process::cpu_seconds(pid).unwrap_or(0.0);
    let bench_before = process::cpu_seconds(own_pid).unwrap_or(0.0);
    let machine_before = process::machine_cpu();
    tokio::time::sleep(sizes.window).await;
    let window_end = Instant::now();
    let system_after = process::cpu_seconds(pid).unwrap_or(0.0);
    let bench_after = process::cpu_seconds(own_pid).unwrap_or(0.0);
    let machine_after = process::machine_cpu();
    stop.store(true, Ordering::Relaxed);
    writers.await.context("the writer task panicked")??;
    running.process.check_alive()?;

    let machine_busy = match (machine_before, machine_after) {
        (Some(before), Some(after)) => process::busy_share(before, after),
        _ => 0.0,
    };
    Ok(Saturation {
        webhooks: analysis::arrivals_between(&tracked, window_start, window_end),
        peak_rss_kb: running.process.monitor.peak_rss_between(window_start, window_end),
        log,
        mark,
        window_start,
        window_end,
        system_cpu: system_after - system_before,
        bench_cpu: bench_after - bench_before,
        machine_busy,
    })
}
