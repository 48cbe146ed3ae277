//! A client of the Hub's write API, the requests `huggingface_hub` makes
//! (`hf_api.py`, `_commit_api.py`, `lfs.py`), with the job's token:
//!
//! - `GET /api/whoami-v2`: who the token is, its role, its orgs.
//! - `GET /api/models/{repo}` (exists?), `GET /api/models/{repo}/revision/{rev}`
//!   (the head commit, `sha`), `GET /api/models/{repo}/commits/{rev}` (the
//!   latest commits, newest first: `id`, `title`, `message`).
//! - `POST /api/repos/create` `{name, organization, private, type}`; 409:
//!   it exists. `POST /api/models/{repo}/branch/{branch}`; 409: it exists.
//! - `POST /api/models/{repo}/preupload/{rev}` `{files: [{path, sample
//!   (base64 of the first 512 bytes), size}]}` → `files[].uploadMode`
//!   (`lfs` | `regular`).
//! - `POST /{repo}.git/info/lfs/objects/batch` (`application/vnd.git-lfs+json`)
//!   `{operation: "upload", transfers: ["basic", "multipart"], objects:
//!   [{oid, size}], hash_algo: "sha256", ref: {name}}` → per object either
//!   no `actions` (already stored) or an `upload` action (a `PUT` of the
//!   body to `href`; with `header.chunk_size`, a `PUT` of each part to the
//!   URL under its number, then a `POST` of `{oid, parts: [{partNumber,
//!   etag}]}` to `href`) and maybe a `verify` action (`POST {oid, size}`).
//!   This client does not offer the `xet` transfer: the Hub then answers
//!   with `basic`/`multipart`, which it still serves.
//! - `POST /api/models/{repo}/commit/{rev}` (`application/x-ndjson`): a
//!   `header` line `{summary, description, parentCommit}`, then `file`
//!   (`{path, content, encoding: "base64"}`) and `lfsFile` (`{path, algo:
//!   "sha256", oid, size}`) lines → `{commitOid, commitUrl}`. A head that
//!   moved past `parentCommit` answers 412 (or 409): [`HubApiError::Conflict`].
//!
//! The token goes as `Authorization: Bearer` to the Hub's own origin only
//! (the API and the `verify` action), never to the storage URLs its LFS
//! `upload` actions hand out (they are signed), even on the Hub's origin.
//! This client never retries: [`HubApiError::is_retryable`] and
//! [`HubApiError::retry_after`] tell the stage runtime, which owns
//! redelivery; only a parent-commit conflict is retried by the caller.

use base64::Engine as _;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

const LFS_JSON: &str = "application/vnd.git-lfs+json";
/// Bytes of a file's start the preupload call sees.
pub const SAMPLE_BYTES: usize = 512;

/// Why a Hub request failed.
#[derive(Debug, thiserror::Error)]
pub enum HubApiError {
    #[error("invalid hub endpoint {0:?}")]
    InvalidEndpoint(String),
    /// 401/403: the token is missing, wrong, or may not do this.
    #[error("the hub refused the token (http {status}{})", code_suffix(code))]
    Auth { status: u16, code: Option<String> },
    #[error("{what} not found on the hub{}", code_suffix(code))]
    NotFound { what: String, code: Option<String> },
    /// The branch moved past the parent commit (412, or 409 on commit).
    #[error("the branch moved while committing (http {status})")]
    Conflict { status: u16 },
    #[error("the hub is rate limiting requests (http 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the hub answered http {status} for {what}")]
    Server {
        status: u16,
        what: String,
        retry_after: Option<Duration>,
    },
    /// Any other refusal (400, 413, 422…): trying again will not help.
    #[error("the hub refused {what} (http {status}): {message}")]
    Refused {
        status: u16,
        what: String,
        message: String,
    },
    #[error("cannot reach the hub for {what}: {message}")]
    Network { what: String, message: String },
    #[error("unexpected answer from the hub for {what}: {message}")]
    Protocol { what: String, message: String },
    #[error("local file {path}: {message}")]
    Io { path: String, message: String },
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_deref()
        .map(|c| format!(", {c}"))
        .unwrap_or_default()
}

impl HubApiError {
    pub fn is_auth(&self) -> bool {
        matches!(self, HubApiError::Auth { .. })
    }

    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HubApiError::RateLimited { .. }
                | HubApiError::Server { .. }
                | HubApiError::Network { .. }
                | HubApiError::Protocol { .. }
                | HubApiError::Io { .. }
        )
    }

    /// How long the Hub asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HubApiError::RateLimited { retry_after } | HubApiError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

/// What `whoami-v2` says about a token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Whoami {
    pub name: String,
    pub orgs: Vec<WhoamiOrg>,
    /// `read`, `write`, `admin`, `contributor` or `fineGrained`; `None`
    /// when the Hub did not say.
    pub role: Option<String>,
    /// A fine-grained token's scoped permissions.
    pub scoped: Vec<WhoamiScope>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WhoamiOrg {
    pub name: String,
    /// `roleInOrg`.
    pub role: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WhoamiScope {
    /// `user`, `org`, `model`, …
    pub entity_type: String,
    pub entity_name: String,
    pub permissions: Vec<String>,
}

#[derive(Deserialize)]
struct WhoamiWire {
    name: String,
    #[serde(default)]
    orgs: Vec<OrgWire>,
    auth: Option<AuthWire>,
}

#[derive(Deserialize)]
struct OrgWire {
    name: String,
    #[serde(rename = "roleInOrg")]
    role_in_org: Option<String>,
}

#[derive(Deserialize)]
struct AuthWire {
    #[serde(rename = "accessToken")]
    access_token: Option<AccessTokenWire>,
}

#[derive(Deserialize)]
struct AccessTokenWire {
    role: Option<String>,
    #[serde(rename = "fineGrained")]
    fine_grained: Option<FineGrainedWire>,
}

#[derive(Deserialize)]
struct FineGrainedWire {
    #[serde(default)]
    scoped: Vec<ScopedWire>,
}

#[derive(Deserialize)]
struct ScopedWire {
    entity: EntityWire,
    #[serde(default)]
    permissions: Vec<String>,
}

#[derive(Deserialize)]
struct EntityWire {
    #[serde(rename = "type")]
    kind: String,
    name: String,
}

/// One commit of a listing.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct CommitEntry {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub message: String,
}

/// A file the preupload call classifies.
#[derive(Clone, Debug, Serialize)]
pub struct PreuploadFile {
    pub path: String,
    /// Base64 of the first [`SAMPLE_BYTES`].
    pub sample: String,
    pub size: u64,
}

#[derive(Deserialize)]
struct PreuploadAnswer {
    files: Vec<PreuploadMode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreuploadMode {
    path: String,
    upload_mode: String,
}

/// One object of an LFS batch answer.
#[derive(Clone, Debug, Deserialize)]
pub struct LfsObject {
    pub oid: String,
    pub size: u64,
    #[serde(default)]
    pub actions: Option<LfsActions>,
    #[serde(default)]
    pub error: Option<LfsObjectError>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsActions {
    pub upload: Option<LfsAction>,
    pub verify: Option<LfsAction>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsAction {
    pub href: String,
    #[serde(default)]
    pub header: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsObjectError {
    pub code: i64,
    pub message: String,
}

#[derive(Deserialize)]
struct LfsBatchAnswer {
    objects: Vec<LfsObject>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitAnswer {
    commit_oid: String,
}

#[derive(Deserialize)]
struct RevisionAnswer {
    sha: Option<String>,
}

/// One line of a commit's NDJSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOp {
    /// A small file, in the commit itself.
    File { path: String, content: Vec<u8> },
    /// A file already in LFS storage, by its sha256.
    LfsFile {
        path: String,
        oid: String,
        size: u64,
    },
}

/// The NDJSON body of a commit: a header line, then one line per file.
pub fn commit_body(
    summary: &str,
    description: &str,
    parent_commit: Option<&str>,
    ops: &[CommitOp],
) -> Vec<u8> {
    let mut header = serde_json::json!({"summary": summary, "description": description});
    if let Some(parent) = parent_commit {
        header["parentCommit"] = parent.into();
    }
    let mut lines = vec![serde_json::json!({"key": "header", "value": header})];
    for op in ops {
        lines.push(match op {
            CommitOp::File { path, content } => serde_json::json!({
                "key": "file",
                "value": {
                    "path": path,
                    "content": base64::engine::general_purpose::STANDARD.encode(content),
                    "encoding": "base64",
                },
            }),
            CommitOp::LfsFile { path, oid, size } => serde_json::json!({
                "key": "lfsFile",
                "value": {"path": path, "algo": "sha256", "oid": oid, "size": size},
            }),
        });
    }
    let mut body = Vec::new();
    for line in lines {
        body.extend(serde_json::to_vec(&line).unwrap_or_default());
        body.push(b'\n');
    }
    body
}

/// A client of one Hub with one token.
#[derive(Clone)]
pub struct HubApi {
    endpoint: Url,
    token: String,
    /// Follows no redirect: the token never leaves the Hub's origin.
    client: reqwest::Client,
}

impl std::fmt::Debug for HubApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubApi")
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &crate::redact::MASK)
            .finish()
    }
}

impl HubApi {
    pub fn new(endpoint: &str, token: &str) -> Result<Self, HubApiError> {
        let bad = || HubApiError::InvalidEndpoint(endpoint.to_owned());
        let url = Url::parse(endpoint.trim_end_matches('/')).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(bad());
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            // Per read: a stalled transfer fails, a long one does not.
            .read_timeout(Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("trainyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| bad())?;
        Ok(Self {
            endpoint: url,
            token: token.to_owned(),
            client,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str().trim_end_matches('/')
    }

    /// The token (for tests of which secret was chosen).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `{endpoint}/<segments…>`, each segment percent-encoded; a segment
    /// holding `/` (a repository id) becomes several.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            for segment in segments {
                path.extend(segment.split('/'));
            }
        }
        url
    }

    /// `/api/models/{repo}/{action}/{revision}`: the revision is one
    /// segment even if it held a `/`.
    fn repo_url(&self, repo: &str, action: &str, revision: &str) -> Url {
        let mut url = self.url(&["api", "models", repo, action]);
        if let Ok(mut path) = url.path_segments_mut() {
            path.push(revision);
        }
        url
    }

    /// A request to the storage URLs of an LFS action: signed, so never
    /// with the token, whatever their origin.
    fn storage_request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.client.request(method, url)
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.client.request(method, url.clone());
        if url.origin() == self.endpoint.origin() {
            request.bearer_auth(&self.token)
        } else {
            request
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, HubApiError> {
        let response = request.send().await.map_err(|e| HubApiError::Network {
            what: what.to_owned(),
            message: chain(e),
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_of(response, what).await)
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        response: reqwest::Response,
        what: &str,
    ) -> Result<T, HubApiError> {
        let bytes = response.bytes().await.map_err(|e| HubApiError::Network {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| HubApiError::Protocol {
            what: what.to_owned(),
            message: e.to_string(),
        })
    }

    /// Who the token is.
    pub async fn whoami(&self) -> Result<Whoami, HubApiError> {
        let what = "whoami-v2";
        let response = self
            .send(self.request(Method::GET, self.url(&["api", what])), what)
            .await?;
        let wire: WhoamiWire = Self::json(response, what).await?;
        let token = wire.auth.and_then(|a| a.access_token);
        Ok(Whoami {
            name: wire.name,
            orgs: wire
                .orgs
                .into_iter()
                .map(|o| WhoamiOrg {
                    name: o.name,
                    role: o.role_in_org,
                })
                .collect(),
            role: token.as_ref().and_then(|t| t.role.clone()),
            scoped: token
                .and_then(|t| t.fine_grained)
                .map(|f| {
                    f.scoped
                        .into_iter()
                        .map(|s| WhoamiScope {
                            entity_type: s.entity.kind,
                            entity_name: s.entity.name,
                            permissions: s.permissions,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Whether the model repository exists (and the token may see it).
    pub async fn repo_exists(&self, repo: &str) -> Result<bool, HubApiError> {
        let url = self.url(&["api", "models", repo]);
        match self.send(self.request(Method::GET, url), repo).await {
            Ok(_) => Ok(true),
            Err(HubApiError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The commit `revision` points at; `None` when the revision (or the
    /// repository) does not exist.
    pub async fn head(&self, repo: &str, revision: &str) -> Result<Option<String>, HubApiError> {
        let what = format!("{repo}@{revision}");
        let url = self.repo_url(repo, "revision", revision);
        match self.send(self.request(Method::GET, url), &what).await {
            Ok(response) => {
                let answer: RevisionAnswer = Self::json(response, &what).await?;
                answer.sha.map(Some).ok_or_else(|| HubApiError::Protocol {
                    what,
                    message: "no sha in the revision's info".into(),
                })
            }
            Err(HubApiError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a model repository; `false` when it already existed.
    pub async fn create_repo(&self, repo: &str, private: bool) -> Result<bool, HubApiError> {
        let (organization, name) = repo.split_once('/').unwrap_or(("", repo));
        let body = serde_json::json!({
            "name": name,
            "organization": organization,
            "private": private,
            "type": "model",
        });
        let url = self.url(&["api", "repos", "create"]);
        match self
            .send(
                self.request(Method::POST, url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(json_bytes(&body)),
                repo,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(HubApiError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates `branch` from the default branch; `false` when it existed.
    pub async fn create_branch(&self, repo: &str, branch: &str) -> Result<bool, HubApiError> {
        let url = self.repo_url(repo, "branch", branch);
        let what = format!("branch {branch} of {repo}");
        match self
            .send(
                self.request(Method::POST, url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body("{}"),
                &what,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(HubApiError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The latest commits of `revision`, newest first (the Hub's first page).
    pub async fn commits(
        &self,
        repo: &str,
        revision: &str,
    ) -> Result<Vec<CommitEntry>, HubApiError> {
        let what = format!("the commits of {repo}");
        let url = self.repo_url(repo, "commits", revision);
        let response = self.send(self.request(Method::GET, url), &what).await?;
        Self::json(response, &what).await
    }

    /// Which files the Hub wants through LFS: their paths.
    pub async fn preupload(
        &self,
        repo: &str,
        revision: &str,
        files: &[PreuploadFile],
    ) -> Result<Vec<String>, HubApiError> {
        let what = format!("the preupload of {repo}");
        let url = self.repo_url(repo, "preupload", revision);
        let mut lfs = Vec::new();
        for chunk in files.chunks(256) {
            let body = serde_json::json!({ "files": chunk });
            let response = self
                .send(
                    self.request(Method::POST, url.clone())
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(json_bytes(&body)),
                    &what,
                )
                .await?;
            let answer: PreuploadAnswer = Self::json(response, &what).await?;
            lfs.extend(
                answer
                    .files
                    .into_iter()
                    .filter(|f| f.upload_mode == "lfs")
                    .map(|f| f.path),
            );
        }
        Ok(lfs)
    }

    /// The LFS batch call for uploading `objects` (`(sha256, size)`).
    pub async fn lfs_batch(
        &self,
        repo: &str,
        revision: &str,
        objects: &[(String, u64)],
    ) -> Result<Vec<LfsObject>, HubApiError> {
        let what = format!("the LFS batch of {repo}");
        let url = self.url(&[&format!("{repo}.git"), "info", "lfs", "objects", "batch"]);
        let body = serde_json::json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects
                .iter()
                .map(|(oid, size)| serde_json::json!({"oid": oid, "size": size}))
                .collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let request = self
            .request(Method::POST, url)
            .header(header::ACCEPT, LFS_JSON)
            .header(header::CONTENT_TYPE, LFS_JSON)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        let response = self.send(request, &what).await?;
        let answer: LfsBatchAnswer = Self::json(response, &what).await?;
        Ok(answer.objects)
    }

    /// Uploads `local` (`size` bytes, sha256 `oid`) as `object`'s actions
    /// say: nothing when it is already stored, one `PUT`, or parts and a
    /// completion; then the `verify` action when given.
    pub async fn lfs_upload(
        &self,
        object: &LfsObject,
        local: &Path,
        size: u64,
    ) -> Result<(), HubApiError> {
        if let Some(error) = &object.error {
            return Err(lfs_object_error(&object.oid, error));
        }
        let Some(actions) = &object.actions else {
            return Ok(());
        };
        let what = format!("the upload of LFS object {}", object.oid);
        if let Some(upload) = &actions.upload {
            let href = self.action_url(upload, &what)?;
            match upload.header.get("chunk_size") {
                Some(chunk) => {
                    let chunk: u64 = chunk.parse().map_err(|_| HubApiError::Protocol {
                        what: what.clone(),
                        message: format!("chunk_size {chunk:?} is not a number"),
                    })?;
                    self.upload_parts(upload, href, chunk, local, size, &object.oid, &what)
                        .await?;
                }
                None => {
                    let file = tokio::fs::File::open(local)
                        .await
                        .map_err(|e| io(local, e))?;
                    let request = self
                        .storage_request(Method::PUT, href)
                        .headers(action_headers(upload))
                        .header(header::CONTENT_LENGTH, size)
                        .body(reqwest::Body::from(file));
                    self.send(request, &what).await?;
                }
            }
        }
        if let Some(verify) = &actions.verify {
            let href = self.action_url(verify, &what)?;
            let body = serde_json::json!({"oid": object.oid, "size": size});
            let request = self
                .request(Method::POST, href)
                .headers(action_headers(verify))
                .header(header::ACCEPT, LFS_JSON)
                .header(header::CONTENT_TYPE, LFS_JSON)
                .body(serde_json::to_vec(&body).unwrap_or_default());
            self.send(request, &format!("the verification of {}", object.oid))
                .await?;
        }
        Ok(())
    }

    fn action_url(&self, action: &LfsAction, what: &str) -> Result<Url, HubApiError> {
        let url = self
            .endpoint
            .join(&action.href)
            .map_err(|e| HubApiError::Protocol {
                what: what.to_owned(),
                message: format!("bad href: {e}"),
            })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HubApiError::Protocol {
                what: what.to_owned(),
                message: "the href is not http(s)".into(),
            });
        }
        Ok(url)
    }

    /// The multipart transfer: each part's `PUT` to the URL under its
    /// number in the action's header, then the completion with their etags.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        upload: &LfsAction,
        href: Url,
        chunk: u64,
        local: &Path,
        size: u64,
        oid: &str,
        what: &str,
    ) -> Result<(), HubApiError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut parts: Vec<(u32, &String)> = upload
            .header
            .iter()
            .filter_map(|(k, v)| k.parse::<u32>().ok().map(|n| (n, v)))
            .collect();
        parts.sort();
        if chunk == 0 || parts.len() as u64 != size.div_ceil(chunk) {
            return Err(HubApiError::Protocol {
                what: what.to_owned(),
                message: format!(
                    "{} part URLs for {size} bytes in chunks of {chunk}",
                    parts.len()
                ),
            });
        }
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| io(local, e))?;
        let mut done = Vec::with_capacity(parts.len());
        for (index, (number, part_url)) in parts.iter().enumerate() {
            let start = index as u64 * chunk;
            let len = chunk.min(size - start);
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| io(local, e))?;
            let mut buffer = vec![0u8; len as usize];
            file.read_exact(&mut buffer)
                .await
                .map_err(|e| io(local, e))?;
            let url = self.action_url(
                &LfsAction {
                    href: (*part_url).clone(),
                    header: Default::default(),
                },
                what,
            )?;
            let response = self
                .send(self.storage_request(Method::PUT, url).body(buffer), what)
                .await?;
            let etag = response
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| HubApiError::Protocol {
                    what: what.to_owned(),
                    message: format!("no etag for part {number}"),
                })?
                .to_owned();
            done.push(serde_json::json!({"partNumber": number, "etag": etag}));
        }
        let body = serde_json::json!({"oid": oid, "parts": done});
        let request = self
            .storage_request(Method::POST, href)
            .header(header::ACCEPT, LFS_JSON)
            .header(header::CONTENT_TYPE, LFS_JSON)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        self.send(request, what).await?;
        Ok(())
    }

    /// Commits `body` ([`commit_body`]) to `revision`; its commit id.
    pub async fn commit(
        &self,
        repo: &str,
        revision: &str,
        body: Vec<u8>,
    ) -> Result<String, HubApiError> {
        let what = format!("the commit to {repo}@{revision}");
        let url = self.repo_url(repo, "commit", revision);
        let request = self
            .request(Method::POST, url)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let response = self.send(request, &what).await?;
        let answer: CommitAnswer = Self::json(response, &what).await?;
        Ok(answer.commit_oid)
    }
}

/// A request error and its causes, without the URL (signed LFS URLs
/// carry credentials in their query).
fn chain(error: reqwest::Error) -> String {
    use std::error::Error as _;
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn io(path: &Path, e: std::io::Error) -> HubApiError {
    HubApiError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn lfs_object_error(oid: &str, error: &LfsObjectError) -> HubApiError {
    let what = format!("LFS object {oid}");
    match error.code {
        401 | 403 => HubApiError::Auth {
            status: error.code as u16,
            code: None,
        },
        500..=599 => HubApiError::Server {
            status: error.code as u16,
            what,
            retry_after: None,
        },
        code => HubApiError::Refused {
            status: u16::try_from(code).unwrap_or(0),
            what,
            message: error.message.chars().take(200).collect(),
        },
    }
}

/// An action's headers, but for the multipart bookkeeping ones.
fn action_headers(action: &LfsAction) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &action.header {
        if name == "chunk_size" || name.parse::<u32>().is_ok() {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error a non-success answer means.
async fn error_of(response: reqwest::Response, what: &str) -> HubApiError {
    let status = response.status();
    let code = response
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let wait = retry_after(&response);
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            if !matches!(
                code.as_deref(),
                Some("RepoNotFound" | "RevisionNotFound" | "EntryNotFound")
            ) =>
        {
            HubApiError::Auth {
                status: status.as_u16(),
                code,
            }
        }
        StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            HubApiError::NotFound {
                what: what.to_owned(),
                code,
            }
        }
        StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => HubApiError::Conflict {
            status: status.as_u16(),
        },
        StatusCode::TOO_MANY_REQUESTS => HubApiError::RateLimited { retry_after: wait },
        s if s.is_server_error() => HubApiError::Server {
            status: s.as_u16(),
            what: what.to_owned(),
            retry_after: wait,
        },
        s => {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(body);
            HubApiError::Refused {
                status: s.as_u16(),
                what: what.to_owned(),
                message: message.chars().take(300).collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_body_is_a_header_line_then_one_line_per_file() {
        let body = commit_body(
            "Trainyard: my-lora",
            "trained\n\nTrainyard-Job: j-1",
            Some("abc123"),
            &[
                CommitOp::File {
                    path: "README.md".into(),
                    content: b"# hi\n".to_vec(),
                },
                CommitOp::LfsFile {
                    path: "lora.safetensors".into(),
                    oid: "ab".repeat(32),
                    size: 1024,
                },
            ],
        );
        let text = String::from_utf8(body).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["key"], "header");
        assert_eq!(lines[0]["value"]["summary"], "Trainyard: my-lora");
        assert_eq!(lines[0]["value"]["parentCommit"], "abc123");
        assert!(
            lines[0]["value"]["description"]
                .as_str()
                .unwrap()
                .ends_with("Trainyard-Job: j-1")
        );
        assert_eq!(lines[1]["key"], "file");
        assert_eq!(lines[1]["value"]["encoding"], "base64");
        assert_eq!(lines[1]["value"]["content"], "IyBoaQo=");
        assert_eq!(lines[2]["key"], "lfsFile");
        assert_eq!(lines[2]["value"]["algo"], "sha256");
        assert_eq!(lines[2]["value"]["size"], 1024);

        let no_parent = commit_body("s", "", None, &[]);
        let header: serde_json::Value =
            serde_json::from_slice(no_parent.strip_suffix(b"\n").unwrap()).unwrap();
        assert!(header["value"].get("parentCommit").is_none());
    }

    #[test]
    fn the_token_is_never_shown_and_urls_encode_segments() {
        let api = HubApi::new("https://hub.example/", "hf_secret").unwrap();
        assert!(!format!("{api:?}").contains("hf_secret"));
        assert_eq!(
            api.repo_url("me/r", "commit", "my branch").as_str(),
            "https://hub.example/api/models/me/r/commit/my%20branch"
        );
        assert!(HubApi::new("ftp://x", "t").is_err());
    }

    #[test]
    fn action_headers_keep_only_real_headers() {
        let action = LfsAction {
            href: "https://s3.example/put".into(),
            header: [
                ("chunk_size".to_string(), "10".to_string()),
                ("1".to_string(), "https://s3.example/1".to_string()),
                ("x-amz-meta".to_string(), "v".to_string()),
            ]
            .into(),
        };
        let headers = action_headers(&action);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-amz-meta"], "v");
    }
}
