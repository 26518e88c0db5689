//! The webhook receiver: a minimal HTTP/1.1 server (hyper, keep-alive) on
//! 127.0.0.1 with one path per endpoint, `/e0`, `/e1`, and so on.
//!
//! For each request it verifies the Standard Webhooks signature itself, with
//! no code shared with gancho's signer, records the arrival time, the
//! `seq` value of the changed row and a hash of the `webhook-id`, and responds
//! 200 with an empty body. One endpoint can be made slow: it responds only
//! after a fixed delay.

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;

type HmacSha256 = hmac::Hmac<Sha256>;

/// One request that carried a `seq` value.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Instant,
    pub seq: i64,
    /// A hash of the `webhook-id` header, to tell a redelivery from a new webhook.
    pub webhook_id: u64,
    pub verified: bool,
}

/// The requests that one endpoint path received since the last reset.
pub struct EndpointLog {
    key: Vec<u8>,
    delay: Option<Duration>,
    arrivals: Mutex<Vec<Arrival>>,
    received: AtomicU64,
    without_seq: AtomicU64,
}

impl EndpointLog {
    /// Requests received so far, verified or not.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Requests whose body had no `seq` value (neither `data.new.seq` nor `seq`).
    pub fn without_seq(&self) -> u64 {
        self.without_seq.load(Ordering::Relaxed)
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrival log lock").clone()
    }
}

/// The request counts of some endpoints at one moment, to count what
/// arrives after it.
#[derive(Clone)]
pub struct ArrivalMark {
    endpoints: Vec<Arc<EndpointLog>>,
    counts: Vec<u64>,
}

impl ArrivalMark {
    pub fn new(endpoints: &[Arc<EndpointLog>]) -> ArrivalMark {
        ArrivalMark {
            endpoints: endpoints.to_vec(),
            counts: endpoints.iter().map(|endpoint| endpoint.received()).collect(),
        }
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Requests received since the mark, per endpoint.
    pub fn received_since(&self) -> Vec<u64> {
        self.endpoints
            .iter()
            .zip(&self.counts)
            .map(|(endpoint, count)| endpoint.received() - count)
            .collect()
    }
}

/// The configuration of one endpoint path for the next run.
pub struct EndpointSpec {
    /// The HMAC key: the base64-decoded part of the `whsec_` secret.
    pub key: Vec<u8>,
    /// Respond only after this long, as a slow receiver does.
    pub delay: Option<Duration>,
}

struct State {
    endpoints: RwLock<Vec<Arc<EndpointLog>>>,
    unknown_paths: AtomicU64,
}

pub struct Receiver {
    address: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(State {
            endpoints: RwLock::new(Vec::new()),
            unknown_paths: AtomicU64::new(0),
        });
        let server_state = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Usually too many open files; a short pause lets
                        // connections close instead of spinning on the error.
                        eprintln!("receiver: accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let connection_state = Arc::clone(&server_state);
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(Arc::clone(&connection_state), request));
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Receiver { address, state, server })
    }

    /// Returns the URL of endpoint number `index`.
    pub fn url(&self, index: usize) -> String {
        format!("http://{}/e{index}", self.address)
    }

    /// Replaces the endpoint paths with fresh, empty logs. Requests still in
    /// flight from an earlier run land in the old logs, which no scenario reads.
    pub fn reset(&self, specs: Vec<EndpointSpec>) -> Vec<Arc<EndpointLog>> {
        let logs: Vec<Arc<EndpointLog>> = specs
            .into_iter()
            .map(|spec| {
                Arc::new(EndpointLog {
                    key: spec.key,
                    delay: spec.delay,
                    arrivals: Mutex::new(Vec::new()),
                    received: AtomicU64::new(0),
                    without_seq: AtomicU64::new(0),
                })
            })
            .collect();
        *self.state.endpoints.write().expect("endpoint table lock") = logs.clone();
        self.state.unknown_paths.store(0, Ordering::Relaxed);
        logs
    }

    /// Requests to a path that is not a current endpoint, since the last reset.
    pub fn unknown_paths(&self) -> u64 {
        self.state.unknown_paths.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The parts of a body that the receiver reads: `data.new.seq` in gancho's
/// payload, or `seq` at the top level in the naive baseline's row JSON.
#[derive(Deserialize)]
struct Body {
    seq: Option<i64>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    new: Option<Row>,
}

#[derive(Deserialize)]
struct Row {
    seq: Option<i64>,
}

fn empty_response(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    response
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
    let endpoint = request
        .uri()
        .path()
        .strip_prefix("/e")
        .and_then(|index| index.parse::<usize>().ok())
        .and_then(|index| state.endpoints.read().expect("endpoint table lock").get(index).cloned());
    let Some(endpoint) = endpoint else {
        state.unknown_paths.fetch_add(1, Ordering::Relaxed);
        return Ok(empty_response(StatusCode::NOT_FOUND));
    };

    let header = |name: &str| request.headers().get(name).map(|value| value.as_bytes().to_vec());
    let webhook_id = header("webhook-id").unwrap_or_default();
    let timestamp = header("webhook-timestamp").unwrap_or_default();
    let signature = header("webhook-signature").unwrap_or_default();
    // A request cut off mid-body (its sender was stopped) is not a delivery.
    let Ok(collected) = request.into_body().collect().await else {
        return Ok(empty_response(StatusCode::BAD_REQUEST));
    };
    let body = collected.to_bytes();
    let at = Instant::now();

    let verified = verify(&endpoint.key, &webhook_id, &timestamp, &body, &signature);
    let seq = serde_json::from_slice::<Body>(&body)
        .ok()
        .and_then(|body| body.seq.or_else(|| body.data?.new?.seq));
    match seq {
        Some(seq) => {
            let mut hasher = DefaultHasher::new();
            webhook_id.hash(&mut hasher);
            let arrival = Arrival {
                at,
                seq,
                webhook_id: hasher.finish(),
                verified,
            };
            endpoint.arrivals.lock().expect("arrival log lock").push(arrival);
        }
        None => {
            endpoint.without_seq.fetch_add(1, Ordering::Relaxed);
        }
    }
    endpoint.received.fetch_add(1, Ordering::Relaxed);

    if let Some(delay) = endpoint.delay {
        tokio::time::sleep(delay).await;
    }
    Ok(empty_response(StatusCode::OK))
}

/// Verifies a Standard Webhooks signature: `webhook-signature` lists
/// space-separated `v1,<base64>` entries, one of which must be the HMAC-SHA256
/// of `{webhook-id}.{webhook-timestamp}.{body}`. Compares in constant time.
fn verify(key: &[u8], webhook_id: &[u8], timestamp: &[u8], body: &[u8], header: &[u8]) -> bool {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    mac.update(webhook_id);
    mac.update(b".");
    mac.update(timestamp);
    mac.update(b".");
    mac.update(body);
    let Ok(header) = std::str::from_utf8(header) else {
        return false;
    };
    header
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .any(
            |encoded| match base64::engine::general_purpose::STANDARD.decode(encoded) {
                Ok(expected) => mac.clone().verify_slice(&expected).is_ok(),
                Err(_) => false,
            },
        )
}

/// Signs like a Standard Webhooks sender, for the naive baseline's listener.
pub fn sign(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(format!("{webhook_id}.{timestamp}.").as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// Decodes a `whsec_<base64>` secret into its HMAC key.
pub fn secret_key(secret: &str) -> anyhow::Result<Vec<u8>> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| anyhow::anyhow!("the secret does not start with whsec_"))?;
    Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn verify_accepts_specification_vector() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let header = b"v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(verify(
            &key,
            b"msg_p5jXN8AQM9LWM0D4loKWxJek",
            b"1614265330",
            body,
            header
        ));
        assert!(!verify(
            &key,
            b"msg_p5jXN8AQM9LWM0D4loKWxJek",
            b"1614265331",
            body,
            header
        ));
    }

    #[test]
    fn sign_matches_verify() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = sign(&key, "msg_1", 1700000000, b"{}");
        assert!(verify(&key, b"msg_1", b"1700000000", b"{}", signature.as_bytes()));
    }
}
