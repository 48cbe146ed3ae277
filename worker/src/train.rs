//! The training stage on the shared runtime: fetch the prepared dataset
//! (verifying its manifest checksums), the base model's parts and the newest
//! stored checkpoint, render the backend's run, launch it as a child process
//! group, turn its output (and webhook posts) into progress, metric and log
//! events (log lines batched off the run loop, [`crate::logs`]), upload
//! every new complete checkpoint, and store the final adapter.
//!
//! Cancel kills the trainer at once. Shutdown asks the trainer to save the
//! way its backend allows ([`StopRequest`]), uploads that state, and hands
//! the task back; the next attempt, on any worker, continues from it.
//!
//! Observability: the handler runs inside the task's span; its steps are
//! child spans `train.inputs` (dataset, restored checkpoint), `train.model`
//! (`cache` = hit | miss, `bytes`, `fetched_bytes`), `train.run` (`backend`,
//! `slot`, `resume_step`) with one `train.checkpoint.upload` (`step`,
//! `bytes`) per stored checkpoint, `train.adapter.upload` and
//! `train.log.upload`, each with `trainyard.job.id`. Every parsed progress
//! sets the job's gauges (`trainyard_job_*`, removed when the handler
//! ends); parsed values go out as `metric` events named `loss`,
//! `learning_rate`, `samples_per_second`, `epoch` (and the trainer's own
//! extra metrics under their names), throttled by [`MetricThrottle`]. The
//! trainer's output is kept by [`TrainerLog`] and stored when each run
//! ends, however it ends.

use crate::gpu::{Gpus, Slots, visible_devices};
use crate::logs::LogBatcher;
use crate::models::Models;
use crate::throttle::MetricThrottle;
use crate::trainer_log::TrainerLog;
use crate::webhook::Webhook;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tracing::Instrument;
use tracing::field::Empty;
use trainyard_backends::{
    LineEvent, OutputParser, Resume, StopRequest, Tools, TrainInputs, TrainerBackend,
};
use trainyard_core::config::{StuckConfig, StuckLimits};
use trainyard_core::models::ModelSource;
use trainyard_core::process::{ChildGroup, CommandSpec, Guard, OutputLine};
use trainyard_core::runtime::{StageError, StageHandler, TaskContext};
use trainyard_core::store::{ArtifactStore, keys, sha256_file};
use trainyard_core::telemetry::metrics;
use trainyard_core::telemetry::metrics::JobProgress;
use trainyard_proto::v1::{
    Checkpoint, ErrorKind, JobSpec, Progress, Stage, Stuck, TrainOutput, TrainSummary, TrainTask,
    stage_result::Outcome,
};

const TAIL_LINES: usize = 40;

/// How long a trainer whose worker died gets between SIGTERM and SIGKILL.
/// Short: nothing is left to upload what it would save.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// How long the log lines queued at the end of a run may take to publish.
const LOG_CLOSE: Duration = Duration::from_secs(5);

/// How long storing an attempt's trainer log may take before it is given up.
const LOG_UPLOAD: Duration = Duration::from_secs(60);

/// The `metric` event names of the values every progress may carry.
const LOSS: &str = "loss";
const LEARNING_RATE: &str = "learning_rate";
const SAMPLES_PER_SECOND: &str = "samples_per_second";
const EPOCH: &str = "epoch";

pub struct TrainStage {
    pub store: ArtifactStore,
    pub models: Models,
    pub work_root: PathBuf,
    pub tools: Tools,
    /// How long a trainer gets to save and exit when the worker stops.
    pub stop_grace: Duration,
    /// The trainer guard, which ends the trainer's group if this process
    /// dies; `None` starts trainers directly.
    pub guard: Option<Guard>,
    pub progress_interval: Duration,
    pub checkpoint_scan: Duration,
    pub nan_loss_steps: u32,
    /// Added to every trainer's environment (`[worker.trainers] env`).
    pub trainer_env: Vec<(String, String)>,
    /// When a trainer counts as stuck (`[worker.stuck]`).
    pub stuck: StuckConfig,
    /// NVML, for the GPU idle check; absent on machines without it.
    pub gpus: Gpus,
    /// Each concurrent run's index and GPU (`TrainInputs::slot`).
    pub slots: Slots,
    /// Bytes of trainer output kept per attempt (`[worker] trainer_log_max_bytes`).
    pub trainer_log_max_bytes: u64,
    /// `[worker] metric_events_per_second`.
    pub metric_events_per_second: u32,
}

/// Removes a job's gauges when its handling ends, however it ends.
struct JobGauges<'a>(&'a str);

impl Drop for JobGauges<'_> {
    fn drop(&mut self) {
        metrics().job_ended(self.0);
    }
}

fn local_error(what: &str, error: std::io::Error) -> StageError {
    StageError::retry(
        ErrorKind::Internal,
        format!("{what}: {error}"),
        Duration::from_secs(5),
    )
}

impl StageHandler for TrainStage {
    type Task = TrainTask;

    async fn handle(&self, task: TrainTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        let work = self.work_root.join(ctx.meta.job.as_str());
        let _ = tokio::fs::remove_dir_all(&work).await;
        let _gauges = JobGauges(ctx.meta.job.as_str());
        let result = self.train(task, &ctx, &work).await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }
}

impl TrainStage {
    async fn train(
        &self,
        task: TrainTask,
        ctx: &TaskContext,
        work: &Path,
    ) -> Result<Outcome, StageError> {
        let started = Instant::now();
        let mut spec = task
            .spec
            .clone()
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "task has no job spec"))?;
        // The settings an earlier delivery lightened (an OOM), as the
        // coordinator recorded them in the job record.
        if let Some(lighter) = &ctx.record.effective_training {
            spec.training = Some(lighter.clone());
        }
        let settings = spec
            .training
            .clone()
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "training: is required"))?;
        let model_ref = spec.base_model.clone().unwrap_or_default();
        let family = ModelSource::parse(&model_ref.uri)
            .and_then(|source| source.family(&model_ref.family))
            .map_err(|e| StageError::fail(ErrorKind::InvalidSpec, e))?;
        let problems = trainyard_backends::check_settings(&settings, family);
        if !problems.is_empty() {
            return Err(StageError::fail(
                ErrorKind::InvalidSpec,
                problems.join("; "),
            ));
        }
        let backend =
            trainyard_backends::by_name(&settings.backend, &self.tools).ok_or_else(|| {
                StageError::fail(
                    ErrorKind::InvalidSpec,
                    format!("training.backend: unknown backend {:?}", settings.backend),
                )
            })?;
        if let Some(missing) = trainyard_backends::not_installed(&settings.backend, &self.tools) {
            // Another worker of the pool may have it: hand the task back.
            return Err(StageError::retry(
                ErrorKind::Trainer,
                missing,
                Duration::from_secs(30),
            ));
        }
        let slot = self.slots.take();
        let mut inputs = TrainInputs {
            job_id: ctx.meta.job.to_string(),
            dataset_dir: work.join("dataset"),
            model: trainyard_backends::ModelFiles {
                reference: model_ref.uri.clone(),
                family,
                parts: Default::default(),
            },
            run_dir: work.join("run"),
            output_dir: work.join("output"),
            output_name: "lora".into(),
            trigger_word: spec
                .caption
                .as_ref()
                .map(|c| c.trigger_word.clone())
                .unwrap_or_default(),
            resume: None,
            webhook_url: None,
            slot: slot.slot().clone(),
            settings,
        };
        for dir in [&inputs.run_dir, &inputs.output_dir, &inputs.dataset_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| local_error("cannot create work dir", e))?;
        }
        let fetched = tokio::select! {
            fetched = self.fetch_inputs(&mut inputs, &task, &spec, backend.as_ref(), ctx) => fetched?,
            _ = ctx.cancel.cancelled() => return Err(StageError::Cancelled),
            _ = ctx.stop.cancelled() => return Err(StageError::Interrupted),
        };
        let _lease = fetched;
        let mut webhook = None;
        if backend.wants_webhook() {
            let hook = Webhook::bind()
                .await
                .map_err(|e| local_error("cannot open the webhook listener", e))?;
            inputs.webhook_url = Some(hook.url.clone());
            webhook = Some(hook);
        }
        let launch = backend
            .render(&inputs)
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
        let mut command = launch.command;
        let mut defaults = vec![("PYTHONUNBUFFERED", "1"), ("PYTHONIOENCODING", "utf-8")];
        if webhook.is_some() {
            // The webhook is on loopback: never through a configured proxy.
            defaults.extend([
                ("NO_PROXY", "127.0.0.1,localhost"),
                ("no_proxy", "127.0.0.1,localhost"),
            ]);
        }
        let defaults = defaults
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()));
        for (key, value) in defaults.chain(self.trainer_env.iter().cloned()) {
            if !command.env.iter().any(|(k, _)| *k == key) {
                command.env.push((key, value));
            }
        }
        let logs = LogBatcher::start(ctx.events.clone(), Stage::Train);
        let run = Run {
            stage: self,
            backend: backend.as_ref(),
            ctx,
            inputs: &inputs,
            staging: work.join("staging"),
            logs: &logs,
            tenant: ctx.meta.tenant.to_string(),
            throttle: Mutex::new(MetricThrottle::new(self.metric_events_per_second)),
            log: Mutex::new(TrainerLog::create(work, self.trainer_log_max_bytes)),
        };
        let span = tracing::info_span!(
            "train.run",
            trainyard.job.id = %ctx.meta.job,
            backend = backend.name(),
            slot = inputs.slot.index,
            resume_step = Empty,
        );
        if let Some(resume) = &inputs.resume {
            span.record("resume_step", resume.step);
        }
        let result = run
            .supervise(command, webhook, started)
            .instrument(span)
            .await;
        run.send_metrics(true).await;
        // However the run ended (a cancelled one too: why it was cancelled
        // may be in its output).
        run.store_log().await;
        // The run's log lines go out before its result.
        logs.close(LOG_CLOSE).await;
        result
    }

    /// Fetches the dataset, the model parts and the newest checkpoint into
    /// the run's folders; returns the model lease that keeps them cached.
    async fn fetch_inputs(
        &self,
        inputs: &mut TrainInputs,
        task: &TrainTask,
        spec: &JobSpec,
        backend: &dyn TrainerBackend,
        ctx: &TaskContext,
    ) -> Result<crate::models::ModelLease, StageError> {
        ctx.note("fetching dataset").await;
        let key = self.store.key_of(&task.dataset_uri).ok_or_else(|| {
            StageError::fail(
                ErrorKind::InvalidSpec,
                format!("dataset {} is not in the artifact store", task.dataset_uri),
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
        .await?;
        ctx.note("fetching base model").await;
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
        drop(span);
        inputs.model = model;
        // The newest complete checkpoint in the store wins over the one the
        // task names: a retried or redelivered attempt continues from the
        // latest state any earlier attempt uploaded. One that cannot be
        // restored is skipped for the next older one.
        let mut candidates: Vec<String> = self
            .store
            .checkpoints(&ctx.meta.job)
            .await
            .map_err(StageError::from)?
            .into_iter()
            .map(|step| keys::checkpoint(&ctx.meta.job, step))
            .collect();
        if let Some(named) = task.resume_from.as_ref().filter(|c| !c.uri.is_empty())
            && let Some(key) = self.store.key_of(&named.uri)
            && !candidates.contains(&key)
        {
            candidates.push(key);
        }
        let restore = tracing::info_span!(
            "train.checkpoint.restore",
            trainyard.job.id = %ctx.meta.job,
            step = Empty,
        );
        for prefix in candidates {
            let restored = self
                .store
                .get_checkpoint(&prefix, &inputs.output_dir)
                .instrument(restore.clone())
                .await;
            match restored {
                Ok((step, files)) => {
                    restore.record("step", step);
                    ctx.note(&format!("resuming from step {step}")).await;
                    tracing::info!(job = %ctx.meta.job, step, "restored checkpoint");
                    inputs.resume = Some(Resume { step, files });
                    break;
                }
                Err(e) if e.is_retryable() => return Err(StageError::from(e)),
                Err(e) => {
                    tracing::warn!(job = %ctx.meta.job, checkpoint = %prefix, error = %e, "checkpoint cannot be restored; trying an older one");
                    let _ = tokio::fs::remove_dir_all(&inputs.output_dir).await;
                    tokio::fs::create_dir_all(&inputs.output_dir)
                        .await
                        .map_err(|e| local_error("cannot create work dir", e))?;
                }
            }
        }
        Ok(lease)
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

/// One trainer run and everything that watches it.
struct Run<'a> {
    stage: &'a TrainStage,
    backend: &'a dyn TrainerBackend,
    ctx: &'a TaskContext,
    inputs: &'a TrainInputs,
    /// Checkpoint files are copied here before upload, so a trainer that
    /// prunes or rewrites them cannot tear the stored copy.
    staging: PathBuf,
    /// Log events, published off the run loop.
    logs: &'a LogBatcher,
    tenant: String,
    /// Which parsed values go out as `metric` events.
    throttle: Mutex<MetricThrottle>,
    /// The trainer's whole output; `None` when not kept.
    log: Mutex<Option<TrainerLog>>,
}

struct Seen {
    parser: Box<dyn OutputParser>,
    tail: VecDeque<String>,
    last_progress: Option<Progress>,
    last_emit: Option<Instant>,
    first_step_at: Option<(Instant, u32)>,
    loss_first: Option<f32>,
    /// Consecutive steps whose loss was not finite, and the last such step.
    nan_run: u32,
    nan_step: Option<u32>,
    /// The step of the newest checkpoint stored (or restored).
    stored_step: Option<u32>,
    latest_uploaded: Option<Checkpoint>,
    /// The upload in flight and its step.
    upload: Option<(u32, JoinHandle<Result<Checkpoint, StageError>>)>,
    resume_checked: bool,
    /// When the last output line (or webhook post) arrived.
    line_at: tokio::time::Instant,
    /// The highest step reported and when it was first seen (the start
    /// until then): the stuck watchdog's clock.
    top_step: Option<u32>,
    step_at: tokio::time::Instant,
    /// When the GPUs were last seen busy (or the first step, if later).
    gpu_busy_at: tokio::time::Instant,
}

/// Why the run loop stopped the trainer itself.
enum Verdict {
    Exited(std::process::ExitStatus),
    Abort(StageError),
    Stuck(Stuck),
}

/// Whether the trainer is stuck at `now`: no output for the silent limit,
/// no first step within its allowance, no new step since the last one for
/// the step limit, or (sampled by the caller) idle GPUs since the first
/// step for the GPU limit.
fn stuck_at(limits: &StuckLimits, seen: &Seen, now: tokio::time::Instant) -> Option<Stuck> {
    let stuck = |cause: &str, since: tokio::time::Instant, what: String| {
        let seconds = now.duration_since(since).as_secs_f64();
        Stuck {
            stage: Stage::Train as i32,
            step: seen.top_step.unwrap_or(0),
            seconds,
            cause: cause.into(),
            message: format!("trainer stuck: {what} for {seconds:.0}s; killed"),
        }
    };
    if let Some(limit) = limits.silent
        && now.duration_since(seen.line_at) >= limit
    {
        return Some(stuck("silent", seen.line_at, "no output".into()));
    }
    if let Some(limit) = limits.gpu_idle
        && seen.top_step.is_some()
        && now.duration_since(seen.gpu_busy_at) >= limit
    {
        return Some(stuck("gpu_idle", seen.gpu_busy_at, "GPUs idle".into()));
    }
    match seen.top_step {
        None => limits
            .first_step
            .filter(|limit| now.duration_since(seen.step_at) >= *limit)
            .map(|_| stuck("first_step", seen.step_at, "no first step".into())),
        Some(step) => limits
            .step
            .filter(|limit| now.duration_since(seen.step_at) >= *limit)
            .map(|_| stuck("no_step", seen.step_at, format!("no step after {step}"))),
    }
}

impl Run<'_> {
    async fn supervise(
        &self,
        command: CommandSpec,
        mut webhook: Option<Webhook>,
        started: Instant,
    ) -> Result<Outcome, StageError> {
        let job = &self.ctx.meta.job;
        let spawned = match &self.stage.guard {
            Some(guard) => ChildGroup::spawn_guarded(&command, guard).await,
            None => ChildGroup::spawn(&command),
        };
        let (mut child, mut lines) = spawned.map_err(|e| {
            StageError::fail(
                ErrorKind::Trainer,
                format!("cannot start trainer {}: {e}", command.program.display()),
            )
        })?;
        tracing::info!(%job, pid = child.trainer_pid(), pgid = child.pid(), backend = self.backend.name(), "trainer started");
        self.logs.note(&format!(
            "{} trainer started pid={} pgid={}",
            self.backend.name(),
            child.trainer_pid(),
            child.pid()
        ));
        let mut seen = Seen {
            parser: self.backend.parser(self.inputs),
            tail: VecDeque::new(),
            last_progress: None,
            last_emit: None,
            first_step_at: None,
            loss_first: None,
            nan_run: 0,
            nan_step: None,
            stored_step: self.inputs.resume.as_ref().map(|r| r.step),
            latest_uploaded: None,
            upload: None,
            resume_checked: self.inputs.resume.is_none(),
            line_at: tokio::time::Instant::now(),
            top_step: None,
            step_at: tokio::time::Instant::now(),
            gpu_busy_at: tokio::time::Instant::now(),
        };
        let mut scan = tokio::time::interval(self.stage.checkpoint_scan);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut limits = self.stage.stuck.limits(self.backend.name());
        if !self.stage.gpus.present() {
            limits.gpu_idle = None;
        }
        // This run's own GPUs where its slot names them: another run's busy
        // GPU must not hide this one's idleness.
        let devices = if self.inputs.slot.gpus.is_empty() {
            visible_devices(
                self.stage
                    .trainer_env
                    .iter()
                    .find(|(k, _)| k == "CUDA_VISIBLE_DEVICES")
                    .map(|(_, v)| v.as_str()),
            )
        } else {
            self.inputs.slot.gpus.clone()
        };
        let shortest = [
            limits.step,
            limits.first_step,
            limits.silent,
            limits.gpu_idle,
        ]
        .into_iter()
        .flatten()
        .min();
        // Look a few times per limit, never more than every 100 ms nor
        // less than every 5 s.
        let mut watchdog = tokio::time::interval(
            shortest
                .map(|d| d / 4)
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
        );
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lines_open = true;
        let verdict = loop {
            tokio::select! {
                line = lines.recv(), if lines_open => match line {
                    Some(line) => {
                        if let Err(e) = self.on_line(line, &mut seen).await {
                            break Verdict::Abort(e);
                        }
                    }
                    None => lines_open = false,
                },
                Some(body) = recv_webhook(&mut webhook) => {
                    seen.line_at = tokio::time::Instant::now();
                    // Failures reported only by webhook must reach `classify`.
                    let text = body.to_string();
                    if text.to_ascii_lowercase().contains("error") {
                        push_tail(&mut seen, format!("webhook: {text}"));
                    }
                    let events = seen.parser.webhook(&body);
                    if let Err(e) = self.on_events(events, None, &mut seen).await {
                        break Verdict::Abort(e);
                    }
                }
                _ = scan.tick() => {
                    self.send_metrics(false).await;
                    if let Err(e) = self.poll_checkpoints(&mut seen).await {
                        break Verdict::Abort(e);
                    }
                }
                _ = watchdog.tick(), if shortest.is_some() => {
                    if limits.gpu_idle.is_some()
                        && seen.top_step.is_some()
                        && self.stage.gpus.busiest(&devices).await.is_some_and(|busy| busy > 0)
                    {
                        seen.gpu_busy_at = tokio::time::Instant::now();
                    }
                    if let Some(stuck) = stuck_at(&limits, &seen, tokio::time::Instant::now()) {
                        break Verdict::Stuck(stuck);
                    }
                }
                status = child.wait() => break Verdict::Exited(
                    status.map_err(|e| local_error("waiting for trainer", e))?,
                ),
                _ = self.ctx.cancel.cancelled() => {
                    let _ = child.stop(Duration::from_millis(200)).await;
                    // A running upload finishes on its own (never torn off mid-way).
                    seen.upload = None;
                    tracing::info!(%job, "trainer killed: job cancelled");
                    return Err(StageError::Cancelled);
                }
                _ = self.ctx.stop.cancelled() => {
                    self.stop(&mut child, &mut lines, lines_open, &mut seen).await;
                    return Err(StageError::Interrupted);
                }
            }
        };
        let status = match verdict {
            Verdict::Exited(status) => status,
            Verdict::Abort(error) => {
                let _ = child.stop(Duration::from_secs(2)).await;
                self.finish_uploads(&mut seen).await;
                return Err(error);
            }
            Verdict::Stuck(stuck) => {
                tracing::warn!(%job, cause = %stuck.cause, step = stuck.step, seconds = stuck.seconds, "trainer stuck; killing it");
                let _ = child.stop(Duration::from_secs(2)).await;
                // Keep whatever state it saved: the retry resumes from it.
                self.finish_uploads(&mut seen).await;
                let _ = self.poll_checkpoints(&mut seen).await;
                self.finish_uploads(&mut seen).await;
                let message = stuck.message.clone();
                self.ctx.events.stuck(stuck).await;
                return Err(StageError::retry(
                    ErrorKind::Trainer,
                    message,
                    Duration::from_secs(5),
                ));
            }
        };
        // The leader is gone and its group killed: read what is left.
        self.drain(&mut lines, &mut seen).await;
        let tail: Vec<String> = seen.tail.iter().cloned().collect();
        let adapter = self.backend.final_adapter(self.inputs);
        if let (true, Some(adapter)) = (status.success(), &adapter) {
            self.finish_uploads(&mut seen).await;
            // Some bars stop one short (ai-toolkit counts from 0): a run
            // that wrote its adapter did every step.
            if let Some(last) = seen.last_progress.as_mut()
                && last.step < last.total_steps
            {
                last.step = last.total_steps;
                self.ctx.events.progress(last.clone()).await;
            }
            let summary = (
                seen.last_progress.clone().unwrap_or_default(),
                seen.loss_first,
                seen.latest_uploaded.clone(),
            );
            return self.finish(adapter, summary, started).await;
        }
        // Keep whatever state the failed run saved for the next attempt.
        self.finish_uploads(&mut seen).await;
        let _ = self.poll_checkpoints(&mut seen).await;
        self.finish_uploads(&mut seen).await;
        let mut error = self.backend.classify(status, &tail);
        if status.success() && error.retryable {
            // Exit 0 without the adapter: interrupted, unless the backend
            // recognised a permanent cause (kohya's "No data found").
            error.message = format!(
                "trainer exited 0 without writing the final adapter: {}",
                error.message
            );
        }
        tracing::warn!(%job, %status, error = %error.message, "trainer failed");
        if error.retryable && error.kind() == ErrorKind::Oom {
            // Out of memory: the next delivery runs lighter, if the backend
            // has something lighter; the runtime reports it with the retry
            // and the coordinator records it in the job record.
            if let Some((training, change)) = self
                .backend
                .lighter(&self.inputs.settings, self.inputs.model.family)
            {
                tracing::info!(%job, %change, "next attempt runs with lighter settings");
                return Err(StageError::RetryWithReport {
                    error,
                    delay: Duration::ZERO,
                    report: Box::new(Outcome::Adjusted(trainyard_proto::v1::TrainingAdjusted {
                        training: Some(Box::new(training)),
                        note: format!("oom: {change}"),
                        delivered: self.ctx.delivered,
                    })),
                });
            }
        }
        if error.retryable {
            // The retry policy sets the delay.
            Err(StageError::Retry {
                error,
                delay: Duration::ZERO,
            })
        } else {
            Err(StageError::Fail(error))
        }
    }

    /// Asks the trainer to save as its backend allows, waits up to the
    /// grace, stops the group, and uploads the newest complete checkpoint.
    async fn stop(
        &self,
        child: &mut ChildGroup,
        lines: &mut tokio::sync::mpsc::Receiver<OutputLine>,
        mut lines_open: bool,
        seen: &mut Seen,
    ) {
        let job = &self.ctx.meta.job;
        let grace = self.stage.stop_grace.max(Duration::from_millis(100));
        let before = seen.stored_step;
        let request = self.backend.stop_request(self.inputs);
        tracing::info!(%job, ?request, "stopping: asking the trainer to save");
        let write = |path: &Path, body: &[u8]| {
            if let Err(e) = std::fs::write(path, body) {
                tracing::warn!(%job, path = %path.display(), error = %e, "cannot write the stop file");
            }
        };
        let deadline = tokio::time::Instant::now() + grace;
        match &request {
            StopRequest::SaveAndExit { path, body } => write(path, body),
            StopRequest::SaveAndContinue { path, body } => write(path, body),
            StopRequest::Signal(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(signal) => child.signal(signal),
                Err(_) => tracing::warn!(%job, signal, "backend asked for an unknown signal"),
            },
            StopRequest::Unsupported => {}
        }
        if request != StopRequest::Unsupported {
            // Wait for the trainer to exit (or, for save-and-continue, for a
            // newer complete checkpoint), reading its output meanwhile.
            let mut scan = tokio::time::interval(self.stage.checkpoint_scan.min(grace));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    line = lines.recv(), if lines_open => match line {
                        Some(line) => { let _ = self.on_line(line, seen).await; }
                        None => lines_open = false,
                    },
                    _ = scan.tick(), if matches!(request, StopRequest::SaveAndContinue { .. }) => {
                        let newer = self
                            .backend
                            .latest_checkpoint(self.inputs)
                            .is_some_and(|c| before.is_none_or(|b| c.step > b));
                        if newer {
                            break;
                        }
                    }
                    _ = child.wait() => break,
                }
            }
        }
        let _ = child
            .stop(
                deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(500)),
            )
            .await;
        self.drain(lines, seen).await;
        self.finish_uploads(seen).await;
        let _ = self.poll_checkpoints(seen).await;
        self.finish_uploads(seen).await;
        tracing::info!(%job, step = ?seen.stored_step, "trainer stopped; task handed back");
    }

    /// Reads the lines still buffered after the group is gone.
    /// Reads the lines still buffered after the group is gone: until the
    /// pipes close, 2 s pass without a line, or 10 s in all (a process that
    /// left the group may hold the pipes open).
    async fn drain(&self, lines: &mut tokio::sync::mpsc::Receiver<OutputLine>, seen: &mut Seen) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Ok(Some(line))) = tokio::time::timeout_at(
            deadline,
            tokio::time::timeout(Duration::from_secs(2), lines.recv()),
        )
        .await
        {
            let _ = self.on_line(line, seen).await;
        }
    }

    async fn on_line(&self, line: OutputLine, seen: &mut Seen) -> Result<(), StageError> {
        seen.line_at = tokio::time::Instant::now();
        if let Some(log) = lock(&self.log).as_mut() {
            log.line(&line.line);
        }
        push_tail(seen, line.line.clone());
        let events = seen.parser.line(&line.line);
        let raw = events.is_empty().then_some(&line);
        self.on_events(events, raw, seen).await
    }

    async fn on_events(
        &self,
        events: Vec<LineEvent>,
        raw: Option<&OutputLine>,
        seen: &mut Seen,
    ) -> Result<(), StageError> {
        if let Some(line) = raw {
            self.logs.line(line.stream.name(), &line.line);
        }
        for event in events {
            match event {
                LineEvent::Progress {
                    step,
                    total,
                    loss,
                    lr,
                    samples_per_sec,
                    epoch,
                } => {
                    self.on_progress(step, total, loss, lr, samples_per_sec, epoch, seen)
                        .await?
                }
                LineEvent::Metric { name, value, step } => {
                    // The progress values keep their own source.
                    if ![LOSS, LEARNING_RATE, SAMPLES_PER_SECOND, EPOCH].contains(&name.as_str()) {
                        lock(&self.throttle).offer(&name, value, step);
                        self.send_metrics(false).await;
                    }
                }
                LineEvent::Saved { .. } => self.poll_checkpoints(seen).await?,
                LineEvent::Resumed { step } => {
                    if let Some(resume) = &self.inputs.resume
                        && step < resume.step
                    {
                        return Err(restarted(step, resume.step));
                    }
                    self.logs.note(&format!("trainer resumed at step {step}"));
                }
                LineEvent::Done => {}
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_progress(
        &self,
        step: u32,
        total: u32,
        loss: Option<f32>,
        lr: Option<f64>,
        samples_per_sec: Option<f32>,
        epoch: Option<f32>,
        seen: &mut Seen,
    ) -> Result<(), StageError> {
        if !seen.resume_checked {
            seen.resume_checked = true;
            if let Some(resume) = &self.inputs.resume
                && step < resume.step
            {
                return Err(restarted(step, resume.step));
            }
        }
        match loss {
            Some(l) if !l.is_finite() => {
                // Several events may report one step (bar, postfix, webhook).
                if seen.nan_step != Some(step) {
                    seen.nan_step = Some(step);
                    seen.nan_run += 1;
                }
                if seen.nan_run >= self.stage.nan_loss_steps.max(1) {
                    return Err(StageError::fail(
                        ErrorKind::Trainer,
                        format!(
                            "training diverged: loss is {l} for {} steps in a row (at step {step}); lower the learning rate or check the data",
                            seen.nan_run
                        ),
                    ));
                }
            }
            Some(l) => {
                seen.nan_run = 0;
                seen.nan_step = None;
                seen.loss_first.get_or_insert(l);
            }
            None => {}
        }
        if seen.top_step.is_none_or(|top| step > top) {
            if seen.top_step.is_none() {
                // GPU idleness counts from the first step (loading is not idle).
                seen.gpu_busy_at = tokio::time::Instant::now();
            }
            seen.top_step = Some(step);
            seen.step_at = tokio::time::Instant::now();
        }
        let now = Instant::now();
        let (t0, s0) = *seen.first_step_at.get_or_insert((now, step));
        let eta = if step > s0 {
            let per_step = now.duration_since(t0).as_secs_f32() / (step - s0) as f32;
            per_step * total.saturating_sub(step) as f32
        } else {
            0.0
        };
        let progress = Progress {
            stage: Stage::Train as i32,
            step,
            total_steps: total,
            loss: loss.unwrap_or(f32::NAN),
            learning_rate: lr.unwrap_or_default(),
            samples_per_second: samples_per_sec.unwrap_or_default(),
            eta_seconds: eta,
            message: String::new(),
        };
        let finite = |v: f64| v.is_finite().then_some(v);
        metrics().job_progress(
            self.ctx.meta.job.as_str(),
            JobProgress {
                tenant: self.tenant.clone(),
                backend: self.backend.name().to_string(),
                step: u64::from(step),
                total_steps: u64::from(total),
                loss: loss.map(f64::from).and_then(finite),
                learning_rate: lr.and_then(finite),
                samples_per_second: samples_per_sec.map(f64::from).and_then(finite),
                reported_at: trainyard_core::now_ms() as f64 / 1000.0,
            },
        );
        {
            let mut throttle = lock(&self.throttle);
            let values = [
                (LOSS, loss.map(f64::from)),
                (LEARNING_RATE, lr),
                (SAMPLES_PER_SECOND, samples_per_sec.map(f64::from)),
                (EPOCH, epoch.map(f64::from)),
            ];
            for (name, value) in values {
                if let Some(value) = value {
                    throttle.offer(name, value, step);
                }
            }
        }
        let due = seen
            .last_emit
            .is_none_or(|at| now.duration_since(at) >= self.stage.progress_interval);
        if due || step == total {
            seen.last_emit = Some(now);
            self.ctx.events.progress(progress.clone()).await;
        }
        self.send_metrics(false).await;
        seen.last_progress = Some(progress);
        Ok(())
    }

    /// Publishes the `metric` events the throttle lets out now, or, at the
    /// end of the run (`all`), every value still waiting.
    async fn send_metrics(&self, all: bool) {
        let due = {
            let mut throttle = lock(&self.throttle);
            match all {
                true => throttle.flush(Instant::now()),
                false => throttle.due(Instant::now()),
            }
        };
        for (name, value, step) in due {
            self.ctx.events.metric(&name, value, step).await;
        }
    }

    /// Stores the trainer's output of this run at
    /// `jobs/<job>/logs/train-attempt-<a>-delivery-<d>.log` and says where
    /// in a log event; trouble is logged, never the run's result.
    async fn store_log(&self) {
        let Some(log) = lock(&self.log).take() else {
            return;
        };
        let job = &self.ctx.meta.job;
        let key = keys::train_log(job, self.ctx.meta.attempt.0, self.ctx.delivered);
        let span = tracing::info_span!(
            "train.log.upload",
            trainyard.job.id = %job,
            bytes = Empty,
            truncated = Empty,
        );
        let stored = async {
            let finished = tokio::task::spawn_blocking(move || log.finish())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let artifact = self
                .stage
                .store
                .put_file(&finished.path, &key)
                .await
                .map_err(|e| e.to_string())?;
            let span = tracing::Span::current();
            span.record("bytes", artifact.size);
            span.record("truncated", finished.truncated);
            Ok::<_, String>((artifact, finished))
        }
        .instrument(span);
        match tokio::time::timeout(LOG_UPLOAD, stored).await {
            Ok(Ok((artifact, finished))) => {
                tracing::info!(%job, key, bytes = artifact.size, "trainer log stored");
                let cut = match finished.truncated {
                    true => format!(", the last part of {} bytes", finished.total),
                    false => String::new(),
                };
                self.logs.note(&format!(
                    "trainer output stored at {} ({} bytes{cut})",
                    artifact.uri, artifact.size
                ));
            }
            Ok(Err(error)) => {
                tracing::warn!(%job, key, %error, "cannot store the trainer log");
            }
            Err(_) => tracing::warn!(%job, key, "storing the trainer log took too long; given up"),
        }
    }

    /// Uploads the newest complete checkpoint if it is newer than the last
    /// one stored, one upload at a time. Store or staging trouble never
    /// stops the trainer: the checkpoint is tried again at the next scan
    /// (or a newer one is).
    async fn poll_checkpoints(&self, seen: &mut Seen) -> Result<(), StageError> {
        if let Some((_, upload)) = &seen.upload {
            if !upload.is_finished() {
                return Ok(());
            }
            let (step, upload) = seen.upload.take().expect("checked");
            self.uploaded(step, upload.await, seen).await;
        }
        let Some(found) = self.backend.latest_checkpoint(self.inputs) else {
            return Ok(());
        };
        if seen.stored_step.is_some_and(|s| found.step <= s) {
            return Ok(());
        }
        // A checkpoint of the last step is not worth storing (the run is
        // about to finish) and some trainers cannot resume from one.
        if found.step >= self.inputs.settings.steps {
            return Ok(());
        }
        let output_dir = self.inputs.output_dir.clone();
        let dir = self.staging.join(format!("{:08}", found.step));
        let files = found.files.clone();
        let staged =
            tokio::task::spawn_blocking(move || stage_checkpoint(&output_dir, &files, &dir))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
        let (staged, bytes) = match staged {
            Ok(staged) => staged,
            Err(e) => {
                // Pruned or rewritten while being copied: try again later.
                tracing::debug!(job = %self.ctx.meta.job, step = found.step, error = %e, "checkpoint changed while staging");
                return Ok(());
            }
        };
        let store = self.stage.store.clone();
        let job = self.ctx.meta.job.clone();
        let step = found.step;
        let span = tracing::info_span!(
            "train.checkpoint.upload",
            trainyard.job.id = %job,
            step,
            bytes,
        );
        seen.upload = Some((
            step,
            tokio::spawn(
                async move {
                    let uri = store
                        .put_checkpoint(&job, step, &staged, &found.files)
                        .await;
                    let _ = tokio::fs::remove_dir_all(&staged).await;
                    Ok(Checkpoint {
                        step,
                        uri: uri.map_err(StageError::from)?,
                    })
                }
                .instrument(span),
            ),
        ));
        Ok(())
    }

    async fn uploaded(
        &self,
        step: u32,
        joined: Result<Result<Checkpoint, StageError>, tokio::task::JoinError>,
        seen: &mut Seen,
    ) {
        let result = joined
            .map_err(|e| format!("upload task failed: {e}"))
            .and_then(|r| r.map_err(|e| format!("{e:?}")));
        match result {
            Ok(checkpoint) => {
                tracing::info!(job = %self.ctx.meta.job, step, "checkpoint stored");
                seen.stored_step = Some(step).max(seen.stored_step);
                self.ctx.events.checkpoint(checkpoint.clone()).await;
                seen.latest_uploaded = Some(checkpoint);
            }
            Err(e) => {
                tracing::warn!(job = %self.ctx.meta.job, step, error = %e, "checkpoint upload failed; it is tried again");
                self.logs.note(&format!(
                    "checkpoint of step {step} could not be stored: {e}"
                ));
            }
        }
    }

    /// Waits for a running upload.
    async fn finish_uploads(&self, seen: &mut Seen) {
        if let Some((step, upload)) = seen.upload.take() {
            self.uploaded(step, upload.await, seen).await;
        }
    }

    async fn finish(
        &self,
        adapter: &Path,
        (last, loss_first, latest_uploaded): (Progress, Option<f32>, Option<Checkpoint>),
        started: Instant,
    ) -> Result<Outcome, StageError> {
        let name = adapter
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "lora.safetensors".into());
        let key = format!("{}/{name}", keys::output(&self.ctx.meta.job));
        let span = tracing::info_span!(
            "train.adapter.upload",
            trainyard.job.id = %self.ctx.meta.job,
            bytes = Empty,
        );
        let artifact = self
            .stage
            .store
            .put_file(adapter, &key)
            .instrument(span.clone())
            .await
            .map_err(StageError::from)?;
        span.record("bytes", artifact.size);
        Ok(Outcome::Trained(TrainOutput {
            artifacts: vec![artifact],
            summary: Some(TrainSummary {
                steps: last.step,
                loss_first: loss_first.unwrap_or(f32::NAN),
                loss_last: last.loss,
                seconds: started.elapsed().as_secs_f64(),
                backend: self.backend.name().into(),
            }),
            last_checkpoint: latest_uploaded,
        }))
    }
}

/// Copies a checkpoint's files into a staging folder, failing if any of
/// them changed while it was copied (some trainers rewrite files in place,
/// ai-toolkit's `optimizer.pt`, or prune old checkpoints); returns the
/// folder and the bytes copied.
fn stage_checkpoint(
    output_dir: &Path,
    files: &[PathBuf],
    dir: &Path,
) -> std::io::Result<(PathBuf, u64)> {
    let _ = std::fs::remove_dir_all(dir);
    let result = (|| {
        let mut bytes = 0;
        for rel in files {
            let from = output_dir.join(rel);
            let to = dir.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let stamp = |m: std::fs::Metadata| (m.len(), m.modified().ok());
            let before = stamp(std::fs::metadata(&from)?);
            bytes += std::fs::copy(&from, &to)?;
            if stamp(std::fs::metadata(&from)?) != before {
                return Err(std::io::Error::other(format!(
                    "{} changed while it was copied",
                    rel.display()
                )));
            }
        }
        Ok((dir.to_owned(), bytes))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn push_tail(seen: &mut Seen, line: String) {
    if seen.tail.len() == TAIL_LINES {
        seen.tail.pop_front();
    }
    seen.tail.push_back(line);
}

fn restarted(step: u32, checkpoint: u32) -> StageError {
    StageError::retry(
        ErrorKind::Trainer,
        format!(
            "trainer restarted at step {step} although the checkpoint of step {checkpoint} was restored"
        ),
        Duration::from_secs(5),
    )
}

async fn recv_webhook(webhook: &mut Option<Webhook>) -> Option<serde_json::Value> {
    match webhook {
        Some(hook) => hook.bodies.recv().await,
        None => std::future::pending().await,
    }
}
