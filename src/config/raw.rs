//! The config file as TOML writes it, before validation. Every struct rejects
//! unknown keys, so a misspelt key is an error instead of a silent default.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub database_url: Option<String>,
    #[serde(default, rename = "source")]
    pub sources: Vec<RawSource>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub sidecar: RawSidecar,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: String,
    pub table: String,
    pub key: Vec<String>,
    #[serde(default)]
    pub columns: Vec<String>,
    pub truncate_event: Option<String>,
    #[serde(default)]
    pub fire_in_replica_mode: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub source: String,
    pub kind: String,
    pub event: String,
    // threshold
    pub value: Option<String>,
    pub below: Option<toml::Value>,
    pub above: Option<toml::Value>,
    pub rearm: Option<toml::Value>,
    pub recovered_event: Option<String>,
    // transition and shift
    pub column: Option<String>,
    pub from: Option<Vec<toml::Value>>,
    pub to: Option<Vec<toml::Value>>,
    // shift
    pub direction: Option<String>,
    pub min: Option<String>,
    // change
    pub columns: Option<Vec<String>>,
    // every kind
    #[serde(rename = "where")]
    pub where_: Option<BTreeMap<String, toml::Value>>,
    pub where_not: Option<BTreeMap<String, toml::Value>>,
    #[serde(default)]
    pub enrich: Vec<RawEnrich>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnrich {
    pub name: String,
    pub sql: String,
    #[serde(default)]
    pub params: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub name: String,
    pub url: String,
    pub secret: String,
    pub events: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub timeout: Option<String>,
    pub max_in_flight: Option<i64>,
    pub retry_schedule: Option<Vec<String>>,
    pub ordered: Option<bool>,
    pub breaker_threshold: Option<i64>,
    pub disable_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSidecar {
    pub poll_interval: Option<String>,
    pub batch_size: Option<i64>,
    pub lease: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub enrich_timeout: Option<String>,
    pub pool_size: Option<i64>,
    pub retention: Option<String>,
    pub liveness_interval: Option<String>,
}
