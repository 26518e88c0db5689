//! Edge cases of every rule kind, on hand-built changes.

use std::path::Path;

use serde_json::{Value, json};

use super::*;
use crate::config::Config;

const CONFIG: &str = r#"
database_url = "postgres://localhost/shop"

[[source]]
name = "stock"
table = "stock"
key = ["id"]
columns = ["quantity", "allocated", "reorder_point", "status"]

[[source]]
name = "shipments"
table = "shipments"
key = ["id"]
columns = ["state", "promised_at"]

[[rule]]
name = "low"
source = "stock"
kind = "threshold"
value = "quantity"
below = 10
event = "low"
recovered_event = "ok"

[[rule]]
name = "low-rearm"
source = "stock"
kind = "threshold"
value = "quantity"
below = 10
rearm = 15
event = "low"
recovered_event = "restocked"

[[rule]]
name = "high"
source = "stock"
kind = "threshold"
value = "quantity - allocated"
above = 100
event = "high"

[[rule]]
name = "reorder"
source = "stock"
kind = "threshold"
value = "quantity"
below = "reorder_point"
event = "reorder"
where_not = { status = "discontinued" }

[[rule]]
name = "shipped"
source = "shipments"
kind = "transition"
column = "state"
to = ["shipped"]
event = "shipped"

[[rule]]
name = "any-state"
source = "shipments"
kind = "transition"
column = "state"
event = "state"

[[rule]]
name = "ready-to-shipped"
source = "shipments"
kind = "transition"
column = "state"
from = ["ready"]
to = ["shipped"]
event = "ready-shipped"

[[rule]]
name = "delayed"
source = "shipments"
kind = "shift"
column = "promised_at"
direction = "later"
min = "1h"
event = "delayed"
where_not = { state = ["canceled"] }

[[rule]]
name = "advanced"
source = "shipments"
kind = "shift"
column = "promised_at"
direction = "earlier"
event = "advanced"

[[rule]]
name = "report"
source = "stock"
kind = "change"
columns = ["quantity"]
event = "changed"

[[endpoint]]
name = "all"
url = "http://127.0.0.1:9/"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
events = ["*"]
"#;

fn rule(name: &str) -> Rule {
    let config = Config::parse(CONFIG, Path::new("test.toml"), &|_| None).expect("the test config is valid");
    config
        .rules
        .into_iter()
        .find(|rule| rule.name == name)
        .expect("the rule exists")
}

fn row(value: Value) -> Option<Row> {
    match value {
        Value::Object(map) => Some(map),
        Value::Null => None,
        other => panic!("not a row: {other}"),
    }
}

fn change(source: &str, old: Value, new: Value) -> Change {
    let operation = match (&old, &new) {
        (Value::Null, _) => Operation::Insert,
        (_, Value::Null) => Operation::Delete,
        _ => Operation::Update,
    };
    Change {
        id: 1,
        source: source.into(),
        table: format!("public.{source}"),
        operation,
        key: json!({"id": 1}),
        old: row(old),
        new: row(new),
        changed_at: Utc::now(),
    }
}

fn stock(old: Option<i64>, new: Option<i64>) -> Change {
    let to_row =
        |quantity: Option<i64>| json!({"quantity": quantity, "allocated": 0, "reorder_point": 5, "status": "active"});
    change("stock", to_row(old), to_row(new))
}

fn event_of(rule: &Rule, change: &Change, state: Option<&str>) -> Option<String> {
    evaluate(rule, change, state).0.map(|found| found.event_type)
}

#[test]
fn threshold_fires_on_crossing_only() {
    let low = rule("low");
    assert_eq!(event_of(&low, &stock(Some(10), Some(9)), None).as_deref(), Some("low"));
    assert_eq!(event_of(&low, &stock(Some(9), Some(8)), None), None, "already below");
    assert_eq!(
        event_of(&low, &stock(Some(11), Some(10)), None),
        None,
        "exactly at the limit is not below"
    );
    assert_eq!(
        event_of(&low, &stock(Some(50), Some(2)), None).as_deref(),
        Some("low"),
        "jump across"
    );
    assert_eq!(
        event_of(&low, &stock(Some(9), Some(10)), None).as_deref(),
        Some("ok"),
        "back at the limit"
    );
}

#[test]
fn threshold_on_insert_delete_and_null() {
    let low = rule("low");
    let insert = change("stock", Value::Null, json!({"quantity": 3, "allocated": 0}));
    assert_eq!(event_of(&low, &insert, None).as_deref(), Some("low"));
    let delete = change("stock", json!({"quantity": 3}), Value::Null);
    assert_eq!(event_of(&low, &delete, None), None);
    assert_eq!(
        event_of(&low, &stock(None, Some(3)), None).as_deref(),
        Some("low"),
        "null to below fires"
    );
    assert_eq!(event_of(&low, &stock(Some(12), None), None), None, "null is not below");
    assert_eq!(
        event_of(&low, &stock(Some(3), None), None),
        None,
        "below to null is no recovery"
    );
}

#[test]
fn threshold_details_carry_value_and_limit() {
    let (found, _) = evaluate(&rule("low"), &stock(Some(12), Some(7)), None);
    let details = found.expect("fires").details;
    assert_eq!(details.get("value"), Some(&json!(7)));
    assert_eq!(details.get("limit"), Some(&json!(10)));
}

#[test]
fn threshold_rearm_stops_flapping() {
    let rearm = rule("low-rearm");

    let (found, update) = evaluate(&rearm, &stock(Some(12), Some(9)), None);
    assert_eq!(found.map(|found| found.event_type).as_deref(), Some("low"));
    assert_eq!(update, StateUpdate::Set(ALERTING));

    let (found, update) = evaluate(&rearm, &stock(Some(9), Some(12)), Some(ALERTING));
    assert_eq!(found, None, "12 is under the rearm level");
    assert_eq!(update, StateUpdate::Keep);

    let (found, update) = evaluate(&rearm, &stock(Some(12), Some(8)), Some(ALERTING));
    assert_eq!(found, None, "no second alert before rearming");
    assert_eq!(update, StateUpdate::Keep);

    let (found, update) = evaluate(&rearm, &stock(Some(8), Some(15)), Some(ALERTING));
    assert_eq!(found.map(|found| found.event_type).as_deref(), Some("restocked"));
    assert_eq!(update, StateUpdate::Clear);

    let (found, update) = evaluate(&rearm, &stock(Some(15), Some(9)), None);
    assert_eq!(
        found.map(|found| found.event_type).as_deref(),
        Some("low"),
        "fires again after rearm"
    );
    assert_eq!(update, StateUpdate::Set(ALERTING));
}

#[test]
fn threshold_rearm_state_cleared_on_delete() {
    let rearm = rule("low-rearm");
    let delete = change("stock", json!({"quantity": 3}), Value::Null);
    assert_eq!(evaluate(&rearm, &delete, Some(ALERTING)), (None, StateUpdate::Clear));
}

#[test]
fn threshold_on_difference_of_columns() {
    let high = rule("high");
    let before = json!({"quantity": 150, "allocated": 50});
    let after = json!({"quantity": 151, "allocated": 50});
    assert_eq!(
        event_of(&high, &change("stock", before.clone(), before.clone()), None),
        None
    );
    assert_eq!(
        event_of(&high, &change("stock", before, after), None).as_deref(),
        Some("high")
    );
    let null_allocated = json!({"quantity": 500, "allocated": null});
    assert_eq!(
        event_of(&high, &change("stock", Value::Null, null_allocated), None),
        None
    );
}

#[test]
fn threshold_limit_from_column_and_filter() {
    let reorder = rule("reorder");
    let before = json!({"quantity": 6, "reorder_point": 5, "status": "active"});
    let after = json!({"quantity": 4, "reorder_point": 5, "status": "active"});
    assert_eq!(
        event_of(&reorder, &change("stock", before.clone(), after), None).as_deref(),
        Some("reorder")
    );

    let raised_point = json!({"quantity": 6, "reorder_point": 7, "status": "active"});
    assert_eq!(
        event_of(&reorder, &change("stock", before.clone(), raised_point), None).as_deref(),
        Some("reorder")
    );

    let discontinued = json!({"quantity": 4, "reorder_point": 5, "status": "discontinued"});
    assert_eq!(event_of(&reorder, &change("stock", before, discontinued), None), None);
}

#[test]
fn threshold_keeps_numeric_precision() {
    let low = rule("low");
    let before: Value = serde_json::from_str(r#"{"quantity": 10.000000000000000000000001}"#).unwrap();
    let after: Value = serde_json::from_str(r#"{"quantity": 9.999999999999999999999999}"#).unwrap();
    assert_eq!(
        event_of(&low, &change("stock", before, after), None).as_deref(),
        Some("low")
    );
}

#[test]
fn transition_to_and_from_lists() {
    let shipped = rule("shipped");
    let ready = json!({"state": "ready", "promised_at": null});
    let sent = json!({"state": "shipped", "promised_at": null});
    let pending = json!({"state": "pending", "promised_at": null});

    assert_eq!(
        event_of(&shipped, &change("shipments", ready.clone(), sent.clone()), None).as_deref(),
        Some("shipped")
    );
    assert_eq!(
        event_of(&shipped, &change("shipments", sent.clone(), sent.clone()), None),
        None,
        "unchanged"
    );
    assert_eq!(
        event_of(&shipped, &change("shipments", pending.clone(), ready.clone()), None),
        None
    );
    assert_eq!(
        event_of(&shipped, &change("shipments", Value::Null, sent.clone()), None).as_deref(),
        Some("shipped")
    );

    let strict = rule("ready-to-shipped");
    assert_eq!(
        event_of(&strict, &change("shipments", pending, sent.clone()), None),
        None
    );
    assert_eq!(
        event_of(&strict, &change("shipments", ready, sent.clone()), None).as_deref(),
        Some("ready-shipped")
    );
    assert_eq!(
        event_of(&strict, &change("shipments", Value::Null, sent), None),
        None,
        "insert is from no row"
    );
}

#[test]
fn transition_without_lists_sees_insert_delete_and_null() {
    let any = rule("any-state");
    let with_state = json!({"state": "ready"});
    let null_state = json!({"state": null});

    let (found, _) = evaluate(&any, &change("shipments", Value::Null, with_state.clone()), None);
    let details = found.expect("insert is a transition").details;
    assert_eq!(details.get("from"), Some(&Value::Null));
    assert_eq!(details.get("to"), Some(&json!("ready")));

    assert_eq!(
        event_of(&any, &change("shipments", with_state.clone(), Value::Null), None).as_deref(),
        Some("state")
    );
    assert_eq!(
        event_of(&any, &change("shipments", null_state.clone(), with_state.clone()), None).as_deref(),
        Some("state")
    );
    assert_eq!(
        event_of(&any, &change("shipments", with_state, null_state), None).as_deref(),
        Some("state")
    );
}

#[test]
fn shift_later_with_minimum() {
    let delayed = rule("delayed");
    let at = |time: &str, state: &str| json!({"state": state, "promised_at": time});

    let two_hours = change(
        "shipments",
        at("2026-12-04T10:00:00+00:00", "ready"),
        at("2026-12-04T12:00:00+00:00", "ready"),
    );
    let (found, _) = evaluate(&delayed, &two_hours, None);
    let details = found.expect("two hours later fires").details;
    assert_eq!(details.get("shift_seconds"), Some(&json!(7200)));

    let exactly_one_hour = change(
        "shipments",
        at("2026-12-04T10:00:00+00:00", "ready"),
        at("2026-12-04T11:00:00+00:00", "ready"),
    );
    assert_eq!(event_of(&delayed, &exactly_one_hour, None).as_deref(), Some("delayed"));

    let minutes = change(
        "shipments",
        at("2026-12-04T10:00:00+00:00", "ready"),
        at("2026-12-04T10:59:59+00:00", "ready"),
    );
    assert_eq!(event_of(&delayed, &minutes, None), None, "under min");

    let earlier = change(
        "shipments",
        at("2026-12-04T10:00:00+00:00", "ready"),
        at("2026-12-04T08:00:00+00:00", "ready"),
    );
    assert_eq!(event_of(&delayed, &earlier, None), None);
    assert_eq!(event_of(&rule("advanced"), &earlier, None).as_deref(), Some("advanced"));

    let canceled = change(
        "shipments",
        at("2026-12-04T10:00:00+00:00", "canceled"),
        at("2026-12-05T10:00:00+00:00", "canceled"),
    );
    assert_eq!(event_of(&delayed, &canceled, None), None, "where_not excludes canceled");

    let first_promise = change(
        "shipments",
        json!({"state": "ready", "promised_at": null}),
        at("2026-12-05T10:00:00+00:00", "ready"),
    );
    assert_eq!(
        event_of(&delayed, &first_promise, None),
        None,
        "null to a date is not a shift"
    );
}

#[test]
fn change_rule_watches_listed_columns() {
    let report = rule("report");
    let before = json!({"quantity": 5, "status": "active"});
    let quantity_changed = json!({"quantity": 6, "status": "active"});
    let status_changed = json!({"quantity": 5, "status": "discontinued"});
    assert_eq!(
        event_of(&report, &change("stock", before.clone(), quantity_changed), None).as_deref(),
        Some("changed")
    );
    assert_eq!(
        event_of(&report, &change("stock", before.clone(), status_changed), None),
        None
    );
    assert_eq!(
        event_of(&report, &change("stock", Value::Null, before), None).as_deref(),
        Some("changed")
    );
}

#[test]
fn truncate_and_other_sources_are_ignored() {
    let low = rule("low");
    let mut truncate = stock(Some(12), Some(3));
    truncate.operation = Operation::Truncate;
    assert_eq!(event_of(&low, &truncate, None), None);
    let other = change("shipments", json!({"quantity": 12}), json!({"quantity": 3}));
    assert_eq!(event_of(&low, &other, None), None);
}
