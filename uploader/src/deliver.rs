//! One delivery: fetch each output from the artifact store (checking the
//! sha256 the worker recorded), copy it to each destination, read the copy
//! back to verify it, then write the manifest. An `hf://` destination
//! takes the files, a model card and the manifest in one commit instead
//! ([`crate::hub`]).
//!
//! A copy in a bucket destination written with the job's own keys (no
//! fleet credential, [`destination::uses_job_keys`]) gets its download URL
//! here, signed by the same client that wrote it, while the uploader still
//! holds those keys: once the job is final its sealed secrets are dropped
//! from its record, so the coordinator could never sign for it (it signs
//! the artifact store's and fleet-credential copies itself, on read). The
//! URL is a GET of that one object, good for the task's
//! `download_url_ttl_secs` (the coordinator's `[coordinator]
//! download_url_ttl_secs`), and travels only in the stage result into the
//! job record, which only its tenant reads; it is never logged nor put in
//! an event. An Azure container reached with a SAS token cannot sign (a
//! SAS cannot make another) and gets none; nor does a local folder (nothing
//! serves it but the artifact store's own URL) or an `hf://` repository.

mod object;

use crate::attributes::scheme_and_bucket;
use crate::hub::HubTarget;
use crate::hub::job::JobInput;
use object::{already_there, download_url, store_error, verify};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::Instrument;
use trainyard_core::Config;
use trainyard_core::destination::{self, Destinations, chain, hf};
use trainyard_core::redact::{display_url, redact_in};
use trainyard_core::runtime::{StageError, StageHandler, TaskContext};
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_proto::v1::{
    Artifact, DeliverOutput, DeliverTask, DeliveredFile, Destination, ErrorKind, JobSpec, LogLine,
    Secrets, Stage, TrainSummary, job_event::Kind, stage_result::Outcome,
};

pub struct DeliverStage {
    store: ArtifactStore,
    work_root: PathBuf,
    /// The allowed local roots, the store no destination may overlap, and
    /// the credentials `s3://` destinations may use; the coordinator and
    /// preflight check destinations with the same rules.
    destinations: Destinations,
    /// Opens the jobs' sealed secrets (destination credentials).
    secrets: Option<trainyard_core::secrets::Keyring>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    version: u32,
    job_id: &'a str,
    name: &'a str,
    files: Vec<ManifestFile>,
    spec: SpecSummary,
    metrics: Metrics,
    delivered_at_ms: i64,
}

#[derive(Serialize)]
struct ManifestFile {
    name: String,
    size: u64,
    sha256: String,
    uris: Vec<String>,
}

#[derive(Serialize, Default)]
struct SpecSummary {
    backend: String,
    base_model: String,
    steps: u32,
    learning_rate: f64,
    rank: u32,
    alpha: f64,
    resolution: u32,
    batch_size: u32,
    trigger_word: String,
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize, Default)]
struct Metrics {
    steps: u32,
    loss_first: Option<f32>,
    loss_last: Option<f32>,
    train_seconds: f64,
    image_count: Option<u32>,
}

fn summary(spec: &JobSpec) -> SpecSummary {
    let t = spec.training.clone().unwrap_or_default();
    SpecSummary {
        backend: t.backend,
        base_model: spec
            .base_model
            .as_ref()
            .map(|m| m.uri.clone())
            .unwrap_or_default(),
        steps: t.steps,
        learning_rate: t.learning_rate,
        rank: t.rank,
        alpha: t.alpha,
        resolution: t.resolution,
        batch_size: t.batch_size,
        trigger_word: spec
            .caption
            .as_ref()
            .map(|c| c.trigger_word.clone())
            .unwrap_or_default(),
        labels: spec.labels.clone().into_iter().collect(),
    }
}

fn finite(v: f32) -> Option<f32> {
    v.is_finite().then_some(v)
}

impl DeliverStage {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.uploader.work_dir)?;
        Ok(Self {
            store: ArtifactStore::open_config(&config.store)?,
            work_root: std::fs::canonicalize(&config.uploader.work_dir)?,
            destinations: Destinations::from_config(config),
            secrets: trainyard_core::secrets::Keyring::from_config(&config.secrets)?,
        })
    }

    /// Opens `tenant`'s destination with the job's `secrets`, checking it
    /// again on the disk as it is now (see [`Destinations::open`]). The
    /// error names it without credentials or query.
    fn destination(
        &self,
        tenant: &str,
        destination: &Destination,
        secrets: Option<&Secrets>,
    ) -> Result<Sink, StageError> {
        let uri = destination.uri.as_str();
        let refused = |e: trainyard_core::destination::DestinationError| {
            StageError::fail(ErrorKind::InvalidSpec, redact_in(&e.to_string(), uri))
        };
        if hf::is_hf(uri) {
            let dest = self.destinations.open_hf(uri, secrets).map_err(refused)?;
            return Ok(Sink::Hub(Box::new(HubTarget {
                dest,
                label: uri.to_owned(),
                public: destination.public,
                license: destination.license.clone(),
            })));
        }
        self.destinations
            .open(tenant, uri, secrets)
            .map(Sink::Store)
            .map_err(refused)
    }

    async fn deliver(
        &self,
        task: DeliverTask,
        ctx: &TaskContext,
        work: &Path,
    ) -> Result<Outcome, StageError> {
        let spec = task.spec.unwrap_or_default();
        let job = ctx.meta.job.as_str();
        let url_ttl = Duration::from_secs(task.download_url_ttl_secs);
        if task.artifacts.is_empty() {
            return Err(StageError::fail(
                ErrorKind::Internal,
                "nothing to deliver: the training stage stored no output",
            ));
        }
        // Every destination is opened (and so checked) before any byte
        // moves; one that cannot be opened is its chain's failure.
        let mut opened = Vec::with_capacity(spec.destinations.len());
        for destination in &spec.destinations {
            opened.push(Some(
                self.destination(&task.tenant, destination, spec.secrets.as_ref())
                    .map(|sink| Target {
                        label: destination.uri.clone(),
                        sink,
                        prefix: job.to_string(),
                        sign_for: (!url_ttl.is_zero()
                            && destination::uses_job_keys(&destination.uri))
                        .then_some(url_ttl),
                    }),
            ));
        }
        // A chain none of whose members can even be opened fails the job
        // now, before a byte moves, as a single destination always has.
        for members in chain::chains(&spec.destinations) {
            if members.iter().all(|&m| matches!(opened[m], Some(Err(_))))
                && let Some(&last) = members.last()
                && let Some(Err(error)) = opened[last].take()
            {
                return Err(error);
            }
        }
        let train = task.summary.unwrap_or_default();
        let hub_input = JobInput {
            job,
            spec: &spec,
            train: &train,
            dataset_uri: &task.dataset_uri,
        };
        let own = keys::job(&ctx.meta.tenant, &ctx.meta.job);
        let locals = self.fetch_all(&task.artifacts, &own, work).await?;
        let delivery = Delivery {
            artifacts: &task.artifacts,
            locals: &locals,
            hub_input: &hub_input,
            ctx,
            work,
        };
        // Per artifact, its copy in each target, in target order.
        let mut copies: Vec<Vec<DeliveredFile>> = vec![Vec::new(); task.artifacts.len()];
        let output = Target {
            label: String::new(),
            sink: Sink::Store(self.store.clone()),
            prefix: keys::output(&ctx.meta.tenant, &ctx.meta.job),
            sign_for: None,
        };
        let delivered = self.deliver_target(&output, &delivery).await?;
        let mut targets = vec![output];
        for (copy, list) in delivered.into_iter().zip(copies.iter_mut()) {
            list.push(copy);
        }
        for members in chain::chains(&spec.destinations) {
            let (target, delivered) = self
                .deliver_chain(&members, &mut opened, &spec, &delivery)
                .await?;
            targets.push(target);
            for (copy, list) in delivered.into_iter().zip(copies.iter_mut()) {
                list.push(copy);
            }
        }
        let uris = copies
            .iter()
            .map(|copies| copies.iter().map(|c| c.uri.clone()).collect())
            .collect();
        let body = manifest_body(job, &spec, &train, &task.artifacts, uris);
        let span = tracing::info_span!(
            "deliver.manifest",
            trainyard.destinations = targets.len(),
            trainyard.bytes = body.len(),
        );
        let manifest_uri = write_manifest(&targets, body).instrument(span).await?;
        crate::fault::exit_after(crate::fault::DELIVER_UPLOADED);
        Ok(Outcome::Delivered(DeliverOutput {
            files: copies.into_iter().flatten().collect(),
            manifest_uri,
        }))
    }

    /// One chain of destinations ([`chain`]): each member in order until one
    /// takes every artifact; a failure before the last is noted on the
    /// job's events (the destination named without credentials, the reason
    /// redacted) and the next is tried; the last one's failure is the
    /// job's. A cancelled or stopping task stops at once.
    async fn deliver_chain(
        &self,
        members: &[usize],
        opened: &mut [Option<Result<Target, StageError>>],
        spec: &JobSpec,
        delivery: &Delivery<'_>,
    ) -> Result<(Target, Vec<DeliveredFile>), StageError> {
        let ctx = delivery.ctx;
        let mut members = members.iter().peekable();
        while let Some(&index) = members.next() {
            let result = match opened[index]
                .take()
                .expect("each destination is tried once")
            {
                Ok(target) => self
                    .deliver_target(&target, delivery)
                    .await
                    .map(|delivered| (target, delivered)),
                Err(error) => Err(error),
            };
            let error = match result {
                Ok(done) => return Ok(done),
                Err(error @ (StageError::Cancelled | StageError::Interrupted)) => {
                    return Err(error);
                }
                Err(error) => error,
            };
            let Some(&&next) = members.peek() else {
                return Err(error);
            };
            let uri = &spec.destinations[index].uri;
            let line = format!(
                "destination {} failed: {}; trying the next one, {}",
                display_url(uri),
                redact_in(&error.to_string(), uri),
                display_url(&spec.destinations[next].uri),
            );
            tracing::warn!(job = %ctx.meta.job, "{line}");
            ctx.events
                .emit(Kind::Log(LogLine {
                    stage: Stage::Deliver as i32,
                    stream: "uploader".into(),
                    line,
                }))
                .await;
        }
        Err(StageError::fail(
            ErrorKind::Internal,
            "an empty destination chain",
        ))
    }

    /// Every artifact to `target`, inside its span (`deliver.output` or
    /// `deliver.destination`), counting what moved.
    async fn deliver_target(
        &self,
        target: &Target,
        delivery: &Delivery<'_>,
    ) -> Result<Vec<DeliveredFile>, StageError> {
        let span = target.span();
        let mut tally = Tally::default();
        let result = self
            .deliver_to(target, delivery, &mut tally)
            .instrument(span.clone())
            .await;
        span.record("trainyard.files", tally.files);
        span.record("trainyard.bytes", tally.bytes);
        trainyard_core::telemetry::metrics().artifact_uploaded("deliver", tally.bytes);
        let outcome = match (&result, tally.copied) {
            (Err(_), _) => "error",
            (Ok(_), 0) => "already_present",
            (Ok(_), _) => "verified",
        };
        span.record("trainyard.outcome", outcome);
        result
    }

    /// Every artifact to `target`, in order: kept when it is already
    /// there whole, else copied and read back. An `hf://` destination
    /// gets them in one commit with a model card and the manifest.
    async fn deliver_to(
        &self,
        target: &Target,
        delivery: &Delivery<'_>,
        tally: &mut Tally,
    ) -> Result<Vec<DeliveredFile>, StageError> {
        let Delivery {
            artifacts,
            locals,
            hub_input,
            ctx,
            work,
        } = *delivery;
        let Target {
            label,
            sink,
            prefix,
            sign_for,
        } = target;
        let store = match sink {
            Sink::Store(store) => store,
            Sink::Hub(hub) => {
                let delivered = crate::hub::job::deliver(
                    hub,
                    &self.store,
                    artifacts,
                    locals,
                    hub_input,
                    ctx,
                    work,
                )
                .await?;
                tally.files += delivered.files.len() as u64;
                tally.bytes += delivered.uploaded_bytes;
                if delivered.committed {
                    tally.copied += delivered.files.len() as u64;
                }
                return Ok(delivered.files);
            }
        };
        let shown = display_url(store.root());
        let mut delivered = Vec::with_capacity(artifacts.len());
        for (artifact, local) in artifacts.iter().zip(locals) {
            ctx.note(&format!("delivering {} to {shown}", artifact.name))
                .await;
            let key = format!("{prefix}/{}", artifact.name);
            // The artifact store already holds the worker's verified copy.
            let copy = if label.is_empty()
                && store.key_of(&artifact.uri).as_deref() == Some(key.as_str())
            {
                artifact.clone()
            } else if let Some(found) = already_there(store, &key, artifact, work).await? {
                // A delivery that died before its ack left it: keep it.
                let note = format!(
                    "{} already in {shown}, sha256 verified; not copied again",
                    artifact.name,
                );
                tracing::info!(job = %ctx.meta.job, uri = %display_url(&found.uri), "{note}");
                ctx.note(&note).await;
                found
            } else {
                let copy = store.put_file(local, &key).await.map_err(store_error)?;
                tally.copied += 1;
                tally.bytes += copy.size;
                verify(store, &key, &copy.sha256, work).await?;
                copy
            };
            tally.files += 1;
            let (download_url, download_url_expires_at_ms) = match sign_for {
                Some(ttl) => download_url(store, &key, *ttl, label)
                    .await
                    .unwrap_or_default(),
                None => Default::default(),
            };
            delivered.push(DeliveredFile {
                destination: if label.is_empty() {
                    store.root().to_string()
                } else {
                    label.clone()
                },
                uri: copy.uri,
                size: copy.size,
                sha256: copy.sha256,
                download_url,
                download_url_expires_at_ms,
                ..Default::default()
            });
        }
        Ok(delivered)
    }

    /// Downloads every artifact (checked against its sha256) inside a
    /// `deliver.fetch` span, counting the bytes read from the store.
    async fn fetch_all(
        &self,
        artifacts: &[Artifact],
        own: &str,
        work: &Path,
    ) -> Result<Vec<PathBuf>, StageError> {
        let span = tracing::info_span!(
            "deliver.fetch",
            trainyard.files = artifacts.len(),
            trainyard.bytes = tracing::field::Empty,
        );
        let mut bytes = 0;
        let result = async {
            let mut locals = Vec::with_capacity(artifacts.len());
            for artifact in artifacts {
                let (local, size) = self.fetch(artifact, own, work).await?;
                bytes += size;
                locals.push(local);
            }
            Ok(locals)
        }
        .instrument(span.clone())
        .await;
        span.record("trainyard.bytes", bytes);
        trainyard_core::telemetry::metrics().artifact_downloaded("deliver", bytes);
        result
    }

    /// Downloads an artifact — only from the job's own prefix `own` — and
    /// checks it against its recorded sha256; returns where it is and its
    /// size.
    async fn fetch(
        &self,
        artifact: &Artifact,
        own: &str,
        work: &Path,
    ) -> Result<(PathBuf, u64), StageError> {
        let key = self
            .store
            .key_of(&artifact.uri)
            .filter(|key| key.strip_prefix(own).is_some_and(|r| r.starts_with('/')))
            .ok_or_else(|| {
                StageError::fail(
                    ErrorKind::Internal,
                    format!(
                        "artifact {} is not in this job's folder of the artifact store",
                        artifact.uri
                    ),
                )
            })?;
        let local = work.join("outputs").join(&artifact.name);
        let (size, _) = self
            .store
            .get_file(&key, &local, Some(&artifact.sha256))
            .await
            .map_err(StageError::from)?;
        Ok((local, size))
    }
}

/// What every target of one delivery gets: the artifacts, their local
/// copies, the job (for a Hub commit's card), and the task.
#[derive(Clone, Copy)]
struct Delivery<'a> {
    artifacts: &'a [Artifact],
    locals: &'a [PathBuf],
    hub_input: &'a JobInput<'a>,
    ctx: &'a TaskContext,
    work: &'a Path,
}

/// Where one delivery goes: a destination of the spec (`label` is its
/// URI) or the artifact store's `tenants/<tenant>/jobs/<job>/output/`
/// (`label` empty).
struct Target {
    label: String,
    sink: Sink,
    prefix: String,
    /// Sign a download URL per copy, good this long: a bucket destination
    /// written with the job's own keys, when the task sets a TTL.
    sign_for: Option<Duration>,
}

/// What a target writes to.
enum Sink {
    Store(ArtifactStore),
    /// An `hf://` repository: one commit with the files, card and manifest.
    Hub(Box<HubTarget>),
}

/// The manifest of `job`'s delivery, each artifact with its `uris`.
pub(crate) fn manifest_body(
    job: &str,
    spec: &JobSpec,
    train: &TrainSummary,
    artifacts: &[Artifact],
    uris: Vec<Vec<String>>,
) -> bytes::Bytes {
    let files = artifacts
        .iter()
        .zip(uris)
        .map(|(artifact, uris)| ManifestFile {
            name: artifact.name.clone(),
            size: artifact.size,
            sha256: artifact.sha256.clone(),
            uris,
        })
        .collect();
    let manifest = Manifest {
        version: 1,
        job_id: job,
        name: &spec.name,
        files,
        spec: summary(spec),
        metrics: Metrics {
            steps: train.steps,
            loss_first: finite(train.loss_first),
            loss_last: finite(train.loss_last),
            train_seconds: train.seconds,
            image_count: None,
        },
        delivered_at_ms: trainyard_core::now_ms(),
    };
    bytes::Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default())
}

impl Target {
    /// `deliver.destination` for a destination of the spec, named by its
    /// scheme and bucket (never credentials or a query);
    /// `deliver.output` for the artifact store's copy.
    fn span(&self) -> tracing::Span {
        let (scheme, bucket) = scheme_and_bucket(match &self.sink {
            Sink::Store(store) if self.label.is_empty() => store.root(),
            _ => &self.label,
        });
        macro_rules! span {
            ($name:literal) => {
                tracing::info_span!(
                    $name,
                    trainyard.destination.scheme = scheme,
                    trainyard.destination.bucket = tracing::field::Empty,
                    trainyard.files = tracing::field::Empty,
                    trainyard.bytes = tracing::field::Empty,
                    trainyard.outcome = tracing::field::Empty,
                )
            };
        }
        let span = if self.label.is_empty() {
            span!("deliver.output")
        } else {
            span!("deliver.destination")
        };
        if let Some(bucket) = bucket {
            span.record("trainyard.destination.bucket", bucket.as_str());
        }
        span
    }
}

/// What one target got.
#[derive(Default)]
struct Tally {
    /// Artifacts delivered (copied or already there).
    files: u64,
    /// Artifacts copied now.
    copied: u64,
    /// Bytes written.
    bytes: u64,
}

/// Writes the manifest to every target (an `hf://` one has it in its
/// commit already); returns the first one's URI.
async fn write_manifest(targets: &[Target], body: bytes::Bytes) -> Result<String, StageError> {
    let mut manifest_uri = String::new();
    for target in targets {
        let Sink::Store(store) = &target.sink else {
            continue;
        };
        let stored = store
            .put_bytes(&format!("{}/manifest.json", target.prefix), body.clone())
            .await
            .map_err(store_error)?;
        trainyard_core::telemetry::metrics().artifact_uploaded("deliver", stored.size);
        if manifest_uri.is_empty() {
            manifest_uri = stored.uri;
        }
    }
    Ok(manifest_uri)
}

impl StageHandler for DeliverStage {
    type Task = DeliverTask;

    async fn handle(&self, mut task: DeliverTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        trainyard_core::secrets::open_task(
            self.secrets.as_ref(),
            &mut task.spec,
            &task.tenant,
            &task.job_id,
        )?;
        let work = self
            .work_root
            .join(format!("{}-{}", ctx.meta.job, ctx.meta.attempt));
        let _ = tokio::fs::remove_dir_all(&work).await;
        let result = tokio::select! {
            result = self.deliver(task, &ctx, &work) => result,
            _ = ctx.cancel.cancelled() => Err(StageError::Cancelled),
        };
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }
}
