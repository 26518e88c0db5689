//! `gancho demo`: a Solidus-like shop, its triggers, the sidecar and two
//! verifying receivers, driven through a burst of shop traffic that shows the
//! three jobs (stock range alerts, the stock report, customer updates).
//!
//! Without DATABASE_URL it runs on a [`cluster::TempCluster`]. With it, it
//! works in that database inside a schema of its own (`gancho_demo`) and
//! drops that schema and the gancho schema when it is done.

pub mod cluster;
pub mod receiver;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Secret};
use crate::db::{self, DbError};
use crate::delivery::sign::generate_secret;
use crate::{capture, sidecar};
use cluster::{ClusterError, TempCluster};
use receiver::{ReceivedWebhook, Receiver};

/// The schema the demo shop lives in.
pub const DEMO_SCHEMA: &str = "gancho_demo";

const SHOP_SCHEMA_SQL: &str = include_str!("../../examples/solidus-schema.sql");
const SHOP_CONFIG: &str = include_str!("../../examples/solidus.toml");

/// Webhooks the traffic below produces: six for the warehouse, four for the notifier.
const EXPECTED_WAREHOUSE: usize = 6;
const EXPECTED_NOTIFIER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("demo query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("the demo config is invalid")]
    Config(#[from] ConfigError),
    #[error("cannot start a receiver on 127.0.0.1")]
    Receiver(#[source] std::io::Error),
    #[error("this database already has a {0} schema; point DATABASE_URL at a database without one")]
    SchemaExists(String),
    #[error("only {received} of {expected} webhooks arrived within {seconds}s")]
    Missing {
        received: usize,
        expected: usize,
        seconds: u64,
    },
    #[error("{0} webhook(s) failed signature verification")]
    BadSignature(usize),
    #[error(transparent)]
    Sidecar(#[from] sidecar::SidecarError),
}

pub async fn run(database_url: Option<String>) -> Result<(), DemoError> {
    // A server: the one given, or a throwaway cluster that lives as long as this function.
    let (base_url, _cluster) = match database_url {
        Some(url) => {
            println!("Using the database at DATABASE_URL.");
            (url, None)
        }
        None => {
            println!("Starting a throwaway Postgres cluster...");
            let cluster = tokio::task::spawn_blocking(TempCluster::start)
                .await
                .expect("the cluster start-up thread does not panic")?;
            println!("Postgres is up on 127.0.0.1:{}.", cluster.port());
            (cluster.url("postgres"), Some(cluster))
        }
    };

    let mut client = db::connect(&db::parse_url(&base_url)?).await?;
    for schema in ["gancho", DEMO_SCHEMA] {
        let exists: bool = client
            .query_one("select to_regnamespace($1) is not null", &[&schema])
            .await?
            .get(0);
        if exists {
            return Err(DemoError::SchemaExists(schema.to_string()));
        }
    }

    let outcome = run_in_schema(&mut client, &base_url).await;

    // Clean up whatever happened: the triggers, the gancho schema and the shop.
    let cleanup = async {
        capture::uninstall(&mut client).await?;
        client
            .batch_execute(&format!("drop schema if exists {DEMO_SCHEMA} cascade"))
            .await?;
        Ok::<(), DemoError>(())
    };
    if let Err(error) = cleanup.await {
        eprintln!("cleaning up the demo failed: {}", sidecar::error_chain(&error));
    } else {
        println!("Removed the demo shop and gancho's schema.");
    }
    outcome
}

async fn run_in_schema(client: &mut tokio_postgres::Client, base_url: &str) -> Result<(), DemoError> {
    // The shop, in its own schema, with some stock, orders and shipments.
    client
        .batch_execute(&format!(
            "create schema {DEMO_SCHEMA}; set search_path = {DEMO_SCHEMA}; {SHOP_SCHEMA_SQL} {SEED_SQL} reset search_path;"
        ))
        .await?;

    // Two receivers that check every signature.
    let warehouse_secret = generate_secret();
    let notifier_secret = generate_secret();
    let warehouse = start_receiver(&warehouse_secret, "warehouse").await?;
    let notifier = start_receiver(&notifier_secret, "customer-notifier").await?;

    // The Solidus example config, pointed at the demo schema and receivers.
    let shop_url = with_search_path(base_url);
    let config_text = SHOP_CONFIG.replace("public.spree_", &format!("{DEMO_SCHEMA}.spree_"));
    let lookup = |name: &str| match name {
        "DATABASE_URL" => Some(shop_url.clone()),
        "WAREHOUSE_URL" => Some(warehouse.url()),
        "NOTIFIER_URL" => Some(notifier.url()),
        "WAREHOUSE_SECRET" => Some(warehouse_secret.clone()),
        "NOTIFIER_SECRET" => Some(notifier_secret.clone()),
        _ => None,
    };
    let config = Arc::new(Config::parse(
        &config_text,
        Path::new("examples/solidus.toml"),
        &lookup,
    )?);
    capture::install(client, &config).await?;
    println!("Installed gancho's triggers on the demo shop's stock, orders and shipments.");

    let shutdown = CancellationToken::new();
    let sidecar_task = tokio::spawn(sidecar::run(Arc::clone(&config), shutdown.clone()));

    println!("\nShop traffic, and the webhooks it causes:\n");
    client
        .batch_execute(&format!("set search_path = {DEMO_SCHEMA}"))
        .await?;
    for (description, sql) in TRAFFIC {
        println!("shop: {description}");
        client.batch_execute(sql).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    client.batch_execute("reset search_path").await?;

    let timeout = Duration::from_secs(30);
    let warehouse_received = warehouse.wait_for(EXPECTED_WAREHOUSE, timeout).await;
    let notifier_received = notifier.wait_for(EXPECTED_NOTIFIER, timeout).await;
    shutdown.cancel();
    sidecar_task.await.expect("the sidecar task does not panic")?;

    let received = warehouse_received.len() + notifier_received.len();
    let expected = EXPECTED_WAREHOUSE + EXPECTED_NOTIFIER;
    let unverified = warehouse_received
        .iter()
        .chain(&notifier_received)
        .filter(|webhook| !webhook.verified)
        .count();
    println!(
        "\n{received} webhooks received, {} with a valid signature.",
        received - unverified
    );
    if received < expected {
        return Err(DemoError::Missing {
            received,
            expected,
            seconds: timeout.as_secs(),
        });
    }
    if unverified > 0 {
        return Err(DemoError::BadSignature(unverified));
    }
    Ok(())
}

async fn start_receiver(secret: &str, name: &'static str) -> Result<Receiver, DemoError> {
    let key = crate::config::parse_secret_text(secret).expect("a generated secret is valid");
    let receiver = Receiver::start(Some(Secret::from_key(key)))
        .await
        .map_err(DemoError::Receiver)?;
    receiver.on_receive(move |webhook| println!("{}", describe(name, webhook)));
    println!("Receiver {name:<17} listening on {}", receiver.url());
    Ok(receiver)
}

/// Adds `search_path=gancho_demo` to a database URL, so the enrichment queries
/// of the example config find the demo shop's tables.
fn with_search_path(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{DEMO_SCHEMA}")
}

/// One line per webhook: receiver, event type, signature check, then the
/// fields that tell what happened.
fn describe(receiver: &str, webhook: &ReceivedWebhook) -> String {
    let data = webhook.data();
    let check = if webhook.verified {
        "signature ok"
    } else {
        "SIGNATURE INVALID"
    };
    let mut details = Vec::new();
    for field in [
        "key",
        "value",
        "limit",
        "from",
        "to",
        "shift_seconds",
        "units_to_pack",
        "section",
        "orders_on_hold",
    ] {
        if let Some(value) = data.get(field) {
            details.push(format!("{field}={}", compact(value)));
        }
    }
    // A change event has no value or from/to of its own: show the new row.
    if let (Some(new @ Value::Object(_)), None, None) = (data.get("new"), data.get("value"), data.get("from")) {
        details.insert(1, format!("new={}", compact(new)));
    }
    format!(
        "  -> {receiver:<17} {:<22} {check}\n       {}",
        webhook.event_type(),
        details.join("  ")
    )
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The shop before gancho is installed: one warehouse, three variants, two
/// orders waiting on back-ordered stock, and two shipments on their way.
const SEED_SQL: &str = "
insert into spree_stock_locations (id, name) values (1, 'Madrid');
insert into spree_variants (id, sku) values (1, 'TSHIRT-RED-M'), (2, 'MUG-LOGO'), (3, 'POSTER-A2');
insert into spree_stock_items (id, stock_location_id, variant_id, count_on_hand)
    values (1, 1, 1, 20), (2, 1, 2, 90), (3, 1, 3, 40);
insert into warehouse_bins (stock_location_id, variant_id, section)
    values (1, 1, 'A-03'), (1, 2, 'C-11'), (1, 3, 'B-07');
insert into spree_orders (id, number, email, state, shipment_state, completed_at) values
    (1, 'R100', 'ana@example.com', 'complete', 'ready', now() - interval '2 days'),
    (2, 'R101', 'luis@example.com', 'complete', 'backorder', now() - interval '3 days'),
    (3, 'R102', 'marta@example.com', 'complete', 'backorder', now() - interval '1 day');
insert into spree_line_items (order_id, variant_id, quantity, price) values
    (1, 1, 2, 19.90), (2, 1, 5, 19.90), (3, 1, 1, 19.90), (3, 3, 1, 9.50);
insert into spree_shipments (id, order_id, number, state, promised_at) values
    (1, 1, 'H100', 'ready', date_trunc('hour', now()) + interval '2 days'),
    (2, 2, 'H101', 'pending', date_trunc('hour', now()) + interval '5 days');
select setval(pg_get_serial_sequence('spree_orders', 'id'), 100);
";

const TRAFFIC: &[(&str, &str)] = &[
    (
        "12 red T-shirts sold, stock 20 -> 8",
        "update spree_stock_items set count_on_hand = 8 where id = 1",
    ),
    (
        "40 mugs received, stock 90 -> 130",
        "update spree_stock_items set count_on_hand = 130 where id = 2",
    ),
    (
        "22 red T-shirts received, stock 8 -> 30",
        "update spree_stock_items set count_on_hand = 30 where id = 1",
    ),
    (
        "a customer fills a cart and checks out (cart -> address -> delivery -> payment -> confirm -> complete)",
        "insert into spree_orders (id, number, email) values (200, 'R200', 'eva@example.com');
         insert into spree_line_items (order_id, variant_id, quantity, price) values (200, 3, 1, 9.50);
         update spree_orders set state = 'address' where id = 200;
         update spree_orders set state = 'delivery' where id = 200;
         update spree_orders set state = 'payment' where id = 200;
         update spree_orders set state = 'confirm' where id = 200;
         update spree_orders set state = 'complete', shipment_state = 'pending', completed_at = now() where id = 200;",
    ),
    (
        "another customer leaves items in a cart (no webhook)",
        "insert into spree_orders (id, number, email) values (201, 'R201', 'joan@example.com');
         insert into spree_line_items (order_id, variant_id, quantity, price) values (201, 2, 3, 7.00);",
    ),
    (
        "the carrier pushes shipment H100 back by a day",
        "update spree_shipments set promised_at = promised_at + interval '1 day' where id = 1",
    ),
    (
        "shipment H101 will arrive two days early",
        "update spree_shipments set promised_at = promised_at - interval '2 days' where id = 2",
    ),
    (
        "shipment H100 leaves the warehouse",
        "update spree_shipments set state = 'shipped', tracking = 'TRK-7781', shipped_at = now() where id = 1",
    ),
];
