//! Delivery: signatures, retries, dead deliveries and redelivery.

use std::time::Duration;

use gancho::operations::deliveries;

use crate::support::verify::expected_signature;
use crate::support::*;

const ORDERS: &str = r#"
[[source]]
name = "orders"
table = "orders"
key = ["id"]
columns = ["state"]

[[rule]]
name = "completed"
source = "orders"
kind = "transition"
column = "state"
to = ["complete"]
event = "order.completed"
"#;

async fn orders_db() -> TestDb {
    let db = TestDb::create().await;
    db.execute("create table orders (id int primary key, state text)").await;
    db
}

#[tokio::test]
async fn signature_verifies_with_independent_code() {
    let db = orders_db().await;
    let receiver = receiver().await;
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'complete'), (2, 'complete')")
        .await;
    let received = receiver.wait_for(2, Duration::from_secs(20)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 2);
    for webhook in &received {
        let expected = expected_signature(SECRET, &webhook.webhook_id, &webhook.timestamp, &webhook.body);
        assert_eq!(webhook.signature, expected);
        assert!(webhook.webhook_id.starts_with("msg_"), "{}", webhook.webhook_id);
        let age = chrono::Utc::now().timestamp() - webhook.timestamp.parse::<i64>().expect("a unix timestamp");
        assert!((0..60).contains(&age), "timestamp is current: {age}s old");
        assert_eq!(webhook.header("content-type"), Some("application/json"));
        assert_eq!(webhook.event_type(), "order.completed");
        assert!(
            webhook.payload["timestamp"]
                .as_str()
                .is_some_and(|text| text.ends_with('Z'))
        );
        let keys: Vec<&str> = webhook
            .payload
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, vec!["type", "timestamp", "data"]);
    }
    assert_ne!(received[0].webhook_id, received[1].webhook_id);
}

/// Checks the signature with the Python library that the Standard Webhooks
/// project publishes, when it is installed (CI installs it).
#[tokio::test]
async fn signature_verifies_with_published_python_library() {
    let available = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .status()
        .is_ok_and(|status| status.success());
    if !available {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install the standardwebhooks Python package"
        );
        eprintln!("skipped: `pip install standardwebhooks` to run this check");
        return;
    }

    let db = orders_db().await;
    let receiver = receiver().await;
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);
    db.execute("insert into orders values (1, 'complete')").await;
    let received = receiver.wait_for(1, Duration::from_secs(20)).await;
    sidecar.stop().await;

    let webhook = &received[0];
    let script = "import sys, json\nfrom standardwebhooks.webhooks import Webhook\n\
                  secret, msg_id, ts, sig = sys.argv[1:5]\nbody = sys.stdin.buffer.read()\n\
                  payload = Webhook(secret).verify(body, {'webhook-id': msg_id, 'webhook-timestamp': ts, 'webhook-signature': sig})\n\
                  print(payload['type'])";
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            SECRET,
            &webhook.webhook_id,
            &webhook.timestamp,
            &webhook.signature,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 starts");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&webhook.body)
        .expect("body written");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "order.completed");
}

#[tokio::test]
async fn retry_then_success_keeps_webhook_id() {
    let db = orders_db().await;
    let receiver = receiver().await;
    receiver.fail_next(2);
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'complete')").await;
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        1,
        Duration::from_secs(20),
    )
    .await;
    sidecar.stop().await;
    assert_eq!(delivered, 1);

    let received = receiver.received();
    assert_eq!(
        received.iter().map(|webhook| webhook.answered).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    assert!(
        received
            .iter()
            .all(|webhook| webhook.webhook_id == received[0].webhook_id)
    );
    assert!(received.iter().all(|webhook| webhook.verified));

    let client = db.client().await;
    let attempts = client
        .query(
            "select attempt, status_code, error, response_body, latency_ms from gancho.attempt order by id",
            &[],
        )
        .await
        .expect("attempts are readable");
    type AttemptSummary = (i32, Option<i32>, Option<String>, Option<String>);
    let summary: Vec<AttemptSummary> = attempts
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                1,
                Some(500),
                Some("HTTP status 500".into()),
                Some("not accepted".into())
            ),
            (
                2,
                Some(500),
                Some("HTTP status 500".into()),
                Some("not accepted".into())
            ),
            (3, Some(200), None, Some("ok".into())),
        ]
    );
    assert!(
        attempts.iter().all(|row| row.get::<_, f64>(4) > 0.0),
        "latency is recorded"
    );
}

#[tokio::test]
async fn dead_after_last_attempt_then_redelivered() {
    let db = orders_db().await;
    let receiver = receiver().await;
    receiver.set_status(503);
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'complete')").await;
    let dead = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'dead'",
        1,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(dead, 1);
    assert_eq!(receiver.received().len(), 4, "one attempt and three retries");
    assert_eq!(db.count("select count(*) from gancho.attempt").await, 4);

    let client = db.client().await;
    let listed = deliveries::list(&client, Some("dead"), Some("test"), 10)
        .await
        .expect("listing works");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].attempts, 4);
    assert_eq!(listed[0].last_error.as_deref(), Some("HTTP status 503"));
    let webhook_id = listed[0].webhook_id.clone();

    receiver.set_status(204);
    let queued = deliveries::redeliver(&client, &[], true, None)
        .await
        .expect("redeliver works");
    assert_eq!(queued, vec![listed[0].id]);
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        1,
        Duration::from_secs(20),
    )
    .await;
    sidecar.stop().await;

    assert_eq!(delivered, 1);
    let received = receiver.received();
    assert_eq!(received.len(), 5);
    assert_eq!(received[4].answered, 204);
    assert_eq!(received[4].webhook_id, webhook_id);
}

#[tokio::test]
async fn hanging_receiver_times_out_and_redirects_fail() {
    let db = orders_db().await;
    let hanging = receiver().await;
    hanging.set_delay(Duration::from_secs(30));
    let redirecting = receiver().await;
    redirecting.set_status(302);
    let text = format!(
        r#"database_url = "{url}"
{ORDERS}
[[endpoint]]
name = "hanging"
url = "{hanging}"
secret = "{SECRET}"
events = ["*"]
timeout = "500ms"
retry_schedule = []

[[endpoint]]
name = "redirecting"
url = "{redirecting}"
secret = "{SECRET}"
events = ["order.*"]
retry_schedule = []

[sidecar]
poll_interval = "200ms"
shutdown_timeout = "1s"
"#,
        url = db.url,
        hanging = hanging.url(),
        redirecting = redirecting.url()
    );
    let config = parse_config(&text, &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'complete')").await;
    let dead = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'dead'",
        2,
        Duration::from_secs(20),
    )
    .await;
    sidecar.stop().await;
    assert_eq!(dead, 2);

    let client = db.client().await;
    let errors: Vec<(String, Option<i32>, Option<String>)> = client
        .query(
            "select d.endpoint, a.status_code, a.error from gancho.attempt a join gancho.delivery d on d.id = a.delivery_id order by d.endpoint",
            &[],
        )
        .await
        .expect("attempts are readable")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0].0, "hanging");
    assert_eq!(errors[0].1, None);
    assert!(
        errors[0]
            .2
            .as_deref()
            .is_some_and(|error| error.starts_with("timed out after 500ms")),
        "{errors:?}"
    );
    assert_eq!(
        errors[1],
        (
            "redirecting".to_string(),
            Some(302),
            Some("HTTP status 302".to_string())
        )
    );
}

#[tokio::test]
async fn large_response_body_is_cut() {
    let db = orders_db().await;
    let receiver = receiver().await;
    receiver.set_response_body(bytes::Bytes::from("é".repeat(1_000_000)));
    let config = parse_config(&config_text(&db.url, &receiver.url(), ORDERS), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders values (1, 'complete')").await;
    let delivered = wait_for_count(
        &db,
        "select count(*) from gancho.delivery where status = 'delivered'",
        1,
        Duration::from_secs(20),
    )
    .await;
    sidecar.stop().await;

    assert_eq!(
        delivered, 1,
        "a 2 MB answer is read only in part and does not fail the delivery"
    );
    let stored: String = db
        .client()
        .await
        .query_one("select response_body from gancho.attempt", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored,
        "é".repeat(512),
        "the first 1 KiB is stored, cut at a character boundary"
    );
}

#[tokio::test]
async fn concurrent_attempts_recorded_once_each() {
    let db = orders_db().await;
    let receiver = receiver().await;
    // Requests finish in parallel, so their outcomes are written in batches;
    // one in ten fails once, so batches mix successes and failures.
    receiver.fail_next(30);
    let text = config_text(&db.url, &receiver.url(), ORDERS).replacen(
        "timeout = \"2s\"",
        "timeout = \"2s\"\nmax_in_flight = 32\nordered = false\nbreaker_threshold = 1000",
        1,
    );
    let config = parse_config(&text, &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute("insert into orders select id, 'complete' from generate_series(1, 300) id")
        .await;
    let received = receiver.wait_for(330, Duration::from_secs(60)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 330);
    assert_eq!(
        db.count("select count(*) from gancho.delivery where status = 'delivered'")
            .await,
        300
    );
    assert_eq!(db.count("select count(*) from gancho.attempt").await, 330);
    assert_eq!(
        db.count("select count(*) from gancho.attempt where status_code = 200")
            .await,
        300
    );
    assert_eq!(
        db.count("select count(*) from gancho.delivery where attempts = 2")
            .await,
        30
    );
    assert_eq!(
        db.count("select count(*) from gancho.endpoint_state where consecutive_failures = 0 and paused_until is null")
            .await,
        1,
        "the successes after the failures leave the endpoint healthy"
    );
}
