//! The naive baseline's listener, as a shop would hand-write it: LISTEN on
//! the naive trigger's channel and POST each notification's payload to every
//! endpoint in turn, one request at a time, over one keep-alive HTTP client.
//! It makes no retries and keeps no record; a failed request is counted on
//! stderr and dropped. It signs each request like a Standard Webhooks sender,
//! because an HMAC costs microseconds and the receiver verifies everything.
//!
//! It runs as `gancho-bench naive-listener`, a child process of the
//! benchmark, so its memory and CPU time are measured like gancho's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::receiver::{secret_key, sign};
use crate::setup::NAIVE_CHANNEL;

/// The application_name of the listener's connection, to find it in pg_stat_activity.
pub const APPLICATION_NAME: &str = "gancho-bench-naive";

#[derive(clap::Args, Debug)]
pub struct NaiveArgs {
    /// Database to LISTEN on, as a postgres:// URL.
    #[arg(long)]
    pub database_url: String,
    /// Endpoint URL; repeat for several endpoints, which get each
    /// notification in the order given.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// The `whsec_` secret of each endpoint, in the order of --url; a single
    /// secret is used for every endpoint.
    #[arg(long = "secret", required = true)]
    pub secrets: Vec<String>,
}

pub async fn run_listener(args: NaiveArgs) -> anyhow::Result<()> {
    let keys = match (args.secrets.len(), args.urls.len()) {
        (1, _) => vec![secret_key(&args.secrets[0])?; args.urls.len()],
        (secrets, urls) if secrets == urls => args
            .secrets
            .iter()
            .map(|secret| secret_key(secret))
            .collect::<anyhow::Result<_>>()?,
        (secrets, urls) => bail!("{secrets} --secret values for {urls} --url values; give one, or one per URL"),
    };

    let mut config: tokio_postgres::Config = args.database_url.parse().context("parsing --database-url")?;
    config.application_name(APPLICATION_NAME);
    let (client, mut connection) = config.connect(NoTls).await.context("connecting to the database")?;

    // The connection task reads every notification as soon as it arrives and
    // queues it here, so Postgres's notification queue never fills. A slow
    // endpoint makes this queue, and the process's memory, grow instead.
    let (sender, mut notifications) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut messages = futures_util::stream::poll_fn(move |context| connection.poll_message(context));
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if sender.send(notification.payload().to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    eprintln!("naive listener: connection failed: {error}");
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("listen {NAIVE_CHANNEL}")).await?;

    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .build()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sent: u64 = 0;
    let mut failures: u64 = 0;
    loop {
        let payload = tokio::select! {
            _ = terminate.recv() => break,
            payload = notifications.recv() => match payload {
                Some(payload) => payload,
                None => bail!("the LISTEN connection closed"),
            },
        };
        for (url, key) in args.urls.iter().zip(&keys) {
            sent += 1;
            let webhook_id = format!("msg_naive_{sent}");
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
            let signature = sign(key, &webhook_id, timestamp, payload.as_bytes());
            let request = http
                .post(url)
                .header("content-type", "application/json")
                .header("webhook-id", &webhook_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(payload.clone());
            let outcome = tokio::select! {
                _ = terminate.recv() => {
                    eprintln!("naive listener: stopped during a request; {sent} requests, {failures} failed");
                    return Ok(());
                },
                outcome = request.send() => outcome,
            };
            match outcome {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    failures += 1;
                    eprintln!("naive listener: {url} responded with {}", response.status());
                }
                Err(error) => {
                    failures += 1;
                    eprintln!("naive listener: POST to {url} failed: {error}");
                }
            }
        }
    }
    eprintln!("naive listener: stopped; {sent} requests, {failures} failed");
    Ok(())
}
