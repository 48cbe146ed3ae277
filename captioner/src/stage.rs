//! The prepare stage on the shared runtime: fetch the dataset named by the
//! job spec, prepare it with [`crate::prepare_local`], and store the
//! prepared folder (manifest last) at `jobs/<job>/dataset/` in the artifact
//! store. Errors keep their retry intent: a 503 from a dataset host is a
//! retry with the server's delay, a zip with no usable image fails the job.

use crate::{
    FetchPolicy, GuardedClient, LocalInput, PrepareError, PrepareSettings, RemoteSource,
    UnpackLimits, fetch_source, prepare_local,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use trainyard_core::Config;
use trainyard_core::runtime::{StageError, StageHandler, TaskContext};
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_proto::v1::{
    ErrorKind, PrepareOutput, PrepareTask, dataset_source::Source, stage_result::Outcome,
};

pub struct PrepareStage {
    store: ArtifactStore,
    client: GuardedClient,
    work_root: PathBuf,
    limits: UnpackLimits,
}

impl PrepareStage {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let policy = FetchPolicy {
            allow_private_addresses: config.captioner.allow_private_urls,
            max_bytes: config.captioner.max_dataset_bytes,
            ..FetchPolicy::default()
        };
        let limits = UnpackLimits {
            max_total_bytes: config.captioner.max_dataset_bytes,
            max_files: config.captioner.max_files,
            ..UnpackLimits::default()
        };
        std::fs::create_dir_all(&config.captioner.work_dir)?;
        Ok(Self {
            store: ArtifactStore::open_with(&config.store.uri, &config.store.s3)?,
            client: GuardedClient::new(policy)?,
            work_root: std::fs::canonicalize(&config.captioner.work_dir)?,
            limits,
        })
    }

    async fn prepare(
        &self,
        task: PrepareTask,
        ctx: &TaskContext,
        work: &Path,
    ) -> Result<Outcome, StageError> {
        let spec = task
            .spec
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "task has no job spec"))?;
        let source = spec
            .dataset
            .and_then(|d| d.source)
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "dataset: is empty"))?;
        let caption = spec.caption.unwrap_or_default();
        ctx.note("fetching dataset").await;
        let input = match source {
            Source::ZipUrl(url) => {
                fetch(&self.client, RemoteSource::ZipUrl(url), work, &self.limits).await?
            }
            Source::ImageUrls(list) => {
                fetch(
                    &self.client,
                    RemoteSource::ImageUrls(list.urls),
                    work,
                    &self.limits,
                )
                .await?
            }
            Source::ArtifactUri(uri) => self.fetch_artifact(&uri, work).await?,
        };
        let mut settings = PrepareSettings {
            trigger_word: caption.trigger_word,
            overwrite_sidecar: caption.overwrite_sidecar,
            limits: self.limits,
            ..PrepareSettings::default()
        };
        if !caption.template.is_empty() {
            settings.template = caption.template;
        }
        ctx.note("unpacking, validating and captioning").await;
        let captioner = settings.template_captioner();
        let prepared = prepare_local(input, work, &settings, &captioner)
            .await
            .map_err(prepare_error)?;
        ctx.note(&format!(
            "storing {} images",
            prepared.manifest.images.len()
        ))
        .await;
        let prefix = keys::dataset(&ctx.meta.job);
        // A crashed earlier delivery may have left part of a set: start clean.
        self.store
            .delete_prefix(&prefix)
            .await
            .map_err(StageError::from)?;
        for file in prepared.files() {
            let rel = file
                .strip_prefix(&prepared.dir)
                .map_err(|_| {
                    StageError::fail(ErrorKind::Internal, "prepared file outside its folder")
                })?
                .to_string_lossy()
                .replace('\\', "/");
            self.store
                .put_file(&file, &format!("{prefix}/{rel}"))
                .await
                .map_err(StageError::from)?;
        }
        let manifest = &prepared.manifest;
        let sidecar = manifest
            .images
            .iter()
            .filter(|i| matches!(i.caption_source, crate::CaptionSource::Sidecar))
            .count() as u32;
        let images = manifest.images.len() as u32;
        Ok(Outcome::Prepared(PrepareOutput {
            dataset_uri: self.store.uri(&prefix),
            image_count: images,
            captioned: images - sidecar,
            sidecar_captions: sidecar,
            dropped: manifest
                .dropped
                .iter()
                .map(|d| format!("{}: {:?}", d.name, d.reason))
                .collect(),
        }))
    }

    /// A dataset already in the artifact store: a zip file or a folder.
    /// Only URIs inside the configured store are accepted, so a job cannot
    /// read files of the machine the captioner runs on.
    async fn fetch_artifact(&self, uri: &str, work: &Path) -> Result<LocalInput, StageError> {
        let key = self.store.key_of(uri).ok_or_else(|| {
            StageError::fail(
                ErrorKind::InvalidSpec,
                format!(
                    "dataset.artifact_uri must be inside the artifact store {}",
                    self.store.root()
                ),
            )
        })?;
        let download = work.join("download");
        if key.ends_with(".zip") {
            let local = download.join("dataset.zip");
            self.store
                .get_file(&key, &local, None)
                .await
                .map_err(StageError::from)?;
            return Ok(LocalInput::Zip(local));
        }
        let dir = download.join("dataset");
        let files = self
            .store
            .get_dir(&key, &dir)
            .await
            .map_err(StageError::from)?;
        if files.is_empty() {
            return Err(StageError::fail(
                ErrorKind::BadDataset,
                format!("dataset.artifact_uri {uri} holds no files"),
            ));
        }
        Ok(LocalInput::Dir(dir))
    }
}

async fn fetch(
    client: &GuardedClient,
    source: RemoteSource,
    work: &Path,
    limits: &UnpackLimits,
) -> Result<LocalInput, StageError> {
    fetch_source(client, &source, work, limits)
        .await
        .map_err(prepare_error)
}

fn prepare_error(error: PrepareError) -> StageError {
    let kind = match &error {
        PrepareError::Fetch(_) => ErrorKind::Fetch,
        PrepareError::InvalidSettings { .. } => ErrorKind::InvalidSpec,
        PrepareError::Io { .. } | PrepareError::Interrupted => ErrorKind::Internal,
        _ => ErrorKind::BadDataset,
    };
    if error.is_retryable() {
        let delay = error.retry_after().unwrap_or(Duration::from_secs(5));
        StageError::retry(kind, error.to_string(), delay)
    } else {
        StageError::fail(kind, error.to_string())
    }
}

impl StageHandler for PrepareStage {
    type Task = PrepareTask;

    async fn handle(&self, task: PrepareTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        let work = self
            .work_root
            .join(format!("{}-{}", ctx.meta.job, ctx.meta.attempt));
        let _ = tokio::fs::remove_dir_all(&work).await;
        if let Err(e) = tokio::fs::create_dir_all(&work).await {
            return Err(StageError::retry(
                ErrorKind::Internal,
                format!("cannot create work dir {}: {e}", work.display()),
                Duration::from_secs(5),
            ));
        }
        let result = tokio::select! {
            result = self.prepare(task, &ctx, &work) => result,
            _ = ctx.cancel.cancelled() => Err(StageError::Cancelled),
            _ = ctx.stop.cancelled() => Err(StageError::Interrupted),
        };
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }
}
