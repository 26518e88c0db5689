//! The soak test: mixed shop traffic for ten minutes (SOAK_SECONDS to change)
//! while replicas are killed, Postgres restarts and receivers fail, then a
//! report of committed changes, deliveries, duplicates, losses and ordering
//! violations. Not part of `cargo test`; run it with
//!
//!     cargo test --release --test soak -- --ignored --nocapture

#[path = "integration/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gancho::demo::cluster::TempCluster;
use gancho::demo::receiver::Receiver;
use support::*;

const REPLICAS: usize = 3;
const WRITERS: usize = 4;
const ORDERS: i64 = 2000;

fn config(url: &str, warehouse: &str, notifier: &str) -> String {
    format!(
        r#"database_url = "{url}"

[[source]]
name = "orders"
table = "orders"
key = ["id"]
columns = ["state", "version"]

[[rule]]
name = "changed"
source = "orders"
kind = "change"
event = "order.changed"

[[endpoint]]
name = "warehouse"
url = "{warehouse}"
secret = "{SECRET}"
events = ["*"]
timeout = "2s"
retry_schedule = ["200ms", "500ms", "1s", "2s", "5s", "10s", "10s", "10s", "10s", "10s", "10s", "10s"]
breaker_threshold = 20

[[endpoint]]
name = "notifier"
url = "{notifier}"
secret = "{SECRET}"
events = ["*"]
timeout = "2s"
retry_schedule = ["200ms", "500ms", "1s", "2s", "5s", "10s", "10s", "10s", "10s", "10s", "10s", "10s"]
breaker_threshold = 20

[sidecar]
poll_interval = "500ms"
lease = "5s"
shutdown_timeout = "3s"
"#
    )
}

/// Inserts and updates orders until `stop` is set. Every committed change
/// raises `version` by one, so the table itself tells afterwards which
/// changes committed, whatever errors the writer saw during restarts.
async fn write_traffic(url: String, writer: i64, stop: Arc<AtomicBool>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut step: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|client| client.is_closed()) {
            client = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .ok()
                .map(|(client, connection)| {
                    tokio::spawn(connection);
                    client
                });
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let id = (step * WRITERS as i64 + writer) % ORDERS + 1;
        let sql = format!(
            "insert into orders values ({id}, 'new', 1)
             on conflict (id) do update set version = orders.version + 1,
                 state = (array['paid', 'packed', 'shipped', 'delivered'])[orders.version % 4 + 1]"
        );
        let _ = client.as_ref().expect("connected above").batch_execute(&sql).await;
        step += 1;
        // About 40 changes a second per writer: a busy shop, not a benchmark.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_replica(config_path: &std::path::Path) -> Child {
    gancho_command()
        .args(["run", "--config"])
        .arg(config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gancho run starts")
}

struct EndpointReport {
    delivered: usize,
    duplicates: usize,
    losses: usize,
    ordering_violations: usize,
}

/// Compares what a receiver accepted with the committed versions of each order.
fn report(receiver: &Receiver, committed: &BTreeMap<i64, i64>) -> EndpointReport {
    let mut arrivals: HashMap<i64, Vec<i64>> = HashMap::new();
    for webhook in receiver.received().iter().filter(|webhook| webhook.answered == 200) {
        let id = webhook.data()["key"]["id"].as_i64().expect("an integer key");
        let version = webhook.data()["new"]["version"].as_i64().expect("an integer version");
        arrivals.entry(id).or_default().push(version);
    }

    let mut result = EndpointReport {
        delivered: 0,
        duplicates: 0,
        losses: 0,
        ordering_violations: 0,
    };
    for (id, last_version) in committed {
        let seen = arrivals.remove(id).unwrap_or_default();
        let mut highest = 0;
        for version in &seen {
            // A repeat of the newest version is a duplicate; anything older arrived out of order.
            if *version < highest {
                result.ordering_violations += 1;
            }
            highest = highest.max(*version);
        }
        let mut unique = seen.clone();
        unique.sort_unstable();
        unique.dedup();
        result.delivered += unique.len();
        result.duplicates += seen.len() - unique.len();
        result.losses += (1..=*last_version)
            .filter(|version| unique.binary_search(version).is_err())
            .count();
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "runs for ten minutes; see the file's documentation"]
async fn soak() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(600);
    let mut cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .unwrap()
        .expect("a throwaway cluster starts");
    let url = cluster.url("postgres");
    connect(&url)
        .await
        .batch_execute("create table orders (id bigint primary key, state text not null, version bigint not null)")
        .await
        .unwrap();

    let warehouse = Receiver::start(Some(secret())).await.unwrap();
    let notifier = Receiver::start(Some(secret())).await.unwrap();
    let text = config(&url, &warehouse.url(), &notifier.url());
    let config_file = TempFile::with_text(&text);
    gancho::capture::install(&mut connect(&url).await, &parse_config(&text, &[]))
        .await
        .unwrap();
    let mut replicas: Vec<Child> = (0..REPLICAS).map(|_| spawn_replica(&config_file.path)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS as i64)
        .map(|writer| tokio::spawn(write_traffic(url.clone(), writer, Arc::clone(&stop))))
        .collect();

    // Chaos: every few seconds kill a replica, restart Postgres, or fail a receiver.
    let started = Instant::now();
    let (mut kills, mut restarts, mut failures) = (0, 0, 0);
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(3000 + rand::random::<u64>() % 4000)).await;
        match rand::random::<u32>() % 4 {
            0 | 1 => {
                let victim = rand::random::<u32>() as usize % REPLICAS;
                replicas[victim].kill().unwrap();
                replicas[victim].wait().unwrap();
                replicas[victim] = spawn_replica(&config_file.path);
                kills += 1;
            }
            2 => {
                cluster = tokio::task::spawn_blocking(move || {
                    cluster.restart().expect("Postgres restarts");
                    cluster
                })
                .await
                .unwrap();
                restarts += 1;
            }
            _ => {
                let receiver = if rand::random::<bool>() { &warehouse } else { &notifier };
                receiver.fail_for(Duration::from_millis(2000 + rand::random::<u64>() % 6000));
                failures += 1;
            }
        }
    }

    // Stop writing, then let the replicas drain everything.
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let admin = connect(&url).await;
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(600);
    while Instant::now() < deadline {
        let pending: i64 = admin
            .query_one("select (select count(*) from gancho.outbox where processed_at is null) + (select count(*) from gancho.delivery where status <> 'delivered')", &[])
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_seconds = drain_started.elapsed().as_secs();
    for replica in &replicas {
        send_signal(replica, libc::SIGTERM);
    }
    for replica in &mut replicas {
        wait_for_exit(replica, Duration::from_secs(10)).await;
    }

    let committed: BTreeMap<i64, i64> = admin
        .query("select id, version from orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let changes: i64 = committed.values().sum();
    let statuses: Vec<(String, String, i64)> = admin
        .query(
            "select endpoint, status, count(*) from gancho.delivery group by 1, 2 order by 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    println!(
        "\nsoak: {seconds}s, {REPLICAS} replicas, {WRITERS} writers; {kills} replica kills, {restarts} Postgres restarts, {failures} receiver failure bursts"
    );
    println!("committed changes: {changes}; the backlog left when the chaos stopped drained in {drain_seconds}s");
    println!("deliveries by status: {statuses:?}");
    println!(
        "{:<10} {:>10} {:>11} {:>7} {:>20}",
        "endpoint", "delivered", "duplicates", "losses", "ordering violations"
    );
    let mut bad = 0;
    for (name, receiver) in [("warehouse", &warehouse), ("notifier", &notifier)] {
        let result = report(receiver, &committed);
        println!(
            "{name:<10} {:>10} {:>11} {:>7} {:>20}",
            result.delivered, result.duplicates, result.losses, result.ordering_violations
        );
        bad += result.losses + result.ordering_violations;
    }
    drop(cluster);
    assert_eq!(bad, 0, "losses or ordering violations");
}
