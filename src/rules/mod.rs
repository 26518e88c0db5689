//! Rules: deciding which captured changes become events.
//!
//! [`evaluate`] is a pure function of one rule, one change and the rule's
//! remembered state for that row, so every edge case is unit-testable. The
//! [`processor`] runs it inside the transaction that consumes outbox rows.

pub mod enrich;
pub mod processor;
mod values;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::config::{
    Change as ChangeRule, Rule, RuleKind, Shift, ShiftDirection, Threshold, ThresholdDirection, Transition,
};
pub use values::Row;
use values::{decimal_json, evaluate_expression, evaluate_limit, instant, matches_any};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Operation {
    pub fn parse(text: &str) -> Option<Operation> {
        match text {
            "INSERT" => Some(Operation::Insert),
            "UPDATE" => Some(Operation::Update),
            "DELETE" => Some(Operation::Delete),
            "TRUNCATE" => Some(Operation::Truncate),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Truncate => "TRUNCATE",
        }
    }
}

/// One captured change: an outbox row.
#[derive(Debug, Clone)]
pub struct Change {
    pub id: i64,
    pub source: String,
    pub table: String,
    pub operation: Operation,
    pub key: Value,
    pub old: Option<Row>,
    pub new: Option<Row>,
    pub changed_at: DateTime<Utc>,
}

impl Change {
    /// Returns the row that filters and enrichment parameters read: the new row,
    /// or the old one for a delete.
    pub fn current_row(&self) -> Option<&Row> {
        self.new.as_ref().or(self.old.as_ref())
    }
}

/// An event that a rule emits for a change, with the fields that this rule
/// kind adds to the payload's `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleMatch {
    pub event_type: String,
    pub details: Map<String, Value>,
}

/// The change to a rule's remembered state for a row after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateUpdate {
    Keep,
    Set(&'static str),
    Clear,
}

/// The state a threshold rule with a rearm level keeps while it waits for the value to rearm.
pub const ALERTING: &str = "alerting";

/// Returns whether a rule keeps per-row state, so the processor loads it only when needed.
pub fn needs_state(rule: &Rule) -> bool {
    matches!(&rule.kind, RuleKind::Threshold(threshold) if threshold.rearm.is_some())
}

/// Evaluates one rule on one change. `state` is what the rule stored for this
/// row earlier, if anything.
pub fn evaluate(rule: &Rule, change: &Change, state: Option<&str>) -> (Option<RuleMatch>, StateUpdate) {
    if change.operation == Operation::Truncate || change.source != rule.source {
        return (None, StateUpdate::Keep);
    }
    let (found, update) = match &rule.kind {
        RuleKind::Threshold(threshold) => evaluate_threshold(rule, threshold, change, state),
        RuleKind::Transition(transition) => (evaluate_transition(rule, transition, change), StateUpdate::Keep),
        RuleKind::Shift(shift) => (evaluate_shift(rule, shift, change), StateUpdate::Keep),
        RuleKind::Change(change_rule) => (evaluate_change(rule, change_rule, change), StateUpdate::Keep),
    };

    // Filters decide whether an event is emitted; state still follows the
    // value, so a filtered-out row does not fire later from a stale state.
    if found.is_some() && !passes_filter(rule, change) {
        return (None, update);
    }
    (found, update)
}

fn passes_filter(rule: &Rule, change: &Change) -> bool {
    let Some(row) = change.current_row() else {
        return true;
    };
    let included = rule
        .filter
        .only
        .iter()
        .all(|(column, values)| matches_any(row.get(column), values));
    let excluded = rule
        .filter
        .except
        .iter()
        .any(|(column, values)| matches_any(row.get(column), values));
    included && !excluded
}

fn is_outside(direction: ThresholdDirection, value: Decimal, limit: Decimal) -> bool {
    match direction {
        ThresholdDirection::Below => value < limit,
        ThresholdDirection::Above => value > limit,
    }
}

fn is_rearmed(direction: ThresholdDirection, value: Decimal, rearm: Decimal) -> bool {
    match direction {
        ThresholdDirection::Below => value >= rearm,
        ThresholdDirection::Above => value <= rearm,
    }
}

/// A threshold fires when the value crosses the limit, and not again while it
/// stays beyond it. A null value is neither inside nor outside, so it never
/// fires; a change from null to beyond the limit fires, as an insert does.
///
/// With a rearm level the rule remembers that it fired and stays silent until
/// the value is back at the rearm level, which is also when `recovered_event`
/// is emitted. Without one, `recovered_event` is emitted when the value crosses
/// back inside the limit.
fn evaluate_threshold(
    rule: &Rule,
    threshold: &Threshold,
    change: &Change,
    state: Option<&str>,
) -> (Option<RuleMatch>, StateUpdate) {
    let alerting = state == Some(ALERTING);
    let Some(new_row) = &change.new else {
        // The row is gone: forget its state so a new row with the same key starts afresh.
        let update = if state.is_some() {
            StateUpdate::Clear
        } else {
            StateUpdate::Keep
        };
        return (None, update);
    };

    let new_value = evaluate_expression(&threshold.value, new_row);
    let new_limit = evaluate_limit(&threshold.limit, new_row);
    let (old_value, old_limit) = match &change.old {
        Some(old_row) => (
            evaluate_expression(&threshold.value, old_row),
            evaluate_limit(&threshold.limit, old_row),
        ),
        None => (None, None),
    };

    let now_outside =
        matches!((new_value, new_limit), (Some(value), Some(limit)) if is_outside(threshold.direction, value, limit));
    let was_outside =
        matches!((old_value, old_limit), (Some(value), Some(limit)) if is_outside(threshold.direction, value, limit));
    let fired = RuleMatch {
        event_type: rule.event.clone(),
        details: threshold_details(new_value, new_limit),
    };

    match &threshold.rearm {
        Some(rearm) if alerting => {
            let rearmed = matches!(
                (new_value, evaluate_limit(rearm, new_row)),
                (Some(value), Some(level)) if is_rearmed(threshold.direction, value, level)
            );
            if !rearmed {
                return (None, StateUpdate::Keep);
            }
            let recovered = threshold.recovered_event.as_ref().map(|event_type| RuleMatch {
                event_type: event_type.clone(),
                details: threshold_details(new_value, new_limit),
            });
            (recovered, StateUpdate::Clear)
        }
        Some(_) => {
            if now_outside && !was_outside {
                (Some(fired), StateUpdate::Set(ALERTING))
            } else {
                (None, StateUpdate::Keep)
            }
        }
        None => {
            if now_outside && !was_outside {
                (Some(fired), StateUpdate::Keep)
            } else if was_outside && !now_outside && new_value.is_some() && new_limit.is_some() {
                let recovered = threshold.recovered_event.as_ref().map(|event_type| RuleMatch {
                    event_type: event_type.clone(),
                    details: threshold_details(new_value, new_limit),
                });
                (recovered, StateUpdate::Keep)
            } else {
                (None, StateUpdate::Keep)
            }
        }
    }
}

fn threshold_details(value: Option<Decimal>, limit: Option<Decimal>) -> Map<String, Value> {
    let mut details = Map::new();
    details.insert("value".into(), value.map(decimal_json).unwrap_or(Value::Null));
    details.insert("limit".into(), limit.map(decimal_json).unwrap_or(Value::Null));
    details
}

/// A transition fires when the column's value changes. An insert changes it
/// from no row and a delete to no row. `from` and `to` restrict the values left
/// and reached, and a side with no row never matches a non-empty list.
fn evaluate_transition(rule: &Rule, transition: &Transition, change: &Change) -> Option<RuleMatch> {
    let old_value = change
        .old
        .as_ref()
        .map(|row| row.get(&transition.column).cloned().unwrap_or(Value::Null));
    let new_value = change
        .new
        .as_ref()
        .map(|row| row.get(&transition.column).cloned().unwrap_or(Value::Null));
    if change.operation == Operation::Update && old_value == new_value {
        return None;
    }

    if !transition.from.is_empty() && !matches_any(old_value.as_ref(), &transition.from) {
        return None;
    }
    if !transition.to.is_empty() && !matches_any(new_value.as_ref(), &transition.to) {
        return None;
    }

    let mut details = Map::new();
    details.insert("from".into(), old_value.unwrap_or(Value::Null));
    details.insert("to".into(), new_value.unwrap_or(Value::Null));
    Some(RuleMatch {
        event_type: rule.event.clone(),
        details,
    })
}

/// A shift fires when an update moves a date or timestamp in the rule's
/// direction by at least `min`. Setting the first value or clearing it is not a shift.
fn evaluate_shift(rule: &Rule, shift: &Shift, change: &Change) -> Option<RuleMatch> {
    if change.operation != Operation::Update {
        return None;
    }
    let old_raw = change.old.as_ref()?.get(&shift.column);
    let new_raw = change.new.as_ref()?.get(&shift.column);
    let (old_instant, new_instant) = (instant(old_raw)?, instant(new_raw)?);

    let delta = new_instant.signed_duration_since(old_instant);
    let min = chrono::Duration::from_std(shift.min).unwrap_or(chrono::Duration::MAX);
    let moved = match shift.direction {
        ShiftDirection::Later => delta > chrono::Duration::zero() && delta >= min,
        ShiftDirection::Earlier => delta < chrono::Duration::zero() && -delta >= min,
        ShiftDirection::Either => delta != chrono::Duration::zero() && delta.abs() >= min,
    };
    if !moved {
        return None;
    }

    let seconds = Decimal::new(delta.num_milliseconds(), 3);
    let mut details = Map::new();
    details.insert("from".into(), old_raw.cloned().unwrap_or(Value::Null));
    details.insert("to".into(), new_raw.cloned().unwrap_or(Value::Null));
    details.insert("shift_seconds".into(), decimal_json(seconds));
    Some(RuleMatch {
        event_type: rule.event.clone(),
        details,
    })
}

/// A change rule fires on every insert and delete, and on an update that
/// changes one of its columns (any captured column or the key when it lists none).
fn evaluate_change(rule: &Rule, change_rule: &ChangeRule, change: &Change) -> Option<RuleMatch> {
    if change.operation == Operation::Update && !change_rule.columns.is_empty() {
        let (old_row, new_row) = (change.old.as_ref()?, change.new.as_ref()?);
        let changed = change_rule
            .columns
            .iter()
            .any(|column| old_row.get(column) != new_row.get(column));
        if !changed {
            return None;
        }
    }
    Some(RuleMatch {
        event_type: rule.event.clone(),
        details: Map::new(),
    })
}

#[cfg(test)]
mod tests;
