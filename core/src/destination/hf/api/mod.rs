//! A client of the Hub's write API, the requests `huggingface_hub` makes
//! (`hf_api.py`, `_commit_api.py`, `lfs.py`), with the job's token:
//!
//! - `GET /api/whoami-v2`: who the token is, its role, its orgs.
//! - `GET /api/models/{repo}` (exists?), `GET /api/models/{repo}/revision/{rev}`
//!   (the head commit, `sha`), `GET /api/models/{repo}/commits/{rev}?limit=100`
//!   (commits newest first: `id`, `title`, `message`, `date`), one page at
//!   a time: the next page is the `Link: <…>; rel="next"` header's URL,
//!   which carries its own query (`p=1&limit=100`), as huggingface_hub's
//!   `utils/_pagination.py` and huggingface.js's `list-commits.ts` follow
//!   it ([`CommitPage`]).
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
//! A revision (`{rev}`, `{branch}`) is always one path segment, every
//! byte but letters, digits and `-._~` percent-encoded, so a branch
//! `exp/run-1` goes as `exp%2Frun-1` (huggingface_hub: `quote(revision,
//! safe="")` in `hf_api.py`); the LFS batch body names it unencoded.
//!
//! The token goes as `Authorization: Bearer` to the Hub's own origin only
//! (the API and the `verify` action), never to the storage URLs its LFS
//! `upload` actions hand out (they are signed), even on the Hub's origin.
//! This client never retries: [`HubApiError::is_retryable`] and
//! [`HubApiError::retry_after`] tell the stage runtime, which owns
//! redelivery; only a parent-commit conflict is retried by the caller.

mod error;
mod lfs;

pub use error::HubApiError;
pub use lfs::{LfsAction, LfsActions, LfsObject, LfsObjectError};

use base64::Engine as _;
use error::error_of;
use reqwest::header;
use reqwest::{Method, Url};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const LFS_JSON: &str = "application/vnd.git-lfs+json";
/// Bytes of a file's start the preupload call sees.
pub const SAMPLE_BYTES: usize = 512;

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
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct CommitEntry {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339 (`2024-01-15T10:30:00.000Z`); empty when the Hub did not say.
    #[serde(default)]
    pub date: String,
}

/// Commits asked for per page; the Hub may send fewer (huggingface.js
/// `list-commits.ts`: `batchSize`, default 100).
pub const COMMITS_PER_PAGE: usize = 100;

/// One page of a commit listing.
#[derive(Clone, Debug, Default)]
pub struct CommitPage {
    /// Newest first.
    pub commits: Vec<CommitEntry>,
    /// The next page (the `Link` header's `rel="next"`); `None` on the last.
    pub next: Option<Url>,
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

    /// The first page of `revision`'s commits, newest first.
    pub async fn commits(&self, repo: &str, revision: &str) -> Result<CommitPage, HubApiError> {
        let mut url = self.repo_url(repo, "commits", revision);
        url.query_pairs_mut()
            .append_pair("limit", &COMMITS_PER_PAGE.to_string());
        self.commit_page(repo, url).await
    }

    /// The page an earlier one's [`CommitPage::next`] names.
    pub async fn next_commits(&self, repo: &str, next: &Url) -> Result<CommitPage, HubApiError> {
        self.commit_page(repo, next.clone()).await
    }

    async fn commit_page(&self, repo: &str, url: Url) -> Result<CommitPage, HubApiError> {
        let what = format!("the commits of {repo}");
        let response = self
            .send(self.request(Method::GET, url.clone()), &what)
            .await?;
        let next = response
            .headers()
            .get_all(header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| next_link(v, &url));
        if let Some(next) = &next
            && next.origin() != self.endpoint.origin()
        {
            return Err(HubApiError::Protocol {
                what,
                message: "the next page of commits is on another origin".into(),
            });
        }
        let commits = Self::json(response, &what).await?;
        Ok(CommitPage { commits, next })
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

/// The `rel="next"` URL of a `Link` header value (RFC 8288, as GitHub and
/// the Hub write it: `<url>; rel="next", <url>; rel="last"`), resolved
/// against the URL it answered.
pub fn next_link(value: &str, base: &Url) -> Option<Url> {
    value.split(',').find_map(|link| {
        let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
        let next = params.split(';').any(|param| {
            let Some((key, rels)) = param.trim().split_once('=') else {
                return false;
            };
            key.trim().eq_ignore_ascii_case("rel")
                && rels
                    .trim()
                    .trim_matches('"')
                    .split_ascii_whitespace()
                    .any(|rel| rel.eq_ignore_ascii_case("next"))
        });
        next.then(|| base.join(target.trim()).ok()).flatten()
    })
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
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
        // A branch holding '/' stays one segment, in every revision path.
        for action in ["commit", "preupload", "branch", "commits", "revision"] {
            assert_eq!(
                api.repo_url("me/r", action, "exp/run-1").as_str(),
                format!("https://hub.example/api/models/me/r/{action}/exp%2Frun-1")
            );
        }
    }

    #[test]
    fn the_next_page_is_the_link_headers_rel_next() {
        let base =
            Url::parse("https://hub.example/api/models/me/r/commits/main?limit=100").unwrap();
        let next = |value: &str| next_link(value, &base).map(String::from);
        assert_eq!(
            next(r#"<https://hub.example/api/models/me/r/commits/main?p=1&limit=100>; rel="next""#)
                .as_deref(),
            Some("https://hub.example/api/models/me/r/commits/main?p=1&limit=100")
        );
        assert_eq!(
            next(r#"<https://h/x?p=0>; rel="prev", <https://h/x?p=2>; rel="next""#).as_deref(),
            Some("https://h/x?p=2")
        );
        assert_eq!(
            next(r#"</api/models/me/r/commits/main?p=3>;rel=next"#).as_deref(),
            Some("https://hub.example/api/models/me/r/commits/main?p=3")
        );
        assert_eq!(
            next(r#"<https://h/x?p=9>; title="a"; rel="last next""#).as_deref(),
            Some("https://h/x?p=9")
        );
        assert_eq!(next(r#"<https://h/x?p=9>; rel="last""#), None);
        assert_eq!(next("garbage"), None);
        assert_eq!(next(""), None);
    }
}
