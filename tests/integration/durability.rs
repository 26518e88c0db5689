//! Nothing committed is lost: not when the sidecar is down, and not when it
//! is killed with SIGKILL in the middle of a burst.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;

const ORDERS: &str = r#"
[[source]]
name = "orders"
table = "orders"
key = ["id"]
columns = ["state"]

[[rule]]
name = "created"
source = "orders"
kind = "change"
event = "order.changed"
"#;

/// Counts the webhooks per order id.
fn per_order(receiver: &gancho::demo::receiver::Receiver) -> HashMap<i64, usize> {
    let mut counts = HashMap::new();
    for webhook in receiver.received() {
        if webhook.answered == 200 {
            let id = webhook.data()["key"]["id"].as_i64().expect("an integer key");
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test]
async fn changes_while_sidecar_down_are_delivered() {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    let receiver = receiver().await;
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;

    db.execute("insert into orders select i, 'new' from generate_series(1, 50) i")
        .await;
    let sidecar = start_sidecar(config);
    let received = receiver.wait_for(50, Duration::from_secs(20)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 50);
    let counts = per_order(&receiver);
    assert_eq!(counts.len(), 50);
    assert!(counts.values().all(|count| *count == 1));
}

#[tokio::test]
async fn bulk_update_of_ten_thousand_rows() {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    db.execute("insert into orders select i, 'new' from generate_series(1, 10000) i")
        .await;
    let receiver = receiver().await;
    let text = config_text(&db.url, &receiver.url(), ORDERS)
        .replace("events = [\"*\"]", "events = [\"*\"]\nmax_in_flight = 32");
    let config = parse_config(&text, &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("update orders set state = 'paid'").await;
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        10_000,
        Duration::from_secs(120),
    )
    .await;
    sidecar.stop().await;

    assert_eq!(delivered, 10_000);
    assert_eq!(
        db.count("select count(*) from gancho.outbox where processed_at is null")
            .await,
        0
    );
    let counts = per_order(&receiver);
    assert_eq!(counts.len(), 10_000);
    assert!(
        counts.values().all(|count| *count == 1),
        "no duplicates without a crash"
    );
}

#[tokio::test]
async fn sigkill_under_load_loses_nothing() {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    let receiver = receiver().await;
    receiver.set_delay(Duration::from_millis(2));
    let text = config_text(&db.url, &receiver.url(), ORDERS).replace("lease = \"10s\"", "lease = \"2s\"");
    let config_file = TempFile::with_text(&text);
    let start = || {
        gancho_command()
            .args(["run", "--config"])
            .arg(&config_file.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gancho run starts")
    };
    install(&db, &parse_config(&text, &[])).await;
    let mut first = start();

    // Write 3,000 orders in 60 transactions while the sidecar delivers.
    let writer_url = db.url.clone();
    let writer = tokio::spawn(async move {
        let client = connect(&writer_url).await;
        for batch in 0..60 {
            let from = batch * 50 + 1;
            client
                .batch_execute(&format!(
                    "insert into orders select i, 'new' from generate_series({from}, {}) i",
                    from + 49
                ))
                .await
                .expect("the shop's insert succeeds");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    // Kill the sidecar once it is well into the burst.
    let seen = receiver.wait_for(400, Duration::from_secs(30)).await.len();
    assert!(seen >= 400, "deliveries started before the kill: {seen}");
    first.kill().expect("SIGKILL is sent");
    first.wait().expect("the killed sidecar is reaped");
    writer.await.expect("the writer finishes");

    let mut second = start();
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        3000,
        Duration::from_secs(60),
    )
    .await;
    send_signal(&second, libc::SIGTERM);
    let status = wait_for_exit(&mut second, Duration::from_secs(10)).await;

    assert_eq!(delivered, 3000);
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(0),
        "SIGTERM stops the sidecar cleanly"
    );
    let counts = per_order(&receiver);
    assert_eq!(counts.len(), 3000, "every committed order reached the receiver");
    let duplicates: usize = counts.values().map(|count| count - 1).sum();
    // Only requests in flight at the kill may arrive twice: at most max_in_flight (8).
    assert!(duplicates <= 8, "{duplicates} duplicates");
}

/// With polling set to a minute, only notifications and the scan after a
/// reconnection can deliver within the test's timeouts.
fn notify_only_config(database_url: &str, receiver_url: &str) -> String {
    config_text(database_url, receiver_url, ORDERS).replace("poll_interval = \"200ms\"", "poll_interval = \"60s\"")
}

#[tokio::test]
async fn listener_reconnects_after_backend_killed() {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    let receiver = receiver().await;
    let config = parse_config(&notify_only_config(&db.url, &receiver.url()), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'new')").await;
    assert_eq!(receiver.wait_for(1, Duration::from_secs(15)).await.len(), 1);

    // Kill every connection of the sidecar, then change a row during the gap.
    let terminated = db
        .count(&format!(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = '{}' and application_name = 'gancho'",
            db.name
        ))
        .await;
    assert!(
        terminated >= 2,
        "the LISTEN connection and a pool connection: {terminated}"
    );
    db.execute("insert into orders values (2, 'new')").await;
    // The sidecar may meet killed pool connections first and back off (1 s,
    // 2 s, 4 s, ...) before its scan finds the change, hence the minute.
    assert_eq!(
        receiver.wait_for(2, Duration::from_secs(60)).await.len(),
        2,
        "the gap's change arrives"
    );

    // The new LISTEN connection receives notifications again.
    db.execute("insert into orders values (3, 'new')").await;
    assert_eq!(receiver.wait_for(3, Duration::from_secs(15)).await.len(), 3);
    sidecar.stop().await;

    let counts = per_order(&receiver);
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|count| *count == 1), "{counts:?}");
}

#[tokio::test]
async fn postgres_restart_loses_nothing() {
    // A cluster of this test's own, since restarting a shared server would
    // disturb the other tests.
    let mut cluster = tokio::task::spawn_blocking(gancho::demo::cluster::TempCluster::start)
        .await
        .unwrap()
        .expect("a throwaway cluster starts");
    let url = cluster.url("postgres");
    let admin = connect(&url).await;
    admin
        .batch_execute("create table orders (id int primary key, state text)")
        .await
        .unwrap();
    drop(admin);
    let receiver = receiver().await;
    let config = parse_config(&notify_only_config(&url, &receiver.url()), &[]);
    let mut installer = connect(&url).await;
    gancho::capture::install(&mut installer, &config)
        .await
        .expect("gancho installs");
    drop(installer);
    let sidecar = start_sidecar(config);

    let writer = connect(&url).await;
    writer
        .batch_execute("insert into orders values (1, 'new')")
        .await
        .unwrap();
    assert_eq!(receiver.wait_for(1, Duration::from_secs(15)).await.len(), 1);

    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().expect("the cluster restarts");
        cluster
    })
    .await
    .unwrap();
    let writer = connect(&cluster.url("postgres")).await;
    writer
        .batch_execute("insert into orders values (2, 'new'), (3, 'new')")
        .await
        .unwrap();
    let received = receiver.wait_for(3, Duration::from_secs(30)).await;
    sidecar.stop().await;
    cluster.stop();

    assert_eq!(received.len(), 3);
    let counts = per_order(&receiver);
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|count| *count == 1), "{counts:?}");
}

async fn wait_until_claimed(db: &TestDb) {
    let claimed = wait_for_count(
        db,
        "select count(*) from gancho.delivery where lease_until is not null",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(claimed, 1, "the delivery was claimed");
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    let receiver = receiver().await;
    receiver.set_delay(Duration::from_millis(1500));
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'new')").await;
    wait_until_claimed(&db).await;
    sidecar.stop().await;

    assert_eq!(receiver.received().len(), 1);
    assert_eq!(
        db.count("select count(*) from gancho.delivery where status = 'delivered'")
            .await,
        1
    );
}

#[tokio::test]
async fn shutdown_timeout_releases_unfinished_leases() {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    let receiver = receiver().await;
    receiver.set_delay(Duration::from_secs(5));
    let text = config_text(&db.url, &receiver.url(), ORDERS)
        .replace("shutdown_timeout = \"2s\"", "shutdown_timeout = \"300ms\"")
        .replace("\ntimeout = \"2s\"", "\ntimeout = \"8s\"");
    let config = parse_config(&text, &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'new')").await;
    wait_until_claimed(&db).await;
    sidecar.stop().await;

    let client = db.client().await;
    let row = client
        .query_one("select status, attempts, lease_until is null from gancho.delivery", &[])
        .await
        .expect("the delivery is readable");
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0, "the abandoned attempt is not counted");
    assert!(row.get::<_, bool>(2), "the lease is released for the next start");
    assert_eq!(db.count("select count(*) from gancho.attempt").await, 0);
}

#[tokio::test]
async fn postgres_crash_keeps_webhook_ids() {
    // A cluster of this test's own, since crashing a shared server would
    // disturb the other tests. Its WAL writer waits 10 s between rounds
    // instead of 0.2 s, so asynchronous commits stay in memory longer and a
    // crash is likelier to lose some.
    let mut cluster = tokio::task::spawn_blocking(|| {
        gancho::demo::cluster::TempCluster::start_with(&[
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("max_connections", "200"),
            ("wal_writer_delay", "10s"),
        ])
    })
    .await
    .unwrap()
    .expect("a throwaway cluster starts");
    let url = cluster.url("postgres");
    let admin = connect(&url).await;
    admin
        .batch_execute("create table orders (id int primary key, state text)")
        .await
        .unwrap();
    drop(admin);
    let receiver = receiver().await;
    let config = parse_config(&config_text(&url, &receiver.url(), ORDERS), &[]);
    let mut installer = connect(&url).await;
    gancho::capture::install(&mut installer, &config)
        .await
        .expect("gancho installs");
    drop(installer);
    let sidecar = start_sidecar(config);

    // One committed transaction, and no other writer after it, so only
    // gancho's own commits move the WAL forward. A delivery sent before its
    // event was flushed would be lost in the crash and made again under a
    // new webhook-id.
    const ORDER_COUNT: i32 = 1500;
    let writer = connect(&url).await;
    writer
        .execute(
            "insert into orders select id, 'new' from generate_series(1, $1) id",
            &[&ORDER_COUNT],
        )
        .await
        .unwrap();
    drop(writer);
    receiver.set_delay(Duration::from_millis(5));

    // Crash while events are being made, sent and recorded.
    receiver.wait_for(300, Duration::from_secs(30)).await;
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster
            .crash_and_restart()
            .expect("the cluster restarts after the crash");
        cluster
    })
    .await
    .unwrap();
    receiver.set_delay(Duration::ZERO);

    let mut ids_by_order: HashMap<i64, std::collections::BTreeSet<String>> = HashMap::new();
    for _ in 0..600 {
        ids_by_order.clear();
        for webhook in receiver.received() {
            if webhook.answered == 200 {
                let id = webhook.data()["key"]["id"].as_i64().expect("an integer key");
                ids_by_order.entry(id).or_default().insert(webhook.webhook_id.clone());
            }
        }
        if ids_by_order.len() == ORDER_COUNT as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sidecar.stop().await;
    cluster.stop();

    assert_eq!(
        ids_by_order.len(),
        ORDER_COUNT as usize,
        "every committed order arrived"
    );
    let with_two_ids: Vec<_> = ids_by_order.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(
        with_two_ids.is_empty(),
        "orders that arrived under more than one webhook-id: {with_two_ids:?}"
    );
}
