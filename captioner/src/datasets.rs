//! A job's dataset, fetched and prepared: shared by the prepare stage and
//! the `Validate` responder, so both see the same dataset. Image datasets go
//! through [`crate::prepare_local`], a language model's through
//! [`crate::text::prepare_text`]. Failures are [`DatasetError`]s, which
//! preflight turns into problems (or a retry).

use crate::caption::CaptionBackend;
use crate::error::DatasetError;
use crate::preflight::{self, AccessChecks};
use crate::{
    FetchPolicy, GuardedClient, LocalInput, PrepareError, PrepareSettings, PreparedDataset,
    RemoteSource, UnpackLimits, fetch_source, prepare_local,
};
use std::path::{Path, PathBuf};
use tracing::Instrument;
use trainyard_core::Config;
use trainyard_core::destination::Destinations;
use trainyard_core::redact::host as url_host;
use trainyard_core::runtime::{StageError, TaskContext};
use trainyard_core::store::{ArtifactStore, ReadCaps, StoreError};
use trainyard_models::hub::HubClient;
use trainyard_proto::TenantId;
use trainyard_proto::v1::{ErrorKind, JobSpec, dataset_source::Source};

/// Fetching and preparing a job's dataset, shared by the stage and the
/// `Validate` responder.
pub struct Datasets {
    store: ArtifactStore,
    client: GuardedClient,
    limits: UnpackLimits,
    video: crate::VideoSettings,
    /// Work folders are made below this one.
    pub work_root: PathBuf,
}

impl Datasets {
    pub fn new(config: &Config, store: ArtifactStore) -> anyhow::Result<Self> {
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
            store,
            client: GuardedClient::new(policy)?,
            work_root: std::fs::canonicalize(&config.captioner.work_dir)?,
            limits,
            video: crate::VideoSettings::from_config(&config.captioner.video),
        })
    }

    /// Fetches and prepares `tenant`'s `spec`'s dataset under `work`,
    /// captioning with `captioner`; progress notes go to `ctx` when there is
    /// a job.
    pub async fn prepare(
        &self,
        tenant: &TenantId,
        spec: &JobSpec,
        work: &Path,
        captioner: &dyn CaptionBackend,
        ctx: Option<&TaskContext>,
    ) -> Result<PreparedDataset, DatasetError> {
        let note = async |message: &str| {
            if let Some(ctx) = ctx {
                ctx.note(message).await;
            }
        };
        let source = spec
            .dataset
            .as_ref()
            .and_then(|d| d.source.clone())
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "dataset: is empty"))?;
        let caption = spec.caption.clone().unwrap_or_default();
        note("fetching dataset").await;
        let input = self.fetch_any(tenant, source, work).await?;
        if preflight::is_text(spec) {
            note("unpacking and checking the text dataset").await;
            return Ok(crate::text::prepare_text(input, work, self.limits)
                .instrument(tracing::info_span!("prepare.text"))
                .await?);
        }
        let settings = PrepareSettings {
            trigger_word: caption.trigger_word,
            overwrite_sidecar: caption.overwrite_sidecar,
            limits: self.limits,
            video: crate::VideoSettings {
                gif_as_video: trains_video(spec),
                ..self.video.clone()
            },
            ..PrepareSettings::default()
        };
        note("unpacking, validating and captioning").await;
        Ok(prepare_local(input, work, &settings, captioner).await?)
    }

    /// Fetches the dataset inside a `prepare.fetch` span (source kind,
    /// host only, bytes and files fetched) and counts the bytes.
    async fn fetch_any(
        &self,
        tenant: &TenantId,
        source: Source,
        work: &Path,
    ) -> Result<LocalInput, DatasetError> {
        let (kind, host) = match &source {
            Source::ZipUrl(url) => ("zip_url", url_host(url)),
            Source::ImageUrls(list) => ("image_urls", list.urls.first().and_then(|u| url_host(u))),
            Source::ArtifactUri(_) => ("artifact", None),
        };
        let span = tracing::info_span!(
            "prepare.fetch",
            trainyard.dataset.source = kind,
            server.address = tracing::field::Empty,
            trainyard.files = tracing::field::Empty,
            trainyard.bytes = tracing::field::Empty,
            trainyard.outcome = tracing::field::Empty,
        );
        if let Some(host) = &host {
            span.record("server.address", host.as_str());
        }
        let fetched = async {
            Ok::<_, DatasetError>(match source {
                Source::ZipUrl(url) => self.fetch(RemoteSource::ZipUrl(url), work).await?,
                Source::ImageUrls(list) => {
                    self.fetch(RemoteSource::ImageUrls(list.urls), work).await?
                }
                Source::ArtifactUri(uri) => self.fetch_artifact(tenant, &uri, work).await?,
            })
        }
        .instrument(span.clone())
        .await;
        match &fetched {
            Ok(input) => {
                let (files, bytes) = input_size(input).await;
                span.record("trainyard.files", files);
                span.record("trainyard.bytes", bytes);
                span.record("trainyard.outcome", "ok");
                trainyard_core::telemetry::metrics().artifact_downloaded("prepare", bytes);
            }
            Err(_) => {
                span.record("trainyard.outcome", "error");
            }
        }
        fetched
    }

    async fn fetch(&self, source: RemoteSource, work: &Path) -> Result<LocalInput, PrepareError> {
        fetch_source(&self.client, &source, work, &self.limits).await
    }

    /// A dataset already in the artifact store: a zip file, a folder, or
    /// (for a language model) a `.jsonl` file. Only URIs below the task's
    /// own tenant's uploads and jobs are accepted (the coordinator checked
    /// too), so a job cannot read another tenant's objects or files of the
    /// machine the captioner runs on; the listing or the object's size is
    /// held to `[captioner] max_files` and `max_dataset_bytes` before a
    /// byte is fetched.
    async fn fetch_artifact(
        &self,
        tenant: &TenantId,
        uri: &str,
        work: &Path,
    ) -> Result<LocalInput, StageError> {
        let key = self.store.tenant_key(tenant, uri).map_err(|e| {
            StageError::fail(ErrorKind::InvalidSpec, format!("dataset.artifact_uri: {e}"))
        })?;
        let refused = |e: StoreError| match e.is_refused() {
            true => StageError::fail(ErrorKind::BadDataset, format!("dataset.artifact_uri: {e}")),
            false => StageError::from(e),
        };
        let max_bytes = self.limits.max_total_bytes;
        let download = work.join("download");
        let single = if key.ends_with(".jsonl") {
            Some(download.join(crate::text::TRAIN_JSONL))
        } else if key.ends_with(".zip") {
            Some(download.join("dataset.zip"))
        } else {
            None
        };
        if let Some(local) = single {
            self.store
                .size_within(&key, max_bytes)
                .await
                .map_err(refused)?;
            self.store
                .get_file(&key, &local, None)
                .await
                .map_err(StageError::from)?;
            return Ok(if key.ends_with(".zip") {
                LocalInput::Zip(local)
            } else {
                LocalInput::Files(vec![local])
            });
        }
        let caps = ReadCaps {
            max_files: self.limits.max_files,
            max_bytes,
        };
        let dir = download.join("dataset");
        let files = self
            .store
            .get_dir_capped(&key, &dir, caps)
            .await
            .map_err(refused)?;
        if files.is_empty() {
            return Err(StageError::fail(
                ErrorKind::BadDataset,
                format!("dataset.artifact_uri {uri} holds no files"),
            ));
        }
        Ok(LocalInput::Dir(dir))
    }
}

/// Whether `spec`'s backend trains its model family on video, so an
/// animated gif is a clip rather than a still.
fn trains_video(spec: &JobSpec) -> bool {
    let backend = spec
        .training
        .as_ref()
        .map(|t| t.backend.as_str())
        .unwrap_or_default();
    let family = spec
        .base_model
        .as_ref()
        .and_then(|m| trainyard_models::ModelFamily::from_name(&m.family));
    match (
        trainyard_backends::by_name(backend, &Default::default()),
        family,
    ) {
        (Some(trainer), Some(family)) => trainer.trains_video(family),
        _ => false,
    }
}

/// Files and bytes of a fetched dataset, as they lie on disk.
async fn input_size(input: &LocalInput) -> (u64, u64) {
    let roots: Vec<PathBuf> = match input {
        LocalInput::Zip(path) | LocalInput::Dir(path) => vec![path.clone()],
        LocalInput::Files(files) => files.clone(),
    };
    tokio::task::spawn_blocking(move || {
        let mut total = (0, 0);
        let mut stack = roots;
        while let Some(path) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if let Ok(entries) = std::fs::read_dir(&path) {
                    stack.extend(entries.flatten().map(|e| e.path()));
                }
            } else if meta.is_file() {
                total.0 += 1;
                total.1 += meta.len();
            }
        }
        total
    })
    .await
    .unwrap_or_default()
}

/// The access checks as this service's config sets them up: the artifact
/// store, the Hub the workers fetch from (`worker.hf_endpoint`), and
/// destinations under the uploader's rules (`[uploader]
/// allowed_local_roots`, `[destinations]`). A `file://` destination is
/// probed on this machine, so it should see the same folders as the
/// uploaders.
pub fn access_checks(config: &Config, store: ArtifactStore) -> anyhow::Result<AccessChecks> {
    Ok(AccessChecks::new(
        store,
        HubClient::new(&config.worker.hf_endpoint)?,
        Destinations::from_config(config),
    )
    .with_model_cap(config.store.max_model_bytes))
}
