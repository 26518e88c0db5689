//! A webhook receiver on 127.0.0.1 that records every request and checks its
//! signature, for `gancho demo` and the integration tests.
//!
//! Its response can be changed while it runs: a status code, a delay before
//! answering (to play a slow or hanging receiver), or a fixed number of
//! failures before it starts to accept.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::config::Secret;
use crate::delivery::sign::verify;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub path: String,
    pub webhook_id: String,
    pub timestamp: String,
    pub signature: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The parsed body, or null when it was not JSON.
    pub payload: Value,
    /// Whether the signature verified with the receiver's secret.
    pub verified: bool,
    /// The status code the receiver responded with.
    pub answered: u16,
    pub arrived: Instant,
}

impl ReceivedWebhook {
    pub fn event_type(&self) -> &str {
        self.payload.get("type").and_then(Value::as_str).unwrap_or("")
    }

    pub fn data(&self) -> &Value {
        self.payload.get("data").unwrap_or(&Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

type ReceiveCallback = Box<dyn Fn(&ReceivedWebhook) + Send>;

struct State {
    secret: Option<Secret>,
    status: AtomicU16,
    delay_ms: AtomicU64,
    retry_after: Mutex<Option<String>>,
    response_body: Mutex<Option<Bytes>>,
    failures_left: AtomicUsize,
    failing_until: Mutex<Option<Instant>>,
    reject_invalid: AtomicBool,
    received: Mutex<Vec<ReceivedWebhook>>,
    arrived: Notify,
    on_receive: Mutex<Option<ReceiveCallback>>,
}

pub struct Receiver {
    address: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver on a free port of 127.0.0.1. With a secret, each
    /// request's signature is checked and recorded in `verified`.
    pub async fn start(secret: Option<Secret>) -> std::io::Result<Receiver> {
        Receiver::start_on("127.0.0.1:0".parse().expect("a valid socket address"), secret).await
    }

    pub async fn start_on(address: SocketAddr, secret: Option<Secret>) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let state = Arc::new(State {
            secret,
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            retry_after: Mutex::new(None),
            response_body: Mutex::new(None),
            failures_left: AtomicUsize::new(0),
            failing_until: Mutex::new(None),
            reject_invalid: AtomicBool::new(false),
            received: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            on_receive: Mutex::new(None),
        });

        let server_state = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let connection_state = Arc::clone(&server_state);
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(Arc::clone(&connection_state), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Receiver { address, state, server })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The URL to configure as an endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.address)
    }

    /// Responds to every later request with this status code.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Answers with this body instead of "ok" or "not accepted".
    pub fn set_response_body(&self, body: Bytes) {
        *self.state.response_body.lock().expect("receiver lock") = Some(body);
    }

    /// Sends this Retry-After header value with every later answer.
    pub fn set_retry_after(&self, value: Option<&str>) {
        *self.state.retry_after.lock().expect("receiver lock") = value.map(str::to_string);
    }

    /// Waits this long before answering each later request.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers the next `count` requests with 500, then with the set status.
    pub fn fail_next(&self, count: usize) {
        self.state.failures_left.store(count, Ordering::SeqCst);
    }

    /// Answers every request with 500 for this long, like a receiver that is down.
    pub fn fail_for(&self, duration: Duration) {
        *self.state.failing_until.lock().expect("receiver lock") = Some(Instant::now() + duration);
    }

    /// Answers 401 to requests whose signature does not verify, as a real
    /// receiver should.
    pub fn reject_invalid_signatures(&self) {
        self.state.reject_invalid.store(true, Ordering::SeqCst);
    }

    /// Calls `callback` for each request as it arrives (the demo prints them).
    pub fn on_receive(&self, callback: impl Fn(&ReceivedWebhook) + Send + 'static) {
        *self.state.on_receive.lock().expect("receiver lock") = Some(Box::new(callback));
    }

    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.state.received.lock().expect("receiver lock").clone()
    }

    /// Waits until at least `count` requests have arrived, or the timeout
    /// passes, and returns what arrived.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedWebhook> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.state.arrived.notified();
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.received();
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    // A request cut off mid-body (its sender was killed) is not a delivery.
    let Ok(collected) = request.into_body().collect().await else {
        let response = Response::builder()
            .status(400)
            .body(Full::new(Bytes::new()))
            .expect("a static response is valid");
        return Ok(response);
    };
    let body = collected.to_bytes();

    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let down = state
        .failing_until
        .lock()
        .expect("receiver lock")
        .is_some_and(|until| Instant::now() < until);
    let failing = down
        || state
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1))
            .is_ok();

    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_default()
    };
    let (webhook_id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let verified = match (&state.secret, timestamp.parse::<i64>()) {
        (Some(secret), Ok(seconds)) => verify(secret, &webhook_id, seconds, &body, &signature),
        _ => false,
    };
    let status = if failing {
        500
    } else if !verified && state.reject_invalid.load(Ordering::SeqCst) {
        401
    } else {
        state.status.load(Ordering::SeqCst)
    };
    let received = ReceivedWebhook {
        path,
        webhook_id,
        timestamp,
        signature,
        headers,
        payload: serde_json::from_slice(&body).unwrap_or(Value::Null),
        body,
        verified,
        answered: status,
        arrived: Instant::now(),
    };

    if let Some(callback) = state.on_receive.lock().expect("receiver lock").as_ref() {
        callback(&received);
    }
    state.received.lock().expect("receiver lock").push(received);
    state.arrived.notify_waiters();

    let default_body = Bytes::from(if status < 300 { "ok" } else { "not accepted" });
    let body = state
        .response_body
        .lock()
        .expect("receiver lock")
        .clone()
        .unwrap_or(default_body);
    let mut response = Response::builder().status(status);
    if let Some(value) = state.retry_after.lock().expect("receiver lock").as_deref() {
        response = response.header("retry-after", value);
    }
    let response = response
        .header("content-type", "text/plain")
        .body(Full::new(body))
        .expect("a static response is valid");
    Ok(response)
}
