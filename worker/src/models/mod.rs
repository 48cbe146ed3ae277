//! Base models: a job's `base_model` resolved to files on this machine's
//! disk, through a content-addressed cache ([`cache`]) shared by concurrent
//! jobs, fetching only the parts the backend needs.
//!
//! What a reference gives:
//!
//! | reference | parts |
//! |---|---|
//! | `reference-denoiser-v1` | `file`: the reference trainer's base model at the job's resolution. Made once by `ty-reference-trainer make-base`, stored at `models/reference-denoiser-v1-r<res>/model.safetensors` in the artifact store, downloaded from there like any stored model |
//! | a preset (`flux1-dev`, …) | each asked part, from the Hub as the preset lists it |
//! | `hf://org/repo@rev/path` (one file) | `file`, and `transformer` / `checkpoint` when asked |
//! | `hf://org/repo@rev` (a snapshot) | `diffusers` / `llm` / `ckpt_dir` when asked: the snapshot's folder |
//! | an artifact-store `.safetensors` URI | `file`, and `transformer` / `checkpoint` when asked |
//!
//! A part the reference cannot give fails the job before anything is
//! downloaded. A folder part is the snapshot folder, or the sub-folder all of
//! its include patterns live in (`transformer/*.json` → `transformer/`).
//! Gated repositories use the job's `hf_token` secret.
//!
//! [`Models::resolve`] returns a [`ModelLease`] with the files: while it is
//! held the files cannot be evicted.

mod cache;
pub mod claim;
mod hub;

pub use cache::CachedModel;

use cache::{BlobKey, Cache, Expected, LeaseCount, Pin};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use trainyard_backends::ModelFiles;
use trainyard_core::process::{ChildGroup, CommandSpec};
use trainyard_core::runtime::StageError;
use trainyard_core::store::{ArtifactStore, StoreError, keys};
use trainyard_models::hub::{HubClient, HubError};
use trainyard_models::{ModelSource, part};
use trainyard_proto::v1::{ErrorKind, ModelRef};

pub const REFERENCE_MODEL: &str = "reference-denoiser-v1";

/// Parts a single-file reference can stand for.
const SINGLE_FILE_PARTS: &[&str] = &[part::FILE, part::TRANSFORMER, part::CHECKPOINT];
/// Parts a repository snapshot can stand for.
const SNAPSHOT_PARTS: &[&str] = &[part::DIFFUSERS, part::LLM, part::CKPT_DIR];

/// The files of a resolved model stay in the cache while this is held.
pub struct ModelLease {
    pins: Vec<Pin>,
    /// Part name → the blobs that make it.
    parts: BTreeMap<String, Vec<String>>,
    _count: LeaseCount,
}

impl ModelLease {
    fn new(cache: &Arc<Cache>) -> Self {
        Self {
            pins: Vec::new(),
            parts: BTreeMap::new(),
            _count: LeaseCount::new(cache),
        }
    }

    fn hold(&mut self, part: &str, pin: Pin) {
        self.parts
            .entry(part.to_string())
            .or_default()
            .push(pin.sha().to_string());
        self.pins.push(pin);
    }

    /// Blobs (sha256) held.
    pub fn blobs(&self) -> Vec<&str> {
        self.pins.iter().map(Pin::sha).collect()
    }

    /// Bytes of the files held.
    pub fn bytes(&self) -> u64 {
        self.pins.iter().map(Pin::size).sum()
    }

    /// Bytes fetched to resolve the model; 0 when the cache had every file.
    pub fn fetched_bytes(&self) -> u64 {
        self.pins
            .iter()
            .filter(|p| p.fetched())
            .map(Pin::size)
            .sum()
    }

    /// Whether the cache had every file (nothing was fetched).
    pub fn hit(&self) -> bool {
        !self.pins.iter().any(Pin::fetched)
    }
}

/// Base-model resolution and the cache behind it. Cheap to clone.
#[derive(Clone)]
pub struct Models {
    store: ArtifactStore,
    cache: Arc<Cache>,
    hub: HubClient,
    trainer_bin: PathBuf,
}

fn fail(message: String) -> StageError {
    StageError::fail(ErrorKind::Model, message)
}

fn retry(message: String) -> StageError {
    StageError::retry(ErrorKind::Model, message, Duration::from_secs(10))
}

impl Models {
    /// A cache in `cache_dir` (created on first use) of at most `max_bytes`
    /// (0: no limit), fetching `hf://` references and presets from `hf_endpoint`.
    pub fn new(
        store: ArtifactStore,
        cache_dir: PathBuf,
        trainer_bin: PathBuf,
        hf_endpoint: &str,
        max_bytes: u64,
    ) -> Result<Self, HubError> {
        Ok(Self {
            store,
            cache: Cache::open(cache_dir, max_bytes),
            hub: HubClient::new(hf_endpoint)?,
            trainer_bin,
        })
    }

    /// Models on disk, for the worker registry.
    pub fn holdings(&self) -> Vec<CachedModel> {
        self.cache.holdings()
    }

    /// Bytes of all cached files.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.total_bytes()
    }

    /// The cache's size limit; 0 means none.
    pub fn max_bytes(&self) -> u64 {
        self.cache.max_bytes()
    }

    /// Leases held right now: runs using a model.
    pub fn leases(&self) -> usize {
        self.cache.leases()
    }

    pub fn cache_dir(&self) -> &Path {
        self.cache.root()
    }

    /// Resolves `model` to local files for the `parts` a backend needs.
    /// Errors: unknown model or file → `Fail(Model)`; refused by the Hub →
    /// `Fail(Auth)`; network, rate limits, server errors, a corrupt
    /// download → `Retry`.
    pub async fn resolve(
        &self,
        model: &ModelRef,
        parts: &[&str],
        resolution: u32,
        hf_token: Option<&str>,
    ) -> Result<(ModelFiles, ModelLease), StageError> {
        let hf_token = hf_token.filter(|t| !t.is_empty());
        let source = ModelSource::parse(&model.uri).map_err(|e| fail(e.to_string()))?;
        let family = source
            .family(&model.family)
            .map_err(|e| StageError::fail(ErrorKind::InvalidSpec, e.to_string()))?;
        let mut lease = ModelLease::new(&self.cache);
        let mut files = BTreeMap::new();
        let mut record_as = model.uri.clone();
        match &source {
            ModelSource::Preset(p) if p.name == REFERENCE_MODEL => {
                accept_parts(&model.uri, parts, &[part::FILE])?;
                record_as = format!("{REFERENCE_MODEL}-r{resolution}");
                let key = format!("{}/model.safetensors", keys::model(&record_as));
                let path = self
                    .store_file(&key, Some(resolution), &mut lease, part::FILE)
                    .await?;
                files.insert(part::FILE.to_string(), path);
            }
            ModelSource::Preset(p) => {
                for name in parts {
                    let Some(hub_part) = p.part(name) else {
                        return Err(fail(format!(
                            "base_model {}: the preset has no {name} part, which this backend needs; its parts are {}",
                            p.name,
                            p.parts
                                .iter()
                                .map(|p| p.role)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    };
                    let ctx = hub::Ctx {
                        reference: &model.uri,
                        part: name,
                        token: hf_token,
                    };
                    let path = match hub_part.file {
                        Some(file) => {
                            self.hub_file(&ctx, hub_part.repo, hub_part.revision, file, &mut lease)
                                .await?
                        }
                        None => {
                            self.hub_folder(
                                &ctx,
                                hub_part.repo,
                                hub_part.revision,
                                hub_part.include,
                                &mut lease,
                            )
                            .await?
                        }
                    };
                    files.insert(name.to_string(), path);
                }
            }
            ModelSource::Hub(r) => {
                let (accepted, primary) = match r.path {
                    Some(_) => (SINGLE_FILE_PARTS, part::FILE),
                    None => (SNAPSHOT_PARTS, ""),
                };
                let wanted = accept_parts(&model.uri, parts, accepted)?;
                let ctx = hub::Ctx {
                    reference: &model.uri,
                    part: wanted.first().copied().unwrap_or(primary),
                    token: hf_token,
                };
                let path = match &r.path {
                    Some(file) => {
                        self.hub_file(&ctx, &r.repo, &r.revision, file, &mut lease)
                            .await?
                    }
                    None => {
                        self.hub_folder(&ctx, &r.repo, &r.revision, &[], &mut lease)
                            .await?
                    }
                };
                if !primary.is_empty() {
                    files.insert(primary.to_string(), path.clone());
                }
                for name in wanted {
                    files.insert(name.to_string(), path.clone());
                }
            }
            ModelSource::Store(uri) => {
                let wanted = accept_parts(&model.uri, parts, SINGLE_FILE_PARTS)?;
                let Some(key) = self.store.key_of(uri) else {
                    return Err(fail(format!(
                        "base_model {uri} is not in the artifact store ({})",
                        self.store.root()
                    )));
                };
                let path = self.store_file(&key, None, &mut lease, part::FILE).await?;
                files.insert(part::FILE.to_string(), path.clone());
                for name in wanted {
                    files.insert(name.to_string(), path.clone());
                }
            }
        }
        self.cache.record_model(&record_as, &lease.parts).await;
        Ok((
            ModelFiles {
                reference: model.uri.clone(),
                family,
                parts: files,
            },
            lease,
        ))
    }

    /// A file of the artifact store, through the cache. With `make_at`, the
    /// reference model is generated and stored first when it is not there.
    async fn store_file(
        &self,
        key: &str,
        make_at: Option<u32>,
        lease: &mut ModelLease,
        part_name: &str,
    ) -> Result<PathBuf, StageError> {
        let link = format!("snapshots/store/{key}");
        let uri = self.store.uri(key);
        let uri = uri.as_str();
        let pin = self
            .cache
            .ensure(
                &BlobKey::source(uri),
                &Expected::default(),
                uri,
                |partial| async move {
                    if let Some(resolution) = make_at {
                        let exists = self
                            .store
                            .exists(key)
                            .await
                            .map_err(|e| retry(format!("artifact store: {e}")))?;
                        if !exists {
                            self.make_reference(key, resolution).await?;
                        }
                    }
                    self.store
                        .get_file(key, &partial, None)
                        .await
                        .map(|_| ())
                        .map_err(|e| match e {
                            StoreError::NotFound(_) => fail(format!("base model {uri} not found")),
                            e => retry(format!("cannot download base model {uri}: {e}")),
                        })
                },
            )
            .await?;
        let path = self.cache.link(&link, pin.sha()).await?;
        lease.hold(part_name, pin);
        Ok(path)
    }

    /// Generates the reference base model and stores it.
    async fn make_reference(&self, key: &str, resolution: u32) -> Result<(), StageError> {
        let dir = self.cache.root().join(".make");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| retry(format!("cannot create {}: {e}", dir.display())))?;
        let out = dir.join(format!("base-r{resolution}.safetensors"));
        let spec = CommandSpec {
            program: self.trainer_bin.clone(),
            args: vec![
                "make-base".into(),
                "--out".into(),
                out.clone().into(),
                "--resolution".into(),
                resolution.to_string().into(),
            ],
            cwd: dir.clone(),
            env: vec![],
        };
        let (mut child, mut lines) = ChildGroup::spawn(&spec)
            .map_err(|e| retry(format!("cannot start {}: {e}", self.trainer_bin.display())))?;
        let mut tail = Vec::new();
        while let Some(line) = lines.recv().await {
            tail.push(line.line);
        }
        let status = child.wait().await.map_err(|e| retry(e.to_string()))?;
        if !status.success() {
            return Err(fail(format!(
                "making the reference base model failed: {}",
                tail.join(" | ")
            )));
        }
        self.store
            .put_file(&out, key)
            .await
            .map_err(|e| retry(format!("cannot store base model: {e}")))?;
        let _ = tokio::fs::remove_file(&out).await;
        tracing::info!(key, "reference base model generated and stored");
        Ok(())
    }
}

/// The asked parts a reference can give; an error naming the first it cannot.
fn accept_parts<'a>(
    reference: &str,
    parts: &[&'a str],
    accepted: &[&str],
) -> Result<Vec<&'a str>, StageError> {
    if let Some(missing) = parts.iter().find(|p| !accepted.contains(p)) {
        return Err(fail(format!(
            "base_model {reference} gives only {}, but this backend needs the {missing} part; use a preset that has it{}",
            accepted.join(", "),
            if accepted.contains(&part::FILE) {
                " or an hf://org/repo@revision snapshot"
            } else {
                ""
            }
        )));
    }
    Ok(parts.to_vec())
}

/// Finds `ty-reference-trainer`: the configured path, beside this
/// executable (or one folder up, for test binaries in `target/*/deps`), or on PATH.
pub fn find_trainer(configured: Option<&Path>) -> Option<PathBuf> {
    match configured {
        Some(path) => Some(path.to_owned()),
        None => find_program("ty-reference-trainer"),
    }
}

/// Finds a program shipped with the worker: beside this executable (or one
/// folder up, for test binaries in `target/*/deps`), or on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
        dir = d.parent();
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
