//! What every integration test needs: a database of its own on a real
//! Postgres, a receiver on 127.0.0.1, a sidecar, and ways to wait for results.
//!
//! The server is the one at DATABASE_URL when set (a postgres:// URL that can
//! create databases), otherwise a throwaway cluster shared by the whole test
//! binary.

pub mod verify;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gancho::config::{Config, Secret};
use gancho::demo::cluster::TempCluster;
use gancho::demo::receiver::Receiver;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// The secret of the Standard Webhooks specification's own example.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn secret() -> Secret {
    Secret::from_key(gancho::config::parse_secret_text(SECRET).expect("the test secret is valid"))
}

/// The throwaway cluster shared by the test binary. Statics are never
/// dropped, so an exit handler stops it and removes its folder.
static CLUSTER: Mutex<Option<TempCluster>> = Mutex::new(None);
static CLUSTER_URL: OnceLock<String> = OnceLock::new();

extern "C" fn remove_cluster() {
    if let Ok(mut cluster) = CLUSTER.lock() {
        drop(cluster.take());
    }
}

/// The URL of the server's maintenance database.
pub fn server_url() -> String {
    if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty()) {
        return url;
    }
    CLUSTER_URL
        .get_or_init(|| {
            let cluster = TempCluster::start().expect("a throwaway Postgres cluster starts (or set DATABASE_URL)");
            let url = cluster.url("postgres");
            *CLUSTER.lock().expect("cluster lock") = Some(cluster);
            unsafe { libc::atexit(remove_cluster) };
            url
        })
        .clone()
}

/// The same server URL with another database.
pub fn url_for_database(database: &str) -> String {
    let mut url = reqwest::Url::parse(&server_url()).expect("DATABASE_URL is a postgres:// URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

/// The same URL with another user (and no password: the test servers trust local users).
pub fn url_with_user(url: &str, user: &str) -> String {
    let mut url = reqwest::Url::parse(url).expect("a postgres:// URL");
    url.set_username(user).expect("the URL has a host");
    url.set_password(None).expect("the URL has a host");
    url.to_string()
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("the test database accepts connections");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Opens a connection that LISTENs on `channel`, and returns it with the
/// channel names of the notifications it receives.
pub async fn listen(
    url: &str,
    channel: &str,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use futures_util::StreamExt;

    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("the test database accepts connections");
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |context| connection.poll_message(context));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                let _ = sender.send(notification.channel().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("listen {channel}"))
        .await
        .expect("LISTEN succeeds");
    (client, receiver)
}

/// A database created for one test and dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let server = tokio::task::spawn_blocking(server_url)
            .await
            .expect("server start-up does not panic");
        let name = format!("gancho_test_{:016x}", rand::random::<u64>());
        let admin = connect(&server).await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("the test database is created");
        TestDb {
            url: url_for_database(&name),
            name,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}\nfailed: {error:?}"));
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|error| panic!("{sql}\nfailed: {error:?}"))
            .get(0)
    }

    /// Loads the Solidus-like schema that ships in examples/.
    pub async fn load_solidus_schema(&self) {
        self.execute(include_str!("../../../examples/solidus-schema.sql")).await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async code, so the drop gets a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let admin = connect(&server_url()).await;
                let _ = admin
                    .batch_execute(&format!("drop database if exists {name} with (force)"))
                    .await;
            });
        })
        .join();
    }
}

/// Parses a config with `${VAR}` taken from `vars` only.
pub fn parse_config(text: &str, vars: &[(&str, String)]) -> Arc<Config> {
    let lookup = |name: &str| {
        vars.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    };
    Arc::new(
        Config::parse(text, Path::new("test.toml"), &lookup)
            .unwrap_or_else(|error| panic!("{}", gancho::sidecar::error_chain(&error))),
    )
}

/// A config with the given sources and rules, one endpoint that takes every
/// event, fast retries, and a short poll interval.
pub fn config_text(database_url: &str, receiver_url: &str, sources_and_rules: &str) -> String {
    format!(
        r#"database_url = "{database_url}"

{sources_and_rules}

[[endpoint]]
name = "test"
url = "{receiver_url}"
secret = "{SECRET}"
events = ["*"]
retry_schedule = ["100ms", "100ms", "100ms"]
timeout = "2s"

[sidecar]
poll_interval = "200ms"
lease = "10s"
shutdown_timeout = "2s"
"#
    )
}

/// Installs the triggers for a config.
pub async fn install(db: &TestDb, config: &Config) {
    let mut client = db.client().await;
    gancho::capture::install(&mut client, config)
        .await
        .expect("gancho installs");
}

/// A sidecar running inside the test process.
pub struct RunningSidecar {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), gancho::sidecar::SidecarError>>,
}

pub fn start_sidecar(config: Arc<Config>) -> RunningSidecar {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gancho::sidecar::run(config, shutdown.clone()));
    RunningSidecar { shutdown, task }
}

impl RunningSidecar {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("the sidecar does not panic")
            .expect("the sidecar stops cleanly");
    }
}

/// A receiver with the test secret on a free port of 127.0.0.1.
pub async fn receiver() -> Receiver {
    Receiver::start(Some(secret()))
        .await
        .expect("a receiver starts on 127.0.0.1")
}

/// Polls a query returning one bigint until it equals `expected`, and returns
/// the last value seen, so the caller's assertion shows it on a timeout.
pub async fn wait_for_count(db: &TestDb, sql: &str, expected: i64, timeout: Duration) -> i64 {
    let client = db.client().await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let value: i64 = client.query_one(sql, &[]).await.expect("the polled query runs").get(0);
        if value == expected || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A file in the temporary folder, removed when dropped.
pub struct TempFile {
    pub path: std::path::PathBuf,
}

impl TempFile {
    pub fn with_text(text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("gancho-test-{:016x}.toml", rand::random::<u64>()));
        std::fs::write(&path, text).expect("the temporary file is written");
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `gancho` binary built for these tests.
pub fn gancho_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gancho"));
    command
        .env_remove("GANCHO_CONFIG")
        .env("GANCHO_LOG", "info,tokio_postgres=warn");
    command
}

/// Sends a signal to a child process.
pub fn send_signal(child: &std::process::Child, signal: i32) {
    let result = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(result, 0, "the signal was delivered");
}

/// Waits for a child to exit, up to a timeout, and returns its exit status.
pub async fn wait_for_exit(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("the child can be polled") {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
