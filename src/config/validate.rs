//! Turns the raw TOML into a [`Config`], collecting every problem with its key.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use rust_decimal::Decimal;

use super::raw::{RawConfig, RawEndpoint, RawRule, RawSidecar, RawSource};
use super::*;

/// The retry schedule when an endpoint sets none: nine attempts over about 28 hours.
pub const DEFAULT_RETRY_SCHEDULE: &[Duration] = &[
    Duration::from_secs(5),
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

struct Problems {
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Problems {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Validates the raw config. With `capture_only`, the database URL and the
/// endpoints are not read, so `gancho install --print` works without the
/// secrets and the database that only the sidecar needs.
pub fn validate(
    raw: RawConfig,
    lookup: &dyn Fn(&str) -> Option<String>,
    capture_only: bool,
) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems {
        errors: Vec::new(),
        warnings: Vec::new(),
    };

    let database_url = match raw.database_url {
        _ if capture_only => String::new(),
        None => {
            problems.error(
                "database_url",
                "missing: set it to a postgres:// URL, for example \"${DATABASE_URL}\"",
            );
            String::new()
        }
        Some(text) => expand_or_report(&text, "database_url", lookup, &mut problems),
    };

    let sources = validate_sources(&raw.sources, &mut problems);
    let rules: Vec<Rule> = raw
        .rules
        .iter()
        .enumerate()
        .filter_map(|(index, rule)| validate_rule(index, rule, &sources, &mut problems))
        .collect();
    check_unique(rules.iter().map(|rule| rule.name.as_str()), "rule", &mut problems);

    let raw_endpoints = if capture_only { &[][..] } else { &raw.endpoints[..] };
    let endpoints: Vec<Endpoint> = raw_endpoints
        .iter()
        .enumerate()
        .filter_map(|(index, endpoint)| validate_endpoint(index, endpoint, lookup, &mut problems))
        .collect();
    check_unique(
        endpoints.iter().map(|endpoint| endpoint.name.as_str()),
        "endpoint",
        &mut problems,
    );

    let sidecar = validate_sidecar(&raw.sidecar, &mut problems);
    warn_about_routing(&rules, &endpoints, &mut problems);
    for endpoint in &endpoints {
        if endpoint.timeout >= sidecar.lease {
            problems.warn(
                format!("endpoint \"{}\".timeout", endpoint.name),
                format!(
                    "the timeout ({}) is not shorter than sidecar.lease ({}), so a slow request can be sent twice; make the lease longer",
                    format_duration(endpoint.timeout),
                    format_duration(sidecar.lease)
                ),
            );
        }
    }

    if !problems.errors.is_empty() {
        return Err(problems.errors);
    }
    Ok(Config {
        database_url,
        sources,
        rules,
        endpoints,
        sidecar,
        warnings: problems.warnings,
    })
}

fn expand_or_report(text: &str, key: &str, lookup: &dyn Fn(&str) -> Option<String>, problems: &mut Problems) -> String {
    match expand(text, lookup) {
        Ok(value) => value,
        Err(message) => {
            problems.error(key, format!("{message}; export it or write the value in the file"));
            String::new()
        }
    }
}

fn check_unique<'a>(names: impl Iterator<Item = &'a str>, kind: &str, problems: &mut Problems) {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            problems.error(
                format!("{kind} \"{name}\""),
                format!("two {kind}s are named \"{name}\"; give each a unique name"),
            );
        }
    }
}

/// Source, rule and endpoint names appear in trigger names and logs, so they are
/// kept to a safe alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 50
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

const NAME_HINT: &str = "use 1 to 50 lowercase letters, digits, \"_\" or \"-\"";

fn validate_sources(raw_sources: &[RawSource], problems: &mut Problems) -> Vec<Source> {
    let mut sources = Vec::new();
    for (index, raw) in raw_sources.iter().enumerate() {
        let key = format!("source[{index}] \"{}\"", raw.name);
        if !valid_name(&raw.name) {
            problems.error(
                format!("{key}.name"),
                format!("invalid name {:?}: {NAME_HINT}", raw.name),
            );
        }

        let (schema, table) = match parse_table_name(&raw.table) {
            Ok(parts) => parts,
            Err(message) => {
                problems.error(format!("{key}.table"), message);
                continue;
            }
        };
        if raw.key.is_empty() {
            problems.error(
                format!("{key}.key"),
                "empty: list the primary key columns, for example key = [\"id\"]",
            );
        }
        for column in raw.key.iter().chain(&raw.columns) {
            if column.is_empty() {
                problems.error(key.clone(), "a column name is empty");
            }
        }

        let truncate_event = raw
            .truncate_event
            .clone()
            .unwrap_or_else(|| format!("{}.truncated", raw.name));
        check_event_name(&format!("{key}.truncate_event"), &truncate_event, problems);

        sources.push(Source {
            name: raw.name.clone(),
            schema,
            table,
            key: raw.key.clone(),
            columns: raw.columns.clone(),
            truncate_event,
            fire_in_replica_mode: raw.fire_in_replica_mode,
        });
    }
    check_unique(sources.iter().map(|source| source.name.as_str()), "source", problems);
    sources
}

/// Splits `schema.table` into its parts. Unquoted parts fold to lowercase as in
/// SQL, quoted parts keep their case, and a name without a schema is in `public`.
pub fn parse_table_name(text: &str) -> Result<(String, String), String> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();

    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("unclosed quote in table name {text:?}")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return Err(format!(
                        "invalid character {c:?} in table name {text:?}; quote names that need it, as in '\"My Table\"'"
                    ));
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!(
                "invalid table name {text:?}; write it as schema.table, for example \"public.spree_orders\""
            ));
        }
        parts.push(part);

        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(c) => return Err(format!("unexpected {c:?} in table name {text:?}")),
        }
    }

    match parts.len() {
        1 => Ok(("public".to_string(), parts.remove(0))),
        2 => {
            let table = parts.remove(1);
            Ok((parts.remove(0), table))
        }
        _ => Err(format!(
            "invalid table name {text:?}; write it as schema.table, without a database name"
        )),
    }
}

fn validate_rule(index: usize, raw: &RawRule, sources: &[Source], problems: &mut Problems) -> Option<Rule> {
    let key = format!("rule[{index}] \"{}\"", raw.name);
    let error_count = problems.errors.len();

    if !valid_name(&raw.name) {
        problems.error(
            format!("{key}.name"),
            format!("invalid name {:?}: {NAME_HINT}", raw.name),
        );
    }
    check_event_name(&format!("{key}.event"), &raw.event, problems);
    let Some(source) = sources.iter().find(|source| source.name == raw.source) else {
        let known: Vec<&str> = sources.iter().map(|source| source.name.as_str()).collect();
        problems.error(
            format!("{key}.source"),
            format!(
                "unknown source {:?}; use one of the [[source]] names: {}",
                raw.source,
                known.join(", ")
            ),
        );
        return None;
    };

    let kind = match raw.kind.as_str() {
        "threshold" => validate_threshold(&key, raw, source, problems).map(RuleKind::Threshold),
        "transition" => validate_transition(&key, raw, source, problems).map(RuleKind::Transition),
        "shift" => validate_shift(&key, raw, source, problems).map(RuleKind::Shift),
        "change" => validate_change(&key, raw, source, problems).map(RuleKind::Change),
        other => {
            problems.error(
                format!("{key}.kind"),
                format!("unknown kind {other:?}; use \"threshold\", \"transition\", \"shift\" or \"change\""),
            );
            None
        }
    };
    reject_foreign_keys(&key, raw, problems);

    let filter = RowFilter {
        only: validate_filter(&format!("{key}.where"), raw.where_.as_ref(), source, problems),
        except: validate_filter(&format!("{key}.where_not"), raw.where_not.as_ref(), source, problems),
    };

    let mut enrich = Vec::new();
    for (enrich_index, raw_enrich) in raw.enrich.iter().enumerate() {
        let enrich_key = format!("{key}.enrich[{enrich_index}]");
        if !valid_name(&raw_enrich.name.replace('-', "_")) || raw_enrich.name.contains('-') {
            problems.error(
                format!("{enrich_key}.name"),
                format!(
                    "invalid name {:?}: use lowercase letters, digits and \"_\"",
                    raw_enrich.name
                ),
            );
        }
        if RESERVED_DATA_FIELDS.contains(&raw_enrich.name.as_str()) {
            problems.error(
                format!("{enrich_key}.name"),
                format!(
                    "{:?} is a field of the payload's data; choose another name",
                    raw_enrich.name
                ),
            );
        }
        for param in &raw_enrich.params {
            require_column(&format!("{enrich_key}.params"), param, source, problems);
        }
        let sql = raw_enrich.sql.trim().trim_end_matches(';').trim_end().to_string();
        if sql.is_empty() {
            problems.error(format!("{enrich_key}.sql"), "empty: write a SELECT query");
        }
        enrich.push(Enrichment {
            name: raw_enrich.name.clone(),
            sql,
            params: raw_enrich.params.clone(),
        });
    }
    check_unique(
        enrich.iter().map(|item| item.name.as_str()),
        &format!("{key}.enrich"),
        problems,
    );

    if problems.errors.len() > error_count {
        return None;
    }
    Some(Rule {
        name: raw.name.clone(),
        source: raw.source.clone(),
        event: raw.event.clone(),
        kind: kind?,
        filter,
        enrich,
    })
}

fn check_event_name(key: &str, event: &str, problems: &mut Problems) {
    let valid = !event.is_empty()
        && event.len() <= 100
        && event
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        problems.error(
            key,
            format!("invalid event type {event:?}; use letters, digits, \".\", \"_\" or \"-\", as in \"inventory.low_stock\""),
        );
    }
}

fn require_column(key: &str, column: &str, source: &Source, problems: &mut Problems) {
    if !source.has_column(column) {
        problems.error(
            key,
            format!(
                "column {column:?} is not captured by source \"{}\"; add it to that source's columns (or key)",
                source.name
            ),
        );
    }
}

/// Keys that belong to another rule kind are errors, since silently ignoring
/// `below` on a transition rule would hide a mistake.
fn reject_foreign_keys(key: &str, raw: &RawRule, problems: &mut Problems) {
    let present = [
        ("value", raw.value.is_some()),
        ("below", raw.below.is_some()),
        ("above", raw.above.is_some()),
        ("rearm", raw.rearm.is_some()),
        ("recovered_event", raw.recovered_event.is_some()),
        ("column", raw.column.is_some()),
        ("from", raw.from.is_some()),
        ("to", raw.to.is_some()),
        ("direction", raw.direction.is_some()),
        ("min", raw.min.is_some()),
        ("columns", raw.columns.is_some()),
    ];
    let allowed: &[&str] = match raw.kind.as_str() {
        "threshold" => &["value", "below", "above", "rearm", "recovered_event"],
        "transition" => &["column", "from", "to"],
        "shift" => &["column", "direction", "min"],
        "change" => &["columns"],
        _ => return,
    };
    for (name, is_present) in present {
        if is_present && !allowed.contains(&name) {
            problems.error(
                format!("{key}.{name}"),
                format!("not a key of a {} rule; remove it or change the kind", raw.kind),
            );
        }
    }
}

fn validate_threshold(key: &str, raw: &RawRule, source: &Source, problems: &mut Problems) -> Option<Threshold> {
    let Some(value_text) = &raw.value else {
        problems.error(
            format!("{key}.value"),
            "missing: name the column to watch, or a sum such as \"quantity - reserved\"",
        );
        return None;
    };
    let value = match parse_value_expression(value_text) {
        Ok(value) => value,
        Err(message) => {
            problems.error(format!("{key}.value"), message);
            return None;
        }
    };
    for column in value.columns() {
        require_column(&format!("{key}.value"), column, source, problems);
    }

    let (direction, limit_value, limit_key) = match (&raw.below, &raw.above) {
        (Some(below), None) => (ThresholdDirection::Below, below, "below"),
        (None, Some(above)) => (ThresholdDirection::Above, above, "above"),
        _ => {
            problems.error(
                key,
                "a threshold rule needs exactly one of below or above; write two rules for a range",
            );
            return None;
        }
    };
    let limit = parse_limit(&format!("{key}.{limit_key}"), limit_value, source, problems)?;
    let rearm = match &raw.rearm {
        None => None,
        Some(value) => Some(parse_limit(&format!("{key}.rearm"), value, source, problems)?),
    };

    if let (Limit::Number(limit), Some(Limit::Number(rearm))) = (&limit, &rearm) {
        let wrong_side = match direction {
            ThresholdDirection::Below => rearm < limit,
            ThresholdDirection::Above => rearm > limit,
        };
        if wrong_side {
            let side = if direction == ThresholdDirection::Below {
                "at or above"
            } else {
                "at or below"
            };
            problems.error(
                format!("{key}.rearm"),
                format!("rearm ({rearm}) must be {side} the limit ({limit})"),
            );
        }
    }
    if let Some(recovered) = &raw.recovered_event {
        check_event_name(&format!("{key}.recovered_event"), recovered, problems);
    }

    Some(Threshold {
        value,
        direction,
        limit,
        rearm,
        recovered_event: raw.recovered_event.clone(),
    })
}

fn parse_limit(key: &str, value: &toml::Value, source: &Source, problems: &mut Problems) -> Option<Limit> {
    let limit = match value {
        toml::Value::Integer(number) => Limit::Number(Decimal::from(*number)),
        toml::Value::Float(number) => match Decimal::from_str(&number.to_string()) {
            Ok(decimal) => Limit::Number(decimal),
            Err(_) => {
                problems.error(key, format!("{number} is out of range"));
                return None;
            }
        },
        toml::Value::String(text) => match Decimal::from_str(text) {
            Ok(decimal) => Limit::Number(decimal),
            Err(_) => {
                require_column(key, text, source, problems);
                Limit::Column(text.clone())
            }
        },
        other => {
            problems.error(key, format!("expected a number or a column name, found {other}"));
            return None;
        }
    };
    Some(limit)
}

/// Parses `a - b + 3` into signed terms. A column name that is not a plain
/// identifier is written in double quotes.
pub fn parse_value_expression(text: &str) -> Result<ValueExpression, String> {
    let mut terms = Vec::new();
    let mut sign = Sign::Plus;
    let mut expect_term = true;
    let mut chars = text.chars().peekable();

    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if !expect_term {
            sign = match c {
                '+' => Sign::Plus,
                '-' => Sign::Minus,
                _ => return Err(format!("expected + or - before {c:?} in {text:?}")),
            };
            chars.next();
            expect_term = true;
            continue;
        }

        let term = if c == '"' {
            chars.next();
            let mut name = String::new();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        name.push('"');
                    }
                    Some('"') => break,
                    Some(other) => name.push(other),
                    None => return Err(format!("unclosed quote in {text:?}")),
                }
            }
            Term::Column(name)
        } else {
            let mut word = String::new();
            while let Some(&next) = chars.peek() {
                if next.is_alphanumeric() || next == '_' || next == '.' || next == '$' {
                    word.push(next);
                    chars.next();
                } else {
                    break;
                }
            }
            if word.is_empty() {
                return Err(format!("expected a column name or a number at {c:?} in {text:?}"));
            }
            match Decimal::from_str(&word) {
                Ok(number) => Term::Number(number),
                Err(_) if word.chars().next().is_some_and(|first| first.is_ascii_digit()) => {
                    return Err(format!("invalid number {word:?} in {text:?}"));
                }
                Err(_) => Term::Column(word),
            }
        };
        terms.push((sign, term));
        expect_term = false;
    }

    if terms.is_empty() || expect_term {
        return Err(format!(
            "incomplete value {text:?}; write a column, or columns joined by + and -"
        ));
    }
    Ok(ValueExpression {
        text: text.to_string(),
        terms,
    })
}

fn validate_transition(key: &str, raw: &RawRule, source: &Source, problems: &mut Problems) -> Option<Transition> {
    let Some(column) = &raw.column else {
        problems.error(
            format!("{key}.column"),
            "missing: name the column whose value changes, such as \"state\"",
        );
        return None;
    };
    require_column(&format!("{key}.column"), column, source, problems);
    let from = match_values(&format!("{key}.from"), raw.from.as_deref().unwrap_or(&[]), problems);
    let to = match_values(&format!("{key}.to"), raw.to.as_deref().unwrap_or(&[]), problems);
    Some(Transition {
        column: column.clone(),
        from,
        to,
    })
}

fn validate_shift(key: &str, raw: &RawRule, source: &Source, problems: &mut Problems) -> Option<Shift> {
    let Some(column) = &raw.column else {
        problems.error(
            format!("{key}.column"),
            "missing: name the date or timestamp column, such as \"promised_at\"",
        );
        return None;
    };
    require_column(&format!("{key}.column"), column, source, problems);

    let direction = match raw.direction.as_deref() {
        Some("later") => ShiftDirection::Later,
        Some("earlier") => ShiftDirection::Earlier,
        Some("either") => ShiftDirection::Either,
        other => {
            problems.error(
                format!("{key}.direction"),
                format!("expected \"later\", \"earlier\" or \"either\", found {other:?}"),
            );
            return None;
        }
    };
    let min = match &raw.min {
        None => Duration::ZERO,
        Some(text) => match parse_duration(text) {
            Some(duration) => duration,
            None => {
                problems.error(
                    format!("{key}.min"),
                    format!("invalid duration {text:?}; write it as \"30m\", \"1h\" or \"1d\""),
                );
                return None;
            }
        },
    };
    Some(Shift {
        column: column.clone(),
        direction,
        min,
    })
}

fn validate_change(key: &str, raw: &RawRule, source: &Source, problems: &mut Problems) -> Option<Change> {
    let columns = raw.columns.clone().unwrap_or_default();
    for column in &columns {
        require_column(&format!("{key}.columns"), column, source, problems);
    }
    Some(Change { columns })
}

fn validate_filter(
    key: &str,
    raw: Option<&BTreeMap<String, toml::Value>>,
    source: &Source,
    problems: &mut Problems,
) -> BTreeMap<String, Vec<MatchValue>> {
    let mut filter = BTreeMap::new();
    for (column, value) in raw.into_iter().flatten() {
        let entry_key = format!("{key}.{column}");
        require_column(&entry_key, column, source, problems);
        let values = match value {
            toml::Value::Array(items) => match_values(&entry_key, items, problems),
            single => match_values(&entry_key, std::slice::from_ref(single), problems),
        };
        filter.insert(column.clone(), values);
    }
    filter
}

fn match_values(key: &str, values: &[toml::Value], problems: &mut Problems) -> Vec<MatchValue> {
    let mut output = Vec::new();
    for value in values {
        match value {
            toml::Value::String(text) => output.push(MatchValue(text.clone())),
            toml::Value::Integer(number) => output.push(MatchValue(number.to_string())),
            toml::Value::Float(number) => output.push(MatchValue(number.to_string())),
            toml::Value::Boolean(flag) => output.push(MatchValue(flag.to_string())),
            other => problems.error(key, format!("expected strings, numbers or booleans, found {other}")),
        }
    }
    output
}

fn validate_endpoint(
    index: usize,
    raw: &RawEndpoint,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<Endpoint> {
    let key = format!("endpoint[{index}] \"{}\"", raw.name);
    let error_count = problems.errors.len();

    if !valid_name(&raw.name) {
        problems.error(
            format!("{key}.name"),
            format!("invalid name {:?}: {NAME_HINT}", raw.name),
        );
    }

    let url_text = expand_or_report(&raw.url, &format!("{key}.url"), lookup, problems);
    let url = match reqwest::Url::parse(&url_text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Some(url),
        Ok(_) => {
            problems.error(
                format!("{key}.url"),
                format!("{url_text:?} is not an http:// or https:// URL with a host"),
            );
            None
        }
        Err(error) if !url_text.is_empty() => {
            problems.error(format!("{key}.url"), format!("invalid URL {url_text:?}: {error}"));
            None
        }
        Err(_) => None,
    };

    let secret_text = expand_or_report(&raw.secret, &format!("{key}.secret"), lookup, problems);
    let secret = if secret_text.is_empty() && problems.errors.len() > error_count {
        None
    } else {
        parse_secret(&format!("{key}.secret"), &secret_text, problems)
    };

    if raw.events.is_empty() {
        problems.error(
            format!("{key}.events"),
            "empty: list the event types this endpoint takes, or [\"*\"] for all",
        );
    }
    for pattern in &raw.events {
        let literal = pattern.replace('*', "x");
        check_event_name(&format!("{key}.events"), &literal, problems);
    }

    let mut headers = Vec::new();
    for (name, value) in &raw.headers {
        let header_key = format!("{key}.headers.{name}");
        let value = expand_or_report(value, &header_key, lookup, problems);
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.error(&header_key, format!("{name:?} is not a valid HTTP header name"));
        } else if reqwest::header::HeaderValue::from_str(&value).is_err() {
            problems.error(
                &header_key,
                "the value contains characters that an HTTP header cannot carry",
            );
        }
        let lowered = name.to_ascii_lowercase();
        if lowered.starts_with("webhook-") || lowered == "content-type" {
            problems.error(&header_key, format!("{name:?} is set by gancho itself; remove it"));
        }
        headers.push((name.clone(), value));
    }

    let timeout = duration_or_default(
        &format!("{key}.timeout"),
        raw.timeout.as_deref(),
        Duration::from_secs(10),
        problems,
    );
    let max_in_flight = match raw.max_in_flight {
        None => 8,
        Some(count) if (1..=1024).contains(&count) => count as usize,
        Some(count) => {
            problems.error(
                format!("{key}.max_in_flight"),
                format!("{count} is out of range; use 1 to 1024"),
            );
            1
        }
    };

    let retry_schedule = match &raw.retry_schedule {
        None => DEFAULT_RETRY_SCHEDULE.to_vec(),
        Some(items) => {
            let mut schedule = Vec::new();
            for (position, item) in items.iter().enumerate() {
                match parse_duration(item) {
                    Some(delay) => schedule.push(delay),
                    None => problems.error(
                        format!("{key}.retry_schedule[{position}]"),
                        format!("invalid duration {item:?}; write it as \"5s\", \"1m\" or \"1h\""),
                    ),
                }
            }
            schedule
        }
    };

    let breaker_threshold = match raw.breaker_threshold {
        None => 5,
        Some(count) if (1..=1000).contains(&count) => count as u32,
        Some(count) => {
            problems.error(
                format!("{key}.breaker_threshold"),
                format!("{count} is out of range; use 1 to 1000"),
            );
            5
        }
    };
    let disable_after = duration_or_default(
        &format!("{key}.disable_after"),
        raw.disable_after.as_deref(),
        Duration::from_secs(5 * 86_400),
        problems,
    );

    if problems.errors.len() > error_count {
        return None;
    }
    Some(Endpoint {
        name: raw.name.clone(),
        url: url?,
        secret: secret?,
        events: raw.events.clone(),
        headers,
        timeout,
        max_in_flight,
        retry_schedule,
        ordered: raw.ordered.unwrap_or(true),
        breaker_threshold,
        disable_after,
    })
}

/// Decodes a `whsec_<base64>` secret. The Standard Webhooks specification recommends
/// keys of 24 to 64 bytes.
pub fn decode_secret(text: &str) -> Result<Vec<u8>, String> {
    const FIX: &str = "generate one with `gancho secret`";
    let Some(encoded) = text.strip_prefix(Secret::PREFIX) else {
        return Err(format!("a secret must start with \"whsec_\" followed by base64; {FIX}"));
    };
    match base64::engine::general_purpose::STANDARD.decode(encoded) {
        Ok(bytes) if (24..=64).contains(&bytes.len()) => Ok(bytes),
        Ok(bytes) => Err(format!(
            "the secret's key is {} bytes; use 24 to 64 bytes ({FIX})",
            bytes.len()
        )),
        Err(_) => Err(format!("the part after \"whsec_\" is not valid base64; {FIX}")),
    }
}

fn parse_secret(key: &str, text: &str, problems: &mut Problems) -> Option<Secret> {
    match decode_secret(text) {
        Ok(bytes) => Some(Secret::from_key(bytes)),
        Err(message) => {
            problems.error(key, message);
            None
        }
    }
}

fn duration_or_default(key: &str, text: Option<&str>, default: Duration, problems: &mut Problems) -> Duration {
    let Some(text) = text else {
        return default;
    };
    match parse_duration(text) {
        Some(duration) if !duration.is_zero() => duration,
        _ => {
            problems.error(
                key,
                format!("invalid duration {text:?}; write it as \"500ms\", \"5s\" or \"1m\""),
            );
            default
        }
    }
}

fn validate_sidecar(raw: &RawSidecar, problems: &mut Problems) -> SidecarSettings {
    let defaults = SidecarSettings::default();
    let batch_size = match raw.batch_size {
        None => defaults.batch_size,
        Some(size) if (1..=10_000).contains(&size) => size,
        Some(size) => {
            problems.error("sidecar.batch_size", format!("{size} is out of range; use 1 to 10000"));
            defaults.batch_size
        }
    };
    let pool_size = match raw.pool_size {
        None => defaults.pool_size,
        Some(size) if (2..=64).contains(&size) => size as usize,
        Some(size) => {
            problems.error("sidecar.pool_size", format!("{size} is out of range; use 2 to 64"));
            defaults.pool_size
        }
    };
    SidecarSettings {
        poll_interval: duration_or_default(
            "sidecar.poll_interval",
            raw.poll_interval.as_deref(),
            defaults.poll_interval,
            problems,
        ),
        batch_size,
        lease: duration_or_default("sidecar.lease", raw.lease.as_deref(), defaults.lease, problems),
        shutdown_timeout: duration_or_default(
            "sidecar.shutdown_timeout",
            raw.shutdown_timeout.as_deref(),
            defaults.shutdown_timeout,
            problems,
        ),
        retention: duration_or_default(
            "sidecar.retention",
            raw.retention.as_deref(),
            defaults.retention,
            problems,
        ),
        liveness_interval: duration_or_default(
            "sidecar.liveness_interval",
            raw.liveness_interval.as_deref(),
            defaults.liveness_interval,
            problems,
        ),
        enrich_timeout: duration_or_default(
            "sidecar.enrich_timeout",
            raw.enrich_timeout.as_deref(),
            defaults.enrich_timeout,
            problems,
        ),
        pool_size,
    }
}

/// Warns about rules whose events no endpoint takes and endpoints that no rule feeds.
fn warn_about_routing(rules: &[Rule], endpoints: &[Endpoint], problems: &mut Problems) {
    let mut event_types: Vec<(&str, &str)> = Vec::new();
    for rule in rules {
        event_types.push((rule.name.as_str(), rule.event.as_str()));
        if let RuleKind::Threshold(Threshold {
            recovered_event: Some(recovered),
            ..
        }) = &rule.kind
        {
            event_types.push((rule.name.as_str(), recovered.as_str()));
        }
    }
    for (rule, event_type) in &event_types {
        if !endpoints.iter().any(|endpoint| endpoint.accepts(event_type)) {
            problems.warn(
                format!("rule \"{rule}\""),
                format!("no endpoint takes events of type {event_type:?}, so they are recorded but never sent"),
            );
        }
    }
    for endpoint in endpoints {
        if !event_types.iter().any(|(_, event_type)| endpoint.accepts(event_type)) {
            problems.warn(
                format!("endpoint \"{}\".events", endpoint.name),
                "no rule emits an event that matches these patterns",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_follow_sql_rules() {
        assert_eq!(
            parse_table_name("public.spree_orders").unwrap(),
            ("public".into(), "spree_orders".into())
        );
        assert_eq!(
            parse_table_name("Spree_Orders").unwrap(),
            ("public".into(), "spree_orders".into())
        );
        assert_eq!(
            parse_table_name("\"Shop\".\"order\"").unwrap(),
            ("Shop".into(), "order".into())
        );
        assert_eq!(parse_table_name("shop.\"a.b\"").unwrap(), ("shop".into(), "a.b".into()));
        assert!(parse_table_name("db.shop.orders").is_err());
        assert!(parse_table_name("shop.").is_err());
        assert!(parse_table_name("my table").is_err());
    }

    #[test]
    fn value_expressions_parse_terms() {
        let expression = parse_value_expression("quantity - quantity_allocated + 2").unwrap();
        assert_eq!(
            expression.terms,
            vec![
                (Sign::Plus, Term::Column("quantity".into())),
                (Sign::Minus, Term::Column("quantity_allocated".into())),
                (Sign::Plus, Term::Number(Decimal::from(2))),
            ]
        );
        let quoted = parse_value_expression("\"On Hand\"-reserved").unwrap();
        assert_eq!(quoted.columns().collect::<Vec<_>>(), vec!["On Hand", "reserved"]);
        assert!(parse_value_expression("a -").is_err());
        assert!(parse_value_expression("a b").is_err());
        assert!(parse_value_expression("").is_err());
        assert!(parse_value_expression("a * b").is_err());
    }
}
