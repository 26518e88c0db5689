//! Reading a row's JSON values as the rules need them: exact decimals for
//! thresholds, instants for shifts, and text for `from`, `to` and `where` lists.

use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::config::{Limit, MatchValue, Sign, Term, ValueExpression};

pub type Row = Map<String, Value>;

/// Reads a JSON value as an exact decimal. `None` for null, missing, text or
/// numbers beyond the 28 significant digits that `Decimal` holds.
pub fn decimal(value: Option<&Value>) -> Option<Decimal> {
    match value? {
        Value::Number(number) => {
            let text = number.to_string();
            Decimal::from_str(&text)
                .or_else(|_| Decimal::from_scientific(&text))
                .ok()
        }
        _ => None,
    }
}

/// Computes a value expression over a row; `None` when a column is null or not a number.
pub fn evaluate_expression(expression: &ValueExpression, row: &Row) -> Option<Decimal> {
    let mut total = Decimal::ZERO;
    for (sign, term) in &expression.terms {
        let amount = match term {
            Term::Number(number) => *number,
            Term::Column(column) => decimal(row.get(column))?,
        };
        total = match sign {
            Sign::Plus => total.checked_add(amount)?,
            Sign::Minus => total.checked_sub(amount)?,
        };
    }
    Some(total)
}

pub fn evaluate_limit(limit: &Limit, row: &Row) -> Option<Decimal> {
    match limit {
        Limit::Number(number) => Some(*number),
        Limit::Column(column) => decimal(row.get(column)),
    }
}

/// Writes a decimal as a JSON number, keeping every digit.
pub fn decimal_json(value: Decimal) -> Value {
    let text = value.normalize().to_string();
    serde_json::Number::from_str(&text)
        .map(Value::Number)
        .unwrap_or(Value::String(text))
}

/// Reads a date or timestamp as `to_jsonb` writes it: timestamptz with an
/// offset, timestamp without one (read as UTC), or a plain date at midnight.
pub fn instant(value: Option<&Value>) -> Option<DateTime<Utc>> {
    let Value::String(text) = value? else {
        return None;
    };
    if let Ok(with_offset) = DateTime::parse_from_rfc3339(text) {
        return Some(with_offset.with_timezone(&Utc));
    }
    if let Ok(with_offset) = DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%#z") {
        return Some(with_offset.with_timezone(&Utc));
    }
    if let Ok(naive) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(naive.and_utc());
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|naive| naive.and_utc())
}

/// Whether a row value equals one of the config's values. Numbers compare by
/// value (3.50 matches 3.5), everything else by text; null matches nothing.
pub fn matches_any(value: Option<&Value>, candidates: &[MatchValue]) -> bool {
    let Some(value) = value else {
        return false;
    };
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => return false,
    };
    let number = decimal(Some(value));

    candidates.iter().any(|candidate| {
        if candidate.0 == text {
            return true;
        }
        match (number, Decimal::from_str(&candidate.0)) {
            (Some(number), Ok(other)) => number == other,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_keep_every_digit() {
        let value: Value = serde_json::from_str("12345678901234567890.123456").unwrap();
        assert_eq!(
            decimal(Some(&value)).unwrap().to_string(),
            "12345678901234567890.123456"
        );
        assert_eq!(decimal(Some(&json!("5"))), None);
        assert_eq!(decimal(Some(&Value::Null)), None);
        assert_eq!(decimal(None), None);
    }

    #[test]
    fn instants_parse_postgres_formats() {
        let expected = NaiveDate::from_ymd_opt(2026, 12, 4)
            .unwrap()
            .and_hms_opt(10, 30, 0)
            .unwrap()
            .and_utc();
        assert_eq!(instant(Some(&json!("2026-12-04T10:30:00+00:00"))), Some(expected));
        assert_eq!(instant(Some(&json!("2026-12-04T11:30:00+01:00"))), Some(expected));
        assert_eq!(instant(Some(&json!("2026-12-04T12:30:00+02"))), Some(expected));
        assert_eq!(instant(Some(&json!("2026-12-04T10:30:00"))), Some(expected));
        assert_eq!(
            instant(Some(&json!("2026-12-04"))),
            Some(
                NaiveDate::from_ymd_opt(2026, 12, 4)
                    .unwrap()
                    .and_hms_opt(0, 0, 0)
                    .unwrap()
                    .and_utc()
            )
        );
        assert_eq!(instant(Some(&json!("soon"))), None);
        assert_eq!(instant(Some(&json!(5))), None);
    }

    #[test]
    fn match_values_compare_numbers_by_value() {
        let candidates = [
            MatchValue("complete".into()),
            MatchValue("3.5".into()),
            MatchValue("true".into()),
        ];
        assert!(matches_any(Some(&json!("complete")), &candidates));
        assert!(matches_any(
            Some(&serde_json::from_str::<Value>("3.50").unwrap()),
            &candidates
        ));
        assert!(matches_any(Some(&json!(true)), &candidates));
        assert!(!matches_any(Some(&json!("cart")), &candidates));
        assert!(!matches_any(Some(&Value::Null), &candidates));
        assert!(!matches_any(None, &candidates));
    }
}
