//! Base models: resolve the job's model reference to a local file through a
//! cache on this machine's disk, shared by concurrent jobs (one download per
//! model at a time).
//!
//! - `reference-denoiser-v1`: the reference trainer's base model. The
//!   project generates it deterministically (`ty-reference-trainer
//!   make-base`) the first time any worker needs it, and stores it in the
//!   artifact store at `models/reference-denoiser-v1-r<res>/` like any other
//!   base model; later workers download it from there.
//! - an artifact-store URI of a `.safetensors` file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trainyard_backends::ModelFiles;
use trainyard_core::models::ModelSource;
use trainyard_core::process::{ChildGroup, CommandSpec};
use trainyard_core::runtime::StageError;
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_proto::v1::{ErrorKind, ModelRef};

pub const REFERENCE_MODEL: &str = "reference-denoiser-v1";

/// Held while a run uses a model, so the cache never evicts it.
#[derive(Debug)]
pub struct ModelLease;

pub struct Models {
    store: ArtifactStore,
    cache_dir: PathBuf,
    trainer_bin: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn retry(message: String) -> StageError {
    StageError::retry(ErrorKind::Model, message, Duration::from_secs(5))
}

impl Models {
    pub fn new(store: ArtifactStore, cache_dir: PathBuf, trainer_bin: PathBuf) -> Self {
        Self {
            store,
            cache_dir,
            trainer_bin,
            locks: Mutex::default(),
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("model lock table")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The local files of the parts a run needs.
    pub async fn resolve(
        &self,
        model: &ModelRef,
        parts: &[&str],
        resolution: u32,
        _hf_token: Option<&str>,
    ) -> Result<(ModelFiles, ModelLease), StageError> {
        let source = ModelSource::parse(&model.uri)
            .map_err(|e| StageError::fail(ErrorKind::Model, format!("base_model: {e}")))?;
        let family = source
            .family(&model.family)
            .map_err(|e| StageError::fail(ErrorKind::Model, e))?;
        let path = match source {
            ModelSource::Preset(p) if p.name == REFERENCE_MODEL => {
                let name = format!("{REFERENCE_MODEL}-r{resolution}");
                let key = format!("{}/model.safetensors", keys::model(&name));
                self.cached(&name, &key, Some(resolution)).await?
            }
            ModelSource::Store(uri) => {
                let key = self.store.key_of(&uri).ok_or_else(|| {
                    StageError::fail(
                        ErrorKind::Model,
                        format!("base_model: {uri} is not in the artifact store"),
                    )
                })?;
                self.cached(&key.replace('/', "_"), &key, None).await?
            }
            _ => {
                return Err(StageError::fail(
                    ErrorKind::Model,
                    format!("base_model: {} cannot be fetched by this worker", model.uri),
                ));
            }
        };
        let files = ModelFiles {
            reference: model.uri.clone(),
            family,
            parts: parts
                .iter()
                .map(|p| (p.to_string(), path.clone()))
                .collect(),
        };
        Ok((files, ModelLease))
    }

    /// The local copy of `key`, fetched (or, for the reference model, made) once.
    async fn cached(
        &self,
        name: &str,
        key: &str,
        make_at: Option<u32>,
    ) -> Result<PathBuf, StageError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let local = self.cache_dir.join(name).join("model.safetensors");
        if tokio::fs::try_exists(&local).await.unwrap_or(false) {
            tracing::debug!(model = name, "model cache hit");
            return Ok(local);
        }
        let exists = self
            .store
            .exists(key)
            .await
            .map_err(|e| retry(e.to_string()))?;
        if !exists {
            let Some(resolution) = make_at else {
                return Err(StageError::fail(
                    ErrorKind::Model,
                    format!("base model {} not found", self.store.uri(key)),
                ));
            };
            self.make_reference(key, resolution).await?;
        }
        tracing::info!(model = name, "model cache miss; downloading");
        self.store
            .get_file(key, &local, None)
            .await
            .map_err(|e| retry(format!("cannot download base model: {e}")))?;
        Ok(local)
    }

    /// Generates the reference base model and stores it.
    async fn make_reference(&self, key: &str, resolution: u32) -> Result<(), StageError> {
        let dir = self.cache_dir.join(".make");
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
            return Err(StageError::fail(
                ErrorKind::Model,
                format!(
                    "making the reference base model failed: {}",
                    tail.join(" | ")
                ),
            ));
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

/// Finds `ty-reference-trainer`: the configured path, beside this
/// executable (or one folder up, for test binaries in `target/*/deps`), or on PATH.
pub fn find_trainer(configured: Option<&Path>) -> Option<PathBuf> {
    const NAME: &str = "ty-reference-trainer";
    if let Some(path) = configured {
        return Some(path.to_owned());
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(NAME);
        if candidate.is_file() {
            return Some(candidate);
        }
        dir = d.parent();
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(NAME))
            .find(|p| p.is_file())
    })
}
