//! What a run starts from: the task's training settings checked against its
//! model family and this worker's trainers, the run's folders, the dataset
//! (each file checked against the manifest's sha256), the base model's
//! parts, the newest stored checkpoint, and the trainer's config files and
//! environment. Everything here happens before the trainer starts.

use super::{TrainStage, local_error};
use crate::models::ModelLease;
use std::path::Path;
use std::time::Duration;
use tracing::Instrument;
use tracing::field::Empty;
use trainyard_backends::{ModelFiles, Resume, Slot, Tools, TrainInputs, TrainerBackend};
use trainyard_core::process::CommandSpec;
use trainyard_core::runtime::{StageError, TaskContext};
use trainyard_core::store::{StoreError, keys, sha256_file};
use trainyard_models::{ModelFamily, ModelSource};
use trainyard_proto::v1::{Checkpoint, ErrorKind, JobRecord, JobSpec, TrainTask, TrainingSettings};

/// A task this worker can run: its spec, its training settings, the base
/// model's family and the backend that trains it.
pub(super) struct Checked {
    pub spec: JobSpec,
    pub settings: TrainingSettings,
    pub family: ModelFamily,
    pub backend: Box<dyn TrainerBackend>,
}

/// The training settings this attempt runs with: the task's, or the
/// lighter ones an earlier delivery reported after an OOM, as the
/// coordinator recorded them in the job record (`effective_training`).
fn training_settings(
    task: &TrainTask,
    record: &JobRecord,
) -> Result<(JobSpec, TrainingSettings), StageError> {
    let mut spec = task
        .spec
        .clone()
        .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "task has no job spec"))?;
    if let Some(lighter) = &record.effective_training {
        spec.training = Some(lighter.clone());
    }
    let settings = spec
        .training
        .clone()
        .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "training: is required"))?;
    Ok((spec, settings))
}

/// Checks the task's settings against its model family and finds its
/// backend; a backend this worker lacks hands the task back (another
/// worker of the pool may have it).
pub(super) fn check(
    task: &TrainTask,
    record: &JobRecord,
    tools: &Tools,
) -> Result<Checked, StageError> {
    let (spec, settings) = training_settings(task, record)?;
    let model_ref = spec.base_model.clone().unwrap_or_default();
    let family = ModelSource::parse(&model_ref.uri)
        .and_then(|source| source.family(&model_ref.family))
        .map_err(|e| StageError::fail(ErrorKind::InvalidSpec, e.to_string()))?;
    let problems = trainyard_backends::check_settings(&settings, family);
    if !problems.is_empty() {
        return Err(StageError::fail(
            ErrorKind::InvalidSpec,
            trainyard_backends::joined(&problems),
        ));
    }
    let backend = trainyard_backends::by_name(&settings.backend, tools).ok_or_else(|| {
        StageError::fail(
            ErrorKind::InvalidSpec,
            format!("training.backend: unknown backend {:?}", settings.backend),
        )
    })?;
    if let Some(missing) = trainyard_backends::not_installed(&settings.backend, tools) {
        return Err(StageError::retry(
            ErrorKind::Trainer,
            missing,
            Duration::from_secs(30),
        ));
    }
    Ok(Checked {
        spec,
        settings,
        family,
        backend,
    })
}

impl Checked {
    /// The run's inputs under `work`, before anything is fetched.
    pub(super) fn inputs(&self, job_id: &str, work: &Path, slot: Slot) -> TrainInputs {
        TrainInputs {
            job_id: job_id.to_string(),
            dataset_dir: work.join("dataset"),
            model: ModelFiles {
                reference: self.spec.base_model.clone().unwrap_or_default().uri,
                family: self.family,
                parts: Default::default(),
            },
            run_dir: work.join("run"),
            output_dir: work.join("output"),
            output_name: "lora".into(),
            trigger_word: self
                .spec
                .caption
                .as_ref()
                .map(|c| c.trigger_word.clone())
                .unwrap_or_default(),
            resume: None,
            webhook_url: None,
            slot,
            settings: self.settings.clone(),
        }
    }
}

pub(super) async fn create_dirs(inputs: &TrainInputs) -> Result<(), StageError> {
    for dir in [&inputs.run_dir, &inputs.output_dir, &inputs.dataset_dir] {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| local_error("cannot create work dir", e))?;
    }
    Ok(())
}

impl TrainStage {
    /// Fetches the dataset, the model parts and the newest checkpoint into
    /// the run's folders; returns the model lease that keeps them cached.
    pub(super) async fn fetch_inputs(
        &self,
        inputs: &mut TrainInputs,
        task: &TrainTask,
        spec: &JobSpec,
        backend: &dyn TrainerBackend,
        ctx: &TaskContext,
    ) -> Result<ModelLease, StageError> {
        self.fetch_dataset(inputs, task, ctx).await?;
        let lease = self.fetch_model(inputs, spec, backend, ctx).await?;
        self.restore_checkpoint(inputs, task, ctx).await?;
        Ok(lease)
    }

    /// The dataset the prepare stage stored: read only from the task's own
    /// job's prefix.
    async fn fetch_dataset(
        &self,
        inputs: &TrainInputs,
        task: &TrainTask,
        ctx: &TaskContext,
    ) -> Result<(), StageError> {
        ctx.note("fetching dataset").await;
        let own = keys::dataset(&ctx.meta.tenant, &ctx.meta.job);
        let key = self
            .store
            .tenant_key(&ctx.meta.tenant, &task.dataset_uri)
            .ok()
            .filter(|key| *key == own)
            .ok_or_else(|| {
                StageError::fail(
                    ErrorKind::InvalidSpec,
                    format!(
                        "dataset {} is not this job's prepared dataset ({})",
                        trainyard_core::redact::display_url(&task.dataset_uri),
                        self.store.uri(&own)
                    ),
                )
            })?;
        let span = tracing::info_span!(
            "train.inputs",
            trainyard.job.id = %ctx.meta.job,
            files = Empty,
            bytes = Empty,
        );
        async {
            let fetched = self
                .store
                .get_dir(&key, &inputs.dataset_dir)
                .await
                .map_err(StageError::from)?;
            let span = tracing::Span::current();
            span.record("files", fetched.len());
            span.record("bytes", fetched.iter().map(|(_, size)| size).sum::<u64>());
            verify_manifest(&inputs.dataset_dir).await
        }
        .instrument(span)
        .await
    }

    /// The base model; one in the store must lie below the task's tenant's
    /// prefix and fit `[store] max_model_bytes` before it is fetched.
    async fn check_store_model(&self, spec: &JobSpec, ctx: &TaskContext) -> Result<(), StageError> {
        let uri = spec
            .base_model
            .as_ref()
            .map(|m| m.uri.as_str())
            .unwrap_or_default();
        let Ok(ModelSource::Store(uri)) = ModelSource::parse(uri) else {
            return Ok(());
        };
        let key = self.store.tenant_key(&ctx.meta.tenant, &uri).map_err(|e| {
            StageError::fail(ErrorKind::InvalidSpec, format!("base_model.uri: {e}"))
        })?;
        match self.store.size_within(&key, self.max_model_bytes).await {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) if e.is_refused() => Err(StageError::fail(
                ErrorKind::InvalidSpec,
                format!("base_model.uri: {e}"),
            )),
            Err(e) => Err(StageError::from(e)),
        }
    }

    async fn fetch_model(
        &self,
        inputs: &mut TrainInputs,
        spec: &JobSpec,
        backend: &dyn TrainerBackend,
        ctx: &TaskContext,
    ) -> Result<ModelLease, StageError> {
        ctx.note("fetching base model").await;
        self.check_store_model(spec, ctx).await?;
        let token = spec
            .secrets
            .as_ref()
            .map(|s| s.hf_token.as_str())
            .filter(|t| !t.is_empty());
        let model_ref = spec.base_model.clone().unwrap_or_default();
        let span = tracing::info_span!(
            "train.model",
            trainyard.job.id = %ctx.meta.job,
            cache = Empty,
            bytes = Empty,
            fetched_bytes = Empty,
        );
        let (model, lease) = self
            .models
            .resolve(
                &model_ref,
                backend.parts(inputs.model.family),
                inputs.settings.resolution,
                token,
            )
            .instrument(span.clone())
            .await?;
        span.record("cache", if lease.hit() { "hit" } else { "miss" });
        span.record("bytes", lease.bytes());
        span.record("fetched_bytes", lease.fetched_bytes());
        inputs.model = model;
        Ok(lease)
    }

    /// Restores the newest trusted checkpoint into the output folder. Trusted
    /// are only the checkpoints a worker said it stored — the job's last
    /// `checkpoint` event (a redelivered attempt continues from what any
    /// earlier one uploaded) and the one the record names — and only when
    /// they lie at this job's own checkpoint key and their manifest's
    /// sha256 matches. Anything else in the store is never read. One that
    /// fails its checks is refused with a note and the next older trusted
    /// one tried; with none left the run starts from scratch.
    async fn restore_checkpoint(
        &self,
        inputs: &mut TrainInputs,
        task: &TrainTask,
        ctx: &TaskContext,
    ) -> Result<(), StageError> {
        let (tenant, job) = (&ctx.meta.tenant, &ctx.meta.job);
        let mut trusted: Vec<Checkpoint> = Vec::new();
        match ctx.events.last_checkpoint().await {
            Ok(found) => trusted.extend(found),
            Err(e) => {
                return Err(StageError::retry(
                    ErrorKind::Storage,
                    format!("cannot read the job's checkpoint events: {e}"),
                    Duration::from_secs(5),
                ));
            }
        }
        trusted.extend(task.resume_from.clone().filter(|c| !c.uri.is_empty()));
        trusted.sort_by_key(|c| std::cmp::Reverse(c.step));
        trusted.dedup_by(|a, b| a.uri == b.uri && a.manifest_sha256 == b.manifest_sha256);
        let restore = tracing::info_span!(
            "train.checkpoint.restore",
            trainyard.job.id = %job,
            step = Empty,
        );
        for checkpoint in trusted {
            let own = keys::checkpoint(tenant, job, checkpoint.step);
            let restored = match self.store.key_of(&checkpoint.uri) {
                Some(key) if key == own => {
                    self.store
                        .get_checkpoint(&own, &checkpoint.manifest_sha256, &inputs.output_dir)
                        .instrument(restore.clone())
                        .await
                }
                _ => Err(StoreError::Corrupt(format!(
                    "{} is not this job's checkpoint {}",
                    trainyard_core::redact::display_url(&checkpoint.uri),
                    self.store.uri(&own)
                ))),
            };
            match restored {
                Ok((step, files)) => {
                    restore.record("step", step);
                    ctx.note(&format!("resuming from step {step}")).await;
                    tracing::info!(%job, step, "restored checkpoint");
                    inputs.resume = Some(Resume { step, files });
                    break;
                }
                Err(e) if e.is_retryable() => return Err(StageError::from(e)),
                Err(e) => {
                    tracing::warn!(%job, step = checkpoint.step, error = %e, "checkpoint refused; trying an older one");
                    ctx.note(&format!(
                        "checkpoint of step {} not restored: {e}",
                        checkpoint.step
                    ))
                    .await;
                    let _ = tokio::fs::remove_dir_all(&inputs.output_dir).await;
                    tokio::fs::create_dir_all(&inputs.output_dir)
                        .await
                        .map_err(|e| local_error("cannot create work dir", e))?;
                }
            }
        }
        Ok(())
    }

    /// Renders the backend's run, writes its config files, makes its links
    /// (to dataset files, for a trainer that needs a folder of some of
    /// them), and returns the command with the trainer's environment.
    pub(super) async fn launch(
        &self,
        backend: &dyn TrainerBackend,
        inputs: &TrainInputs,
        receiver: bool,
    ) -> Result<CommandSpec, StageError> {
        let launch = backend
            .render(inputs)
            .map_err(|e| StageError::fail(ErrorKind::InvalidSpec, e.to_string()))?;
        for (path, body) in &launch.files {
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| local_error("cannot create config folder", e))?;
            }
            tokio::fs::write(path, body)
                .await
                .map_err(|e| local_error("cannot write trainer config", e))?;
        }
        for (link, target) in &launch.links {
            make_link(link, target).await?;
        }
        let mut command = launch.command;
        add_env(&mut command.env, receiver, &self.trainer_env);
        Ok(command)
    }
}

/// A symbolic link at `link` to `target`, replacing what a run before
/// this one left there.
async fn make_link(link: &Path, target: &Path) -> Result<(), StageError> {
    if let Some(parent) = link.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| local_error("cannot create link folder", e))?;
    }
    match tokio::fs::remove_file(link).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(local_error("cannot replace dataset link", e)),
    }
    tokio::fs::symlink(target, link)
        .await
        .map_err(|e| local_error("cannot link dataset file", e))
}

/// Adds the trainer's environment to what the backend set, which wins:
/// unbuffered UTF-8 Python output, no proxy for loopback when a progress
/// receiver listens there, then `[worker.trainers] env`.
fn add_env(env: &mut Vec<(String, String)>, receiver: bool, trainer_env: &[(String, String)]) {
    let mut defaults = vec![("PYTHONUNBUFFERED", "1"), ("PYTHONIOENCODING", "utf-8")];
    if receiver {
        // The progress receiver is on loopback: never through a configured proxy.
        defaults.extend([
            ("NO_PROXY", "127.0.0.1,localhost"),
            ("no_proxy", "127.0.0.1,localhost"),
        ]);
    }
    let defaults = defaults
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()));
    for (key, value) in defaults.chain(trainer_env.iter().cloned()) {
        if !env.iter().any(|(k, _)| *k == key) {
            env.push((key, value));
        }
    }
}

/// Checks every dataset file against the sha256 the prepare stage recorded.
async fn verify_manifest(dir: &Path) -> Result<(), StageError> {
    let bad = |m: String| StageError::retry(ErrorKind::Storage, m, Duration::from_secs(5));
    let text = tokio::fs::read(dir.join("manifest.json"))
        .await
        .map_err(|e| {
            bad(format!(
                "prepared dataset has no readable manifest.json: {e}"
            ))
        })?;
    let manifest: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("manifest.json is not valid json: {e}")))?;
    let mut entries = manifest["images"].as_array().cloned().unwrap_or_default();
    entries.extend(manifest["texts"].as_array().cloned().unwrap_or_default());
    if entries.is_empty() {
        return Err(StageError::fail(
            ErrorKind::BadDataset,
            "prepared dataset lists no images or text files",
        ));
    }
    for entry in entries {
        let (Some(file), Some(expected)) = (entry["file"].as_str(), entry["sha256"].as_str())
        else {
            return Err(bad("manifest.json entry without file or sha256".into()));
        };
        if file.contains("..") || file.starts_with('/') {
            return Err(StageError::fail(
                ErrorKind::BadDataset,
                format!("manifest names unsafe path {file}"),
            ));
        }
        let (_, actual) = sha256_file(&dir.join(file))
            .await
            .map_err(StageError::from)?;
        if actual != expected {
            return Err(bad(format!("dataset file {file} failed its checksum")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_backends_environment_wins_over_defaults_and_the_workers() {
        let mut env = pairs(&[("PYTHONUNBUFFERED", "0")]);
        add_env(
            &mut env,
            false,
            &pairs(&[("HF_HOME", "/cache"), ("PYTHONUNBUFFERED", "2")]),
        );
        assert_eq!(
            env,
            pairs(&[
                ("PYTHONUNBUFFERED", "0"),
                ("PYTHONIOENCODING", "utf-8"),
                ("HF_HOME", "/cache"),
            ])
        );
    }

    #[test]
    fn a_progress_receiver_on_loopback_bypasses_proxies() {
        let mut env = Vec::new();
        add_env(&mut env, true, &[]);
        assert!(env.contains(&("NO_PROXY".into(), "127.0.0.1,localhost".into())));
        assert!(env.contains(&("no_proxy".into(), "127.0.0.1,localhost".into())));
        let mut env = Vec::new();
        add_env(&mut env, false, &[]);
        assert!(!env.iter().any(|(k, _)| k.eq_ignore_ascii_case("no_proxy")));
    }

    /// A link is made with its folder, and replaces what an earlier run
    /// left at its place.
    #[tokio::test]
    async fn a_link_replaces_what_was_there() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.mp4"), tmp.path().join("b.mp4"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let link = tmp.path().join("run/media/clips/x.mp4");
        make_link(&link, &a).await.unwrap();
        assert_eq!(std::fs::read(&link).unwrap(), b"a");
        make_link(&link, &b).await.unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), b);
        assert_eq!(std::fs::read(&link).unwrap(), b"b");
    }
}
