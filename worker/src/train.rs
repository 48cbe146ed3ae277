//! The training stage on the shared runtime: fetch the prepared dataset
//! (verifying its manifest checksums) and the base model, render the
//! backend's run, launch it as a child process group, turn its output into
//! progress, metric and log events, upload checkpoints as they appear, and
//! store the final adapter. Cancel kills the trainer at once; shutdown
//! forwards SIGTERM so the trainer can save, uploads that state, and hands
//! the task back.

use crate::backend::{self, LineEvent, TrainInputs, TrainerBackend};
use crate::models::Models;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trainyard_core::process::{ChildGroup, OutputStream};
use trainyard_core::runtime::{StageError, StageHandler, TaskContext};
use trainyard_core::store::{ArtifactStore, keys, sha256_file};
use trainyard_proto::v1::{
    Checkpoint, ErrorKind, Progress, Stage, TrainOutput, TrainSummary, TrainTask,
    stage_result::Outcome,
};

const TAIL_LINES: usize = 40;

pub struct TrainStage {
    pub store: ArtifactStore,
    pub models: Models,
    pub work_root: PathBuf,
    pub trainer_bin: PathBuf,
    pub stop_grace: Duration,
    pub progress_interval: Duration,
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
        let spec = task
            .spec
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "task has no job spec"))?;
        let settings = spec
            .training
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "training: is required"))?;
        let backend = backend::by_name(&settings.backend, &self.trainer_bin).ok_or_else(|| {
            StageError::fail(
                ErrorKind::InvalidSpec,
                format!("training.backend: unknown backend {:?}", settings.backend),
            )
        })?;
        let inputs = TrainInputs {
            dataset_dir: work.join("dataset"),
            base_model: PathBuf::new(),
            base_model_name: String::new(),
            run_dir: work.join("run"),
            output_dir: work.join("output"),
            output_name: "lora".into(),
            trigger_word: spec.caption.map(|c| c.trigger_word).unwrap_or_default(),
            resume_from: None,
            settings,
        };
        for dir in [&inputs.run_dir, &inputs.output_dir, &inputs.dataset_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| local_error("cannot create work dir", e))?;
        }
        let inputs = tokio::select! {
            inputs = self.fetch_inputs(inputs, &task.dataset_uri, spec.base_model.map(|m| m.uri).unwrap_or_default(), task.resume_from, backend.as_ref(), ctx) => inputs?,
            _ = ctx.cancel.cancelled() => return Err(StageError::Cancelled),
            _ = ctx.stop.cancelled() => return Err(StageError::Interrupted),
        };
        let launch = backend
            .render(&inputs)
            .map_err(|e| StageError::fail(ErrorKind::InvalidSpec, e.to_string()))?;
        for (path, body) in &launch.files {
            tokio::fs::write(path, body)
                .await
                .map_err(|e| local_error("cannot write trainer config", e))?;
        }
        let run = Run {
            stage: self,
            backend: backend.as_ref(),
            ctx,
            inputs: &inputs,
        };
        run.supervise(launch.command, started).await
    }

    async fn fetch_inputs(
        &self,
        mut inputs: TrainInputs,
        dataset_uri: &str,
        model_uri: String,
        resume_from: Option<Checkpoint>,
        backend: &dyn TrainerBackend,
        ctx: &TaskContext,
    ) -> Result<TrainInputs, StageError> {
        ctx.note("fetching dataset").await;
        let key = self.store.key_of(dataset_uri).ok_or_else(|| {
            StageError::fail(
                ErrorKind::InvalidSpec,
                format!("dataset {dataset_uri} is not in the artifact store"),
            )
        })?;
        self.store
            .get_dir(&key, &inputs.dataset_dir)
            .await
            .map_err(StageError::from)?;
        verify_manifest(&inputs.dataset_dir).await?;
        ctx.note("fetching base model").await;
        let model = self
            .models
            .resolve(&model_uri, inputs.settings.resolution)
            .await?;
        inputs.base_model = model.path;
        inputs.base_model_name = model.name;
        if let Some(checkpoint) = resume_from.filter(|c| !c.uri.is_empty()) {
            let key = self.store.key_of(&checkpoint.uri).ok_or_else(|| {
                StageError::fail(
                    ErrorKind::Internal,
                    "checkpoint is not in the artifact store",
                )
            })?;
            let dir = backend.checkpoint_dir(&inputs.output_dir, checkpoint.step);
            self.store
                .get_dir(&key, &dir)
                .await
                .map_err(StageError::from)?;
            ctx.note(&format!("resuming from step {}", checkpoint.step))
                .await;
            inputs.resume_from = Some(dir);
        }
        Ok(inputs)
    }
}

/// Checks every image against the sha256 the prepare stage recorded.
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
    let images = manifest["images"].as_array().cloned().unwrap_or_default();
    if images.is_empty() {
        return Err(StageError::fail(
            ErrorKind::BadDataset,
            "prepared dataset lists no images",
        ));
    }
    for image in images {
        let (Some(file), Some(expected)) = (image["file"].as_str(), image["sha256"].as_str())
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
}

#[derive(Default)]
struct Seen {
    tail: VecDeque<String>,
    last_progress: Option<Progress>,
    last_emit: Option<Instant>,
    first_step_at: Option<(Instant, u32)>,
    done: Option<(u32, f32, f32)>,
    latest_uploaded: Option<Checkpoint>,
}

impl Run<'_> {
    async fn supervise(
        &self,
        command: trainyard_core::process::CommandSpec,
        started: Instant,
    ) -> Result<Outcome, StageError> {
        let job = &self.ctx.meta.job;
        let (mut child, mut lines) = ChildGroup::spawn(&command).map_err(|e| {
            StageError::fail(
                ErrorKind::Trainer,
                format!("cannot start trainer {}: {e}", command.program.display()),
            )
        })?;
        tracing::info!(%job, pid = child.pid(), backend = self.backend.name(), "trainer started");
        self.ctx
            .events
            .log(
                Stage::Train,
                "worker",
                &format!("trainer started pid={}", child.pid()),
            )
            .await;
        let mut seen = Seen::default();
        let mut uploads = FuturesUnordered::new();
        let mut lines_open = true;
        let status = loop {
            tokio::select! {
                line = lines.recv(), if lines_open => match line {
                    Some(line) => {
                        if let Some(upload) = self.on_line(line.stream, line.line, &mut seen).await {
                            uploads.push(upload);
                        }
                    }
                    None => lines_open = false,
                },
                Some(done) = uploads.next() => self.on_uploaded(done?, &mut seen).await,
                status = child.wait(), if !lines_open => break status.map_err(|e| local_error("waiting for trainer", e))?,
                _ = self.ctx.cancel.cancelled() => {
                    let _ = child.stop(Duration::from_millis(200)).await;
                    tracing::info!(%job, "trainer killed: job cancelled");
                    return Err(StageError::Cancelled);
                }
                _ = self.ctx.stop.cancelled() => {
                    tracing::info!(%job, "stopping: asking the trainer to save");
                    let _ = child.stop(self.stage.stop_grace).await;
                    while let Some(line) = lines.recv().await {
                        if let Some(upload) = self.on_line(line.stream, line.line, &mut seen).await {
                            uploads.push(upload);
                        }
                    }
                    while let Some(done) = uploads.next().await {
                        if let Ok(checkpoint) = done {
                            self.on_uploaded(checkpoint, &mut seen).await;
                        }
                    }
                    return Err(StageError::Interrupted);
                }
            }
        };
        while let Some(done) = uploads.next().await {
            self.on_uploaded(done?, &mut seen).await;
        }
        let tail: Vec<String> = seen.tail.iter().cloned().collect();
        let adapter = self.backend.final_adapter(self.inputs);
        match (status.success(), adapter, seen.done) {
            (true, Some(adapter), done) => self.finish(adapter, done, &seen, started).await,
            (true, None, _) => Err(StageError::retry(
                ErrorKind::Trainer,
                "trainer exited 0 without writing the final adapter",
                Duration::from_secs(5),
            )),
            (false, _, _) => {
                let error = self.backend.classify(status, &tail);
                tracing::warn!(%job, %status, error = %error.message, "trainer failed");
                if error.retryable {
                    Err(StageError::Retry {
                        error,
                        delay: Duration::from_secs(5),
                    })
                } else {
                    Err(StageError::Fail(error))
                }
            }
        }
    }

    async fn on_line(
        &self,
        stream: OutputStream,
        line: String,
        seen: &mut Seen,
    ) -> Option<futures::future::BoxFuture<'static, Result<Checkpoint, StageError>>> {
        if seen.tail.len() == TAIL_LINES {
            seen.tail.pop_front();
        }
        seen.tail.push_back(line.clone());
        match self.backend.parse_line(&line) {
            Some(LineEvent::Progress {
                step,
                total,
                loss,
                lr,
                samples_per_sec,
            }) => {
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
                let due = seen
                    .last_emit
                    .is_none_or(|at| now.duration_since(at) >= self.stage.progress_interval);
                if due || step == total {
                    seen.last_emit = Some(now);
                    self.ctx.events.progress(progress.clone()).await;
                    if let Some(loss) = loss {
                        self.ctx
                            .events
                            .metric("train/loss", f64::from(loss), step)
                            .await;
                    }
                }
                seen.last_progress = Some(progress);
                None
            }
            Some(LineEvent::Checkpoint { step, dir }) => {
                let store = self.stage.store.clone();
                let key = keys::checkpoint(&self.ctx.meta.job, step);
                Some(Box::pin(async move {
                    store
                        .put_dir(&dir, &key, &["state.json"])
                        .await
                        .map_err(StageError::from)?;
                    Ok(Checkpoint {
                        step,
                        uri: store.uri(&key),
                    })
                }))
            }
            Some(LineEvent::Done {
                steps,
                loss_first,
                loss_last,
                ..
            }) => {
                seen.done = Some((steps, loss_first, loss_last));
                None
            }
            Some(LineEvent::Resumed { step }) => {
                self.ctx
                    .events
                    .log(
                        Stage::Train,
                        "worker",
                        &format!("trainer resumed at step {step}"),
                    )
                    .await;
                None
            }
            None => {
                self.ctx
                    .events
                    .log(Stage::Train, stream.name(), &line)
                    .await;
                None
            }
        }
    }

    async fn on_uploaded(&self, checkpoint: Checkpoint, seen: &mut Seen) {
        tracing::info!(job = %self.ctx.meta.job, step = checkpoint.step, "checkpoint stored");
        self.ctx.events.checkpoint(checkpoint.clone()).await;
        if seen
            .latest_uploaded
            .as_ref()
            .is_none_or(|c| c.step < checkpoint.step)
        {
            seen.latest_uploaded = Some(checkpoint);
        }
    }

    async fn finish(
        &self,
        adapter: PathBuf,
        done: Option<(u32, f32, f32)>,
        seen: &Seen,
        started: Instant,
    ) -> Result<Outcome, StageError> {
        let name = adapter
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "lora.safetensors".into());
        let key = format!("{}/{name}", keys::output(&self.ctx.meta.job));
        let artifact = self
            .stage
            .store
            .put_file(&adapter, &key)
            .await
            .map_err(StageError::from)?;
        let (steps, loss_first, loss_last) = done.unwrap_or_else(|| {
            let p = seen.last_progress.clone().unwrap_or_default();
            (p.step, f32::NAN, p.loss)
        });
        Ok(Outcome::Trained(TrainOutput {
            artifacts: vec![artifact],
            summary: Some(TrainSummary {
                steps,
                loss_first,
                loss_last,
                seconds: started.elapsed().as_secs_f64(),
                backend: self.backend.name().into(),
            }),
            last_checkpoint: seen.latest_uploaded.clone(),
        }))
    }
}
