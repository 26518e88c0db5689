//! A throwaway Postgres cluster, started from the server programs installed on
//! the machine, for `gancho demo` and for the tests when DATABASE_URL is unset.
//!
//! The cluster lives in a fresh temporary folder, listens on a free port on
//! 127.0.0.1 with trust authentication, and runs with fsync off, because it contains
//! nothing worth keeping. [`TempCluster::start_with`] starts one with other
//! server settings instead, such as the durable ones a benchmark needs.
//! Postgres refuses to run as root, so under root the server runs as the
//! `postgres` user that Debian's package creates.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "the Postgres server programs were not found on PATH, through pg_config or in /usr/lib/postgresql; install the postgresql package or set DATABASE_URL to an existing server"
    )]
    ProgramsNotFound,
    #[error(
        "running as root, but there is no `postgres` user to run the server as; create one (useradd postgres) or set DATABASE_URL"
    )]
    NoServerUser,
    #[error("{step} failed")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed: {output}")]
    Initdb { output: String },
    #[error("the Postgres server did not accept connections within {seconds}s; its log:\n{log}")]
    NotReady { seconds: u64, log: String },
}

/// A running throwaway cluster. Dropping it stops the server and removes its folder.
pub struct TempCluster {
    root: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    /// Server settings passed as `-c name=value`, kept for restarts.
    settings: Vec<(String, String)>,
    keeper: Option<Keeper>,
}

/// The settings of [`TempCluster::start`]: no durability, since a test
/// cluster contains nothing worth keeping, and room for many test connections.
const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
];

/// The thread that started the server and owns its process. The server gets
/// SIGQUIT when this thread ends (PR_SET_PDEATHSIG), so a test process that
/// dies does not leave a server behind. The thread is a dedicated one because
/// the signal follows the thread that forked, not the process.
struct Keeper {
    /// Takes the signal that stops the server: SIGINT for a fast shutdown,
    /// SIGQUIT for an immediate one.
    stop: mpsc::Sender<i32>,
    thread: std::thread::JoinHandle<()>,
}

impl TempCluster {
    /// Starts a cluster with fsync and full_page_writes off and
    /// max_connections at 200.
    pub fn start() -> Result<TempCluster, ClusterError> {
        TempCluster::start_with(TEST_SETTINGS)
    }

    /// Starts a cluster with exactly these server settings, as `(name, value)`
    /// pairs, on top of the server's defaults. Unlike [`TempCluster::start`],
    /// nothing is turned off: without a `fsync` entry the server syncs to disk.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<TempCluster, ClusterError> {
        let bin_dir = find_server_programs().ok_or(ClusterError::ProgramsNotFound)?;
        remove_stale_folders();

        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user("postgres").ok_or(ClusterError::NoServerUser)?)
        } else {
            None
        };

        let root = std::env::temp_dir().join(format!(
            "gancho-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root).map_err(|source| io_error("creating the cluster folder", source))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .map_err(|source| io_error("handing the cluster folder to the postgres user", source))?;
        }

        let mut cluster = TempCluster {
            root,
            port: 0,
            bin_dir,
            run_as,
            settings: settings
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            keeper: None,
        };
        cluster.initdb()?;
        cluster.port = free_port().map_err(|source| io_error("finding a free port", source))?;
        cluster.launch()?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for one database of the cluster, as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        command.env("LC_ALL", "C").current_dir(&self.root);
        command
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|source| io_error("running initdb", source))?;
        if !output.status.success() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return Err(ClusterError::Initdb { output: text });
        }
        Ok(())
    }

    /// Starts the server on the cluster's port and waits until it accepts connections.
    fn launch(&mut self) -> Result<(), ClusterError> {
        let log_path = self.root.join("server.log");
        let log = std::fs::File::create(&log_path).map_err(|source| io_error("creating the server log", source))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(&log_path, Some(uid), Some(gid));
        }
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()));
        for (name, value) in &self.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|source| io_error("opening the server log", source))?,
            )
            .stderr(log);
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }

        let (started_sender, started) = mpsc::channel();
        let (stop, stop_requested) = mpsc::channel::<i32>();
        let thread = std::thread::spawn(move || {
            let child = command.spawn();
            let mut child: Child = match child {
                Ok(child) => {
                    let _ = started_sender.send(Ok(()));
                    child
                }
                Err(error) => {
                    let _ = started_sender.send(Err(error));
                    return;
                }
            };
            // Wait for a stop request, then signal the server and wait. A
            // dropped owner means a fast shutdown.
            let signal = stop_requested.recv().unwrap_or(libc::SIGINT);
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        });
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(io_error("starting postgres", source)),
            Err(_) => {
                return Err(io_error(
                    "starting postgres",
                    std::io::Error::other("the keeper thread ended"),
                ));
            }
        }
        self.keeper = Some(Keeper { stop, thread });

        let timeout = Duration::from_secs(60);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // pg_ctl's own readiness test: from PostgreSQL 10 on, the postmaster
            // writes "ready" on the eighth line of postmaster.pid once it accepts
            // connections.
            let ready = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
                .map(|pid_file| pid_file.lines().nth(7).map(str::trim) == Some("ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(ClusterError::NotReady {
            seconds: timeout.as_secs(),
            log,
        })
    }

    /// Stops the server with a fast shutdown and waits until it has exited.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGINT);
    }

    fn stop_with(&mut self, signal: i32) {
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.stop.send(signal);
            let _ = keeper.thread.join();
        }
    }

    /// Stops the server as a crash would (an immediate shutdown: WAL not yet
    /// written from shared memory is lost), then starts it again, which
    /// replays the WAL.
    pub fn crash_and_restart(&mut self) -> Result<(), ClusterError> {
        self.stop_with(libc::SIGQUIT);
        self.launch()
    }

    /// Starts the server again on the same port, keeping its data.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop();
        self.launch()
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn io_error(step: &str, source: std::io::Error) -> ClusterError {
    ClusterError::Io {
        step: step.to_string(),
        source,
    }
}

/// Finds the folder of initdb and postgres: on PATH, through `pg_config
/// --bindir`, or the newest /usr/lib/postgresql/N/bin (Debian keeps them there).
pub fn find_server_programs() -> Option<PathBuf> {
    let has_programs = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();

    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|dir| has_programs(dir))
    {
        return Some(dir);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_programs(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_programs(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    // getpwnam returns a pointer into static storage; the fields are copied at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    let entry = unsafe { &*entry };
    Some((entry.pw_uid, entry.pw_gid))
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Removes cluster folders left by processes that no longer exist.
fn remove_stale_folders() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("gancho-pg-").and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
