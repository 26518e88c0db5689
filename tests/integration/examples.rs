//! The shipped example configs, on the Solidus-like schema, deliver exactly
//! the expected events.

use std::process::Stdio;
use std::time::Duration;

use gancho::demo::receiver::{ReceivedWebhook, Receiver};
use serde_json::json;

use crate::support::*;

const SEED: &str = "
insert into spree_stock_locations (id, name) values (1, 'Madrid');
insert into spree_variants (id, sku) values (1, 'TSHIRT'), (2, 'MUG');
insert into spree_stock_items (id, stock_location_id, variant_id, count_on_hand) values (1, 1, 1, 20), (2, 1, 2, 90);
insert into warehouse_bins values (1, 1, 'A-03'), (1, 2, 'C-11');
insert into spree_orders (id, number, state, shipment_state, completed_at) values
    (1, 'R101', 'complete', 'backorder', '2026-12-01T10:00:00'),
    (2, 'R102', 'complete', 'backorder', '2026-12-02T10:00:00'),
    (3, 'R103', 'complete', 'ready', '2026-12-03T10:00:00');
insert into spree_line_items (order_id, variant_id, quantity, price) values (2, 1, 1, 10), (1, 1, 5, 10), (3, 1, 2, 10);
insert into spree_shipments (id, order_id, number, state, promised_at) values (1, 1, 'H1', 'ready', '2026-12-10T10:00:00Z');
";

const TRAFFIC: &str = "
update spree_stock_items set count_on_hand = 8 where id = 1;
update spree_stock_items set count_on_hand = 101 where id = 2;
update spree_stock_items set updated_at = now(), backorderable = true where id = 2;
insert into spree_orders (id, number, email) values (200, 'R200', 'eva@example.com');
insert into spree_line_items (order_id, variant_id, quantity, price) values (200, 2, 1, 7);
update spree_orders set state = 'address' where id = 200;
update spree_orders set state = 'payment' where id = 200;
update spree_orders set state = 'complete', completed_at = now() where id = 200;
insert into spree_orders (id, number, email) values (201, 'R201', 'joan@example.com');
update spree_shipments set promised_at = promised_at + interval '3 hours' where id = 1;
update spree_shipments set promised_at = promised_at + interval '30 minutes' where id = 1;
update spree_shipments set promised_at = promised_at - interval '5 hours' where id = 1;
update spree_shipments set state = 'shipped', tracking = 'TRK-1' where id = 1;
";

/// `type key` of each webhook, in the order the changes were committed.
fn summary(received: &[ReceivedWebhook]) -> Vec<String> {
    let mut sorted = received.to_vec();
    sorted.sort_by_key(|webhook| {
        (
            webhook.data()["change_id"].as_i64(),
            webhook.data()["rule"].as_str().map(String::from),
        )
    });
    sorted
        .iter()
        .map(|webhook| format!("{} {}", webhook.event_type(), webhook.data()["key"]["id"]))
        .collect()
}

async fn settle(receiver: &Receiver, expected: usize) -> Vec<ReceivedWebhook> {
    receiver.wait_for(expected, Duration::from_secs(20)).await;
    // One more poll interval, so an unexpected extra webhook would show.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    receiver.received()
}

/// The config example written in gancho's first specification, used as written.
#[tokio::test]
async fn quickstart_config_works_as_written() {
    let db = TestDb::create().await;
    db.load_solidus_schema().await;
    db.execute(SEED).await;
    let warehouse = Receiver::start_on("127.0.0.1:9001".parse().unwrap(), Some(secret()))
        .await
        .expect("port 9001 is free");
    let notifier = Receiver::start_on("127.0.0.1:9002".parse().unwrap(), Some(secret()))
        .await
        .expect("port 9002 is free");

    let config = parse_config(
        include_str!("../../examples/quickstart.toml"),
        &[
            ("DATABASE_URL", db.url.clone()),
            ("WAREHOUSE_SECRET", SECRET.into()),
            ("NOTIFIER_SECRET", SECRET.into()),
        ],
    );
    let mut client = db.client().await;
    let report = gancho::operations::check::check(&client, &config)
        .await
        .expect("check runs");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    gancho::capture::install(&mut client, &config)
        .await
        .expect("install works");
    let sidecar = start_sidecar(config);

    db.execute(TRAFFIC).await;
    let warehouse_received = settle(&warehouse, 4).await;
    let notifier_received = settle(&notifier, 3).await;
    sidecar.stop().await;

    assert_eq!(
        summary(&warehouse_received),
        vec![
            "inventory.low_stock 1",
            "inventory.changed 1",
            "inventory.overstock 2",
            "inventory.changed 2"
        ]
    );
    assert_eq!(
        summary(&notifier_received),
        vec!["order.completed 200", "shipment.delayed 1", "shipment.shipped 1"]
    );
    assert!(
        warehouse_received
            .iter()
            .chain(&notifier_received)
            .all(|webhook| webhook.verified)
    );

    let report = warehouse_received
        .iter()
        .find(|webhook| webhook.event_type() == "inventory.changed" && webhook.data()["key"]["id"] == 1)
        .unwrap();
    assert_eq!(
        report.data()["orders_on_hold"],
        json!([{"number": "R101", "quantity": 5}, {"number": "R102", "quantity": 1}])
    );
    assert_eq!(
        report.data()["old"],
        json!({"variant_id": 1, "stock_location_id": 1, "count_on_hand": 20})
    );
    assert_eq!(
        report.data()["new"],
        json!({"variant_id": 1, "stock_location_id": 1, "count_on_hand": 8})
    );
    assert_eq!(report.data()["table"], "public.spree_stock_items");
    assert_eq!(report.data()["operation"], "UPDATE");
    assert_eq!(report.data()["source"], "stock");
    assert_eq!(report.data()["rule"], "stock-report");
}

/// The Solidus example, driven through the CLI as an operator would.
#[tokio::test]
async fn solidus_example_through_cli() {
    let db = TestDb::create().await;
    db.load_solidus_schema().await;
    db.execute(SEED).await;
    let warehouse = receiver().await;
    let notifier = receiver().await;
    let env = [
        ("DATABASE_URL", db.url.clone()),
        ("WAREHOUSE_URL", warehouse.url()),
        ("NOTIFIER_URL", notifier.url()),
        ("WAREHOUSE_SECRET", SECRET.to_string()),
        ("NOTIFIER_SECRET", SECRET.to_string()),
    ];
    let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/solidus.toml");

    for command in ["check", "install"] {
        let output = gancho_command()
            .args([command, "--config", config_path])
            .envs(env.clone())
            .output()
            .expect("gancho runs");
        assert!(
            output.status.success(),
            "gancho {command}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut sidecar = gancho_command()
        .args(["run", "--config", config_path])
        .envs(env.clone())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gancho run starts");

    db.execute(TRAFFIC).await;
    let warehouse_received = settle(&warehouse, 6).await;
    let notifier_received = settle(&notifier, 4).await;
    send_signal(&sidecar, libc::SIGTERM);
    let status = wait_for_exit(&mut sidecar, Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|status| status.code()), Some(0));

    assert_eq!(
        summary(&warehouse_received),
        vec![
            "inventory.low_stock 1",
            "inventory.changed 1",
            "inventory.overstock 2",
            "inventory.changed 2"
        ],
        "the update of columns that are not captured records nothing"
    );
    assert_eq!(
        summary(&notifier_received),
        vec![
            "order.completed 200",
            "shipment.delayed 1",
            "shipment.advanced 1",
            "shipment.shipped 1"
        ]
    );
    let report = warehouse_received
        .iter()
        .find(|webhook| webhook.event_type() == "inventory.changed" && webhook.data()["key"]["id"] == 1)
        .unwrap();
    assert_eq!(report.data()["units_to_pack"], json!([{"units": 2}]));
    assert_eq!(report.data()["section"], json!([{"section": "A-03"}]));
    assert_eq!(
        report.data()["orders_on_hold"],
        json!([{"number": "R101", "quantity": 5}, {"number": "R102", "quantity": 1}])
    );
}
