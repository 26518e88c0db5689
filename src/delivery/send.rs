//! One HTTP attempt: build the envelope, sign it, POST it, and read the response.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use super::sign::sign;
use crate::config::Endpoint;

/// At most this much of a response body is read; the rest is dropped unread.
pub const MAX_RESPONSE_READ: usize = 64 * 1024;
/// At most this much of a response body is stored with the attempt.
pub const MAX_RESPONSE_STORED: usize = 1024;

/// A delivery claimed for sending.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub webhook_id: String,
    /// The number of this attempt, starting at 1.
    pub attempt: i32,
    pub event_id: i64,
    pub event_type: String,
    /// Shared by the deliveries of one event that were handed over together.
    pub data: Arc<Value>,
    pub occurred_at: DateTime<Utc>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: String,
    data: &'a Value,
}

/// The result of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub started_at: DateTime<Utc>,
    pub latency: Duration,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_body: Option<String>,
    /// The receiver's Retry-After, read on 429 and 503 responses only.
    pub retry_after: Option<Duration>,
}

impl AttemptResult {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.status_code.is_some_and(|code| (200..300).contains(&code))
    }
}

/// Builds the HTTP client of one endpoint. Each endpoint has its own, so its
/// keep-alive connections and timeout are its own. Redirects are never
/// followed: a webhook that lands somewhere else than configured is a failure.
pub fn http_client(endpoint: &Endpoint) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(endpoint.timeout)
        .connect_timeout(endpoint.timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("gancho/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(endpoint.max_in_flight)
        .build()
        .expect("the HTTP client settings are static and valid")
}

/// The exact bytes POSTed for a delivery. They are the same on every attempt;
/// only the timestamp and signature headers change.
pub fn envelope_body(delivery: &ClaimedDelivery) -> Vec<u8> {
    let envelope = Envelope {
        event_type: &delivery.event_type,
        timestamp: delivery.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        data: &delivery.data,
    };
    serde_json::to_vec(&envelope).expect("a JSON value always serialises")
}

pub async fn send(client: &reqwest::Client, endpoint: &Endpoint, delivery: &ClaimedDelivery) -> AttemptResult {
    let body = envelope_body(delivery);
    let started_at = Utc::now();
    let timestamp = started_at.timestamp();
    let signature = sign(&endpoint.secret, &delivery.webhook_id, timestamp, &body);

    let mut request = client
        .post(endpoint.url.clone())
        .header("content-type", "application/json")
        .header("webhook-id", &delivery.webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature);
    for (name, value) in &endpoint.headers {
        request = request.header(name, value);
    }

    let clock = Instant::now();
    let outcome = match request.body(body).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = match status {
                429 | 503 => response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| parse_retry_after(value, Utc::now())),
                _ => None,
            };
            let (response_body, read_error) = read_limited(response).await;
            AttemptResult {
                started_at,
                latency: Duration::ZERO,
                status_code: Some(status),
                error: read_error.or_else(|| (!(200..300).contains(&status)).then(|| format!("HTTP status {status}"))),
                response_body: Some(response_body),
                retry_after,
            }
        }
        Err(error) => AttemptResult {
            started_at,
            latency: Duration::ZERO,
            status_code: None,
            error: Some(describe_error(&error, endpoint.timeout)),
            response_body: None,
            retry_after: None,
        },
    };
    AttemptResult {
        latency: clock.elapsed(),
        ..outcome
    }
}

/// Reads a Retry-After value: a number of seconds, or an HTTP date. A date in
/// the past means no wait.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    Some((date - now).to_std().unwrap_or(Duration::ZERO))
}

/// Reads at most [`MAX_RESPONSE_READ`] bytes and keeps the first
/// [`MAX_RESPONSE_STORED`], cut at a character boundary.
async fn read_limited(mut response: reqwest::Response) -> (String, Option<String>) {
    let mut collected = Vec::new();
    let mut error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                collected.extend_from_slice(&chunk);
                if collected.len() >= MAX_RESPONSE_READ {
                    break;
                }
            }
            Ok(None) => break,
            Err(read_error) => {
                error = Some(format!("reading the response body failed: {read_error}"));
                break;
            }
        }
    }
    collected.truncate(MAX_RESPONSE_STORED);
    let mut text = String::from_utf8_lossy(&collected).into_owned();
    if text.len() > MAX_RESPONSE_STORED {
        let mut cut = MAX_RESPONSE_STORED;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    (text, error)
}

fn describe_error(error: &reqwest::Error, timeout: Duration) -> String {
    let mut message = if error.is_timeout() {
        format!("timed out after {}", crate::config::format_duration(timeout))
    } else if error.is_connect() {
        "connection failed".to_string()
    } else if error.is_redirect() {
        "redirect not followed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Fri, 04 Dec 2026 10:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Fri, 04 Dec 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
