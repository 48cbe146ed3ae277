//! An OpenAI-compatible chat-completions server on loopback for tests,
//! answering `POST /v1/chat/completions` in the documented shape
//! (`choices[0].message.content`), as vLLM serving a vision model does.
//!
//! It records every request (model, system prompt, instruction, image
//! URLs, `Authorization`) and refuses, with a 400, any image part that is
//! not a `data:` URL — a caption server must never be handed a link it
//! would fetch. Answers follow a script ([`Reply`]: a caption, 429 with
//! `Retry-After`, 500, slow), then the default: `"The image shows picture
//! <first 8 hex of the sha256 of the first image's data URL>"`, so a test
//! can predict each file's caption. A fixed latency can be set for every
//! answer (the benchmark's).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Reply {
    Caption(String),
    /// 429 with `Retry-After: <secs>`.
    RateLimited(u64),
    /// 500.
    ServerError,
    /// The default caption after this long.
    Slow(Duration),
}

/// What the server saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub model: String,
    pub system: Option<String>,
    /// The user message's text part.
    pub prompt: String,
    pub image_urls: Vec<String>,
    pub authorization: Option<String>,
    pub max_tokens: Option<u64>,
}

#[derive(Default)]
struct Inner {
    script: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    latency: Mutex<Duration>,
}

pub struct FakeOpenAi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stand-in's default answer for an image sent as `data_url` (before
/// the captioner tidies it: "The image shows " comes off).
pub fn default_answer(data_url: &str) -> String {
    format!(
        "The image shows picture {}",
        &hex::encode(Sha256::digest(data_url.as_bytes()))[..8]
    )
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake openai");
        let addr = listener.local_addr().expect("fake openai address");
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(complete))
            .with_state(inner.clone());
        let stop = crate::serve_until_stopped(listener, app);
        Self { inner, addr, stop }
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Answers to give, in order, before the default ones.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.inner.script).extend(replies);
    }

    /// A delay before every answer.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.inner.latency) = latency;
    }

    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.inner.seen).clone()
    }

    pub fn calls(&self) -> usize {
        lock(&self.inner.seen).len()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A JSON answer (the workspace's axum has no `json` feature).
pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error"}}),
    )
}

async fn complete(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not json");
    };
    let mut seen = Seen {
        at: Instant::now(),
        model: body["model"].as_str().unwrap_or_default().to_owned(),
        system: None,
        prompt: String::new(),
        image_urls: Vec::new(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        max_tokens: body["max_tokens"].as_u64(),
    };
    for message in body["messages"].as_array().into_iter().flatten() {
        match message["role"].as_str() {
            Some("system") => seen.system = message["content"].as_str().map(str::to_owned),
            Some("user") => {
                for part in message["content"].as_array().into_iter().flatten() {
                    match part["type"].as_str() {
                        Some("text") => {
                            seen.prompt = part["text"].as_str().unwrap_or_default().to_owned()
                        }
                        Some("image_url") => seen.image_urls.push(
                            part["image_url"]["url"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    lock(&inner.seen).push(seen.clone());
    if seen.image_urls.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no image in the request");
    }
    if seen.image_urls.iter().any(|u| !u.starts_with("data:")) {
        return error(StatusCode::BAD_REQUEST, "only data: urls are accepted");
    }
    let latency = *lock(&inner.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = lock(&inner.script).pop_front();
    let content = match reply {
        Some(Reply::Caption(text)) => text,
        Some(Reply::RateLimited(secs)) => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate limited");
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("header"));
            return response;
        }
        Some(Reply::ServerError) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "engine crashed");
        }
        Some(Reply::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            default_answer(&seen.image_urls[0])
        }
        None => default_answer(&seen.image_urls[0]),
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "model": seen.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
        }),
    )
}
