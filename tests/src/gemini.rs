//! The Gemini API on loopback for tests, from its published shapes:
//!
//! - `POST /v1beta/models/{model}:generateContent` (key in
//!   `x-goog-api-key`): `contents[].parts[]` of `text`, `inline_data
//!   {mime_type, data}` or `file_data {mime_type, file_uri}`; answers
//!   `candidates[0].content.parts[0].text`.
//! - `POST /upload/v1beta/files` with `X-Goog-Upload-Protocol: resumable`
//!   and `X-Goog-Upload-Command: start`: answers `X-Goog-Upload-URL`; the
//!   bytes then go there with `upload, finalize` and the answer is the
//!   `file` (`name`, `uri`, `state: PROCESSING`).
//! - `GET /v1beta/files/{id}`: the file, `ACTIVE` from the first look on.
//! - `DELETE /v1beta/files/{id}`: removes it (`{}`), 404 when unknown.
//!
//! A wrong key answers 403 `PERMISSION_DENIED`. Every generate request's
//! parts are recorded.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::openai::json;

/// One part of a generate request, as the stand-in saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeenPart {
    Text(String),
    Inline { mime_type: String, bytes: usize },
    File { mime_type: String, uri: String },
}

#[derive(Clone, Debug)]
pub struct Generate {
    pub model: String,
    pub parts: Vec<SeenPart>,
    pub system: Option<String>,
}

#[derive(Clone, Debug)]
struct Upload {
    mime_type: String,
    declared: usize,
    bytes: Option<usize>,
}

#[derive(Default)]
struct Inner {
    key: String,
    addr: Mutex<Option<SocketAddr>>,
    generates: Mutex<Vec<Generate>>,
    /// Files stored now, by id.
    uploads: Mutex<HashMap<String, Upload>>,
    /// Every finalised upload, deleted or not: (mime type, bytes).
    finished: Mutex<Vec<(String, usize)>>,
    next_id: Mutex<usize>,
    polls: Mutex<usize>,
}

pub struct FakeGemini {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeGemini {
    /// Starts on `127.0.0.1:0`, accepting `key`.
    pub async fn start(key: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake gemini");
        let addr = listener.local_addr().expect("fake gemini address");
        let inner = Arc::new(Inner {
            key: key.to_owned(),
            ..Inner::default()
        });
        *lock(&inner.addr) = Some(addr);
        let app = axum::Router::new()
            .route("/v1beta/models/{call}", axum::routing::post(generate))
            .route("/upload/v1beta/files", axum::routing::post(start_upload))
            .route("/upload/session/{id}", axum::routing::post(finish_upload))
            .route(
                "/v1beta/files/{id}",
                axum::routing::get(get_file).delete(delete_file),
            )
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(inner.clone());
        let stop = crate::serve_until_stopped(listener, app);
        Self { inner, addr, stop }
    }

    /// `http://127.0.0.1:<port>` (the base URL, without `/v1beta`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn generates(&self) -> Vec<Generate> {
        lock(&self.inner.generates).clone()
    }

    /// Files uploaded and finalised, deleted since or not: (mime type, bytes).
    pub fn uploads(&self) -> Vec<(String, usize)> {
        lock(&self.inner.finished).clone()
    }

    /// Files uploaded and not deleted.
    pub fn stored_files(&self) -> usize {
        lock(&self.inner.uploads).len()
    }

    /// Looks at an uploaded file's state.
    pub fn polls(&self) -> usize {
        *lock(&self.inner.polls)
    }
}

impl Drop for FakeGemini {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn denied(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    let key = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok());
    (key != Some(inner.key.as_str())).then(|| {
        json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": {"code": 403, "message": "API key not valid", "status": "PERMISSION_DENIED"}}),
        )
    })
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn generate(
    State(inner): State<Arc<Inner>>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = denied(&inner, &headers) {
        return denied;
    }
    let Some(model) = call.strip_suffix(":generateContent") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut parts = Vec::new();
    for content in body["contents"].as_array().into_iter().flatten() {
        for part in content["parts"].as_array().into_iter().flatten() {
            if let Some(text) = part["text"].as_str() {
                parts.push(SeenPart::Text(text.to_owned()));
            } else if let Some(inline) = part.get("inline_data") {
                let data = inline["data"].as_str().unwrap_or_default();
                parts.push(SeenPart::Inline {
                    mime_type: inline["mime_type"].as_str().unwrap_or_default().to_owned(),
                    bytes: data.len() / 4 * 3,
                });
            } else if let Some(file) = part.get("file_data") {
                parts.push(SeenPart::File {
                    mime_type: file["mime_type"].as_str().unwrap_or_default().to_owned(),
                    uri: file["file_uri"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    let kind = parts
        .iter()
        .find_map(|p| match p {
            SeenPart::Inline { mime_type, .. } | SeenPart::File { mime_type, .. } => {
                Some(mime_type.clone())
            }
            SeenPart::Text(_) => None,
        })
        .unwrap_or_default();
    let how = if parts.iter().any(|p| matches!(p, SeenPart::File { .. })) {
        "uploaded"
    } else {
        "inline"
    };
    lock(&inner.generates).push(Generate {
        model: model.to_owned(),
        parts,
        system: body["systemInstruction"]["parts"][0]["text"]
            .as_str()
            .map(str::to_owned),
    });
    let text = format!("The video shows a {how} {kind} clip of a red ball");
    json(
        StatusCode::OK,
        serde_json::json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 20}
        }),
    )
}

async fn start_upload(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Some(denied) = denied(&inner, &headers) {
        return denied;
    }
    if header(&headers, "x-goog-upload-protocol") != "resumable"
        || header(&headers, "x-goog-upload-command") != "start"
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let id = {
        let mut next = lock(&inner.next_id);
        *next += 1;
        format!("f{next}")
    };
    let declared = header(&headers, "x-goog-upload-header-content-length")
        .parse()
        .unwrap_or(0);
    lock(&inner.uploads).insert(
        id.clone(),
        Upload {
            mime_type: header(&headers, "x-goog-upload-header-content-type"),
            declared,
            bytes: None,
        },
    );
    let addr = lock(&inner.addr).expect("address");
    let mut response = StatusCode::OK.into_response();
    response.headers_mut().insert(
        "x-goog-upload-url",
        format!("http://{addr}/upload/session/{id}")
            .parse()
            .expect("header"),
    );
    response
}

fn file_json(inner: &Inner, id: &str, upload: &Upload, state: &str) -> serde_json::Value {
    let addr = lock(&inner.addr).expect("address");
    serde_json::json!({
        "name": format!("files/{id}"),
        "uri": format!("http://{addr}/v1beta/files/{id}"),
        "mimeType": upload.mime_type,
        "sizeBytes": upload.bytes.unwrap_or(0).to_string(),
        "state": state,
    })
}

async fn finish_upload(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = denied(&inner, &headers) {
        return denied;
    }
    if header(&headers, "x-goog-upload-command") != "upload, finalize"
        || header(&headers, "x-goog-upload-offset") != "0"
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let upload = {
        let mut uploads = lock(&inner.uploads);
        let Some(upload) = uploads.get_mut(&id) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        if upload.declared != body.len() {
            return StatusCode::BAD_REQUEST.into_response();
        }
        upload.bytes = Some(body.len());
        upload.clone()
    };
    lock(&inner.finished).push((upload.mime_type.clone(), body.len()));
    json(
        StatusCode::OK,
        serde_json::json!({"file": file_json(&inner, &id, &upload, "PROCESSING")}),
    )
}

async fn get_file(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = denied(&inner, &headers) {
        return denied;
    }
    *lock(&inner.polls) += 1;
    let Some(upload) = lock(&inner.uploads).get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    json(StatusCode::OK, file_json(&inner, &id, &upload, "ACTIVE"))
}

async fn delete_file(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = denied(&inner, &headers) {
        return denied;
    }
    match lock(&inner.uploads).remove(&id) {
        Some(_) => json(StatusCode::OK, serde_json::json!({})),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
