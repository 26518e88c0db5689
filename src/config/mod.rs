//! The config file, validated once at start-up into one typed [`Config`].
//!
//! Loading collects every problem instead of stopping at the first, and each
//! [`Problem`] names its key (`rule[2] "overstock".above`) and what to do.

mod duration;
mod env;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use duration::{format_duration, parse_duration};
pub use env::expand;

/// Names that an enrichment may not take because the payload's `data` uses them.
pub const RESERVED_DATA_FIELDS: &[&str] = &[
    "rule",
    "source",
    "table",
    "operation",
    "key",
    "old",
    "new",
    "changed_at",
    "change_id",
    "value",
    "limit",
    "from",
    "to",
    "shift_seconds",
    "errors",
];

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub sources: Vec<Source>,
    pub rules: Vec<Rule>,
    pub endpoints: Vec<Endpoint>,
    pub sidecar: SidecarSettings,
    /// Legal but doubtful settings, printed by `gancho check` and logged at start.
    pub warnings: Vec<Problem>,
}

/// A watched table and the columns captured from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub schema: String,
    pub table: String,
    pub key: Vec<String>,
    pub columns: Vec<String>,
    /// The event type emitted when the table is truncated.
    pub truncate_event: String,
    /// Whether the triggers also fire under `session_replication_role = replica`
    /// (`ENABLE ALWAYS TRIGGER`), as restores and replication tools set it.
    pub fire_in_replica_mode: bool,
}

impl Source {
    /// The table as SQL writes it, schema-qualified and quoted.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", quote_identifier(&self.schema), quote_identifier(&self.table))
    }

    /// The table as the payload's `table` field names it: `schema.table`, unquoted.
    pub fn table_label(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Whether a column is captured, as a key column or a captured column.
    pub fn has_column(&self, column: &str) -> bool {
        self.key.iter().chain(&self.columns).any(|name| name == column)
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub source: String,
    pub event: String,
    pub kind: RuleKind,
    pub filter: RowFilter,
    pub enrich: Vec<Enrichment>,
}

#[derive(Debug, Clone)]
pub enum RuleKind {
    Threshold(Threshold),
    Transition(Transition),
    Shift(Shift),
    Change(Change),
}

impl RuleKind {
    pub fn name(&self) -> &'static str {
        match self {
            RuleKind::Threshold(_) => "threshold",
            RuleKind::Transition(_) => "transition",
            RuleKind::Shift(_) => "shift",
            RuleKind::Change(_) => "change",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Threshold {
    pub value: ValueExpression,
    pub direction: ThresholdDirection,
    pub limit: Limit,
    /// The level the value must reach again before the rule can fire again.
    pub rearm: Option<Limit>,
    pub recovered_event: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdDirection {
    Below,
    Above,
}

/// A threshold limit: a fixed number or another column of the same row.
#[derive(Debug, Clone, PartialEq)]
pub enum Limit {
    Number(rust_decimal::Decimal),
    Column(String),
}

/// A sum of signed terms, each a column or a number: `quantity - quantity_allocated`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueExpression {
    pub text: String,
    pub terms: Vec<(Sign, Term)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    Plus,
    Minus,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Column(String),
    Number(rust_decimal::Decimal),
}

impl ValueExpression {
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().filter_map(|(_, term)| match term {
            Term::Column(name) => Some(name.as_str()),
            Term::Number(_) => None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Transition {
    pub column: String,
    /// Values the column must leave; empty means any value, including no row.
    pub from: Vec<MatchValue>,
    /// Values the column must reach; empty means any value, including no row.
    pub to: Vec<MatchValue>,
}

#[derive(Debug, Clone)]
pub struct Shift {
    pub column: String,
    pub direction: ShiftDirection,
    pub min: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShiftDirection {
    Later,
    Earlier,
    Either,
}

#[derive(Debug, Clone)]
pub struct Change {
    /// The columns whose change counts; empty means every captured column.
    pub columns: Vec<String>,
}

/// A scalar from the config, compared with a row's JSON value by its text:
/// "complete" matches the string "complete", 3 matches the number 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchValue(pub String);

/// `where` and `where_not`: the row must match every `where` entry and no
/// `where_not` entry. Each entry lists the values that match.
#[derive(Debug, Clone, Default)]
pub struct RowFilter {
    pub only: BTreeMap<String, Vec<MatchValue>>,
    pub except: BTreeMap<String, Vec<MatchValue>>,
}

#[derive(Debug, Clone)]
pub struct Enrichment {
    pub name: String,
    pub sql: String,
    pub params: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub url: reqwest::Url,
    pub secret: Secret,
    pub events: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    /// The delay before each retry; a delivery gets `retry_schedule.len() + 1` attempts.
    pub retry_schedule: Vec<Duration>,
    /// Whether deliveries of one source row reach this endpoint one at a time, in commit order.
    pub ordered: bool,
    /// Consecutive failed attempts after which the endpoint as a whole is paused.
    pub breaker_threshold: u32,
    /// How long an endpoint may fail without a success before it is disabled.
    pub disable_after: Duration,
}

impl Endpoint {
    /// Whether this endpoint takes events of this type.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.events.iter().any(|pattern| glob_match(pattern, event_type))
    }
}

/// A signing secret. `Debug` and `Display` print a mask, so a secret never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl Secret {
    pub const PREFIX: &'static str = "whsec_";

    pub fn from_key(key: Vec<u8>) -> Secret {
        Secret { key }
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("whsec_********")
    }
}

#[derive(Debug, Clone)]
pub struct SidecarSettings {
    /// How often the outbox and the due deliveries are scanned without a notification.
    pub poll_interval: Duration,
    /// Outbox rows processed in one transaction.
    pub batch_size: i64,
    /// How long a claimed delivery stays reserved for the sidecar that claimed it.
    pub lease: Duration,
    /// How long requests in flight may take to finish after SIGTERM or SIGINT.
    pub shutdown_timeout: Duration,
    pub enrich_timeout: Duration,
    pub pool_size: usize,
    /// How long processed changes and fully delivered events are kept.
    pub retention: Duration,
    /// How often the LISTEN connection is checked with a query.
    pub liveness_interval: Duration,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        SidecarSettings {
            poll_interval: Duration::from_secs(2),
            batch_size: 500,
            lease: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            enrich_timeout: Duration::from_secs(5),
            pool_size: 4,
            retention: Duration::from_secs(7 * 86_400),
            liveness_interval: Duration::from_secs(30),
        }
    }
}

/// One problem in the config: the key it concerns and a message with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no config file given: pass --config FILE or set GANCHO_CONFIG")]
    NoPath,
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML or has an unknown key")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), format_problems(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads, substitutes and validates a config file, taking `${VAR}` from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Reads a config for what the capture SQL needs (sources) and validates
    /// its rules, but not the database URL or the endpoints.
    pub fn load_for_capture(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: raw::RawConfig = toml::from_str(&text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        validate::validate(raw, &|name| std::env::var(name).ok(), true).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Validates config text. `path` is only used in messages; `lookup` supplies
    /// the environment variables.
    pub fn parse(text: &str, path: &Path, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        validate::validate(raw, lookup, false).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|source| source.name == name)
    }

    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|endpoint| endpoint.name == name)
    }
}

/// Matches an event type against a pattern in which `*` stands for any run of
/// characters, dots included: `inventory.*` matches `inventory.low_stock`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };

    let mut pieces: Vec<&str> = rest.split('*').collect();
    let last = pieces.pop().unwrap_or("");
    for piece in pieces {
        match remaining.find(piece) {
            Some(position) => remaining = &remaining[position + piece.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

/// Quotes an SQL identifier when it needs quotes.
pub fn quote_identifier(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !is_reserved_word(name);
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// A short list of words that Postgres reserves and shops use as table or
/// column names. Quoting any other identifier is harmless, so the list need
/// not be complete for correctness, only for readable output.
fn is_reserved_word(name: &str) -> bool {
    const RESERVED: &[&str] = &[
        "all",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "case",
        "cast",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "default",
        "desc",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "false",
        "fetch",
        "for",
        "foreign",
        "from",
        "grant",
        "group",
        "having",
        "in",
        "into",
        "intersect",
        "leading",
        "limit",
        "not",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "primary",
        "references",
        "select",
        "table",
        "then",
        "to",
        "true",
        "union",
        "unique",
        "user",
        "using",
        "when",
        "where",
        "window",
        "with",
    ];
    RESERVED.contains(&name)
}

/// Decodes the key of a `whsec_<base64>` secret, as the config accepts it.
pub fn parse_secret_text(text: &str) -> Result<Vec<u8>, String> {
    validate::decode_secret(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_wildcards() {
        assert!(glob_match("*", "order.completed"));
        assert!(glob_match("inventory.*", "inventory.low_stock"));
        assert!(!glob_match("inventory.*", "order.completed"));
        assert!(glob_match("order.completed", "order.completed"));
        assert!(!glob_match("order.completed", "order.completed.x"));
        assert!(glob_match("*.delayed", "shipment.delayed"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn identifiers_are_quoted_when_needed() {
        assert_eq!(quote_identifier("spree_orders"), "spree_orders");
        assert_eq!(quote_identifier("order"), "\"order\"");
        assert_eq!(quote_identifier("Shop"), "\"Shop\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_identifier("1x"), "\"1x\"");
    }

    #[test]
    fn secret_debug_is_masked() {
        let secret = Secret::from_key(b"abcdefghijklmnopqrstuvwx".to_vec());
        assert_eq!(format!("{secret:?}"), "whsec_********");
    }
}
