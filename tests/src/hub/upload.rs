//! The fake Hub's write side, answering the requests `huggingface_hub`
//! makes (`hf_api.py`, `_commit_api.py`, `lfs.py`) with the shapes it
//! reads:
//!
//! - `GET /api/whoami-v2` → `{type, name, orgs: [{name, roleInOrg}], auth:
//!   {type, accessToken: {displayName, role}}}`; 401 for an unknown token.
//! - `GET /api/models/{repo}` → `{id, sha, private}`; 404 `RepoNotFound`
//!   (also for a private repository the caller may not see).
//! - `POST /api/repos/create` `{name, organization, private, type}` → `{url}`;
//!   409 when it exists; the repository starts with one commit holding
//!   `.gitattributes`, as the Hub's do.
//! - `POST /api/models/{repo}/branch/{branch}` → 200, 409 when it exists,
//!   400 for a `refs/…` name.
//! - `POST /api/models/{repo}/preupload/{rev}` → `files[].{path,
//!   uploadMode, shouldIgnore}`: `lfs` for weights' extensions, files over
//!   10 MB, or a sample holding a NUL byte.
//! - `POST /{repo}.git/info/lfs/objects/batch` → `{transfer, objects}`:
//!   stored objects without `actions`, others with an `upload` action to
//!   `/lfs-storage/{oid}` on this server (or, with a multipart chunk size
//!   set, one URL per part and the completion URL) and a `verify` action.
//!   The storage URLs check the bytes' sha256 and note whether a request
//!   carried an `Authorization` header (it must not: they are signed).
//! - `POST /api/models/{repo}/commit/{rev}` (NDJSON) → `{success,
//!   commitOid, commitUrl}`; 412 when `parentCommit` is not the head;
//!   `lfsFile` lines must name stored objects. [`FakeHub::inject_conflicts`]
//!   makes the next commits meet a head someone else just moved.
//! - `GET /api/models/{repo}/commits/{rev}[?p=N&limit=L]` → `[{id, title,
//!   message, authors, date}]`, newest first, page `N` (from 0) of
//!   `min(L, page size)` commits ([`FakeHub::set_commit_page_size`], default
//!   100), with `Link: <…?p=N+1&limit=L>; rel="next"` while more follow.
//!   [`FakeHub::add_commits`] adds someone else's commits with a date.
//!
//! Every write needs a token of a user who may write in the namespace
//! ([`FakeHub::add_user`]): 401 without one, 403 when it may not.

use super::{FakeFile, FakeHub, FakeRepo, Inner, error, lfs, lock};
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Who a token is.
#[derive(Clone, Debug)]
pub struct FakeUser {
    pub name: String,
    /// `read`, `write` or `admin`.
    pub role: String,
    /// Organisations with the user's `roleInOrg`.
    pub orgs: Vec<(String, String)>,
}

impl FakeUser {
    pub fn writer(name: &str) -> Self {
        Self {
            name: name.into(),
            role: "write".into(),
            orgs: Vec::new(),
        }
    }

    fn may(&self, namespace: &str, write: bool) -> bool {
        if write && self.role == "read" {
            return false;
        }
        self.name == namespace
            || self
                .orgs
                .iter()
                .any(|(org, role)| org == namespace && (!write || role != "read"))
    }
}

/// A commit made through the commit API (or by a repository's creation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeCommit {
    pub id: String,
    pub parent: Option<String>,
    pub title: String,
    pub message: String,
    /// Ms since the epoch; listed as RFC 3339.
    pub date_ms: i64,
}

/// Commits per listing page unless [`FakeHub::set_commit_page_size`].
const COMMIT_PAGE_SIZE: usize = 100;

#[derive(Default)]
pub(super) struct Writes {
    users: Mutex<HashMap<String, FakeUser>>,
    /// Stored LFS objects by sha256.
    pub(super) lfs: Mutex<HashMap<String, Bytes>>,
    pub(super) parts: Mutex<HashMap<(String, u32), Bytes>>,
    pub(super) multipart_chunk: Mutex<Option<u64>>,
    conflicts: AtomicUsize,
    /// The next commit's answer instead of committing: status, Retry-After.
    commit_failure: Mutex<Option<(StatusCode, Option<u64>)>>,
    created: Mutex<Vec<(String, bool)>>,
    commit_requests: AtomicUsize,
    /// The largest listing page; `None`: [`COMMIT_PAGE_SIZE`].
    commit_page_size: Mutex<Option<usize>>,
    /// The page (`p`) of every commit listing request, in order.
    commit_pages: Mutex<Vec<usize>>,
    pub(super) lfs_puts: AtomicUsize,
    pub(super) token_sent_to_storage: AtomicBool,
}

impl FakeHub {
    /// Lets `token` act as `user`.
    pub fn add_user(&self, token: &str, user: FakeUser) {
        lock(&self.inner.writes.users).insert(token.into(), user);
    }

    /// The next `n` commits find that someone else committed to their
    /// branch just before them (412).
    pub fn inject_conflicts(&self, n: usize) {
        self.inner.writes.conflicts.store(n, Ordering::SeqCst);
    }

    /// The next commit request is answered with `status` (and a
    /// `Retry-After` of `retry_after` seconds) and changes nothing.
    pub fn inject_commit_failure(&self, status: u16, retry_after: Option<u64>) {
        let status = StatusCode::from_u16(status).expect("status");
        *lock(&self.inner.writes.commit_failure) = Some((status, retry_after));
    }

    /// LFS uploads of objects larger than `chunk` go in parts.
    pub fn set_multipart_chunk(&self, chunk: Option<u64>) {
        *lock(&self.inner.writes.multipart_chunk) = chunk;
    }

    /// Repositories created by requests, with their `private` flag.
    pub fn created_repos(&self) -> Vec<(String, bool)> {
        lock(&self.inner.writes.created).clone()
    }

    pub fn repo(&self, name: &str) -> Option<FakeRepo> {
        lock(&self.inner.repos).get(name).cloned()
    }

    /// Commits made in `repo` (its creation's included), oldest first.
    pub fn commits(&self, repo: &str) -> Vec<FakeCommit> {
        self.repo(repo).map(|r| r.log).unwrap_or_default()
    }

    /// Commit listings answer at most `size` commits a page.
    pub fn set_commit_page_size(&self, size: usize) {
        *lock(&self.inner.writes.commit_page_size) = Some(size.max(1));
    }

    /// The page of every commit listing request so far (0: the first).
    pub fn commit_pages(&self) -> Vec<usize> {
        lock(&self.inner.writes.commit_pages).clone()
    }

    /// `n` commits by someone else on `branch` of `repo`, each dated
    /// `date_ms` and adding `notes-<i>.txt`.
    pub fn add_commits(&self, repo: &str, branch: &str, n: usize, date_ms: i64) {
        let mut repos = lock(&self.inner.repos);
        let found = repos.get_mut(repo).expect("the repository");
        for i in 0..n {
            let (_, mut files) = found.at(branch).expect("the branch");
            files.insert(
                format!("notes-{i}.txt"),
                FakeFile {
                    data: Bytes::from(format!("someone else's note {i}\n")),
                    lfs: false,
                },
            );
            record(
                found,
                branch,
                files,
                &format!("someone else's commit {i}"),
                "",
                format!("theirs {i}").as_bytes(),
            );
            found.log.last_mut().expect("the commit").date_ms = date_ms;
        }
    }

    /// Commit requests received, accepted or not.
    pub fn commit_requests(&self) -> usize {
        self.inner.writes.commit_requests.load(Ordering::SeqCst)
    }

    /// `PUT`s to the LFS storage URLs.
    pub fn lfs_puts(&self) -> usize {
        self.inner.writes.lfs_puts.load(Ordering::SeqCst)
    }

    /// Whether a request to the storage URLs carried an `Authorization`.
    pub fn token_sent_to_storage(&self) -> bool {
        self.inner
            .writes
            .token_sent_to_storage
            .load(Ordering::SeqCst)
    }
}

pub(super) fn json(status: StatusCode, value: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&value).expect("json")))
        .expect("response")
}

pub(super) fn refusal(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({"error": message}))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn user(inner: &Inner, headers: &HeaderMap) -> Option<FakeUser> {
    lock(&inner.writes.users).get(bearer(headers)?).cloned()
}

/// Whether the caller may read a private repository.
pub(super) fn may_read(inner: &Inner, repo: &str, headers: &HeaderMap) -> bool {
    let namespace = repo.split('/').next().unwrap_or_default();
    user(inner, headers).is_some_and(|u| u.may(namespace, false))
}

/// The caller, if it may write in `repo`'s namespace, else the refusal.
pub(super) fn writer(
    inner: &Inner,
    repo: &str,
    headers: &HeaderMap,
) -> Result<FakeUser, Box<Response>> {
    let Some(user) = user(inner, headers) else {
        return Err(Box::new(refusal(
            StatusCode::UNAUTHORIZED,
            "Invalid credentials in Authorization header",
        )));
    };
    let namespace = repo.split('/').next().unwrap_or_default();
    if !user.may(namespace, true) {
        return Err(Box::new(refusal(
            StatusCode::FORBIDDEN,
            "You don't have the rights to write in this namespace",
        )));
    }
    Ok(user)
}

pub(super) fn endpoint(inner: &Inner) -> String {
    format!("http://{}", lock(&inner.addr).expect("address"))
}

fn commit_id(parent: &str, body: &[u8]) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(parent.as_bytes());
    h.update(body);
    h.update(&uuid_like().to_le_bytes());
    h.digest().to_string()
}

/// Distinct per call, so equal commits get distinct ids.
fn uuid_like() -> u64 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst) as u64
}

/// The write side's routes; `None` for a request it does not answer.
pub(super) fn route(
    inner: &Inner,
    method: &Method,
    segments: &[String],
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Response> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    Some(match (method, s.as_slice()) {
        (&Method::GET, ["api", "whoami-v2"]) => whoami(inner, headers),
        (&Method::POST, ["api", "repos", "create"]) => create(inner, headers, body),
        (&Method::GET, ["api", "models", org, name]) => {
            info(inner, &format!("{org}/{name}"), headers)
        }
        (&Method::POST, ["api", "models", org, name, "branch", branch]) => {
            create_branch(inner, &format!("{org}/{name}"), branch, headers)
        }
        (&Method::POST, ["api", "models", org, name, "preupload", _rev]) => {
            lfs::preupload(inner, &format!("{org}/{name}"), headers, body)
        }
        (&Method::POST, ["api", "models", org, name, "commit", rev]) => {
            commit(inner, &format!("{org}/{name}"), rev, headers, body)
        }
        (&Method::GET, ["api", "models", org, name, "commits", rev]) => {
            list_commits(inner, &format!("{org}/{name}"), rev, query, headers)
        }
        (&Method::POST, [org, git, "info", "lfs", "objects", "batch"]) if git.ends_with(".git") => {
            let repo = format!("{org}/{}", git.trim_end_matches(".git"));
            lfs::batch(inner, &repo, headers, body)
        }
        (&Method::POST, [_org, git, "info", "lfs", "objects", "verify"])
            if git.ends_with(".git") =>
        {
            lfs::verify(inner, body)
        }
        (&Method::PUT, ["lfs-storage", oid]) => lfs::store_object(inner, oid, headers, body),
        (&Method::PUT, ["lfs-storage", oid, "part", number]) => {
            lfs::store_part(inner, oid, number, headers, body)
        }
        (&Method::POST, ["lfs-storage", oid, "complete"]) => {
            lfs::complete(inner, oid, headers, body)
        }
        _ => return None,
    })
}

fn whoami(inner: &Inner, headers: &HeaderMap) -> Response {
    let Some(user) = user(inner, headers) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "Invalid credentials in Authorization header",
        );
    };
    let orgs: Vec<serde_json::Value> = user
        .orgs
        .iter()
        .map(|(name, role)| serde_json::json!({"type": "org", "name": name, "roleInOrg": role}))
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({
            "type": "user",
            "id": format!("id-{}", user.name),
            "name": user.name,
            "fullname": user.name,
            "orgs": orgs,
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "test", "role": user.role},
            },
        }),
    )
}

fn info(inner: &Inner, repo: &str, headers: &HeaderMap) -> Response {
    match super::access(inner, repo, headers) {
        Ok(found) => json(
            StatusCode::OK,
            serde_json::json!({"id": repo, "sha": found.commit, "private": found.private}),
        ),
        Err((status, code)) => error(status, code),
    }
}

/// Records a commit of `files` on `branch` of `repo`; its id.
fn record(
    repo: &mut FakeRepo,
    branch: &str,
    files: BTreeMap<String, FakeFile>,
    title: &str,
    message: &str,
    body: &[u8],
) -> String {
    let parent = repo.at(branch).map(|(commit, _)| commit);
    let id = commit_id(parent.as_deref().unwrap_or_default(), body);
    repo.snapshots.insert(id.clone(), files.clone());
    if branch == "main" {
        repo.commit = id.clone();
        repo.files = files;
    } else {
        repo.branches.insert(branch.to_owned(), id.clone());
    }
    repo.log.push(FakeCommit {
        id: id.clone(),
        parent,
        title: title.to_owned(),
        message: message.to_owned(),
        date_ms: trainyard_core::now_ms(),
    });
    id
}

fn create(inner: &Inner, headers: &HeaderMap, body: &Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return refusal(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let name = request["name"].as_str().unwrap_or_default();
    let caller = user(inner, headers);
    let namespace = request["organization"]
        .as_str()
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .or_else(|| caller.as_ref().map(|u| u.name.clone()))
        .unwrap_or_default();
    let repo = format!("{namespace}/{name}");
    if let Err(refused) = writer(inner, &repo, headers) {
        return *refused;
    }
    if request["type"].as_str().is_some_and(|t| t != "model") {
        return refusal(StatusCode::BAD_REQUEST, "only model repositories here");
    }
    let private = request["private"].as_bool().unwrap_or(false);
    let url = format!("{}/{repo}", endpoint(inner));
    let mut repos = lock(&inner.repos);
    if repos.contains_key(&repo) {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"error": "You already created this model repo", "url": url}),
        );
    }
    let mut created = FakeRepo {
        private,
        ..FakeRepo::default()
    };
    let attributes = FakeFile {
        data: Bytes::from_static(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"),
        lfs: false,
    };
    record(
        &mut created,
        "main",
        [(".gitattributes".to_owned(), attributes)].into(),
        "initial commit",
        "initial commit",
        repo.as_bytes(),
    );
    repos.insert(repo.clone(), created);
    lock(&inner.writes.created).push((repo, private));
    json(StatusCode::OK, serde_json::json!({"url": url}))
}

fn create_branch(inner: &Inner, repo: &str, branch: &str, headers: &HeaderMap) -> Response {
    if let Err(refused) = writer(inner, repo, headers) {
        return *refused;
    }
    let mut repos = lock(&inner.repos);
    let Some(found) = repos.get_mut(repo) else {
        return error(StatusCode::NOT_FOUND, "RepoNotFound");
    };
    if branch.starts_with("refs/") {
        return refusal(StatusCode::BAD_REQUEST, "Invalid reference for a branch");
    }
    if branch == "main" || found.branches.contains_key(branch) {
        return refusal(StatusCode::CONFLICT, "Reference already exists");
    }
    let head = found.commit.clone();
    found
        .snapshots
        .entry(head.clone())
        .or_insert_with(|| found.files.clone());
    found.branches.insert(branch.to_owned(), head);
    json(StatusCode::OK, serde_json::json!({}))
}

fn commit(inner: &Inner, repo: &str, rev: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    inner.writes.commit_requests.fetch_add(1, Ordering::SeqCst);
    if let Some((status, retry_after)) = lock(&inner.writes.commit_failure).take() {
        let mut response = refusal(status, "injected failure");
        if let Some(secs) = retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                secs.to_string().parse().expect("header"),
            );
        }
        return response;
    }
    if let Err(refused) = writer(inner, repo, headers) {
        return *refused;
    }
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("application/x-ndjson")
    {
        return refusal(StatusCode::BAD_REQUEST, "the body must be NDJSON");
    }
    let mut lines = Vec::new();
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(value) => lines.push(value),
            Err(_) => return refusal(StatusCode::BAD_REQUEST, "a line is not JSON"),
        }
    }
    let Some(header_line) = lines.first().filter(|l| l["key"] == "header") else {
        return refusal(StatusCode::BAD_REQUEST, "the first line must be the header");
    };
    let head = header_line["value"].clone();
    let summary = head["summary"].as_str().unwrap_or_default().to_owned();
    if summary.is_empty() {
        return refusal(StatusCode::BAD_REQUEST, "no summary");
    }
    let description = head["description"].as_str().unwrap_or_default();
    let mut repos = lock(&inner.repos);
    let Some(found) = repos.get_mut(repo) else {
        return error(StatusCode::NOT_FOUND, "RepoNotFound");
    };
    let Some((current, mut files)) = found.at(rev) else {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    };
    if inner
        .writes
        .conflicts
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        // Someone else commits first.
        let mut theirs = files.clone();
        theirs.insert(
            "notes.txt".into(),
            FakeFile {
                data: Bytes::from(format!("someone else, after {current}\n")),
                lfs: false,
            },
        );
        record(found, rev, theirs, "someone else's commit", "", b"theirs");
    }
    let (current, _) = found.at(rev).expect("the revision");
    if let Some(parent) = head["parentCommit"].as_str()
        && parent != current
    {
        return refusal(
            StatusCode::PRECONDITION_FAILED,
            "A commit has happened since. Please refresh and try again.",
        );
    }
    let stored = lock(&inner.writes.lfs);
    for line in &lines[1..] {
        let value = &line["value"];
        let path = value["path"].as_str().unwrap_or_default().to_owned();
        if path.is_empty() || path.split('/').any(|s| matches!(s, "" | "." | "..")) {
            return refusal(StatusCode::BAD_REQUEST, "bad path");
        }
        match line["key"].as_str() {
            Some("file") => {
                let decoded = (value["encoding"] == "base64")
                    .then(|| value["content"].as_str())
                    .flatten()
                    .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok());
                let Some(data) = decoded else {
                    return refusal(StatusCode::BAD_REQUEST, "file content is not base64");
                };
                files.insert(
                    path,
                    FakeFile {
                        data: data.into(),
                        lfs: false,
                    },
                );
            }
            Some("lfsFile") => {
                let oid = value["oid"].as_str().unwrap_or_default();
                let data = stored.get(oid).filter(|d| {
                    value["algo"] == "sha256" && Some(d.len() as u64) == value["size"].as_u64()
                });
                let Some(data) = data else {
                    return refusal(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "an LFS pointer names an object that was never uploaded",
                    );
                };
                files.insert(
                    path,
                    FakeFile {
                        data: data.clone(),
                        lfs: true,
                    },
                );
            }
            Some("deletedFile") => {
                files.remove(&path);
            }
            _ => return refusal(StatusCode::BAD_REQUEST, "unknown line"),
        }
    }
    drop(stored);
    let message = if description.is_empty() {
        summary.clone()
    } else {
        format!("{summary}\n\n{description}")
    };
    let id = record(found, rev, files, &summary, &message, body);
    json(
        StatusCode::OK,
        serde_json::json!({
            "success": true,
            "commitOid": id,
            "commitUrl": format!("{}/{repo}/commit/{id}", endpoint(inner)),
            "hookOutput": "",
        }),
    )
}

fn list_commits(
    inner: &Inner,
    repo: &str,
    rev: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    let found = match super::access(inner, repo, headers) {
        Ok(found) => found,
        Err((status, code)) => return error(status, code),
    };
    let Some((head, _)) = found.at(rev) else {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound");
    };
    let param = |name: &str| {
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let page: usize = match param("p").map(|p| p.parse()) {
        None => 0,
        Some(Ok(p)) => p,
        Some(Err(_)) => return refusal(StatusCode::BAD_REQUEST, "p is not a page number"),
    };
    let limit: Option<usize> = match param("limit").map(|l| l.parse()) {
        None => None,
        Some(Ok(l)) if l > 0 => Some(l),
        Some(_) => return refusal(StatusCode::BAD_REQUEST, "limit is not a positive number"),
    };
    lock(&inner.writes.commit_pages).push(page);
    let largest = lock(&inner.writes.commit_page_size).unwrap_or(COMMIT_PAGE_SIZE);
    let size = limit.unwrap_or(largest).min(largest);
    let by_id: HashMap<&str, &FakeCommit> = found.log.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut history = Vec::new();
    let mut next = Some(head);
    while let Some(id) = next {
        let Some(commit) = by_id.get(id.as_str()) else {
            break;
        };
        history.push(*commit);
        next = commit.parent.clone();
    }
    let listed: Vec<serde_json::Value> = history
        .iter()
        .skip(page * size)
        .take(size)
        .map(|commit| {
            serde_json::json!({
                "id": commit.id,
                "title": commit.title,
                "message": commit.message,
                "authors": [{"user": "someone"}],
                "date": trainyard_core::rfc3339(commit.date_ms),
            })
        })
        .collect();
    let mut response = json(StatusCode::OK, serde_json::Value::Array(listed));
    if (page + 1) * size < history.len() {
        let mut url = url::Url::parse(&endpoint(inner)).expect("endpoint");
        url.path_segments_mut()
            .expect("a base")
            .extend(["api", "models"])
            .extend(repo.split('/'))
            .extend(["commits", rev]);
        let mut query = format!("p={}", page + 1);
        if let Some(limit) = limit {
            query.push_str(&format!("&limit={limit}"));
        }
        url.set_query(Some(&query));
        let link = format!("<{url}>; rel=\"next\"");
        response
            .headers_mut()
            .insert(header::LINK, link.parse().expect("header"));
    }
    response
}
