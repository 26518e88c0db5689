//! Every rule kind end to end: SQL writes on a real table, webhooks at a real receiver.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const STOCK_TABLE: &str = "create table stock (
    id int primary key, sku text, quantity numeric, allocated int default 0,
    reorder_point int, status text default 'active')";

const STOCK_RULES: &str = r#"
[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["sku", "quantity", "allocated", "reorder_point", "status"]

[[rule]]
name = "low"
source = "stock"
kind = "threshold"
value = "quantity"
below = 10
rearm = 15
event = "stock.low"
recovered_event = "stock.restocked"

[[rule]]
name = "high"
source = "stock"
kind = "threshold"
value = "quantity - allocated"
above = 100
event = "stock.high"
where_not = { status = "discontinued" }

[[rule]]
name = "reorder"
source = "stock"
kind = "threshold"
value = "quantity"
below = "reorder_point"
event = "stock.reorder"
"#;

/// Runs SQL statements one by one, each in its own transaction, and returns
/// the event types that arrive, in outbox order.
async fn events_for(
    db: &TestDb,
    receiver: &gancho::demo::receiver::Receiver,
    statements: &[&str],
    expected: usize,
) -> Vec<String> {
    let client = db.client().await;
    for statement in statements {
        client
            .batch_execute(statement)
            .await
            .unwrap_or_else(|error| panic!("{statement}: {error:?}"));
    }
    receiver.wait_for(expected, Duration::from_secs(20)).await;
    // Give a wrong extra event the time of one more poll to show up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut received = receiver.received();
    received.sort_by_key(|webhook| {
        (
            webhook.data()["change_id"].as_i64(),
            webhook.data()["rule"].as_str().map(String::from),
        )
    });
    received
        .iter()
        .map(|webhook| format!("{} {}", webhook.event_type(), webhook.data()["key"]["id"]))
        .collect()
}

#[tokio::test]
async fn threshold_rules_end_to_end() {
    let db = TestDb::create().await;
    db.execute(STOCK_TABLE).await;
    let receiver = receiver().await;
    let config = parse_config(&config_text(&db.url, &receiver.url(), STOCK_RULES), &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    let events = events_for(
        &db,
        &receiver,
        &[
            "insert into stock (id, quantity, reorder_point) values (1, 20, 5), (2, 10, 5), (3, 5, 8)",
            "update stock set quantity = 10 where id = 1",
            "update stock set quantity = 9 where id = 1",
            "update stock set quantity = 12 where id = 1",
            "update stock set quantity = 8 where id = 1",
            "update stock set quantity = 15 where id = 1",
            "update stock set quantity = 0 where id = 1",
            "update stock set quantity = null where id = 2",
            "update stock set quantity = 4 where id = 2",
            "update stock set quantity = 100 where id = 3",
            "update stock set quantity = 101 where id = 3",
            "update stock set quantity = 500, status = 'discontinued' where id = 2",
        ],
        11,
    )
    .await;
    sidecar.stop().await;

    assert_eq!(
        events,
        vec![
            "stock.low 3",       // inserted below 10
            "stock.reorder 3",   // inserted below its reorder point 8
            "stock.low 1",       // 10 -> 9; 20 -> 10 was exactly at the limit
            "stock.restocked 1", // back at the rearm level 15; 12 and 8 stayed silent
            "stock.low 1",       // 15 -> 0, a jump across the limit
            "stock.reorder 1",   // and under its reorder point 5
            "stock.low 2",       // NULL -> 4; 10 -> NULL fired nothing
            "stock.reorder 2",
            "stock.restocked 3", // 5 -> 100
            "stock.high 3",      // 100 -> 101; 100 is not above 100
            "stock.restocked 2", // 4 -> 500; stock.high is filtered out for a discontinued item
        ]
    );
}

#[tokio::test]
async fn transition_and_filters_end_to_end() {
    let db = TestDb::create().await;
    db.execute("create table orders (id bigint primary key, number text, state text, channel text)")
        .await;
    let receiver = receiver().await;
    let config = parse_config(
        &config_text(
            &db.url,
            &receiver.url(),
            r#"
[[source]]
name = "orders"
table = "orders"
key = ["id"]
columns = ["number", "state", "channel"]

[[rule]]
name = "completed"
source = "orders"
kind = "transition"
column = "state"
to = ["complete"]
event = "order.completed"
where = { channel = ["web", "app"] }

[[rule]]
name = "canceled-after-purchase"
source = "orders"
kind = "transition"
column = "state"
from = ["complete"]
to = ["canceled"]
event = "order.canceled"
"#,
        ),
        &[],
    );
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    let events = events_for(
        &db,
        &receiver,
        &[
            "insert into orders values (1, 'R1', 'cart', 'web'), (2, 'R2', 'cart', 'pos'), (3, 'R3', 'cart', 'app')",
            "update orders set state = 'address' where id in (1, 2, 3)",
            "update orders set state = 'complete' where id in (1, 2)",
            "update orders set number = 'R1-A' where id = 1",
            "update orders set state = 'canceled' where id in (1, 3)",
            "insert into orders values (4, 'R4', 'complete', 'web')",
            "delete from orders where id = 4",
        ],
        3,
    )
    .await;
    sidecar.stop().await;

    assert_eq!(
        events,
        vec!["order.completed 1", "order.canceled 1", "order.completed 4"]
    );
}

#[tokio::test]
async fn shift_and_change_with_enrichment() {
    let db = TestDb::create().await;
    db.execute(
        "create table shipments (id int primary key, state text, promised_on date, promised_at timestamp);
         create table holds (shipment_id int, reason text, created_at timestamptz default '2026-01-01T00:00:00Z');
         insert into holds values (1, 'address check'), (1, 'customs'), (2, 'other');",
    )
    .await;
    let receiver = receiver().await;
    let config = parse_config(
        &config_text(
            &db.url,
            &receiver.url(),
            r#"
[[source]]
name = "shipments"
table = "shipments"
key = ["id"]
columns = ["state", "promised_on", "promised_at"]

[[rule]]
name = "delayed"
source = "shipments"
kind = "shift"
column = "promised_at"
direction = "later"
min = "1h"
event = "shipment.delayed"
where_not = { state = ["canceled"] }

[[rule]]
name = "date-moved"
source = "shipments"
kind = "shift"
column = "promised_on"
direction = "either"
event = "shipment.date_moved"

[[rule]]
name = "report"
source = "shipments"
kind = "change"
columns = ["state"]
event = "shipment.report"

[[rule.enrich]]
name = "holds"
sql = "select reason, created_at from holds where shipment_id = $1 order by reason;"
params = ["id"]

[[rule.enrich]]
name = "broken"
sql = "select 1 / (count(*) - count(*)) as boom from holds where shipment_id = $1"
params = ["id"]
"#,
        ),
        &[],
    );
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    let events = events_for(
        &db,
        &receiver,
        &[
            "insert into shipments values (1, 'ready', '2026-12-10', '2026-12-10 10:00')",
            "update shipments set promised_at = '2026-12-10 10:59:59' where id = 1",
            "update shipments set promised_at = '2026-12-10 12:00' where id = 1",
            "update shipments set promised_at = '2026-12-09 12:00' where id = 1",
            "update shipments set promised_on = '2026-12-08' where id = 1",
            "update shipments set state = 'canceled', promised_at = '2026-12-20 12:00' where id = 1",
        ],
        4,
    )
    .await;

    assert_eq!(
        events,
        vec![
            "shipment.report 1",
            "shipment.delayed 1",
            "shipment.date_moved 1",
            "shipment.report 1"
        ]
    );
    let report = receiver
        .received()
        .into_iter()
        .find(|webhook| webhook.event_type() == "shipment.report")
        .expect("a report");
    assert_eq!(
        report.data()["holds"],
        json!([
            {"reason": "address check", "created_at": "2026-01-01T00:00:00+00:00"},
            {"reason": "customs", "created_at": "2026-01-01T00:00:00+00:00"}
        ])
    );
    assert_eq!(report.data()["broken"], serde_json::Value::Null);
    assert_eq!(report.data()["errors"]["broken"], "division by zero");
    let delayed = receiver
        .received()
        .into_iter()
        .find(|webhook| webhook.event_type() == "shipment.delayed")
        .expect("a delay");
    assert_eq!(delayed.data()["shift_seconds"], json!(3601));
    sidecar.stop().await;
}
