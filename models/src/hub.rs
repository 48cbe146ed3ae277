//! A client for the Hugging Face Hub's file protocol, the one
//! `huggingface_hub` speaks (and mirrors copy):
//!
//! - `HEAD {endpoint}/{repo}/resolve/{revision}/{path}` tells what a file is
//!   without downloading it. The answer of the *first* request is read, not
//!   the one after a redirect: large (LFS) files answer `302` to a CDN, and the
//!   hub's own headers are on that `302`: `X-Repo-Commit` (the commit the
//!   revision points at), `X-Linked-Etag` (for LFS files the sha256 of the
//!   content), `X-Linked-Size`, else `ETag` (the git blob id) and
//!   `Content-Length`. Relative redirects (a renamed repository) are followed.
//! - `GET` of the same URL, redirects followed, downloads it; a `Range:
//!   bytes=N-` header resumes a partial file.
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true` lists
//!   a snapshot: JSON `sha` and `siblings: [{rfilename, size, blobId, lfs:
//!   {sha256, size}}]`.
//! - Errors carry `X-Error-Code`: `GatedRepo`, `RepoNotFound`,
//!   `RevisionNotFound`, `EntryNotFound`; a bare `401`/`403` means the
//!   repository is private, gated or missing for this caller.
//!
//! The token is sent as `Authorization: Bearer` to the endpoint's own origin
//! only: never to a CDN the hub redirects to.
//!
//! This client never retries: [`HubError::is_retryable`] says whether trying
//! later can help, and the caller's runtime owns redelivery.

use crate::presets::HubRef;
use reqwest::header::{self, HeaderMap};
use reqwest::{StatusCode, Url};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use trainyard_proto::redact::{display, display_url};

pub const HEADER_REPO_COMMIT: &str = "x-repo-commit";
pub const HEADER_LINKED_ETAG: &str = "x-linked-etag";
pub const HEADER_LINKED_SIZE: &str = "x-linked-size";
pub const HEADER_ERROR_CODE: &str = "x-error-code";
pub const HEADER_ERROR_MESSAGE: &str = "x-error-message";

/// Relative redirects followed by a metadata request.
const MAX_RELATIVE_REDIRECTS: usize = 5;

/// Why a hub request failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("invalid hub endpoint {0:?}")]
    InvalidEndpoint(String),
    /// The repository is gated and this caller has not been granted access.
    #[error("{repo} is a gated repository and {}", if *with_token { "the token has not been granted access to it" } else { "no token was given" })]
    Gated { repo: String, with_token: bool },
    /// 401/403 without an error code: private, gated or missing for this caller.
    #[error("{repo}: access refused (http {status}); the repository is private, gated or missing{}", if *with_token { " for this token" } else { " and no token was given" })]
    Unauthorized {
        repo: String,
        status: u16,
        with_token: bool,
    },
    #[error("repository {repo} not found")]
    RepoNotFound { repo: String },
    #[error("revision {revision:?} not found in {repo}")]
    RevisionNotFound { repo: String, revision: String },
    #[error("{path} not found in {repo}@{revision}")]
    EntryNotFound {
        repo: String,
        revision: String,
        path: String,
    },
    #[error("the hub is rate limiting requests (http 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the hub answered http {status} for {url}")]
    Server { status: u16, url: String },
    /// Any other refusal (400, 405, …): trying again will not help.
    #[error("the hub answered http {status} for {url}")]
    Http { status: u16, url: String },
    #[error("cannot reach the hub at {url}: {message}")]
    Network { url: String, message: String },
    /// An answer that does not follow the protocol (bad JSON, a range that
    /// does not match what was asked).
    #[error("unexpected answer from the hub for {url}: {message}")]
    Protocol { url: String, message: String },
    #[error("local file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl HubError {
    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HubError::RateLimited { .. }
                | HubError::Server { .. }
                | HubError::Network { .. }
                | HubError::Protocol { .. }
                | HubError::Io { .. }
        )
    }

    /// The caller lacks access: a token is missing or not good enough.
    pub fn is_auth(&self) -> bool {
        matches!(self, HubError::Gated { .. } | HubError::Unauthorized { .. })
    }

    /// The repository, revision or file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            HubError::RepoNotFound { .. }
                | HubError::RevisionNotFound { .. }
                | HubError::EntryNotFound { .. }
        )
    }

    /// How long the hub asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HubError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// What the hub says about one file, from the first `HEAD` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFileInfo {
    /// The commit the revision resolved to (`X-Repo-Commit`).
    pub commit: Option<String>,
    /// `X-Linked-Etag`, else `ETag`, without quotes or `W/`.
    pub etag: Option<String>,
    /// `X-Linked-Size`, else `Content-Length`.
    pub size: Option<u64>,
    /// Where to `GET` the content: the CDN location of an LFS file, else the
    /// resolve URL.
    pub location: String,
}

impl HubFileInfo {
    /// The content's sha256, known for LFS files (their etag).
    pub fn sha256(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| is_hex(e, 64))
    }

    /// The git blob id, the etag of files kept in git itself.
    pub fn git_blob_id(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| is_hex(e, 40))
    }
}

/// One file of a snapshot listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubEntry {
    pub path: String,
    pub size: Option<u64>,
    /// For LFS files.
    pub sha256: Option<String>,
    pub git_blob_id: Option<String>,
}

/// A repository at one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSnapshot {
    pub commit: String,
    pub files: Vec<HubEntry>,
}

/// What one download did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// Size of the complete file.
    pub size: u64,
    /// Bytes already on disk that the server agreed to continue from.
    pub resumed_from: u64,
}

#[derive(serde::Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsInfo>,
}

#[derive(serde::Deserialize)]
struct LfsInfo {
    sha256: String,
    size: Option<u64>,
}

/// A client of one hub endpoint (`https://huggingface.co` or a mirror).
#[derive(Clone, Debug)]
pub struct HubClient {
    endpoint: Url,
    /// Follows no redirect: metadata comes from the first answer.
    head: reqwest::Client,
    /// Follows redirects, dropping the token on a change of origin.
    get: reqwest::Client,
}

impl HubClient {
    pub fn new(endpoint: &str) -> Result<Self, HubError> {
        let bad = || HubError::InvalidEndpoint(endpoint.to_string());
        let endpoint = Url::parse(endpoint.trim_end_matches('/')).map_err(|_| bad())?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.cannot_be_a_base() {
            return Err(bad());
        }
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(15))
                // Per read: a stalled transfer fails, a long one does not.
                .read_timeout(Duration::from_secs(60))
                .user_agent(concat!("trainyard/", env!("CARGO_PKG_VERSION")))
        };
        let head = builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| bad())?;
        let get = builder()
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|_| bad())?;
        Ok(Self {
            endpoint,
            head,
            get,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str().trim_end_matches('/')
    }

    fn url_with(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            for segment in segments {
                path.extend(segment.split('/'));
            }
        }
        url
    }

    /// `{endpoint}/{repo}/resolve/{revision}/{path}`.
    pub fn file_url(&self, repo: &str, revision: &str, path: &str) -> String {
        // The revision is one segment even if it holds a '/' (refs/pr/1).
        let mut url = self.url_with(&[repo, "resolve"]);
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(revision);
            segments.extend(path.split('/'));
        }
        url.into()
    }

    fn revision_url(&self, repo: &str, revision: &str) -> Url {
        let mut url = self.url_with(&["api", "models", repo, "revision"]);
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(revision);
        }
        url
    }

    /// Whether `url` is on the endpoint's origin (and may see the token).
    fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.endpoint.origin()
    }

    /// What the hub says about one file, without downloading it.
    pub async fn file_info(
        &self,
        repo: &str,
        revision: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<HubFileInfo, HubError> {
        let not_found = |code: Option<&str>| match code {
            Some("RevisionNotFound") => HubError::RevisionNotFound {
                repo: repo.into(),
                revision: revision.into(),
            },
            Some("RepoNotFound") => HubError::RepoNotFound { repo: repo.into() },
            _ => HubError::EntryNotFound {
                repo: repo.into(),
                revision: revision.into(),
                path: path.into(),
            },
        };
        let mut url = Url::parse(&self.file_url(repo, revision, path))
            .map_err(|_| HubError::InvalidEndpoint(self.endpoint().into()))?;
        for _ in 0..=MAX_RELATIVE_REDIRECTS {
            let mut request = self
                .head
                .head(url.clone())
                .header(header::ACCEPT_ENCODING, "identity");
            if let Some(token) = token.filter(|_| self.same_origin(&url)) {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.map_err(|e| network(&url, &e))?;
            let status = response.status();
            let headers = response.headers();
            if status.is_redirection() {
                let location = headers
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| protocol(&url, "a redirect without a location"))?;
                if Url::parse(location).is_err() {
                    // Relative: the repository moved on the hub itself.
                    url = url
                        .join(location)
                        .map_err(|_| protocol(&url, "a bad relative redirect"))?;
                    continue;
                }
                return Ok(file_info(headers, location.to_string()));
            }
            if status.is_success() {
                return Ok(file_info(headers, url.into()));
            }
            return Err(status_error(
                status,
                headers,
                &url,
                repo,
                token.is_some(),
                not_found,
            ));
        }
        Err(protocol(&url, "too many relative redirects"))
    }

    /// Lists the repository at `revision`, with sizes and LFS hashes.
    pub async fn snapshot(
        &self,
        repo: &str,
        revision: &str,
        token: Option<&str>,
    ) -> Result<HubSnapshot, HubError> {
        self.revision_info(repo, revision, token, true).await
    }

    async fn revision_info(
        &self,
        repo: &str,
        revision: &str,
        token: Option<&str>,
        blobs: bool,
    ) -> Result<HubSnapshot, HubError> {
        let mut url = self.revision_url(repo, revision);
        if blobs {
            url.query_pairs_mut().append_pair("blobs", "true");
        }
        let mut request = self.get.get(url.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| network(&url, &e))?;
        let status = response.status();
        if !status.is_success() {
            let not_found = |code: Option<&str>| match code {
                Some("RevisionNotFound") => HubError::RevisionNotFound {
                    repo: repo.into(),
                    revision: revision.into(),
                },
                _ => HubError::RepoNotFound { repo: repo.into() },
            };
            return Err(status_error(
                status,
                response.headers(),
                &url,
                repo,
                token.is_some(),
                not_found,
            ));
        }
        let body = response.bytes().await.map_err(|e| network(&url, &e))?;
        let info: RevisionInfo = serde_json::from_slice(&body)
            .map_err(|e| protocol(&url, &format!("bad revision listing: {e}")))?;
        let commit = info
            .sha
            .ok_or_else(|| protocol(&url, "the revision listing has no sha"))?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| HubEntry {
                size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
                sha256: s.lfs.map(|l| l.sha256.to_ascii_lowercase()),
                git_blob_id: s.blob_id,
                path: s.rfilename,
            })
            .collect();
        Ok(HubSnapshot { commit, files })
    }

    /// A cheap check that `r` exists and this token may read it: a `HEAD`
    /// for a file, the revision listing (without sizes) for a snapshot.
    /// Nothing is downloaded.
    pub async fn check_access(
        &self,
        r: &HubRef,
        token: Option<&str>,
    ) -> Result<HubFileInfo, HubError> {
        match &r.path {
            Some(path) => self.file_info(&r.repo, &r.revision, path, token).await,
            None => {
                let snapshot = self
                    .revision_info(&r.repo, &r.revision, token, false)
                    .await?;
                Ok(HubFileInfo {
                    commit: Some(snapshot.commit),
                    etag: None,
                    size: None,
                    location: self.revision_url(&r.repo, &r.revision).into(),
                })
            }
        }
    }

    /// Downloads `location` (a resolve or CDN URL) into `dest`, continuing
    /// after the bytes already there with a `Range` request. On a failure
    /// mid-body the bytes received so far stay in `dest` for the next call.
    /// `expected_size`, when known, lets a complete file skip the request and
    /// an oversized one start over. The content is not checked here.
    pub async fn download(
        &self,
        location: &str,
        expected_size: Option<u64>,
        dest: &Path,
        token: Option<&str>,
    ) -> Result<Downloaded, HubError> {
        let url = Url::parse(location).map_err(|_| protocol_str(location, "a bad download url"))?;
        let mut have = match tokio::fs::metadata(dest).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(dest, e)),
        };
        if let Some(size) = expected_size {
            if have == size {
                return Ok(Downloaded {
                    size,
                    resumed_from: have,
                });
            }
            if have > size {
                have = 0;
            }
        }
        let mut response = self.get_from(&url, have, token).await?;
        if response.status() == StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
            // What we hold is not a prefix of this file: start over.
            have = 0;
            response = self.get_from(&url, 0, token).await?;
        }
        let status = response.status();
        if !status.is_success() {
            let not_found = |_: Option<&str>| HubError::Http {
                status: status.as_u16(),
                url: display(&url),
            };
            return Err(status_error(
                status,
                response.headers(),
                &url,
                url.path(),
                token.is_some(),
                not_found,
            ));
        }
        let resumed_from = if status == StatusCode::PARTIAL_CONTENT {
            let start = response
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            if start != Some(have) {
                // Throw the partial file away rather than splice at the wrong place.
                let _ = tokio::fs::remove_file(dest).await;
                return Err(protocol(
                    &url,
                    "a partial answer at another offset than asked",
                ));
            }
            have
        } else {
            0
        };
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io(parent, e))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed_from > 0)
            .truncate(resumed_from == 0)
            .open(dest)
            .await
            .map_err(|e| io(dest, e))?;
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut size = resumed_from;
        let failure = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if let Err(e) = writer.write_all(&chunk).await {
                        break Some(io(dest, e));
                    }
                    size += chunk.len() as u64;
                }
                Ok(None) => break None,
                Err(e) => break Some(network(&url, &e)),
            }
        };
        // Keep what arrived, even after a failure: the next call resumes.
        let flushed = async {
            writer.flush().await?;
            writer.get_ref().sync_all().await
        }
        .await
        .map_err(|e| io(dest, e));
        if let Some(error) = failure {
            return Err(error);
        }
        flushed?;
        if let Some(expected) = expected_size
            && expected != size
        {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(protocol(
                &url,
                &format!("got {size} bytes where {expected} were announced"),
            ));
        }
        Ok(Downloaded { size, resumed_from })
    }

    async fn get_from(
        &self,
        url: &Url,
        offset: u64,
        token: Option<&str>,
    ) -> Result<reqwest::Response, HubError> {
        let mut request = self
            .get
            .get(url.clone())
            .header(header::ACCEPT_ENCODING, "identity");
        if let Some(token) = token.filter(|_| self.same_origin(url)) {
            request = request.bearer_auth(token);
        }
        if offset > 0 {
            request = request.header(header::RANGE, format!("bytes={offset}-"));
        }
        request.send().await.map_err(|e| network(url, &e))
    }
}

fn file_info(headers: &HeaderMap, location: String) -> HubFileInfo {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let etag = text(HEADER_LINKED_ETAG)
        .or_else(|| text(header::ETAG.as_str()))
        .map(normalize_etag);
    let size = text(HEADER_LINKED_SIZE)
        .or_else(|| text(header::CONTENT_LENGTH.as_str()))
        .and_then(|s| s.trim().parse().ok());
    HubFileInfo {
        commit: text(HEADER_REPO_COMMIT).map(str::to_string),
        etag,
        size,
        location,
    }
}

/// `W/"abc"` and `"abc"` are both `abc`.
fn normalize_etag(etag: &str) -> String {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.trim_matches('"').to_ascii_lowercase()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The first byte of `bytes START-END/TOTAL`.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
}

fn status_error(
    status: StatusCode,
    headers: &HeaderMap,
    url: &Url,
    repo: &str,
    with_token: bool,
    not_found: impl Fn(Option<&str>) -> HubError,
) -> HubError {
    let code = headers.get(HEADER_ERROR_CODE).and_then(|v| v.to_str().ok());
    match (code, status.as_u16()) {
        (Some("GatedRepo"), _) => HubError::Gated {
            repo: repo.into(),
            with_token,
        },
        (Some("RepoNotFound" | "RevisionNotFound" | "EntryNotFound"), _) | (None, 404) => {
            not_found(code)
        }
        (_, 401 | 403) => HubError::Unauthorized {
            repo: repo.into(),
            status: status.as_u16(),
            with_token,
        },
        (_, 429) => HubError::RateLimited {
            retry_after: headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse().ok())
                .map(Duration::from_secs),
        },
        (_, 500..=599) => HubError::Server {
            status: status.as_u16(),
            url: display(url),
        },
        (_, status) => HubError::Http {
            status,
            url: display(url),
        },
    }
}

fn network(url: &Url, error: &reqwest::Error) -> HubError {
    use std::error::Error;
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    HubError::Network {
        url: display(url),
        message,
    }
}

fn protocol(url: &Url, message: &str) -> HubError {
    HubError::Protocol {
        url: display(url),
        message: message.into(),
    }
}

fn protocol_str(url: &str, message: &str) -> HubError {
    HubError::Protocol {
        url: display_url(url),
        message: message.into(),
    }
}

fn io(path: &Path, source: std::io::Error) -> HubError {
    HubError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_resolve_layout() {
        let hub = HubClient::new("http://127.0.0.1:9/mirror/").unwrap();
        assert_eq!(
            hub.file_url("org/repo", "main", "sub/a b.json"),
            "http://127.0.0.1:9/mirror/org/repo/resolve/main/sub/a%20b.json"
        );
        assert_eq!(
            hub.file_url("org/repo", "refs/pr/1", "x"),
            "http://127.0.0.1:9/mirror/org/repo/resolve/refs%2Fpr%2F1/x"
        );
        assert_eq!(
            hub.revision_url("org/repo", "v1").as_str(),
            "http://127.0.0.1:9/mirror/api/models/org/repo/revision/v1"
        );
        assert!(HubClient::new("ftp://x").is_err());
    }

    #[test]
    fn etags_and_ranges() {
        assert_eq!(normalize_etag("W/\"AbC\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
        let info = HubFileInfo {
            commit: None,
            etag: Some("a".repeat(64)),
            size: None,
            location: String::new(),
        };
        assert!(info.sha256().is_some() && info.git_blob_id().is_none());
    }

    #[test]
    fn error_codes_map_to_kinds() {
        let url = Url::parse("http://h/org/repo/resolve/main/f").unwrap();
        let with = |code: Option<&str>, status: u16| {
            let mut headers = HeaderMap::new();
            if let Some(code) = code {
                headers.insert(HEADER_ERROR_CODE, code.parse().unwrap());
            }
            status_error(
                StatusCode::from_u16(status).unwrap(),
                &headers,
                &url,
                "org/repo",
                false,
                |code| match code {
                    Some("RevisionNotFound") => HubError::RevisionNotFound {
                        repo: "org/repo".into(),
                        revision: "main".into(),
                    },
                    Some("RepoNotFound") => HubError::RepoNotFound {
                        repo: "org/repo".into(),
                    },
                    _ => HubError::EntryNotFound {
                        repo: "org/repo".into(),
                        revision: "main".into(),
                        path: "f".into(),
                    },
                },
            )
        };
        assert!(matches!(
            with(Some("GatedRepo"), 401),
            HubError::Gated { .. }
        ));
        assert!(matches!(
            with(Some("GatedRepo"), 403),
            HubError::Gated { .. }
        ));
        assert!(matches!(
            with(Some("RepoNotFound"), 401),
            HubError::RepoNotFound { .. }
        ));
        assert!(matches!(
            with(Some("RevisionNotFound"), 404),
            HubError::RevisionNotFound { .. }
        ));
        assert!(matches!(
            with(Some("EntryNotFound"), 404),
            HubError::EntryNotFound { .. }
        ));
        assert!(matches!(with(None, 404), HubError::EntryNotFound { .. }));
        assert!(with(None, 401).is_auth());
        assert!(with(None, 403).is_auth());
        assert!(with(None, 429).is_retryable());
        assert!(with(None, 503).is_retryable());
        assert!(!with(None, 400).is_retryable());
        assert!(with(Some("EntryNotFound"), 404).is_not_found());
    }
}
