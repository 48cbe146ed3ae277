//! A Hugging Face Hub on loopback for tests, speaking the file-resolve
//! protocol from an in-memory map of repositories:
//!
//! Every path segment is percent-decoded before it is routed, so a
//! revision holding `/` must come as one `%2F`-encoded segment, as the
//! Hub wants it; an unencoded one routes nowhere (404).
//!
//! - `HEAD|GET /{org}/{repo}/resolve/{revision}/{path}`: LFS files answer
//!   `302` to `/cdn/<sha256>` with `X-Repo-Commit`, `X-Linked-Etag` (the
//!   sha256) and `X-Linked-Size`; other files answer `200` with `ETag` (the
//!   git blob id) and the body. Both honour `Range: bytes=N-`.
//! - `GET /api/models/{org}/{repo}/revision/{revision}[?blobs=true]`: `sha`
//!   and `siblings`.
//! - Errors with `X-Error-Code`: `RepoNotFound`, `RevisionNotFound`,
//!   `EntryNotFound`, and `GatedRepo` (401 without a token, 403 with the
//!   wrong one) for gated repositories.
//!
//! Faults can be injected per file (a corrupted body, a connection dropped
//! half-way), downloads can be held until released, and every request is
//! counted so tests can assert how many downloads happened.
//!
//! The write side ([`upload`]): `whoami-v2`, repository create, branch
//! create, preupload, the LFS batch API with its upload and verify URLs on
//! this same server, NDJSON commits checked against `parentCommit`, and
//! commit listings; committed files are readable through the resolve route
//! above at the branch, or at the commit.

mod lfs;
mod upload;

pub use upload::{FakeCommit, FakeUser};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use trainyard_models::{PRESETS, preset};

/// One file of a fake repository.
#[derive(Clone, Debug)]
pub struct FakeFile {
    pub data: Bytes,
    /// Served like an LFS file: a redirect to the CDN, the sha256 as etag.
    pub lfs: bool,
}

impl FakeFile {
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.data))
    }

    pub fn git_blob_id(&self) -> String {
        let mut h = sha1_smol::Sha1::new();
        h.update(format!("blob {}\0", self.data.len()).as_bytes());
        h.update(&self.data);
        h.digest().to_string()
    }
}

#[derive(Clone, Debug, Default)]
pub struct FakeRepo {
    /// 40 hex digits; `main` and this resolve to the files.
    pub commit: String,
    pub gated: bool,
    pub files: BTreeMap<String, FakeFile>,
    /// Visible only to its namespace's users (repositories made by a
    /// create request).
    pub private: bool,
    /// Branches besides `main`, by name: their head commit.
    pub branches: BTreeMap<String, String>,
    /// Every commit's files, by commit id (for commits made by requests).
    pub snapshots: BTreeMap<String, BTreeMap<String, FakeFile>>,
    /// Commits made by requests, oldest first.
    pub log: Vec<FakeCommit>,
}

impl FakeRepo {
    /// The commit and files `rev` (a branch or a commit id) names.
    pub fn at(&self, rev: &str) -> Option<(String, BTreeMap<String, FakeFile>)> {
        if rev == "main" || rev == self.commit {
            return Some((self.commit.clone(), self.files.clone()));
        }
        let commit = self.branches.get(rev).map(String::as_str).unwrap_or(rev);
        self.snapshots
            .get(commit)
            .map(|files| (commit.to_owned(), files.clone()))
    }
}

/// A misbehaviour of the next download(s) of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte of the body, once.
    CorruptOnce,
    /// Flip a byte of the body every time.
    CorruptAlways,
    /// Send half the body, then drop the connection, once.
    DropMidBodyOnce,
}

/// What the hub saw for one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRequests {
    pub heads: usize,
    /// Body downloads started (GETs of content, on the CDN or the resolve URL).
    pub downloads: usize,
    /// `Range` headers of those downloads.
    pub ranges: Vec<String>,
}

#[derive(Default)]
struct Inner {
    repos: Mutex<BTreeMap<String, FakeRepo>>,
    /// The write side's state.
    writes: upload::Writes,
    token: Mutex<String>,
    faults: Mutex<HashMap<String, Fault>>,
    /// Keyed by `<repo>/<path>`.
    seen: Mutex<HashMap<String, FileRequests>>,
    addr: Mutex<Option<SocketAddr>>,
    hold: Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
}

/// The running fake hub; stops when dropped.
pub struct FakeHub {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

/// Downloads wait while this is held; dropping it lets them go on.
pub struct HeldDownloads {
    _release: tokio::sync::watch::Sender<bool>,
}

/// A fake commit id for a repository.
pub fn commit_of(repo: &str) -> String {
    hex::encode(Sha256::digest(repo.as_bytes()))[..40].to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeHub {
    /// Starts on `127.0.0.1:0`. Gated repositories accept `token`.
    pub async fn start(token: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake hub");
        let addr = listener.local_addr().expect("fake hub address");
        let inner = Arc::new(Inner::default());
        *lock(&inner.token) = token.to_string();
        *lock(&inner.addr) = Some(addr);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let stop = crate::serve_until_stopped(listener, app);
        Self { inner, addr, stop }
    }

    /// `http://127.0.0.1:<port>`, for `worker.hf_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds (or replaces) a repository; its commit defaults to [`commit_of`].
    pub fn add_repo(&self, name: &str, mut repo: FakeRepo) {
        if repo.commit.is_empty() {
            repo.commit = commit_of(name);
        }
        lock(&self.inner.repos).insert(name.to_string(), repo);
    }

    /// Adds one file to a repository (created ungated if new).
    pub fn add_file(&self, repo: &str, path: &str, data: impl Into<Bytes>, lfs: bool) {
        let mut repos = lock(&self.inner.repos);
        let entry = repos.entry(repo.to_string()).or_insert_with(|| FakeRepo {
            commit: commit_of(repo),
            ..FakeRepo::default()
        });
        entry.files.insert(
            path.to_string(),
            FakeFile {
                data: data.into(),
                lfs,
            },
        );
    }

    pub fn set_gated(&self, repo: &str, gated: bool) {
        if let Some(r) = lock(&self.inner.repos).get_mut(repo) {
            r.gated = gated;
        }
    }

    pub fn file(&self, repo: &str, path: &str) -> Option<FakeFile> {
        lock(&self.inner.repos).get(repo)?.files.get(path).cloned()
    }

    pub fn inject(&self, repo: &str, path: &str, fault: Fault) {
        lock(&self.inner.faults).insert(format!("{repo}/{path}"), fault);
    }

    /// Holds every download before its first byte until the guard drops.
    pub fn hold_downloads(&self) -> HeldDownloads {
        let (tx, rx) = tokio::sync::watch::channel(true);
        *lock(&self.inner.hold) = Some(rx);
        HeldDownloads { _release: tx }
    }

    pub fn requests(&self, repo: &str, path: &str) -> FileRequests {
        lock(&self.inner.seen)
            .get(&format!("{repo}/{path}"))
            .cloned()
            .unwrap_or_default()
    }

    /// Body downloads of every file.
    pub fn total_downloads(&self) -> usize {
        lock(&self.inner.seen).values().map(|r| r.downloads).sum()
    }

    /// Adds the repositories of presets with a small fake file for every
    /// file each part names or includes. `.safetensors` files are real
    /// (tiny) safetensors files. Gated presets make their repositories gated.
    pub fn add_presets(&self, names: &[&str]) {
        for name in names {
            let p = preset(name).unwrap_or_else(|| panic!("no preset {name}"));
            for part in p.parts {
                let files: Vec<String> = match part.file {
                    Some(file) => vec![file.to_string()],
                    None => layout_for(part.role, part.include),
                };
                for path in files {
                    let lfs = is_lfs(&path);
                    self.add_file(part.repo, &path, fake_content(part.repo, &path), lfs);
                }
                if p.gated {
                    self.set_gated(part.repo, true);
                }
            }
        }
    }

    /// Every preset with Hub parts.
    pub fn add_all_presets(&self) {
        let names: Vec<&str> = PRESETS
            .iter()
            .filter(|p| !p.parts.is_empty())
            .map(|p| p.name)
            .collect();
        self.add_presets(&names);
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn is_lfs(path: &str) -> bool {
    [".safetensors", ".pth", ".bin", ".model", ".gguf"]
        .iter()
        .any(|ext| path.ends_with(ext))
}

/// Files a folder part holds in real repositories, filtered by its include
/// patterns; a pattern nothing matches gets a file made from it.
fn layout_for(role: &str, include: &[&str]) -> Vec<String> {
    const DIFFUSERS: &[&str] = &[
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/spiece.model",
        "tokenizer_2/tokenizer_config.json",
    ];
    const LLM: &[&str] = &[
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ];
    const WAN: &[&str] = &[
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
        "google/umt5-xxl/spiece.model",
        "google/umt5-xxl/tokenizer.json",
    ];
    let known: &[&str] = match role {
        "llm" => LLM,
        "ckpt_dir" => WAN,
        _ => DIFFUSERS,
    };
    let mut files: Vec<String> = known
        .iter()
        .filter(|f| include.iter().any(|g| trainyard_models::glob_match(g, f)))
        .map(|f| f.to_string())
        .collect();
    for pattern in include {
        if !files
            .iter()
            .any(|f| trainyard_models::glob_match(pattern, f))
        {
            files.push(pattern.replace("**/", "").replace('*', "fake"));
        }
    }
    files
}

/// Small content for a file: a real safetensors file for `.safetensors`,
/// JSON for `.json`, text otherwise; unique to the repository and path.
pub fn fake_content(repo: &str, path: &str) -> Bytes {
    if path.ends_with(".safetensors") {
        return safetensors_file(&format!("{repo}/{path}"), tensor_name(path));
    }
    if path == "config.json" {
        // A transformers config names its architecture.
        return Bytes::from(
            serde_json::to_vec(&serde_json::json!({"_name_or_path": repo, "model_type": "fake"}))
                .expect("json"),
        );
    }
    if path.ends_with(".json") {
        return Bytes::from(
            serde_json::to_vec(&serde_json::json!({"_name_or_path": repo, "file": path}))
                .expect("json"),
        );
    }
    Bytes::from(format!("fake {repo}/{path}\n"))
}

/// The one tensor's name in a fake weights file: a single-file SDXL base
/// checkpoint holds a key only SDXL base checkpoints have (the second text
/// encoder's), which is how diffusers' `from_single_file` tells SDXL apart.
fn tensor_name(path: &str) -> &'static str {
    if path
        .rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with("sd_xl_base"))
    {
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    } else {
        "weight"
    }
}

/// A valid safetensors file with one F32 tensor `name` and `source` in its
/// metadata.
pub fn safetensors_file(source: &str, name: &str) -> Bytes {
    let header = serde_json::json!({
        "__metadata__": {"source": source},
        name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    });
    let mut header = serde_json::to_vec(&header).expect("json");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for v in [1.0f32, 0.5, -0.5, 0.25] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

fn error(status: StatusCode, code: &str) -> Response {
    Response::builder()
        .status(status)
        .header("x-error-code", code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!("{{\"error\":\"{code}\"}}")))
        .expect("response")
}

/// The repository if this caller may read it, else the status and error code.
fn access(
    inner: &Inner,
    repo: &str,
    headers: &HeaderMap,
) -> Result<FakeRepo, (StatusCode, &'static str)> {
    let Some(found) = lock(&inner.repos).get(repo).cloned() else {
        return Err((StatusCode::NOT_FOUND, "RepoNotFound"));
    };
    if found.private && !upload::may_read(inner, repo, headers) {
        return Err((StatusCode::NOT_FOUND, "RepoNotFound"));
    }
    if found.gated {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match bearer {
            None => return Err((StatusCode::UNAUTHORIZED, "GatedRepo")),
            Some(t) if t != *lock(&inner.token) => {
                return Err((StatusCode::FORBIDDEN, "GatedRepo"));
            }
            Some(_) => {}
        }
    }
    Ok(found)
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_start_matches('/').to_string();
    let segments: Vec<String> = path.split('/').map(percent_decode).collect();
    if let Some(response) = upload::route(&inner, &method, &segments, uri.query(), &headers, &body)
    {
        return response;
    }
    if let Some(rest) = path.strip_prefix("cdn/") {
        return cdn(&inner, &method, rest, &headers).await;
    }
    if segments.len() >= 6
        && segments[0] == "api"
        && segments[1] == "models"
        && segments[4] == "revision"
    {
        let repo = format!("{}/{}", segments[2], segments[3]);
        let blobs = uri.query().is_some_and(|q| q.contains("blobs=true"));
        return revision(&inner, &repo, &segments[5], blobs, &headers);
    }
    if segments.len() >= 5 && segments[2] == "resolve" {
        let repo = format!("{}/{}", segments[0], segments[1]);
        let file = segments[4..].join("/");
        return resolve(&inner, &method, &repo, &segments[3], &file, &headers).await;
    }
    StatusCode::NOT_FOUND.into_response()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn revision(inner: &Inner, repo: &str, rev: &str, blobs: bool, headers: &HeaderMap) -> Response {
    let found = match access(inner, repo, headers) {
        Ok(found) => found,
        Err((status, code)) => return error(status, code),
    };
    let Some((commit, files)) = found.at(rev) else {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    };
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, file)| {
            if !blobs {
                return serde_json::json!({"rfilename": name});
            }
            let mut sibling = serde_json::json!({
                "rfilename": name,
                "size": file.data.len(),
                "blobId": file.git_blob_id(),
            });
            if file.lfs {
                sibling["lfs"] = serde_json::json!({
                    "sha256": file.sha256(),
                    "size": file.data.len(),
                    "pointerSize": 134,
                });
            }
            sibling
        })
        .collect();
    let body = serde_json::json!({"id": repo, "sha": commit, "siblings": siblings});
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

async fn resolve(
    inner: &Inner,
    method: &Method,
    repo: &str,
    rev: &str,
    path: &str,
    headers: &HeaderMap,
) -> Response {
    let found = match access(inner, repo, headers) {
        Ok(found) => found,
        Err((status, code)) => return error(status, code),
    };
    let Some((commit, files)) = found.at(rev) else {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    };
    let Some(file) = files.get(path).cloned() else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound");
    };
    let key = format!("{repo}/{path}");
    if method == Method::HEAD {
        lock(&inner.seen).entry(key.clone()).or_default().heads += 1;
    }
    if file.lfs {
        let addr = lock(&inner.addr).expect("address");
        let location = format!(
            "http://{addr}/cdn/{}?repo={repo}&path={path}&sig=x",
            file.sha256()
        );
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location)
            .header("x-repo-commit", &commit)
            .header("x-linked-etag", format!("\"{}\"", file.sha256()))
            .header("x-linked-size", file.data.len().to_string())
            .header(header::ETAG, format!("\"{}\"", file.git_blob_id()))
            .body(Body::empty())
            .expect("response");
    }
    let mut response = content(inner, method, &key, &file, headers).await;
    let h = response.headers_mut();
    h.insert(
        "x-repo-commit",
        HeaderValue::from_str(&commit).expect("header"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", file.git_blob_id())).expect("header"),
    );
    response
}

async fn cdn(inner: &Inner, method: &Method, rest: &str, headers: &HeaderMap) -> Response {
    let sha = rest.split('?').next().unwrap_or_default();
    let found = lock(&inner.repos).iter().find_map(|(repo, r)| {
        std::iter::once(&r.files)
            .chain(r.snapshots.values())
            .flat_map(|files| files.iter())
            .find(|(_, f)| f.lfs && f.sha256() == sha)
            .map(|(path, f)| (format!("{repo}/{path}"), f.clone()))
    });
    let Some((key, file)) = found else {
        return StatusCode::NOT_FOUND.into_response();
    };
    content(inner, method, &key, &file, headers).await
}

/// Serves a file's content (HEAD: headers only), honouring `Range: bytes=N-`
/// and the injected fault.
async fn content(
    inner: &Inner,
    method: &Method,
    key: &str,
    file: &FakeFile,
    headers: &HeaderMap,
) -> Response {
    let total = file.data.len();
    if method == Method::HEAD {
        return Response::builder()
            .header(header::CONTENT_LENGTH, total.to_string())
            .body(Body::empty())
            .expect("response");
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    {
        let mut seen = lock(&inner.seen);
        let entry = seen.entry(key.to_string()).or_default();
        entry.downloads += 1;
        if let Some(range) = &range {
            entry.ranges.push(range.clone());
        }
    }
    let hold = lock(&inner.hold).clone();
    if let Some(mut hold) = hold {
        let _ = hold.wait_for(|held| !*held).await;
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<usize>().ok());
    if let Some(start) = start
        && start >= total
    {
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(Body::empty())
            .expect("response");
    }
    let from = start.unwrap_or(0);
    let mut body = file.data.slice(from..).to_vec();
    let fault = {
        let mut faults = lock(&inner.faults);
        let fault = faults.get(key).copied();
        if matches!(fault, Some(Fault::CorruptOnce | Fault::DropMidBodyOnce)) {
            faults.remove(key);
        }
        fault
    };
    if matches!(fault, Some(Fault::CorruptOnce | Fault::CorruptAlways))
        && let Some(byte) = body.last_mut()
    {
        *byte ^= 0xff;
    }
    let builder = match start {
        Some(start) => Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", total - 1),
            ),
        None => Response::builder().status(StatusCode::OK),
    }
    .header(header::CONTENT_LENGTH, body.len().to_string())
    .header(header::ACCEPT_RANGES, "bytes");
    if fault == Some(Fault::DropMidBodyOnce) {
        // Half the body, a pending poll (hyper writes out what it has), then an error:
        // hyper closes the connection short of the announced length.
        let half = Bytes::from(body[..body.len() / 2].to_vec());
        let stream = futures::stream::unfold(0, move |step| {
            let half = half.clone();
            async move {
                match step {
                    0 => Some((Ok(half), 1)),
                    1 => {
                        tokio::task::yield_now().await;
                        Some((
                            Err(std::io::Error::other("connection dropped by the test")),
                            2,
                        ))
                    }
                    _ => None,
                }
            }
        });
        return builder.body(Body::from_stream(stream)).expect("response");
    }
    builder.body(Body::from(body)).expect("response")
}
