//! Child processes under measurement (`gancho run` and the naive listener):
//! starting them, stopping them with SIGTERM, and sampling their memory and
//! CPU time from /proc every 100 ms.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// How often the monitor reads /proc/PID.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// How long a child may take to exit after SIGTERM before it gets SIGKILL.
/// gancho lets requests in flight finish for `shutdown_timeout` (10 s by
/// default), so this is longer.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds the gancho binary: `--gancho`, or `gancho` in the folder of this
/// executable (target/release when run through cargo).
pub fn find_gancho(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("finding the path of gancho-bench")?;
            exe.parent()
                .map(|folder| folder.join("gancho"))
                .context("gancho-bench has no parent folder")?
        }
    };
    if !path.is_file() {
        bail!(
            "the gancho binary was not found at {}; run `cargo build --release` first, or pass --gancho PATH",
            path.display()
        );
    }
    if explicit.is_none() {
        warn_if_stale(&path);
    }
    Ok(path)
}

/// Warns when a file of gancho's src/ or sql/ folder is newer than the
/// binary. `cargo run -p gancho-bench` rebuilds the gancho library that this
/// executable links, but not the gancho binary that it measures.
fn warn_if_stale(binary: &Path) {
    let Ok(built) = std::fs::metadata(binary).and_then(|metadata| metadata.modified()) else {
        return;
    };
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newer = ["src", "sql"]
        .iter()
        .filter_map(|folder| newest_file(&repository.join(folder)))
        .filter(|(_, modified)| *modified > built)
        .max_by_key(|(_, modified)| *modified);
    if let Some((file, _)) = newer {
        eprintln!(
            "warning: {} is newer than {}; run `cargo build --release` to measure the current sources",
            file.display(),
            binary.display()
        );
    }
}

/// Returns the most recently modified file under a folder, with its time.
fn newest_file(folder: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    for entry in std::fs::read_dir(folder).ok()?.filter_map(|entry| entry.ok()) {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .map(|time| (path, time))
        };
        if let Some((path, time)) = candidate
            && newest.as_ref().is_none_or(|(_, best)| time > *best)
        {
            newest = Some((path, time));
        }
    }
    newest
}

/// Runs `gancho VERB --config FILE` to completion, failing with its output when it fails.
pub async fn run_gancho_command(gancho: &Path, verb: &str, config: &Path) -> anyhow::Result<()> {
    // The config names the benchmark's database; a DATABASE_URL inherited
    // from the shell (CI exports one for the tests) must not change that.
    let output = Command::new(gancho)
        .arg(verb)
        .arg("--config")
        .arg(config)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} {verb}", gancho.display()))?;
    if !output.status.success() {
        bail!(
            "`gancho {verb} --config {}` failed with {}:\n{}{}",
            config.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

pub async fn gancho_version(gancho: &Path) -> String {
    match Command::new(gancho).arg("--version").output().await {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_string(),
        _ => "unknown".to_string(),
    }
}

/// A measured child process, with its stderr in a log file.
pub struct Measured {
    name: String,
    child: Child,
    pid: i32,
    log: PathBuf,
    pub started: Instant,
    pub monitor: Monitor,
}

impl Measured {
    /// Starts `program args`, with stdout and stderr appended to `log`. Each
    /// entry of `envs` sets an environment variable, or removes it when its
    /// value is None.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, Option<&str>)],
        log: &Path,
    ) -> anyhow::Result<Measured> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;

        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the log file")?)
            .stderr(log_file)
            .kill_on_drop(true);
        for (name, value) in envs {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }

        // A child outlives a benchmark that panics or is interrupted unless
        // the kernel stops it. The signal follows the thread that spawned the
        // child, so children are spawned only from the main thread and
        // tokio's worker threads, which live as long as the runtime. The
        // benchmark never calls block_in_place, because that would hand a
        // worker thread to the blocking pool, whose threads exit when idle.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }

        let started = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("the child has no pid")? as i32;
        eprintln!("started {name} (pid {pid}, log {})", log.display());
        Ok(Measured {
            name: name.to_string(),
            child,
            pid,
            log: log.to_path_buf(),
            started,
            monitor: Monitor::start(pid),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Fails with the end of its log when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early with {status}; {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit, with SIGKILL after a timeout.
    /// Returns the exit status text.
    pub async fn stop(mut self) -> anyhow::Result<String> {
        if let Some(status) = self.child.try_wait()? {
            self.monitor.stop();
            bail!("{} had already exited with {status}; {}", self.name, self.log_tail());
        }
        eprintln!("stopping {} (pid {}) with SIGTERM", self.name, self.pid);
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        let status = match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status?.to_string(),
            Err(_) => {
                self.child.kill().await?;
                format!("killed after {}s without exiting on SIGTERM", STOP_TIMEOUT.as_secs())
            }
        };
        self.monitor.stop();
        Ok(status)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(20);
        format!(
            "the end of its log ({}):\n{}",
            self.log.display(),
            lines[start..].join("\n")
        )
    }

    /// Returns the first `limit` lines of its log at WARN or ERROR level
    /// (gancho's format), and a line with the count of the others.
    pub fn warning_lines(&self, limit: usize) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let matching: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .collect();
        let mut lines: Vec<String> = matching.iter().take(limit).map(|line| line.to_string()).collect();
        if matching.len() > limit {
            lines.push(format!("... and {} more", matching.len() - limit));
        }
        lines
    }

    /// Counts the lines of its log at WARN or ERROR level (gancho's format).
    pub fn warnings_and_errors(&self) -> (usize, usize) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let warnings = text.lines().filter(|line| line.contains(" WARN ")).count();
        let errors = text.lines().filter(|line| line.contains(" ERROR ")).count();
        (warnings, errors)
    }
}

/// One reading of /proc/PID.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// VmRSS in KiB.
    pub rss_kb: u64,
    /// utime + stime in seconds.
    pub cpu_seconds: f64,
}

/// Samples a process's RSS and CPU time every [`SAMPLE_INTERVAL`] until it
/// exits or the monitor is stopped.
pub struct Monitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    pub fn start(pid: i32) -> Monitor {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let task_samples = Arc::clone(&samples);
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(sample) = read_sample(pid) else {
                    return;
                };
                task_samples.lock().expect("sample lock").push(sample);
            }
        });
        Monitor { samples, task }
    }

    pub fn stop(&self) {
        self.task.abort();
    }

    /// Takes a sample now, in addition to the periodic ones, and returns it.
    pub fn sample_now(&self, pid: i32) -> Option<Sample> {
        let sample = read_sample(pid)?;
        self.samples.lock().expect("sample lock").push(sample);
        Some(sample)
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("sample lock").clone()
    }

    /// Returns the highest RSS sampled between two instants, in KiB.
    pub fn peak_rss_between(&self, from: Instant, to: Instant) -> Option<u64> {
        self.samples()
            .iter()
            .filter(|sample| sample.at >= from && sample.at <= to)
            .map(|sample| sample.rss_kb)
            .max()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads VmRSS from /proc/PID/status and utime + stime from /proc/PID/stat.
pub fn read_sample(pid: i32) -> Option<Sample> {
    let at = Instant::now();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())?;
    let cpu_seconds = cpu_seconds(pid)?;
    Some(Sample {
        at,
        rss_kb,
        cpu_seconds,
    })
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in field 2 is in parentheses and may contain spaces,
    // so the fields are counted from the last ')'. utime and stime are
    // fields 14 and 15 of the line, so 12 and 13 after the name.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) as f64 / ticks_per_second)
}

/// Busy and total jiffies of the whole machine, from the first line of /proc/stat.
pub fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already
    // counted in user.
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Computes the share of the machine's CPU time that was busy between two
/// readings of [`machine_cpu`], from 0 to 1.
pub fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / total as f64
}

/// Program names of processes that compete with a benchmark for the CPU and
/// disk when they are not the benchmark's own: another benchmark run, a
/// gancho sidecar, pgbench.
const COMPETING_PROGRAMS: &[&str] = &["gancho", "gancho-bench", "pgbench"];

/// Lists the processes named in [`COMPETING_PROGRAMS`] that do not descend
/// from this process, as (pid, program and first argument). The rest of a
/// command line is left out because it can contain secrets.
pub fn competing_processes() -> Vec<(i32, String)> {
    let own = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents = std::collections::HashMap::new();
    let mut candidates = Vec::new();
    for entry in entries.filter_map(|entry| entry.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The name is in parentheses in field 2; the parent pid is field 4.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|(_, name)| name).unwrap_or_default();
        let parent = rest
            .split_whitespace()
            .nth(1)
            .and_then(|value| value.parse::<i32>().ok())
            .unwrap_or(0);
        parents.insert(pid, parent);
        if COMPETING_PROGRAMS.contains(&name) {
            candidates.push(pid);
        }
    }
    let descends_from_own = |mut pid: i32| {
        // Bounded, in case the table changed while it was read.
        for _ in 0..64 {
            if pid == own {
                return true;
            }
            match parents.get(&pid) {
                Some(parent) if *parent > 0 => pid = *parent,
                _ => return false,
            }
        }
        false
    };
    candidates
        .into_iter()
        .filter(|pid| !descends_from_own(*pid))
        .map(|pid| {
            let command = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|bytes| {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    text.split('\0').take(2).collect::<Vec<_>>().join(" ")
                })
                .unwrap_or_default();
            (pid, command)
        })
        .collect()
}
