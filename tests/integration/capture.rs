//! The triggers: what lands in the outbox, on schemas as shops have them.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

async fn outbox(db: &TestDb) -> Vec<(String, Value, Value, Value)> {
    db.client()
        .await
        .query(
            "select operation, key, coalesce(old, 'null'), coalesce(new, 'null') from gancho.outbox order by id",
            &[],
        )
        .await
        .expect("the outbox is readable")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

#[tokio::test]
async fn install_is_idempotent_and_uninstall_clean() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int, note text)")
        .await;
    let config = parse_config(
        &config_text(
            &db.url,
            "http://127.0.0.1:9/",
            r#"
[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["quantity"]

[[rule]]
name = "any"
source = "stock"
kind = "change"
event = "stock.changed"
"#,
        ),
        &[],
    );

    install(&db, &config).await;
    install(&db, &config).await;
    // A plain table gets statement-level triggers for insert, update and
    // delete, and one for truncate.
    assert_eq!(
        db.count("select count(*) from pg_trigger where tgrelid = 'stock'::regclass and not tgisinternal")
            .await,
        4
    );
    assert_eq!(
        db.count("select value::bigint from gancho.meta where key = 'schema_version'")
            .await,
        1
    );
    // Room on each page lets a claim skip the delivery table's indexes.
    assert_eq!(
        db.count(
            "select count(*) from pg_class where oid = 'gancho.delivery'::regclass and reloptions = '{fillfactor=50}'"
        )
        .await,
        1
    );

    db.execute("insert into stock values (1, 5, 'a')").await;
    assert_eq!(
        db.count("select count(*) from gancho.outbox").await,
        1,
        "one change, not one per install"
    );

    let mut client = db.client().await;
    let removed = gancho::capture::uninstall(&mut client).await.expect("uninstall runs");
    assert_eq!(removed, vec!["stock".to_string()]);
    assert_eq!(
        db.count("select count(*) from pg_trigger where tgrelid = 'stock'::regclass and not tgisinternal")
            .await,
        0
    );
    assert_eq!(
        db.count("select count(*) from pg_namespace where nspname = 'gancho'")
            .await,
        0
    );
    db.execute("update stock set quantity = 6 where id = 1").await;
}

#[tokio::test]
async fn install_drops_webhook_id_index() {
    let db = TestDb::create().await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    let indexed = "select count(*) from pg_index i
                   join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                   where i.indrelid = 'gancho.delivery'::regclass and a.attname = 'webhook_id'";
    assert_eq!(db.count(indexed).await, 0, "a fresh install has no index on webhook_id");

    // Installs of earlier versions created this unique constraint.
    db.execute("alter table gancho.delivery add constraint delivery_webhook_id_key unique (webhook_id)")
        .await;
    assert_eq!(db.count(indexed).await, 1);
    db.execute(gancho::capture::SCHEMA_SQL).await;

    assert_eq!(db.count(indexed).await, 0, "reinstalling drops it");
}

#[tokio::test]
async fn sql_file_installs_with_psql_semantics() {
    // The same file a DBA runs with `psql -f`, then one watch() call.
    let db = TestDb::create().await;
    db.execute("create table items (sku text primary key, quantity int)")
        .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('items', 'items', '{sku}', '{quantity}')")
        .await;
    db.execute("insert into items values ('A-1', 3)").await;

    let rows = outbox(&db).await;
    assert_eq!(
        rows,
        vec![(
            "INSERT".to_string(),
            json!({"sku": "A-1"}),
            Value::Null,
            json!({"quantity": 3})
        )]
    );

    let error = db
        .client()
        .await
        .batch_execute("select gancho.watch('items', 'items', '{sku}', '{quantiti}')")
        .await
        .unwrap_err();
    let message = error.as_db_error().expect("a server error").message().to_string();
    assert_eq!(message, "column \"quantiti\" does not exist in table public.items");
}

#[tokio::test]
async fn unchanged_captured_columns_record_nothing() {
    let db = TestDb::create().await;
    db.execute(
        "create table stock (id int primary key, quantity int, updated_at timestamptz default now(), note text)",
    )
    .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('stock', 'stock', '{id}', '{quantity,note}')")
        .await;
    db.execute("insert into stock (id, quantity) values (1, 5)").await;

    db.execute("update stock set updated_at = now() + interval '1 minute' where id = 1")
        .await;
    db.execute("update stock set quantity = 5 where id = 1").await;
    db.execute("insert into stock (id, quantity) values (1, 9) on conflict do nothing")
        .await;
    assert_eq!(
        db.count("select count(*) from gancho.outbox").await,
        1,
        "only the insert"
    );

    db.execute("update stock set note = 'x' where id = 1").await;
    db.execute("update stock set note = null where id = 1").await;
    let rows = outbox(&db).await;
    assert_eq!(rows.len(), 3, "changes to and from NULL are changes");
    assert_eq!(rows[1].2, json!({"quantity": 5, "note": null}));
    assert_eq!(rows[1].3, json!({"quantity": 5, "note": "x"}));
    assert_eq!(rows[2].3, json!({"quantity": 5, "note": null}));
}

#[tokio::test]
async fn rollback_and_savepoint_record_nothing() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int)")
        .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('stock', 'stock', '{id}', '{quantity}')")
        .await;

    db.execute("begin; insert into stock values (1, 1); rollback;").await;
    db.execute("begin; insert into stock values (2, 2); savepoint s; insert into stock values (3, 3); rollback to savepoint s; commit;").await;
    let rows = outbox(&db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, json!({"id": 2}));
}

#[tokio::test]
async fn quoted_reserved_names_and_composite_keys() {
    let db = TestDb::create().await;
    db.execute(
        r#"create schema "Shop";
           create table "Shop"."order" ("Id" uuid, "line" numeric(22, 4), "State" text, "select" bigint, primary key ("Id", "line"));"#,
    )
    .await;
    let receiver = receiver().await;
    let config = parse_config(
        &config_text(
            &db.url,
            &receiver.url(),
            r#"
[[source]]
name = "orders"
table = '"Shop"."order"'
key = ["Id", "line"]
columns = ["State", "select"]

[[rule]]
name = "state"
source = "orders"
kind = "transition"
column = "State"
event = "order.state"
"#,
        ),
        &[],
    );
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    db.execute(
        r#"insert into "Shop"."order" values ('6f1c2a4e-8d3b-4c5a-9e7f-0a1b2c3d4e5f', 12345678901234567.1234, 'new', 9007199254740993);
           update "Shop"."order" set "State" = 'paid' where "line" = 12345678901234567.1234;
           delete from "Shop"."order";"#,
    )
    .await;
    let received = receiver.wait_for(3, Duration::from_secs(20)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 3);
    let first = received
        .iter()
        .find(|webhook| webhook.data()["operation"] == "INSERT")
        .expect("the insert arrived");
    let body = String::from_utf8(first.body.to_vec()).expect("UTF-8 body");
    assert!(
        body.contains(r#""Id":"6f1c2a4e-8d3b-4c5a-9e7f-0a1b2c3d4e5f""#),
        "{body}"
    );
    assert!(
        body.contains(r#""line":12345678901234567.1234"#),
        "numeric key keeps every digit: {body}"
    );
    assert!(
        body.contains(r#""select":9007199254740993"#),
        "bigint keeps every digit: {body}"
    );
    assert_eq!(first.data()["table"], "Shop.order");
    assert_eq!(first.data()["new"]["State"], "new");

    let delete = received
        .iter()
        .find(|webhook| webhook.data()["operation"] == "DELETE")
        .expect("the delete arrived");
    assert_eq!(delete.data()["new"], Value::Null);
    assert_eq!(delete.data()["old"]["State"], "paid");
    assert_eq!(delete.data()["to"], Value::Null);
}

#[tokio::test]
async fn row_over_notify_limit_is_delivered() {
    let db = TestDb::create().await;
    db.execute("create table notes (id bigint primary key, body text)")
        .await;
    let receiver = receiver().await;
    let config = parse_config(
        &config_text(
            &db.url,
            &receiver.url(),
            r#"
[[source]]
name = "notes"
table = "notes"
key = ["id"]
columns = ["body"]

[[rule]]
name = "any"
source = "notes"
kind = "change"
event = "note.changed"
"#,
        ),
        &[],
    );
    install(&db, &config).await;
    let sidecar = start_sidecar(config);

    // 12,000 characters of two-byte UTF-8: 24,000 bytes, three times NOTIFY's limit.
    let text = "ñ".repeat(12_000);
    db.client()
        .await
        .execute("insert into notes values (1, $1)", &[&text])
        .await
        .expect("the shop's insert succeeds");
    let received = receiver.wait_for(1, Duration::from_secs(20)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 1);
    assert_eq!(received[0].data()["new"]["body"].as_str(), Some(text.as_str()));
    assert!(received[0].verified);
}

#[tokio::test]
async fn dropped_column_never_fails_shop_writes() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int, legacy text)")
        .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('stock', 'stock', '{id}', '{quantity,legacy}')")
        .await;

    db.execute("alter table stock drop column legacy").await;
    db.execute("insert into stock values (1, 4)").await;
    db.execute("alter table stock rename column quantity to qty").await;
    db.execute("update stock set qty = 8 where id = 1").await;

    // The trigger leaves out what was not captured at install time, so a
    // dropped column is simply missing and a renamed one shows its new name.
    let rows = outbox(&db).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "INSERT");
    assert_eq!(rows[0].3, json!({"quantity": 4}));
    assert_eq!(rows[1].0, "UPDATE");
    assert_eq!(rows[1].2, json!({"qty": 4}));
    assert_eq!(rows[1].3, json!({"qty": 8}));
}

#[tokio::test]
async fn install_needs_only_table_ownership() {
    let db = TestDb::create().await;
    let suffix = &db.name["gancho_test_".len()..];
    let (owner, app) = (format!("shop_owner_{suffix}"), format!("shop_app_{suffix}"));
    db.execute(&format!(
        "create role {owner} login nosuperuser; create role {app} login nosuperuser;
         grant create on database {name} to {owner};
         grant usage, create on schema public to {owner};",
        name = db.name
    ))
    .await;

    let owner_url = url_with_user(&db.url, &owner);
    let app_url = url_with_user(&db.url, &app);
    let owner_client = connect(&owner_url).await;
    owner_client
        .batch_execute(&format!(
            "create table stock (id int primary key, quantity int); grant select, insert, update on stock to {app};"
        ))
        .await
        .expect("the owner creates its table");

    let config = parse_config(
        &config_text(
            &owner_url,
            "http://127.0.0.1:9/",
            r#"
[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["quantity"]

[[rule]]
name = "any"
source = "stock"
kind = "change"
event = "stock.changed"
"#,
        ),
        &[],
    );
    let mut installer = connect(&owner_url).await;
    gancho::capture::install(&mut installer, &config)
        .await
        .expect("a table owner without superuser installs gancho");

    // The application role has no privilege on the gancho schema, and its writes still record.
    let app_client = connect(&app_url).await;
    app_client
        .batch_execute("insert into stock values (1, 2); update stock set quantity = 3")
        .await
        .expect("the shop's writes succeed");
    assert_eq!(db.count("select count(*) from gancho.outbox").await, 2);

    drop((owner_client, installer, app_client));
    drop(db);
    let admin = connect(&server_url()).await;
    admin
        .batch_execute(&format!("drop role if exists {owner}; drop role if exists {app};"))
        .await
        .expect("roles dropped");
}

const NOTES: &str = r#"
[[source]]
name = "notes"
table = "notes"
key = ["id"]
columns = ["body"]

[[rule]]
name = "any"
source = "notes"
kind = "change"
event = "note.changed"
"#;

/// Reads the doorbell, which is 1 while a sidecar waits for a NOTIFY.
async fn doorbell(db: &TestDb) -> i64 {
    db.count("select last_value from gancho.doorbell").await
}

async fn wait_for_doorbell(db: &TestDb, value: i64) {
    for _ in 0..200 {
        if doorbell(db).await == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the doorbell never became {value}");
}

#[tokio::test]
async fn trigger_notifies_only_when_doorbell_set() {
    let db = TestDb::create().await;
    db.execute("create table notes (id bigint primary key, body text)")
        .await;
    let receiver = receiver().await;
    let config = parse_config(&config_text(&db.url, &receiver.url(), NOTES), &[]);
    install(&db, &config).await;
    let (listener, mut notifications) = listen(&db.url, "gancho").await;

    db.execute("insert into notes values (1, 'while nobody waits')").await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), notifications.recv()).await;
    assert!(quiet.is_err(), "no NOTIFY while the doorbell is 0");
    assert_eq!(doorbell(&db).await, 0);

    db.execute("select setval('gancho.doorbell', 1)").await;
    db.execute("insert into notes values (2, 'while a sidecar waits')")
        .await;
    let rang = tokio::time::timeout(Duration::from_secs(5), notifications.recv()).await;
    assert_eq!(rang.ok().flatten().as_deref(), Some("gancho"));

    // A sidecar sets the doorbell to 0 while it works, to 1 when it waits,
    // and to 0 again when it stops.
    db.execute("select setval('gancho.doorbell', 0)").await;
    let sidecar = start_sidecar(config);
    let received = receiver.wait_for(2, Duration::from_secs(20)).await;
    wait_for_doorbell(&db, 1).await;
    sidecar.stop().await;
    drop(listener);

    assert_eq!(received.len(), 2);
    assert_eq!(doorbell(&db).await, 0, "a stopped sidecar wants no NOTIFY");
}

#[tokio::test]
async fn writer_missing_doorbell_is_still_seen() {
    let db = TestDb::create().await;
    db.execute("create table notes (id bigint primary key, body text)")
        .await;
    let receiver = receiver().await;
    // A poll interval far longer than the wait below, so only the doorbell's
    // follow-up look at the outbox can deliver the change in time.
    let text =
        config_text(&db.url, &receiver.url(), NOTES).replace("poll_interval = \"200ms\"", "poll_interval = \"60s\"");
    let config = parse_config(&text, &[]);
    install(&db, &config).await;
    let sidecar = start_sidecar(config);
    wait_for_doorbell(&db, 1).await;

    // A writer reads the doorbell as 0, as if it wrote just before the
    // sidecar set it, and commits only after the sidecar set it again.
    let mut writer = connect(&db.url).await;
    db.execute("select setval('gancho.doorbell', 0)").await;
    let transaction = writer.transaction().await.unwrap();
    transaction
        .execute("insert into notes values (1, 'late commit')", &[])
        .await
        .unwrap();
    db.execute("notify gancho").await;
    wait_for_doorbell(&db, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    transaction.commit().await.unwrap();

    let received = receiver.wait_for(1, Duration::from_secs(10)).await;
    sidecar.stop().await;

    assert_eq!(received.len(), 1, "delivered without waiting for the 60 s poll");
    assert_eq!(received[0].data()["new"]["body"], "late commit");
}

#[tokio::test]
async fn column_added_after_install_stays_out() {
    let db = TestDb::create().await;
    db.execute("create table notes (id bigint primary key, body text)")
        .await;
    let receiver = receiver().await;
    let config = parse_config(&config_text(&db.url, &receiver.url(), NOTES), &[]);
    install(&db, &config).await;
    db.execute("alter table notes add column secret_note text").await;
    let sidecar = start_sidecar(config);

    db.execute("insert into notes values (1, 'hello', 'not for webhooks')")
        .await;
    db.execute("update notes set secret_note = 'still not' where id = 1")
        .await;
    db.execute("update notes set body = 'bye' where id = 1").await;
    let received = receiver.wait_for(2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = receiver.received();
    sidecar.stop().await;

    assert_eq!(received.len(), 2);
    assert_eq!(all.len(), 2, "the update of the added column alone sends nothing");
    assert_eq!(all[0].data()["key"], json!({"id": 1}));
    assert_eq!(all[0].data()["new"], json!({"body": "hello"}));
    assert_eq!(all[1].data()["old"], json!({"body": "hello"}));
    assert_eq!(all[1].data()["new"], json!({"body": "bye"}));
}

#[tokio::test]
async fn bulk_update_pairs_row_images() {
    let db = TestDb::create().await;
    db.execute("create table stock (id int primary key, quantity int, note text)")
        .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('stock', 'stock', '{id}', '{quantity}')")
        .await;

    // Every row starts with its own quantity, id * 10, so an image paired
    // with another row's image shows up as a wrong quantity.
    db.execute("insert into stock select g, g * 10, 'a' from generate_series(1, 2000) g")
        .await;
    db.execute("update stock set quantity = quantity + 1, note = 'b'").await;
    db.execute("update stock set note = 'c' where id <= 500").await;
    db.execute("update stock set id = id + 10000 where id <= 3").await;
    db.execute("delete from stock where id between 1991 and 2000").await;

    let rows = outbox(&db).await;
    let (inserts, rest) = rows.split_at(2000);
    let (updates, rest) = rest.split_at(2000);
    let (moved, deletes) = rest.split_at(3);
    assert_eq!(deletes.len(), 10, "the note-only update records nothing");

    for (operation, key, old, new) in inserts {
        let id = key["id"].as_i64().expect("an integer id");
        assert_eq!((operation.as_str(), old), ("INSERT", &Value::Null));
        assert_eq!(new, &json!({"quantity": id * 10}));
    }
    let mut updated_ids: Vec<i64> = updates
        .iter()
        .map(|(operation, key, old, new)| {
            let id = key["id"].as_i64().expect("an integer id");
            assert_eq!(operation, "UPDATE");
            assert_eq!(old, &json!({"quantity": id * 10}), "row {id}");
            assert_eq!(new, &json!({"quantity": id * 10 + 1}), "row {id}");
            id
        })
        .collect();
    updated_ids.sort_unstable();
    assert_eq!(updated_ids, (1..=2000).collect::<Vec<i64>>());

    // A changed key is a change even when no captured column changed; the
    // key is the new one.
    for (operation, key, old, new) in moved {
        let id = key["id"].as_i64().expect("an integer id") - 10000;
        assert_eq!(operation, "UPDATE");
        assert_eq!(
            (old, new),
            (&json!({"quantity": id * 10 + 1}), &json!({"quantity": id * 10 + 1}))
        );
    }
    for (operation, key, old, new) in deletes {
        let id = key["id"].as_i64().expect("an integer id");
        assert!((1991..=2000).contains(&id), "deleted row {id}");
        assert_eq!((operation.as_str(), new), ("DELETE", &Value::Null));
        assert_eq!(old, &json!({"quantity": id * 10 + 1}));
    }
}

#[tokio::test]
async fn partition_writes_through_either_table() {
    let db = TestDb::create().await;
    db.execute(
        "create table orders (id int, region text, state text, primary key (id, region)) partition by list (region);
         create table orders_north partition of orders for values in ('north');
         create table orders_south partition of orders for values in ('south');",
    )
    .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('orders', 'orders', '{id,region}', '{state}')")
        .await;
    db.execute("select gancho.watch('south', 'orders_south', '{id}', '{state}')")
        .await;

    // Statement-level triggers on either table would miss the rows written
    // through the other one.
    db.execute("insert into orders values (1, 'north', 'cart'), (2, 'south', 'cart')")
        .await;
    db.execute("update orders_north set state = 'paid'").await;
    db.execute("update orders set state = 'shipped' where id = 2").await;
    db.execute("update orders set region = 'south' where id = 1").await;

    let client = db.client().await;
    let recorded: Vec<(String, String, Value, Value)> = client
        .query(
            "select source, operation, key, coalesce(new, 'null') from gancho.outbox order by id",
            &[],
        )
        .await
        .expect("the outbox is readable")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let expected =
        |source: &str, operation: &str, key: Value, new: Value| (source.to_string(), operation.to_string(), key, new);
    assert_eq!(
        recorded,
        vec![
            expected(
                "orders",
                "INSERT",
                json!({"id": 1, "region": "north"}),
                json!({"state": "cart"})
            ),
            expected(
                "orders",
                "INSERT",
                json!({"id": 2, "region": "south"}),
                json!({"state": "cart"})
            ),
            expected("south", "INSERT", json!({"id": 2}), json!({"state": "cart"})),
            expected(
                "orders",
                "UPDATE",
                json!({"id": 1, "region": "north"}),
                json!({"state": "paid"})
            ),
            expected(
                "orders",
                "UPDATE",
                json!({"id": 2, "region": "south"}),
                json!({"state": "shipped"})
            ),
            expected("south", "UPDATE", json!({"id": 2}), json!({"state": "shipped"})),
            // Moving a row to another partition deletes it from one and
            // inserts it into the other.
            expected("orders", "DELETE", json!({"id": 1, "region": "north"}), Value::Null),
            expected(
                "orders",
                "INSERT",
                json!({"id": 1, "region": "south"}),
                json!({"state": "paid"})
            ),
            expected("south", "INSERT", json!({"id": 1}), json!({"state": "paid"})),
        ]
    );
    assert_eq!(
        db.count("select count(*) from pg_trigger where tgname like 'gancho_%' and tgrelid = 'orders_south'::regclass and tgtype & 1 = 1")
            .await,
        2,
        "row-level triggers: the clone of the parent's and the partition's own"
    );
}

/// A `fire_in_replica_mode` source on a logical replication subscriber
/// records the rows that the apply worker writes. The apply worker fires row
/// triggers only, so such a source must not get statement-level triggers.
#[tokio::test]
async fn logical_replication_apply_recorded() {
    let cluster = tokio::task::spawn_blocking(|| {
        gancho::demo::cluster::TempCluster::start_with(&[("wal_level", "logical"), ("fsync", "off")])
    })
    .await
    .unwrap()
    .expect("a throwaway cluster starts");
    let admin = connect(&cluster.url("postgres")).await;
    for database in ["shop", "copy"] {
        admin
            .batch_execute(&format!("create database {database}"))
            .await
            .unwrap();
    }

    let shop = connect(&cluster.url("shop")).await;
    shop.batch_execute(
        "create table stock (id int primary key, quantity int);
         insert into stock values (1, 10);
         create publication stock_pub for table stock;",
    )
    .await
    .unwrap();
    shop.batch_execute("select pg_create_logical_replication_slot('stock_slot', 'pgoutput')")
        .await
        .unwrap();

    // A subscription to a database of the same cluster cannot create its
    // slot itself, hence the slot made above.
    let copy = connect(&cluster.url("copy")).await;
    copy.batch_execute("create table stock (id int primary key, quantity int)")
        .await
        .unwrap();
    copy.batch_execute(gancho::capture::SCHEMA_SQL).await.unwrap();
    copy.batch_execute("select gancho.watch('stock', 'stock', '{id}', '{quantity}', true)")
        .await
        .unwrap();
    let connection = format!("host=127.0.0.1 port={} user=postgres dbname=shop", cluster.port());
    copy.batch_execute(&format!(
        "create subscription stock_sub connection '{connection}' publication stock_pub
             with (create_slot = false, slot_name = 'stock_slot')"
    ))
    .await
    .unwrap();

    // Write only once the initial copy of row 1 is in, so that the copy
    // does not take in the changes below.
    let copied = wait_until(&copy, "select count(*) from gancho.outbox", 1).await;
    assert_eq!(copied, 1, "the initial copy records row 1");

    shop.batch_execute(
        "insert into stock values (2, 20), (3, 30);
         update stock set quantity = quantity + 1;
         delete from stock where id = 3;",
    )
    .await
    .unwrap();

    // The initial copy (one INSERT of row 1), then the applied changes.
    let expected = vec![
        (
            "INSERT".to_string(),
            json!({"id": 1}),
            Value::Null,
            json!({"quantity": 10}),
        ),
        (
            "INSERT".to_string(),
            json!({"id": 2}),
            Value::Null,
            json!({"quantity": 20}),
        ),
        (
            "INSERT".to_string(),
            json!({"id": 3}),
            Value::Null,
            json!({"quantity": 30}),
        ),
        (
            "UPDATE".to_string(),
            json!({"id": 1}),
            json!({"quantity": 10}),
            json!({"quantity": 11}),
        ),
        (
            "UPDATE".to_string(),
            json!({"id": 2}),
            json!({"quantity": 20}),
            json!({"quantity": 21}),
        ),
        (
            "UPDATE".to_string(),
            json!({"id": 3}),
            json!({"quantity": 30}),
            json!({"quantity": 31}),
        ),
        (
            "DELETE".to_string(),
            json!({"id": 3}),
            json!({"quantity": 31}),
            Value::Null,
        ),
    ];
    wait_until(&copy, "select count(*) from gancho.outbox", expected.len() as i64).await;
    let recorded: Vec<(String, Value, Value, Value)> = copy
        .query(
            "select operation, key, coalesce(old, 'null'), coalesce(new, 'null') from gancho.outbox order by id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(recorded, expected);

    copy.batch_execute("alter subscription stock_sub disable; alter subscription stock_sub set (slot_name = none); drop subscription stock_sub;")
        .await
        .unwrap();
}

/// Polls a count query until it reaches `expected` or 30 s pass, and returns
/// the last count.
async fn wait_until(client: &tokio_postgres::Client, sql: &str, expected: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let count: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if count >= expected || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bulk_update_beyond_one_gigabyte() {
    let db = TestDb::create().await;
    db.execute("create table products (id int primary key, price int, description text)")
        .await;
    // 110 rows of 10 MB each: their images add up to more than the 1 GB
    // that Postgres allows for one array or one value. The description
    // compresses to almost nothing on disk, but to_jsonb() in the trigger
    // expands it in full.
    db.execute("insert into products select g, g * 100, repeat('x', 10000000) from generate_series(1, 110) g")
        .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('products', 'products', '{id}', '{price}')")
        .await;

    db.execute("update products set price = price + 1").await;

    let rows = outbox(&db).await;
    assert_eq!(rows.len(), 110);
    for (operation, key, old, new) in rows {
        let id = key["id"].as_i64().expect("an integer id");
        assert_eq!(operation, "UPDATE");
        assert_eq!(old, json!({"price": id * 100}), "row {id}");
        assert_eq!(new, json!({"price": id * 100 + 1}), "row {id}");
    }
}

#[tokio::test]
async fn inheritance_children_need_own_source() {
    let db = TestDb::create().await;
    db.execute(
        "create table items (id int primary key, v int);
         create table special_items (extra text) inherits (items);",
    )
    .await;
    db.execute(gancho::capture::SCHEMA_SQL).await;
    db.execute("select gancho.watch('items', 'items', '{id}', '{v}')").await;
    db.execute("select gancho.watch('special', 'special_items', '{id}', '{v}')")
        .await;

    db.execute("insert into items values (1, 1); insert into special_items values (2, 2, 'x');")
        .await;
    db.execute("update items set v = v + 10").await;

    // Each table records the rows stored in it, whichever statement changed
    // them: the parent's trigger does not fire for the child's rows.
    let client = db.client().await;
    let recorded: Vec<(String, String, Value, Value)> = client
        .query("select source, operation, key, new from gancho.outbox order by id", &[])
        .await
        .expect("the outbox is readable")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let expected = |source: &str, operation: &str, id: i64, v: i64| {
        (
            source.to_string(),
            operation.to_string(),
            json!({"id": id}),
            json!({"v": v}),
        )
    };
    assert_eq!(
        recorded,
        vec![
            expected("items", "INSERT", 1, 1),
            expected("special", "INSERT", 2, 2),
            expected("items", "UPDATE", 1, 11),
            expected("special", "UPDATE", 2, 12),
        ]
    );
}
