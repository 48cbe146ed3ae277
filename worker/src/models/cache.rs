//! The content-addressed store under `worker.model_cache_dir`:
//!
//! ```text
//! blobs/<sha256>                     complete, verified files
//! blobs/<key>.incomplete             a download in progress, resumed by the next attempt
//! snapshots/<org>--<repo>@<commit>/… symlinks into blobs/, laid out like the repository
//! snapshots/store/<key>              symlinks for artifact-store models
//! index.json                         sizes, last use, links, what each model is made of
//! ```
//!
//! Every file is one blob, found by its sha256, so two models (or two
//! presets) that share a file share its bytes. One download per blob at a
//! time: concurrent resolves of the same blob wait on a per-key lock and then
//! find it present. A blob in use by a run is *pinned*: a [`Pin`] held in the
//! run's `ModelLease` keeps it from eviction until the lease drops. Eviction
//! removes least-recently-used, unpinned blobs (and their links) while the
//! cache is over `max_bytes`; when everything left is pinned it logs and goes
//! over the cap rather than fail a run.
//!
//! One worker process owns a cache folder: the index is not shared between
//! processes.
//!
//! Every blob lookup counts as a hit (`trainyard_model_cache_hits_total`) or
//! a miss (`…_misses_total`, and the bytes fetched in
//! `…_fetched_bytes_total`); `trainyard_model_cache_size_bytes` follows the
//! cache's size as blobs come and go.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trainyard_core::runtime::StageError;
use trainyard_proto::v1::ErrorKind;

const INDEX: &str = "index.json";
const BLOBS: &str = "blobs";
/// Partial downloads older than this are deleted at start-up.
const STALE_PARTIAL: Duration = Duration::from_secs(24 * 3600);

/// What a blob must be, as far as the source says.
#[derive(Clone, Debug, Default)]
pub(crate) struct Expected {
    pub sha256: Option<String>,
    /// The git blob id (`sha1("blob <len>\0" + content)`) of files kept in git.
    pub git_blob_id: Option<String>,
    pub size: Option<u64>,
}

/// How to find a blob before its sha256 is known: the sha256 itself, or a
/// stable key of its source (`git-<blob id>`, `store-<hash of key>`) that the
/// index maps to the sha256 once downloaded.
#[derive(Clone, Debug)]
pub(crate) struct BlobKey(String);

impl BlobKey {
    pub fn for_expected(expected: &Expected, fallback: &str) -> Self {
        if let Some(sha) = &expected.sha256 {
            return BlobKey(sha.clone());
        }
        if let Some(id) = &expected.git_blob_id {
            return BlobKey(format!("git-{id}"));
        }
        BlobKey::source(fallback)
    }

    /// A key for a source named by a string (a store key, a URL).
    pub fn source(name: &str) -> Self {
        let digest = hex::encode(Sha256::digest(name.as_bytes()));
        BlobKey(format!("src-{}", &digest[..40]))
    }

    fn is_sha(&self) -> bool {
        self.0.len() == 64 && self.0.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct BlobEntry {
    size: u64,
    last_used_ms: i64,
    /// Order of last use (ties in milliseconds are common).
    seq: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ModelEntry {
    /// Part name → blobs that make it.
    parts: BTreeMap<String, BTreeSet<String>>,
    last_used_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    blobs: BTreeMap<String, BlobEntry>,
    /// Source keys (not sha256) → sha256.
    aliases: BTreeMap<String, String>,
    /// Link path, relative to the cache root → sha256.
    links: BTreeMap<String, String>,
    /// `<repo>@<revision>` → the commit it pointed at when last asked.
    refs: BTreeMap<String, String>,
    models: BTreeMap<String, ModelEntry>,
    seq: u64,
}

#[derive(Debug, Default)]
struct State {
    index: Index,
    pins: HashMap<String, usize>,
    leases: usize,
}

/// A model this cache holds, for the worker registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedModel {
    /// The reference as jobs give it (`flux1-dev`, `hf://…`, a store URI);
    /// the reference model is named with its resolution (`reference-denoiser-v1-r64`).
    pub reference: String,
    /// Parts of it that are complete on disk.
    pub parts: Vec<String>,
    pub bytes: u64,
    pub last_used_ms: i64,
}

pub(crate) struct Cache {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// One lock per blob key: held while a blob is checked, fetched, pinned or evicted.
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises writes of the index file.
    writer: tokio::sync::Mutex<()>,
}

/// Keeps one blob from eviction while held.
pub(crate) struct Pin {
    cache: Arc<Cache>,
    sha: String,
    size: u64,
    /// Whether this lookup fetched the blob (a miss).
    fetched: bool,
}

impl Pin {
    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// The blob's size on disk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the blob had to be fetched for this lookup.
    pub fn fetched(&self) -> bool {
        self.fetched
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        if let Some(n) = state.pins.get_mut(&self.sha) {
            *n -= 1;
            if *n == 0 {
                state.pins.remove(&self.sha);
            }
        }
    }
}

/// Counts a live lease (a run holding a model).
pub(crate) struct LeaseCount(Arc<Cache>);

impl LeaseCount {
    pub fn new(cache: &Arc<Cache>) -> Self {
        cache.lock().leases += 1;
        LeaseCount(cache.clone())
    }
}

impl Drop for LeaseCount {
    fn drop(&mut self) {
        self.0.lock().leases -= 1;
    }
}

fn retry(message: String) -> StageError {
    StageError::retry(ErrorKind::Model, message, Duration::from_secs(10))
}

fn io_retry(what: &str, path: &Path, e: std::io::Error) -> StageError {
    retry(format!(
        "model cache: cannot {what} {}: {e}",
        path.display()
    ))
}

impl Cache {
    /// Opens the cache at `root`, reading its index and reconciling it with
    /// what is on disk (blobs gone missing are forgotten, blobs not in the
    /// index are adopted as least recently used).
    pub fn open(root: PathBuf, max_bytes: u64) -> Arc<Self> {
        let index = load_index(&root);
        trainyard_core::telemetry::metrics()
            .set_model_cache_size(index.blobs.values().map(|b| b.size).sum());
        Arc::new(Self {
            root,
            max_bytes,
            state: Mutex::new(State {
                index,
                ..State::default()
            }),
            keys: Mutex::default(),
            writer: tokio::sync::Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    fn blob_path(&self, sha: &str) -> PathBuf {
        self.root.join(BLOBS).join(sha)
    }

    /// Where a blob is downloaded before it is verified.
    pub fn partial_path(&self, key: &BlobKey) -> PathBuf {
        self.root.join(BLOBS).join(format!("{}.incomplete", key.0))
    }

    /// The sha256 a key stands for, if the index knows it.
    fn sha_of(state: &State, key: &BlobKey) -> Option<String> {
        if key.is_sha() {
            return Some(key.0.to_ascii_lowercase());
        }
        state.index.aliases.get(&key.0).cloned()
    }

    fn touch_locked(state: &mut State, sha: &str) {
        state.index.seq += 1;
        let seq = state.index.seq;
        if let Some(entry) = state.index.blobs.get_mut(sha) {
            entry.seq = seq;
            entry.last_used_ms = trainyard_core::now_ms();
        }
    }

    fn pin_locked(self: &Arc<Self>, state: &mut State, sha: &str) -> Pin {
        *state.pins.entry(sha.to_string()).or_default() += 1;
        Self::touch_locked(state, sha);
        Pin {
            cache: self.clone(),
            sha: sha.to_string(),
            size: state.index.blobs.get(sha).map_or(0, |b| b.size),
            fetched: false,
        }
    }

    /// Pins the blob behind `key` if it is complete on disk (its size checked).
    async fn pin_present(self: &Arc<Self>, key: &BlobKey) -> Option<Pin> {
        let (sha, size) = {
            let state = self.lock();
            let sha = Self::sha_of(&state, key)?;
            let size = state.index.blobs.get(&sha)?.size;
            (sha, size)
        };
        let on_disk = tokio::fs::metadata(self.blob_path(&sha)).await.ok();
        let mut state = self.lock();
        if !state.index.blobs.contains_key(&sha) {
            // Evicted meanwhile.
            return None;
        }
        if on_disk.map(|m| m.len()) != Some(size) {
            tracing::warn!(blob = %sha, "cached blob is missing or truncated; fetching it again");
            forget_blob(&mut state.index, &sha);
            return None;
        }
        Some(self.pin_locked(&mut state, &sha))
    }

    /// The blob behind `key`, pinned: from the cache, or fetched once by
    /// `fetch` into the partial file, checked against `expected` and moved
    /// into place. A blob whose content does not match is deleted and
    /// fetched again once; a second mismatch is a retryable error.
    pub async fn ensure<F, Fut>(
        self: &Arc<Self>,
        key: &BlobKey,
        expected: &Expected,
        what: &str,
        mut fetch: F,
    ) -> Result<Pin, StageError>
    where
        F: FnMut(PathBuf) -> Fut,
        Fut: Future<Output = Result<(), StageError>>,
    {
        let lock = self.key_lock(&key.0);
        let _guard = lock.lock().await;
        if let Some(pin) = self.pin_present(key).await {
            tracing::debug!(model_file = what, "model cache hit");
            trainyard_core::telemetry::metrics().model_cache_hit();
            return Ok(pin);
        }
        self.evict(expected.size.unwrap_or(0)).await;
        let partial = self.partial_path(key);
        if let Some(parent) = partial.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_retry("create", parent, e))?;
        }
        for attempt in 1..=2 {
            tracing::info!(model_file = what, attempt, "model cache miss; downloading");
            fetch(partial.clone()).await?;
            let (size, sha256, git_blob_id) = hash_file(&partial, expected.git_blob_id.is_some())
                .await
                .map_err(|e| io_retry("read", &partial, e))?;
            let problem = check(expected, size, &sha256, git_blob_id.as_deref());
            let Some(problem) = problem else {
                // Eviction holds the sha's own lock while it deletes.
                let sha_lock = self.key_lock(&sha256);
                let _sha_guard = match key.is_sha() {
                    true => None,
                    false => Some(sha_lock.lock().await),
                };
                let blob = self.blob_path(&sha256);
                tokio::fs::rename(&partial, &blob)
                    .await
                    .map_err(|e| io_retry("move into place", &blob, e))?;
                let mut pin = {
                    let mut state = self.lock();
                    state.index.blobs.insert(
                        sha256.clone(),
                        BlobEntry {
                            size,
                            last_used_ms: 0,
                            seq: 0,
                        },
                    );
                    if !key.is_sha() {
                        state.index.aliases.insert(key.0.clone(), sha256.clone());
                    }
                    self.pin_locked(&mut state, &sha256)
                };
                drop(_sha_guard);
                drop(_guard);
                pin.fetched = true;
                let metrics = trainyard_core::telemetry::metrics();
                metrics.model_cache_miss(size);
                metrics.set_model_cache_size(self.total_bytes());
                self.save().await;
                self.evict(0).await;
                return Ok(pin);
            };
            let _ = tokio::fs::remove_file(&partial).await;
            tracing::warn!(model_file = what, attempt, problem = %problem, "downloaded model file is corrupt; deleted");
            if attempt == 2 {
                return Err(retry(format!(
                    "model file {what} is corrupt after two downloads: {problem}"
                )));
            }
        }
        unreachable!("the loop returns")
    }

    /// Points `link` (relative to the root) at a blob, replacing what was there.
    pub async fn link(&self, link: &str, sha: &str) -> Result<PathBuf, StageError> {
        let path = self.root.join(link);
        let depth = link.matches('/').count();
        let target: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join(BLOBS)
            .join(sha);
        let current = tokio::fs::read_link(&path).await.ok();
        if current.as_deref() != Some(target.as_path()) {
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| io_retry("create", parent, e))?;
            }
            // A new link under a temporary name renamed over the old one:
            // concurrent resolves of the same file may both get here.
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let tmp = path.with_file_name(format!(
                ".link-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            tokio::fs::symlink(&target, &tmp)
                .await
                .map_err(|e| io_retry("link", &tmp, e))?;
            if let Err(e) = tokio::fs::rename(&tmp, &path).await {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(io_retry("link", &path, e));
            }
        }
        self.lock()
            .index
            .links
            .insert(link.to_string(), sha.to_string());
        Ok(path)
    }

    /// The blob a link points at, pinned, if both are there.
    pub async fn pin_link(self: &Arc<Self>, link: &str) -> Option<Pin> {
        let sha = self.lock().index.links.get(link).cloned()?;
        if tokio::fs::symlink_metadata(self.root.join(link))
            .await
            .is_err()
        {
            return None;
        }
        let lock = self.key_lock(&sha);
        let _guard = lock.lock().await;
        self.pin_present(&BlobKey(sha)).await
    }

    pub fn remember_ref(&self, repo_revision: &str, commit: &str) {
        self.lock()
            .index
            .refs
            .insert(repo_revision.to_string(), commit.to_string());
    }

    pub fn known_ref(&self, repo_revision: &str) -> Option<String> {
        self.lock().index.refs.get(repo_revision).cloned()
    }

    /// Records which blobs make which parts of a model, and its use now.
    pub async fn record_model(&self, reference: &str, parts: &BTreeMap<String, Vec<String>>) {
        {
            let mut state = self.lock();
            let entry = state.index.models.entry(reference.to_string()).or_default();
            for (part, blobs) in parts {
                entry
                    .parts
                    .insert(part.clone(), blobs.iter().cloned().collect());
            }
            entry.last_used_ms = trainyard_core::now_ms();
        }
        self.save().await;
    }

    /// Models whose parts are (at least partly) on disk.
    pub fn holdings(&self) -> Vec<CachedModel> {
        let state = self.lock();
        let blobs = &state.index.blobs;
        state
            .index
            .models
            .iter()
            .filter_map(|(reference, entry)| {
                let parts: Vec<String> = entry
                    .parts
                    .iter()
                    .filter(|(_, shas)| shas.iter().all(|s| blobs.contains_key(s)))
                    .map(|(part, _)| part.clone())
                    .collect();
                if parts.is_empty() {
                    return None;
                }
                let held: BTreeSet<&String> = entry
                    .parts
                    .values()
                    .flatten()
                    .filter(|s| blobs.contains_key(*s))
                    .collect();
                Some(CachedModel {
                    reference: reference.clone(),
                    parts,
                    bytes: held.iter().map(|s| blobs[*s].size).sum(),
                    last_used_ms: entry.last_used_ms,
                })
            })
            .collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.lock().index.blobs.values().map(|b| b.size).sum()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn leases(&self) -> usize {
        self.lock().leases
    }

    /// Evicts least-recently-used, unpinned blobs until the cache plus
    /// `reserve` bytes fits `max_bytes` (or nothing more can go).
    pub async fn evict(&self, reserve: u64) {
        if self.max_bytes == 0 {
            return;
        }
        let mut skipped = BTreeSet::new();
        let mut evicted = false;
        loop {
            let candidate = {
                let state = self.lock();
                let total: u64 = state.index.blobs.values().map(|b| b.size).sum();
                if total.saturating_add(reserve) <= self.max_bytes {
                    break;
                }
                let candidate = state
                    .index
                    .blobs
                    .iter()
                    .filter(|(sha, _)| !state.pins.contains_key(*sha) && !skipped.contains(*sha))
                    .min_by_key(|(_, entry)| entry.seq)
                    .map(|(sha, _)| sha.clone());
                if candidate.is_none() {
                    tracing::warn!(
                        total_bytes = total,
                        reserve_bytes = reserve,
                        max_bytes = self.max_bytes,
                        "model cache over its size limit, but every cached file is in use"
                    );
                }
                candidate
            };
            let Some(sha) = candidate else { break };
            let lock = self.key_lock(&sha);
            // A blob being fetched or pinned right now is not a candidate.
            let Ok(_guard) = lock.try_lock() else {
                skipped.insert(sha);
                continue;
            };
            let links = {
                let mut state = self.lock();
                if state.pins.contains_key(&sha) {
                    skipped.insert(sha);
                    continue;
                }
                forget_blob(&mut state.index, &sha)
            };
            for link in links {
                let _ = tokio::fs::remove_file(self.root.join(&link)).await;
            }
            let _ = tokio::fs::remove_file(self.blob_path(&sha)).await;
            tracing::info!(blob = %sha, "evicted from the model cache");
            evicted = true;
        }
        if evicted {
            trainyard_core::telemetry::metrics().set_model_cache_size(self.total_bytes());
            self.save().await;
        }
    }

    /// Writes the index (to a temporary file, then renamed).
    pub async fn save(&self) {
        let _writing = self.writer.lock().await;
        let json = match serde_json::to_vec_pretty(&self.lock().index) {
            Ok(json) => json,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialise the model cache index");
                return;
            }
        };
        let path = self.root.join(INDEX);
        let tmp = self.root.join(format!("{INDEX}.tmp"));
        let written = async {
            tokio::fs::create_dir_all(&self.root).await?;
            tokio::fs::write(&tmp, json).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %path.display(), "cannot write the model cache index");
        }
    }
}

/// Drops a blob from the index; returns its links, to delete.
fn forget_blob(index: &mut Index, sha: &str) -> Vec<String> {
    index.blobs.remove(sha);
    index.aliases.retain(|_, s| s != sha);
    let links: Vec<String> = index
        .links
        .iter()
        .filter(|(_, s)| *s == sha)
        .map(|(l, _)| l.clone())
        .collect();
    for link in &links {
        index.links.remove(link);
    }
    links
}

fn check(
    expected: &Expected,
    size: u64,
    sha256: &str,
    git_blob_id: Option<&str>,
) -> Option<String> {
    if let Some(want) = expected.size
        && want != size
    {
        return Some(format!("{size} bytes, expected {want}"));
    }
    if let Some(want) = &expected.sha256
        && !want.eq_ignore_ascii_case(sha256)
    {
        return Some(format!("sha256 {sha256}, expected {want}"));
    }
    if let (Some(want), Some(got)) = (&expected.git_blob_id, git_blob_id)
        && !want.eq_ignore_ascii_case(got)
    {
        return Some(format!("git blob id {got}, expected {want}"));
    }
    None
}

/// Size, sha256 and (when asked) git blob id of a file, on a blocking thread.
async fn hash_file(path: &Path, git: bool) -> std::io::Result<(u64, String, Option<String>)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let size = file.metadata()?.len();
        let mut sha256 = Sha256::new();
        let mut sha1 = git.then(|| {
            let mut h = sha1_smol::Sha1::new();
            h.update(format!("blob {size}\0").as_bytes());
            h
        });
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            sha256.update(&buffer[..n]);
            if let Some(h) = sha1.as_mut() {
                h.update(&buffer[..n]);
            }
        }
        Ok((
            size,
            hex::encode(sha256.finalize()),
            sha1.map(|h| h.digest().to_string()),
        ))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Reads the index and reconciles it with the blobs on disk. Runs once at
/// start-up, before any job.
fn load_index(root: &Path) -> Index {
    let mut index: Index = match std::fs::read(root.join(INDEX)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "model cache index unreadable; rebuilding it from the blobs");
            Index::default()
        }),
        Err(_) => Index::default(),
    };
    let blobs = root.join(BLOBS);
    index.blobs.retain(|sha, entry| {
        std::fs::metadata(blobs.join(sha)).is_ok_and(|m| m.len() == entry.size)
    });
    if let Ok(dir) = std::fs::read_dir(&blobs) {
        for item in dir.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            // A partial download nobody resumed for a day is not coming back.
            let stale = item
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_PARTIAL);
            if name.ends_with(".incomplete") && stale {
                let _ = std::fs::remove_file(item.path());
                continue;
            }
            let is_sha = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if is_sha && !index.blobs.contains_key(&name) {
                let size = item.metadata().map(|m| m.len()).unwrap_or(0);
                index.blobs.insert(
                    name,
                    BlobEntry {
                        size,
                        last_used_ms: 0,
                        seq: 0,
                    },
                );
            }
        }
    }
    let present: BTreeSet<String> = index.blobs.keys().cloned().collect();
    index.aliases.retain(|_, sha| present.contains(sha));
    index.links.retain(|_, sha| present.contains(sha));
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_reconciled_with_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join(BLOBS);
        std::fs::create_dir_all(&blobs).unwrap();
        let on_disk = "a".repeat(64);
        std::fs::write(blobs.join(&on_disk), b"12345").unwrap();
        std::fs::write(blobs.join("b.incomplete"), b"12").unwrap();
        let gone = "b".repeat(64);
        let mut index = Index::default();
        let entry = BlobEntry {
            size: 9,
            last_used_ms: 1,
            seq: 1,
        };
        index.blobs.insert(gone.clone(), entry);
        index.links.insert("snapshots/x/f".into(), gone.clone());
        index.aliases.insert("git-1".into(), gone.clone());
        std::fs::write(dir.path().join(INDEX), serde_json::to_vec(&index).unwrap()).unwrap();

        let cache = Cache::open(dir.path().to_owned(), 0);
        // The unknown blob is adopted; the missing one and its links are forgotten.
        assert_eq!(cache.total_bytes(), 5);
        let state = cache.lock();
        assert!(state.index.blobs.contains_key(&on_disk));
        assert!(state.index.links.is_empty() && state.index.aliases.is_empty());
        // A fresh partial download stays for the next attempt.
        assert!(blobs.join("b.incomplete").exists());
    }

    #[test]
    fn content_checks() {
        let expected = Expected {
            sha256: Some("ab".repeat(32)),
            git_blob_id: None,
            size: Some(3),
        };
        assert!(check(&expected, 3, &"ab".repeat(32), None).is_none());
        assert!(check(&expected, 4, &"ab".repeat(32), None).is_some());
        assert!(check(&expected, 3, &"cd".repeat(32), None).is_some());
        let git = Expected {
            git_blob_id: Some("1".repeat(40)),
            ..Expected::default()
        };
        assert!(check(&git, 3, "x", Some(&"2".repeat(40))).is_some());
    }
}
