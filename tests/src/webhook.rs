//! A webhook receiver for tests: a real HTTP server on loopback that records
//! every request (headers, body, time) and answers as the test scripts it.

use crate::wait_for;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the receiver answers to the next request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: <secs>`.
    RetryAfter(u16, u64),
    /// Never answers (the request stays open until the sender goes away).
    Hang,
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", self.headers))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

#[derive(Default)]
struct Recorded {
    hits: Mutex<Vec<Hit>>,
    replies: Mutex<VecDeque<Reply>>,
}

/// A webhook receiver on loopback; answers 200 once its script is used up.
/// Its URL carries a query token, as receivers' URLs often do.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Recorded>,
}

async fn hook(State(state): State<Arc<Recorded>>, headers: HeaderMap, body: Bytes) -> Response {
    let reply = state
        .replies
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(200));
    state.hits.lock().unwrap().push(Hit {
        headers,
        body: body.to_vec(),
        at: Instant::now(),
    });
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::RetryAfter(code, secs) => (
            StatusCode::from_u16(code).unwrap(),
            [("retry-after", secs.to_string())],
        )
            .into_response(),
        Reply::Hang => std::future::pending().await,
    }
}

impl Receiver {
    pub async fn start(script: &[Reply]) -> Receiver {
        let state = Arc::new(Recorded::default());
        state.replies.lock().unwrap().extend(script.iter().copied());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook?token=receiver-query-token", self.addr)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    pub async fn wait_hits(&self, n: usize, timeout: Duration) -> Vec<Hit> {
        wait_for(&format!("{n} webhook requests"), timeout, || async {
            let hits = self.hits();
            (hits.len() >= n).then_some(hits)
        })
        .await
    }
}
