//! Faults: late commits, concurrent writers, replicas, hostile receivers,
//! endpoint health, retention and the claim queries on a large history.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const ORDERS_TABLE: &str = "create table orders (id bigint primary key, state text, total numeric)";

const ORDERS: &str = r#"
[[source]]
name = "orders"
table = "orders"
key = ["id"]
columns = ["state", "total"]

[[rule]]
name = "state"
source = "orders"
kind = "transition"
column = "state"
event = "order.state"
"#;

async fn orders_setup() -> (TestDb, gancho::demo::receiver::Receiver, String) {
    let db = TestDb::create().await;
    db.execute(ORDERS_TABLE).await;
    let receiver = receiver().await;
    let text = config_text(&db.url, &receiver.url(), ORDERS);
    install(&db, &parse_config(&text, &[])).await;
    (db, receiver, text)
}

/// The `to` value of each accepted webhook for one order, in arrival order.
fn states_of(receiver: &gancho::demo::receiver::Receiver, id: i64) -> Vec<String> {
    receiver
        .received()
        .iter()
        .filter(|webhook| webhook.answered < 300 && webhook.data()["key"]["id"] == id)
        .map(|webhook| webhook.data()["to"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn late_commit_with_early_id_is_delivered() {
    let (db, receiver, text) = orders_setup().await;
    let sidecar = start_sidecar(parse_config(&text, &[]));

    // A takes its outbox id first and commits last.
    let session_a = db.client().await;
    session_a
        .batch_execute("begin; insert into orders values (1, 'new', 10)")
        .await
        .unwrap();
    db.execute("insert into orders values (2, 'new', 20)").await;
    assert_eq!(receiver.wait_for(1, Duration::from_secs(15)).await.len(), 1);
    session_a.batch_execute("commit").await.unwrap();

    let received = receiver.wait_for(2, Duration::from_secs(15)).await;
    sidecar.stop().await;
    let mut keys: Vec<i64> = received
        .iter()
        .map(|webhook| webhook.data()["key"]["id"].as_i64().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, vec![1, 2]);
}

#[tokio::test]
async fn two_changes_in_one_transaction_arrive_in_order() {
    let (db, receiver, text) = orders_setup().await;
    db.execute("insert into orders values (1, 'new', 10)").await;
    receiver.fail_next(1);
    let sidecar = start_sidecar(parse_config(&text, &[]));

    db.execute("begin; update orders set state = 'paid' where id = 1; update orders set state = 'packed' where id = 1; commit;").await;
    wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        3,
        Duration::from_secs(15),
    )
    .await;
    sidecar.stop().await;

    assert_eq!(states_of(&receiver, 1), vec!["new", "paid", "packed"]);
}

#[tokio::test]
async fn per_row_order_survives_failures() {
    let (db, receiver, text) = orders_setup().await;
    let text = text.replace("events = [\"*\"]", "events = [\"*\"]\nmax_in_flight = 16");
    receiver.fail_next(7);
    let sidecar = start_sidecar(parse_config(&text, &[]));

    for state in ["new", "paid", "packed", "shipped"] {
        let sql = if state == "new" {
            "insert into orders select i, 'new', 1 from generate_series(1, 10) i".to_string()
        } else {
            format!("update orders set state = '{state}'")
        };
        db.execute(&sql).await;
    }
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        40,
        Duration::from_secs(30),
    )
    .await;
    sidecar.stop().await;

    assert_eq!(delivered, 40);
    for id in 1..=10 {
        assert_eq!(
            states_of(&receiver, id),
            vec!["new", "paid", "packed", "shipped"],
            "order {id}"
        );
    }
}

#[tokio::test]
async fn concurrent_decrements_report_written_values() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int)")
        .await;
    db.execute("insert into stock values (1, 1)").await;
    let receiver = receiver().await;
    let text = config_text(
        &db.url,
        &receiver.url(),
        r#"
[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["quantity"]

[[rule]]
name = "changed"
source = "stock"
kind = "change"
event = "stock.changed"
"#,
    );
    install(&db, &parse_config(&text, &[])).await;
    let sidecar = start_sidecar(parse_config(&text, &[]));

    let first = db.client().await;
    let second = db.client().await;
    first
        .batch_execute("begin; update stock set quantity = quantity - 1 where id = 1")
        .await
        .unwrap();
    let blocked = tokio::spawn(async move {
        second
            .batch_execute("update stock set quantity = quantity - 1 where id = 1")
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.batch_execute("commit").await.unwrap();
    blocked.await.unwrap();

    let received = receiver.wait_for(2, Duration::from_secs(15)).await;
    sidecar.stop().await;
    let pairs: Vec<(Value, Value)> = received
        .iter()
        .map(|webhook| {
            (
                webhook.data()["old"]["quantity"].clone(),
                webhook.data()["new"]["quantity"].clone(),
            )
        })
        .collect();
    assert_eq!(pairs, vec![(json!(1), json!(0)), (json!(0), json!(-1))]);
}

#[tokio::test]
async fn big_numbers_keep_every_digit() {
    let db = TestDb::create().await;
    db.execute("create table ledger (id bigint primary key, amount numeric, counter bigint)")
        .await;
    let receiver = receiver().await;
    let text = config_text(
        &db.url,
        &receiver.url(),
        r#"
[[source]]
name = "ledger"
table = "ledger"
key = ["id"]
columns = ["amount", "counter"]

[[rule]]
name = "changed"
source = "ledger"
kind = "change"
event = "ledger.changed"
"#,
    );
    install(&db, &parse_config(&text, &[])).await;
    let sidecar = start_sidecar(parse_config(&text, &[]));
    db.execute("insert into ledger values (9007199254740993, 12345678901234567890.123456, 9007199254740993)")
        .await;
    let received = receiver.wait_for(1, Duration::from_secs(15)).await;
    sidecar.stop().await;

    let body = String::from_utf8(received[0].body.to_vec()).unwrap();
    assert!(body.contains(r#""key":{"id":9007199254740993}"#), "{body}");
    assert!(body.contains(r#""amount":12345678901234567890.123456"#), "{body}");
    assert!(body.contains(r#""counter":9007199254740993"#), "{body}");
}

#[tokio::test]
async fn truncate_is_its_own_event() {
    let (db, receiver, text) = orders_setup().await;
    db.execute("insert into orders values (1, 'new', 10)").await;
    db.execute("delete from gancho.outbox").await;
    let sidecar = start_sidecar(parse_config(&text, &[]));

    db.execute("truncate orders").await;
    let received = receiver.wait_for(1, Duration::from_secs(15)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 1);
    assert_eq!(received[0].event_type(), "orders.truncated");
    assert_eq!(received[0].data()["operation"], "TRUNCATE");
    assert_eq!(received[0].data()["table"], "public.orders");
    assert_eq!(received[0].data()["rule"], Value::Null);
}

#[tokio::test]
async fn replica_role_skips_unless_fire_always() {
    let db = TestDb::create().await;
    db.execute("create table a (id int primary key, v int); create table b (id int primary key, v int);")
        .await;
    let config = parse_config(
        &config_text(
            &db.url,
            "http://127.0.0.1:9/",
            r#"
[[source]]
name = "plain"
table = "a"
key = ["id"]
columns = ["v"]

[[source]]
name = "always"
table = "b"
key = ["id"]
columns = ["v"]
fire_in_replica_mode = true
"#,
        ),
        &[],
    );
    install(&db, &config).await;

    db.execute("set session_replication_role = replica; insert into a values (1, 1); insert into b values (1, 1);")
        .await;
    db.execute("insert into a values (2, 2); insert into b values (2, 2);")
        .await;
    let sources: Vec<(String, i64)> = db
        .client()
        .await
        .query(
            "select source, count(*) from gancho.outbox group by source order by source",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(sources, vec![("always".to_string(), 2), ("plain".to_string(), 1)]);
}

#[tokio::test]
async fn skip_setting_prevents_loops() {
    let (db, _receiver, _) = orders_setup().await;
    db.execute("set gancho.skip = 'on'; insert into orders values (1, 'new', 1);")
        .await;
    db.execute("begin; set local gancho.skip = 'on'; insert into orders values (2, 'new', 1); commit; insert into orders values (3, 'new', 1);").await;
    let keys: Vec<Value> = db
        .client()
        .await
        .query("select key from gancho.outbox order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, vec![json!({"id": 3})]);
}

#[tokio::test]
async fn replicas_share_work_without_duplicates() {
    let (db, receiver, text) = orders_setup().await;
    let replicas: Vec<RunningSidecar> = (0..3).map(|_| start_sidecar(parse_config(&text, &[]))).collect();

    db.execute("insert into orders select i, 'new', 1 from generate_series(1, 300) i")
        .await;
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        300,
        Duration::from_secs(30),
    )
    .await;
    for replica in replicas {
        replica.stop().await;
    }

    assert_eq!(delivered, 300);
    assert_eq!(receiver.received().len(), 300, "no delivery was sent twice");
    assert_eq!(
        db.count("select count(*) from gancho.event").await,
        300,
        "no change was processed twice"
    );
}

#[tokio::test]
async fn handed_delivery_leased_at_creation() {
    // A delivery the processor hands over gets its lease in the transaction
    // that creates it, so the lease ends exactly one `lease` (10 s) after
    // `created_at`. A claim would set it in a later transaction.
    let (db, receiver, text) = orders_setup().await;
    let sidecar = start_sidecar(parse_config(&text, &[]));
    let delivered_sql = "select count(*) from gancho.delivery where status = 'delivered'";
    db.execute("insert into orders values (0, 'new', 1)").await;
    wait_for_count(&db, delivered_sql, 1, Duration::from_secs(15)).await;

    receiver.set_delay(Duration::from_millis(1500));
    db.execute("insert into orders values (1, 'new', 1)").await;
    let in_flight = "select count(*) from gancho.delivery
                     where status = 'pending' and attempts = 1 and lease_until is not null";
    wait_for_count(&db, in_flight, 1, Duration::from_secs(15)).await;
    let exact = db
        .count(
            "select count(*) from gancho.delivery
             where status = 'pending' and lease_until = created_at + interval '10 s'",
        )
        .await;
    wait_for_count(&db, delivered_sql, 2, Duration::from_secs(15)).await;
    sidecar.stop().await;

    assert_eq!(exact, 1, "the lease was set when the delivery was created");
    assert_eq!(states_of(&receiver, 1), vec!["new"]);
}

#[tokio::test]
async fn deliveries_beyond_the_handoff_are_claimed() {
    // With one request slot the dispatcher takes two deliveries at a time
    // from the processor; the rest of each batch waits for its claims.
    let (db, receiver, text) = orders_setup().await;
    let text = text.replace("events = [\"*\"]", "events = [\"*\"]\nmax_in_flight = 1");
    let sidecar = start_sidecar(parse_config(&text, &[]));
    let delivered_sql = "select count(*) from gancho.delivery where status = 'delivered'";
    // Once the first arrives, the dispatcher has offered its room.
    db.execute("insert into orders values (0, 'new', 1)").await;
    wait_for_count(&db, delivered_sql, 1, Duration::from_secs(15)).await;

    db.execute("insert into orders select i, 'new', 1 from generate_series(1, 40) i")
        .await;
    wait_for_count(&db, delivered_sql, 41, Duration::from_secs(30)).await;
    db.execute("update orders set state = 'paid'").await;
    let delivered = wait_for_count(&db, delivered_sql, 82, Duration::from_secs(30)).await;
    sidecar.stop().await;

    assert_eq!(delivered, 82);
    assert_eq!(receiver.received().len(), 82, "no delivery was sent twice");
    assert_eq!(
        db.count("select count(*) from gancho.attempt").await,
        82,
        "one attempt each"
    );
    assert_eq!(
        db.count("select count(*) from gancho.delivery where attempts <> 1")
            .await,
        0
    );
    for id in 0..=40 {
        assert_eq!(states_of(&receiver, id), vec!["new", "paid"], "order {id}");
    }
}

#[tokio::test]
async fn killed_replica_work_is_taken_over() {
    let (db, receiver, text) = orders_setup().await;
    receiver.set_delay(Duration::from_millis(5));
    let text = text.replace("lease = \"10s\"", "lease = \"2s\"");
    let config_file = TempFile::with_text(&text);
    let spawn = || {
        gancho_command()
            .args(["run", "--config"])
            .arg(&config_file.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gancho run starts")
    };
    let mut doomed = spawn();
    let mut survivor = spawn();

    db.execute("insert into orders select i, 'new', 1 from generate_series(1, 1000) i")
        .await;
    receiver.wait_for(200, Duration::from_secs(30)).await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        1000,
        Duration::from_secs(60),
    )
    .await;
    send_signal(&survivor, libc::SIGTERM);
    wait_for_exit(&mut survivor, Duration::from_secs(10)).await;

    assert_eq!(delivered, 1000);
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for webhook in receiver.received().iter().filter(|webhook| webhook.answered == 200) {
        *counts.entry(webhook.data()["key"]["id"].as_i64().unwrap()).or_default() += 1;
    }
    assert_eq!(counts.len(), 1000);
    let duplicates: usize = counts.values().map(|count| count - 1).sum();
    assert!(
        duplicates <= 8,
        "only the killed replica's requests in flight repeat: {duplicates}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_and_capped() {
    let (db, receiver, text) = orders_setup().await;
    receiver.set_status(429);
    receiver.set_retry_after(Some("2"));
    let sidecar = start_sidecar(parse_config(&text, &[]));

    db.execute("insert into orders values (1, 'new', 1)").await;
    let received = receiver.wait_for(2, Duration::from_secs(15)).await;
    let gap = received[1].arrived.duration_since(received[0].arrived);
    assert!(
        gap >= Duration::from_secs(2),
        "the retry waited for Retry-After, not the 100ms schedule: {gap:?}"
    );
    assert_eq!(received[0].webhook_id, received[1].webhook_id);
    assert_ne!(
        received[0].signature, received[1].signature,
        "each attempt is signed anew"
    );

    receiver.set_retry_after(Some("7200"));
    wait_for_count(&db, "select count(*) from gancho.attempt", 3, Duration::from_secs(15)).await;
    sidecar.stop().await;
    let pause = db.count("select extract(epoch from paused_until - now())::bigint from gancho.endpoint_state where endpoint = 'test'").await;
    assert!(
        (3500..=3600).contains(&pause),
        "a 2-hour Retry-After is cut to one hour: {pause}s"
    );
}

#[tokio::test]
async fn gone_disables_endpoint_until_enabled() {
    let (db, receiver, text) = orders_setup().await;
    receiver.set_status(410);
    let sidecar = start_sidecar(parse_config(&text, &[]));

    db.execute("insert into orders values (1, 'new', 1)").await;
    let disabled = wait_for_count(
        &db,
        "select count(*) from gancho.endpoint_state where disabled_at is not null",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(disabled, 1);
    db.execute("insert into orders values (2, 'new', 1)").await;
    wait_for_count(&db, "select count(*) from gancho.delivery", 2, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.received().len(), 1, "nothing is sent to a disabled endpoint");
    let reason: String = db
        .client()
        .await
        .query_one("select disabled_reason from gancho.endpoint_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "the receiver answered 410 Gone");
    assert_eq!(
        db.count("select count(*) from gancho.delivery where status = 'pending' and attempts = 0")
            .await,
        2
    );

    receiver.set_status(200);
    let client = db.client().await;
    gancho::delivery::health::enable(&client, "test").await.unwrap();
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        2,
        Duration::from_secs(15),
    )
    .await;
    sidecar.stop().await;
    assert_eq!(delivered, 2);
}

#[tokio::test]
async fn circuit_breaker_pauses_failing_endpoint() {
    let (db, receiver, text) = orders_setup().await;
    receiver.set_status(500);
    let text = text
        .replace(
            "events = [\"*\"]",
            "events = [\"*\"]\nmax_in_flight = 1\nbreaker_threshold = 3\ndisable_after = \"3s\"",
        )
        .replace(
            "retry_schedule = [\"100ms\", \"100ms\", \"100ms\"]",
            "retry_schedule = [\"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"]",
        );
    let sidecar = start_sidecar(parse_config(&text, &[]));

    db.execute("insert into orders select i, 'new', 1 from generate_series(1, 20) i")
        .await;
    let paused = wait_for_count(
        &db,
        "select count(*) from gancho.endpoint_state where paused_until > now()",
        1,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(paused, 1);
    assert_eq!(
        db.count("select count(*) from gancho.attempt").await,
        3,
        "the breaker opened after 3 failures, not 20 x 6 attempts"
    );

    // The probe after the 5 s pause fails too, 3 s after the first failure: disabled.
    let disabled = wait_for_count(
        &db,
        "select count(*) from gancho.endpoint_state where disabled_at is not null",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(disabled, 1);
    assert_eq!(db.count("select count(*) from gancho.attempt").await, 4);
    assert_eq!(
        db.count("select count(*) from gancho.delivery where status = 'dead'")
            .await,
        0
    );

    receiver.set_status(200);
    gancho::delivery::health::enable(&db.client().await, "test")
        .await
        .unwrap();
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        20,
        Duration::from_secs(20),
    )
    .await;
    sidecar.stop().await;
    assert_eq!(delivered, 20, "re-enabling delivers what waited");
}

#[tokio::test]
async fn slow_endpoint_does_not_hold_back_others() {
    let db = TestDb::create().await;
    db.execute(ORDERS_TABLE).await;
    let slow = receiver().await;
    slow.set_delay(Duration::from_secs(4));
    let fast = receiver().await;
    let text = format!(
        r#"database_url = "{url}"
{ORDERS}
[[endpoint]]
name = "slow"
url = "{slow}"
secret = "{SECRET}"
events = ["*"]
timeout = "10s"
max_in_flight = 2

[[endpoint]]
name = "fast"
url = "{fast}"
secret = "{SECRET}"
events = ["*"]

[sidecar]
poll_interval = "200ms"
lease = "30s"
shutdown_timeout = "10s"
"#,
        url = db.url,
        slow = slow.url(),
        fast = fast.url()
    );
    install(&db, &parse_config(&text, &[])).await;
    let sidecar = start_sidecar(parse_config(&text, &[]));

    db.execute("insert into orders select i, 'new', 1 from generate_series(1, 50) i")
        .await;
    let fast_received = fast.wait_for(50, Duration::from_secs(15)).await;
    assert_eq!(fast_received.len(), 50);
    assert_eq!(
        slow.received().len(),
        0,
        "all 50 reached the fast endpoint before the slow one answered once"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn retention_prunes_delivered_history_only() {
    let (db, receiver, text) = orders_setup().await;
    let config = parse_config(&text, &[]);
    let sidecar = start_sidecar(config.clone());
    db.execute("insert into orders select i, 'new', 1 from generate_series(1, 30) i")
        .await;
    wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        30,
        Duration::from_secs(15),
    )
    .await;
    sidecar.stop().await;
    db.execute(
        "update gancho.delivery set status = 'dead' where id in (select id from gancho.delivery order by id limit 2)",
    )
    .await;
    assert_eq!(receiver.received().len(), 30);

    let pool = gancho::db::pool(&gancho::db::parse_url(&db.url).unwrap(), 2).unwrap();
    let pruned = gancho::sidecar::maintenance::prune(&pool, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pruned.outbox, 30);
    assert_eq!(pruned.events, 28);
    assert_eq!(
        db.count("select count(*) from gancho.delivery").await,
        2,
        "dead deliveries are kept"
    );
    assert_eq!(db.count("select count(*) from gancho.attempt").await, 2);

    let pruned = gancho::sidecar::maintenance::prune(&pool, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(pruned.total(), 0);
}

/// Runs EXPLAIN on a query and returns the plan as text.
async fn plan(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.query(&format!("explain {sql}"), &[]).await.unwrap();
    rows.iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn claims_stay_index_scans_with_large_history() {
    let (db, _receiver, _) = orders_setup().await;
    db.execute(
        "insert into gancho.outbox (source, table_name, operation, key, new, processed_at)
             select 'orders', 'public.orders', 'INSERT', jsonb_build_object('id', i), '{}', now() - interval '1 day'
             from generate_series(1, 1000000) i;
         insert into gancho.event (outbox_id, rule, type, data, occurred_at)
             select i, 'state', 'order.state', '{}', now() from generate_series(1, 1000000) i;
         insert into gancho.delivery (event_id, endpoint, ordering_key, status, attempts, finished_at)
             select id, 'test', 'orders:' || id, 'delivered', 1, now() from gancho.event;
         insert into orders values (1, 'new', 1);
         analyze gancho.outbox; analyze gancho.event; analyze gancho.delivery;",
    )
    .await;

    let client = db.client().await;
    let changes = plan(
        &client,
        &gancho::rules::processor::CLAIM_CHANGES_SQL.replace("$1", "500"),
    )
    .await;
    assert!(changes.contains("outbox_unprocessed"), "{changes}");
    assert!(!changes.contains("Seq Scan"), "{changes}");

    let deliveries = plan(
        &client,
        &gancho::delivery::dispatcher::CLAIM_SQL
            .replace("$1", "'test'")
            .replace("$2", "8")
            .replace("$3", "60000")
            .replace("$4", "true"),
    )
    .await;
    assert!(deliveries.contains("delivery_due"), "{deliveries}");
    assert!(!deliveries.contains("Seq Scan on delivery"), "{deliveries}");
}

#[tokio::test]
async fn silent_listener_connection_is_replaced() {
    let cluster = tokio::task::spawn_blocking(gancho::demo::cluster::TempCluster::start)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let admin = connect(&url).await;
    admin.batch_execute(ORDERS_TABLE).await.unwrap();
    let receiver = receiver().await;
    let text = config_text(&url, &receiver.url(), ORDERS).replace(
        "poll_interval = \"200ms\"",
        "poll_interval = \"60s\"\nliveness_interval = \"1s\"",
    );
    let mut installer = connect(&url).await;
    gancho::capture::install(&mut installer, &parse_config(&text, &[]))
        .await
        .unwrap();
    let sidecar = start_sidecar(parse_config(&text, &[]));

    admin
        .batch_execute("insert into orders values (1, 'new', 1)")
        .await
        .unwrap();
    assert_eq!(receiver.wait_for(1, Duration::from_secs(15)).await.len(), 1);

    // Freeze the listener's server process: its socket stays open but nothing answers.
    let pid: i32 = admin
        .query_one(
            "select pid from pg_stat_activity where application_name = 'gancho-listener'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    admin
        .batch_execute("insert into orders values (2, 'new', 1)")
        .await
        .unwrap();
    let received = receiver.wait_for(2, Duration::from_secs(15)).await;

    // The change may also arrive through the processor's own look at the
    // outbox after it set the doorbell, so wait for the new connection itself.
    let mut listeners = 0;
    for _ in 0..150 {
        listeners = admin
            .query_one(
                "select count(*) from pg_stat_activity where application_name = 'gancho-listener' and pid <> $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if listeners > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    sidecar.stop().await;

    assert_eq!(
        received.len(),
        2,
        "the change made while the old connection was frozen arrived"
    );
    assert_eq!(listeners, 1, "a new LISTEN connection replaced the frozen one");
}
