//! One trainer run: start the trainer's group, read its output lines and
//! progress posts into events, scan for checkpoints and watch for a stuck
//! trainer until it exits, the job is cancelled or the worker stops; then
//! decide how the run ended (the adapter stored, or the backend's
//! classification of the failure as a retry, a lighter retry or a
//! failure).

use super::checkpoints::Uploads;
use super::progress::{NanGuard, Progress, Reported, is_progress_value};
use super::watchdog::{Clocks, Watchdog};
use super::{TrainStage, local_error, lock};
use crate::logs::LogBatcher;
use crate::progress_receiver::ProgressReceiver;
use crate::throttle::MetricThrottle;
use crate::trainer_log::TrainerLog;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Receiver;
use trainyard_backends::{LineEvent, OutputParser, TrainInputs, TrainerBackend};
use trainyard_core::process::{ChildGroup, CommandSpec, OutputLine};
use trainyard_core::runtime::{StageError, TaskContext};
use trainyard_proto::v1::{
    ErrorKind, JobError, Stuck, TrainOutput, TrainSummary, TrainingAdjusted, stage_result::Outcome,
};

/// Output lines kept for the backend's failure classification.
const TAIL_LINES: usize = 40;

/// One trainer run and everything that watches it.
pub(super) struct Run<'a> {
    pub stage: &'a TrainStage,
    pub backend: &'a dyn TrainerBackend,
    pub ctx: &'a TaskContext,
    pub inputs: &'a TrainInputs,
    /// Checkpoint files are copied here before upload, so a trainer that
    /// prunes or rewrites them cannot tear the stored copy.
    pub staging: PathBuf,
    /// Log events, published off the run loop.
    pub logs: &'a LogBatcher,
    pub tenant: String,
    /// Which parsed values go out as `metric` events.
    pub throttle: Mutex<MetricThrottle>,
    /// The trainer's whole output; `None` when not kept.
    pub log: Mutex<Option<TrainerLog>>,
}

/// The trainer's output as read so far.
pub(super) struct Output {
    /// The backend's parser of lines and posts.
    pub parser: Box<dyn OutputParser>,
    pub tail: Tail,
    /// Whether the first progress was checked against the restored step.
    pub resume_checked: bool,
}

/// The last [`TAIL_LINES`] lines, for the backend's failure classification.
#[derive(Default)]
pub(super) struct Tail(VecDeque<String>);

impl Tail {
    fn push(&mut self, line: String) {
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// What a run keeps track of, one part per concern.
pub(super) struct RunState {
    pub output: Output,
    pub clocks: Clocks,
    pub nan: NanGuard,
    pub reported: Reported,
    pub uploads: Uploads,
}

/// Why the run loop stopped watching.
enum Verdict {
    Exited(ExitStatus),
    /// The run must end with this error (a diverged loss, a trainer that
    /// restarted below its checkpoint).
    Abort(StageError),
    Stuck(Stuck),
    Cancelled,
    /// The worker is stopping; whether the output pipes were still open.
    Stopping {
        lines_open: bool,
    },
}

/// A trainer that counts from below the checkpoint it was given.
pub(super) fn restarted(step: u32, checkpoint: u32) -> StageError {
    StageError::retry(
        ErrorKind::Trainer,
        format!(
            "trainer restarted at step {step} although the checkpoint of step {checkpoint} was restored"
        ),
        Duration::from_secs(5),
    )
}

impl<'a> Run<'a> {
    pub(super) fn new(
        stage: &'a TrainStage,
        backend: &'a dyn TrainerBackend,
        ctx: &'a TaskContext,
        inputs: &'a TrainInputs,
        work: &Path,
        logs: &'a LogBatcher,
    ) -> Self {
        Run {
            stage,
            backend,
            ctx,
            inputs,
            staging: work.join("staging"),
            logs,
            tenant: ctx.meta.tenant.to_string(),
            throttle: Mutex::new(MetricThrottle::new(stage.metric_events_per_second)),
            log: Mutex::new(TrainerLog::create(work, stage.trainer_log_max_bytes)),
        }
    }

    fn state(&self) -> RunState {
        let restored = self.inputs.resume.as_ref().map(|r| r.step);
        RunState {
            output: Output {
                parser: self.backend.parser(self.inputs),
                tail: Tail::default(),
                resume_checked: restored.is_none(),
            },
            clocks: Clocks::start(tokio::time::Instant::now()),
            nan: NanGuard::new(self.stage.nan_loss_steps),
            reported: Reported::new(self.stage.progress_interval),
            uploads: Uploads::new(restored),
        }
    }

    pub(super) async fn supervise(
        &self,
        command: CommandSpec,
        mut receiver: Option<ProgressReceiver>,
        started: Instant,
    ) -> Result<Outcome, StageError> {
        let job = &self.ctx.meta.job;
        let (mut child, mut lines) = self.spawn(&command).await?;
        let mut state = self.state();
        let verdict = self
            .watch(&mut child, &mut lines, &mut receiver, &mut state)
            .await?;
        match verdict {
            Verdict::Exited(status) => self.exited(status, &mut lines, &mut state, started).await,
            Verdict::Abort(error) => {
                let _ = child.stop(Duration::from_secs(2)).await;
                self.finish_uploads(&mut state.uploads).await;
                Err(error)
            }
            Verdict::Stuck(stuck) => {
                tracing::warn!(%job, cause = %stuck.cause, step = stuck.step, seconds = stuck.seconds, "trainer stuck; killing it");
                let _ = child.stop(Duration::from_secs(2)).await;
                // Keep whatever state it saved: the retry resumes from it.
                self.keep_latest(&mut state.uploads).await;
                let message = stuck.message.clone();
                self.ctx.events.stuck(stuck).await;
                Err(StageError::retry(
                    ErrorKind::Trainer,
                    message,
                    Duration::from_secs(5),
                ))
            }
            Verdict::Cancelled => {
                let _ = child.stop(Duration::from_millis(200)).await;
                state.uploads.let_go();
                tracing::info!(%job, "trainer killed: job cancelled");
                Err(StageError::Cancelled)
            }
            Verdict::Stopping { lines_open } => {
                self.stop(&mut child, &mut lines, lines_open, &mut state)
                    .await;
                Err(StageError::Interrupted)
            }
        }
    }

    /// Starts the trainer's group (under the guard, where there is one).
    async fn spawn(
        &self,
        command: &CommandSpec,
    ) -> Result<(ChildGroup, Receiver<OutputLine>), StageError> {
        let spawned = match &self.stage.guard {
            Some(guard) => ChildGroup::spawn_guarded(command, guard).await,
            None => ChildGroup::spawn(command),
        };
        let (child, lines) = spawned.map_err(|e| {
            StageError::fail(
                ErrorKind::Trainer,
                format!("cannot start trainer {}: {e}", command.program.display()),
            )
        })?;
        let job = &self.ctx.meta.job;
        tracing::info!(%job, pid = child.trainer_pid(), pgid = child.pid(), backend = self.backend.name(), "trainer started");
        self.logs.note(&format!(
            "{} trainer started pid={} pgid={}",
            self.backend.name(),
            child.trainer_pid(),
            child.pid()
        ));
        Ok((child, lines))
    }

    /// Reads the trainer's output and posts, scans for checkpoints and
    /// watches for a stuck trainer until the run must end.
    async fn watch(
        &self,
        child: &mut ChildGroup,
        lines: &mut Receiver<OutputLine>,
        receiver: &mut Option<ProgressReceiver>,
        state: &mut RunState,
    ) -> Result<Verdict, StageError> {
        let mut scan = tokio::time::interval(self.stage.checkpoint_scan);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = Watchdog::new(self.stage, self.backend.name(), &self.inputs.slot);
        let mut lines_open = true;
        loop {
            tokio::select! {
                line = lines.recv(), if lines_open => match line {
                    Some(line) => {
                        if let Err(e) = self.on_line(line, state).await {
                            return Ok(Verdict::Abort(e));
                        }
                    }
                    None => lines_open = false,
                },
                Some(body) = next_post(receiver) => {
                    if let Err(e) = self.on_post(body, state).await {
                        return Ok(Verdict::Abort(e));
                    }
                }
                _ = scan.tick() => {
                    self.send_metrics(false).await;
                    self.poll_checkpoints(&mut state.uploads).await;
                }
                _ = watchdog.tick() => {
                    if let Some(stuck) = watchdog.check(&self.stage.gpus, &mut state.clocks).await {
                        return Ok(Verdict::Stuck(stuck));
                    }
                }
                status = child.wait() => return Ok(Verdict::Exited(
                    status.map_err(|e| local_error("waiting for trainer", e))?,
                )),
                _ = self.ctx.cancel.cancelled() => return Ok(Verdict::Cancelled),
                _ = self.ctx.stop.cancelled() => return Ok(Verdict::Stopping { lines_open }),
            }
        }
    }

    /// The trainer exited: the adapter is stored, or the failure classified.
    async fn exited(
        &self,
        status: ExitStatus,
        lines: &mut Receiver<OutputLine>,
        state: &mut RunState,
        started: Instant,
    ) -> Result<Outcome, StageError> {
        // The leader is gone and its group killed: read what is left.
        self.drain(lines, state).await;
        let tail = state.output.tail.lines();
        let adapter = self.backend.final_adapter(self.inputs);
        if let (true, Some(adapter)) = (status.success(), &adapter) {
            return self.succeeded(adapter, state, started).await;
        }
        // Keep whatever state the failed run saved for the next attempt.
        self.keep_latest(&mut state.uploads).await;
        Err(self.failed(status, &tail))
    }

    async fn succeeded(
        &self,
        adapter: &Path,
        state: &mut RunState,
        started: Instant,
    ) -> Result<Outcome, StageError> {
        self.finish_uploads(&mut state.uploads).await;
        // Some bars stop one short (ai-toolkit counts from 0): a run
        // that wrote its adapter did every step.
        if let Some(last) = state.reported.last.as_mut()
            && last.step < last.total_steps
        {
            last.step = last.total_steps;
            self.ctx.events.progress(last.clone()).await;
        }
        let last = state.reported.last.clone().unwrap_or_default();
        let artifact = self.store_adapter(adapter).await?;
        Ok(Outcome::Trained(TrainOutput {
            artifacts: vec![artifact],
            summary: Some(TrainSummary {
                steps: last.step,
                loss_first: state.reported.loss_first.unwrap_or(f32::NAN),
                loss_last: last.loss,
                seconds: started.elapsed().as_secs_f64(),
                backend: self.backend.name().into(),
            }),
            last_checkpoint: state.uploads.latest.clone(),
        }))
    }

    /// The backend's classification of a failed run, as the stage's error.
    fn failed(&self, status: ExitStatus, tail: &[String]) -> StageError {
        let mut error = self.backend.classify(status, tail);
        if status.success() && error.retryable {
            // Exit 0 without the adapter: interrupted, unless the backend
            // recognised a permanent cause (kohya's "No data found").
            error.message = format!(
                "trainer exited 0 without writing the final adapter: {}",
                error.message
            );
        }
        let job = &self.ctx.meta.job;
        tracing::warn!(%job, %status, error = %error.message, "trainer failed");
        if !error.retryable {
            return StageError::Fail(error);
        }
        if error.kind() == ErrorKind::Oom {
            return self.retry_lighter(error);
        }
        // The retry policy sets the delay.
        StageError::Retry {
            error,
            delay: Duration::ZERO,
        }
    }

    /// Out of memory: the next delivery runs lighter, if the backend has
    /// something lighter; the runtime reports it with the retry and the
    /// coordinator records it in the job record.
    fn retry_lighter(&self, error: JobError) -> StageError {
        let lighter = self
            .backend
            .lighter(&self.inputs.settings, self.inputs.model.family);
        let Some((training, change)) = lighter else {
            return StageError::Retry {
                error,
                delay: Duration::ZERO,
            };
        };
        tracing::info!(job = %self.ctx.meta.job, %change, "next attempt runs with lighter settings");
        StageError::RetryWithReport {
            error,
            delay: Duration::ZERO,
            report: Box::new(Outcome::Adjusted(TrainingAdjusted {
                training: Some(Box::new(training)),
                note: format!("oom: {change}"),
                delivered: self.ctx.delivered,
            })),
        }
    }

    /// Reads the lines still buffered after the group is gone: until the
    /// pipes close, 2 s pass without a line, or 10 s in all (a process that
    /// left the group may hold the pipes open).
    pub(super) async fn drain(&self, lines: &mut Receiver<OutputLine>, state: &mut RunState) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Ok(Some(line))) = tokio::time::timeout_at(
            deadline,
            tokio::time::timeout(Duration::from_secs(2), lines.recv()),
        )
        .await
        {
            let _ = self.on_line(line, state).await;
        }
    }

    pub(super) async fn on_line(
        &self,
        line: OutputLine,
        state: &mut RunState,
    ) -> Result<(), StageError> {
        state.clocks.output(tokio::time::Instant::now());
        if let Some(log) = lock(&self.log).as_mut() {
            log.line(&line.line);
        }
        state.output.tail.push(line.line.clone());
        let events = state.output.parser.line(&line.line);
        let raw = events.is_empty().then_some(&line);
        self.on_events(events, raw, state).await
    }

    /// A body the trainer posted to the progress receiver.
    async fn on_post(
        &self,
        body: serde_json::Value,
        state: &mut RunState,
    ) -> Result<(), StageError> {
        state.clocks.output(tokio::time::Instant::now());
        // Failures reported only by post must reach `classify`.
        let text = body.to_string();
        if text.to_ascii_lowercase().contains("error") {
            state.output.tail.push(format!("webhook: {text}"));
        }
        let events = state.output.parser.webhook(&body);
        self.on_events(events, None, state).await
    }

    async fn on_events(
        &self,
        events: Vec<LineEvent>,
        raw: Option<&OutputLine>,
        state: &mut RunState,
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
                    let progress = Progress {
                        step,
                        total,
                        loss,
                        lr,
                        samples_per_sec,
                        epoch,
                    };
                    self.on_progress(progress, state).await?
                }
                LineEvent::Metric { name, value, step } => {
                    if !is_progress_value(&name) {
                        lock(&self.throttle).offer(&name, value, step);
                        self.send_metrics(false).await;
                    }
                }
                LineEvent::Saved { .. } => self.poll_checkpoints(&mut state.uploads).await,
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
}

/// The next body posted to the run's progress receiver; never, without one.
async fn next_post(receiver: &mut Option<ProgressReceiver>) -> Option<serde_json::Value> {
    match receiver {
        Some(receiver) => receiver.bodies.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let mut tail = Tail::default();
        for n in 0..TAIL_LINES + 2 {
            tail.push(format!("line {n}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 2");
        assert_eq!(lines[TAIL_LINES - 1], format!("line {}", TAIL_LINES + 1));
    }
}
