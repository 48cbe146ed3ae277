//! The training stage on the shared runtime: fetch the prepared dataset
//! (verifying its manifest checksums), the base model's parts and the newest
//! stored checkpoint, render the backend's run, launch it as a child process
//! group, turn its output (and posts to its [`ProgressReceiver`]) into
//! progress, metric and log events (log lines batched off the run loop,
//! [`crate::logs`]), upload every new complete checkpoint, and store the
//! final adapter.
//!
//! Cancel kills the trainer at once. Shutdown asks the trainer to save the
//! way its backend allows ([`trainyard_backends::StopRequest`]), uploads
//! that state, and hands the task back; the next attempt, on any worker,
//! continues from it.
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
//!
//! The stage is split by concern, each part small enough to read whole:
//! [`inputs`] (the task's checks, the run's folders, fetching and restoring,
//! the trainer's config and environment), [`supervise`] (one trainer run:
//! the loop that reads its output and decides how the run ends), [`stop`]
//! (asking the trainer to save when the worker stops), [`watchdog`] (the
//! run's clocks and the stuck verdict), [`progress`] (what a parsed
//! progress sets off: the NaN guard, the ETA, events and gauges),
//! [`checkpoints`] (staging and uploading checkpoints, [`keep_latest`]) and
//! [`artifacts`] (the final adapter and the trainer log).
//!
//! [`keep_latest`]: supervise::Run::keep_latest
//! [`MetricThrottle`]: crate::throttle::MetricThrottle
//! [`TrainerLog`]: crate::trainer_log::TrainerLog

mod artifacts;
mod checkpoints;
mod inputs;
mod progress;
mod stop;
mod supervise;
mod watchdog;

use crate::gpu::{Gpus, Slots};
use crate::log_budget::LogLimits;
use crate::logs::LogBatcher;
use crate::models::Models;
use crate::progress_receiver::ProgressReceiver;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::Instrument;
use tracing::field::Empty;
use trainyard_backends::Tools;
use trainyard_core::config::StuckConfig;
use trainyard_core::process::Guard;
use trainyard_core::runtime::{StageError, StageHandler, TaskContext};
use trainyard_core::store::ArtifactStore;
use trainyard_core::telemetry::metrics;
use trainyard_proto::v1::{ErrorKind, Stage, TrainTask, stage_result::Outcome};

/// How long a trainer whose worker died gets between SIGTERM and SIGKILL.
/// Short: nothing is left to upload what it would save.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// How long the log lines queued at the end of a run may take to publish.
const LOG_CLOSE: Duration = Duration::from_secs(5);

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
    /// Opens the jobs' sealed secrets (the Hub token of model downloads).
    pub secrets: Option<trainyard_core::secrets::Keyring>,
    /// `[worker] log_event_budget_bytes` and `log_event_bytes_per_sec`.
    pub log_limits: LogLimits,
    /// Largest store base model a spec may name (`[store] max_model_bytes`).
    pub max_model_bytes: u64,
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl StageHandler for TrainStage {
    type Task = TrainTask;

    async fn handle(&self, mut task: TrainTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        trainyard_core::secrets::open_task(
            self.secrets.as_ref(),
            &mut task.spec,
            &task.tenant,
            &task.job_id,
        )?;
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
        let checked = inputs::check(&task, &ctx.record, &self.tools)?;
        let backend = checked.backend.as_ref();
        let slot = self.slots.take();
        let mut inputs = checked.inputs(ctx.meta.job.as_str(), work, slot.slot().clone());
        inputs::create_dirs(&inputs).await?;
        let _lease = tokio::select! {
            fetched = self.fetch_inputs(&mut inputs, &task, &checked.spec, backend, ctx) => fetched?,
            _ = ctx.cancel.cancelled() => return Err(StageError::Cancelled),
            _ = ctx.stop.cancelled() => return Err(StageError::Interrupted),
        };
        let mut receiver = None;
        if backend.wants_webhook() {
            let bound = ProgressReceiver::bind()
                .await
                .map_err(|e| local_error("cannot open the progress receiver", e))?;
            inputs.webhook_url = Some(bound.url.clone());
            receiver = Some(bound);
        }
        let command = self.launch(backend, &inputs, receiver.is_some()).await?;
        let logs = LogBatcher::start(
            ctx.events.clone(),
            Stage::Train,
            self.log_limits,
            ctx.log_bytes.clone(),
        );
        let run = supervise::Run::new(self, backend, ctx, &inputs, work, &logs);
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
            .supervise(command, receiver, started)
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
}
