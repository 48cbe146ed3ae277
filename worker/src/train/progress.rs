//! What a parsed progress sets off: the restore check (a trainer that
//! starts below the restored checkpoint's step is retried), the NaN guard
//! (a loss that stays non-finite fails the job), the watchdog's step clock,
//! the job's gauges, the `metric` events (through the throttle) and the
//! `progress` events (at most one per `progress_interval`, and the last
//! step always). The decisions ([`NanGuard`], [`Reported`]) are pure and
//! tested here; [`Run::on_progress`] does the sending.

use super::lock;
use super::supervise::{Run, RunState, restarted};
use std::time::{Duration, Instant};
use trainyard_core::runtime::StageError;
use trainyard_core::telemetry::metrics;
use trainyard_core::telemetry::metrics::JobProgress;
use trainyard_proto::v1::{self, ErrorKind, Stage};

/// The `metric` event names of the values every progress may carry.
pub(super) const LOSS: &str = "loss";
pub(super) const LEARNING_RATE: &str = "learning_rate";
pub(super) const SAMPLES_PER_SECOND: &str = "samples_per_second";
pub(super) const EPOCH: &str = "epoch";

/// Whether a trainer's own metric is one of the values a progress carries
/// (those keep their own source).
pub(super) fn is_progress_value(name: &str) -> bool {
    [LOSS, LEARNING_RATE, SAMPLES_PER_SECOND, EPOCH].contains(&name)
}

/// One parsed progress report (`LineEvent::Progress`); `step` is absolute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Progress {
    pub step: u32,
    pub total: u32,
    pub loss: Option<f32>,
    pub lr: Option<f64>,
    pub samples_per_sec: Option<f32>,
    pub epoch: Option<f32>,
}

impl Progress {
    /// The values that go out as `metric` events, by name.
    fn values(&self) -> [(&'static str, Option<f64>); 4] {
        [
            (LOSS, self.loss.map(f64::from)),
            (LEARNING_RATE, self.lr),
            (SAMPLES_PER_SECOND, self.samples_per_sec.map(f64::from)),
            (EPOCH, self.epoch.map(f64::from)),
        ]
    }
}

/// Fails a run whose loss is not finite for `limit` steps in a row.
#[derive(Debug)]
pub(super) struct NanGuard {
    limit: u32,
    /// Consecutive steps whose loss was not finite, and the last such step.
    run: u32,
    step: Option<u32>,
}

impl NanGuard {
    /// `limit` 0 counts as 1.
    pub(super) fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            run: 0,
            step: None,
        }
    }

    /// Counts the loss of `step`; the error once it has not been finite
    /// for `limit` steps in a row.
    pub(super) fn observe(&mut self, step: u32, loss: Option<f32>) -> Result<(), StageError> {
        match loss {
            Some(l) if !l.is_finite() => {
                // Several events may report one step (bar, postfix, post).
                if self.step != Some(step) {
                    self.step = Some(step);
                    self.run += 1;
                }
                if self.run >= self.limit {
                    return Err(StageError::fail(
                        ErrorKind::Trainer,
                        format!(
                            "training diverged: loss is {l} for {} steps in a row (at step {step}); lower the learning rate or check the data",
                            self.run
                        ),
                    ));
                }
            }
            Some(_) => {
                self.run = 0;
                self.step = None;
            }
            None => {}
        }
        Ok(())
    }
}

/// What the run has reported so far.
#[derive(Debug)]
pub(super) struct Reported {
    /// At most one `progress` event per this long (the last step always goes).
    interval: Duration,
    pub last: Option<v1::Progress>,
    last_emit: Option<Instant>,
    /// The first step seen and when: the ETA's origin.
    first_step_at: Option<(Instant, u32)>,
    /// The first finite loss.
    pub loss_first: Option<f32>,
}

impl Reported {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            last_emit: None,
            first_step_at: None,
            loss_first: None,
        }
    }

    /// The progress event for `p` at `now`, with its ETA in seconds from
    /// the pace since the first step seen (0 until a second step).
    fn event(&mut self, p: &Progress, now: Instant) -> v1::Progress {
        if let Some(l) = p.loss.filter(|l| l.is_finite()) {
            self.loss_first.get_or_insert(l);
        }
        let (t0, s0) = *self.first_step_at.get_or_insert((now, p.step));
        let eta = if p.step > s0 {
            let per_step = now.duration_since(t0).as_secs_f32() / (p.step - s0) as f32;
            per_step * p.total.saturating_sub(p.step) as f32
        } else {
            0.0
        };
        v1::Progress {
            stage: Stage::Train as i32,
            step: p.step,
            total_steps: p.total,
            loss: p.loss.unwrap_or(f32::NAN),
            learning_rate: p.lr.unwrap_or_default(),
            samples_per_second: p.samples_per_sec.unwrap_or_default(),
            eta_seconds: eta,
            message: String::new(),
        }
    }

    /// Whether the progress of `step` goes out as an event at `now`: the
    /// first, then once per interval, and the last step always.
    fn due(&mut self, step: u32, total: u32, now: Instant) -> bool {
        let due = self
            .last_emit
            .is_none_or(|at| now.duration_since(at) >= self.interval);
        if due || step == total {
            self.last_emit = Some(now);
            return true;
        }
        false
    }
}

impl Run<'_> {
    pub(super) async fn on_progress(
        &self,
        p: Progress,
        state: &mut RunState,
    ) -> Result<(), StageError> {
        if !state.output.resume_checked {
            state.output.resume_checked = true;
            if let Some(resume) = &self.inputs.resume
                && p.step < resume.step
            {
                return Err(restarted(p.step, resume.step));
            }
        }
        state.nan.observe(p.step, p.loss)?;
        state.clocks.step(p.step, tokio::time::Instant::now());
        let now = Instant::now();
        let event = state.reported.event(&p, now);
        self.set_gauges(&p);
        {
            let mut throttle = lock(&self.throttle);
            for (name, value) in p.values() {
                if let Some(value) = value {
                    throttle.offer(name, value, p.step);
                }
            }
        }
        if state.reported.due(p.step, p.total, now) {
            self.ctx.events.progress(event.clone()).await;
        }
        self.send_metrics(false).await;
        state.reported.last = Some(event);
        Ok(())
    }

    /// The job's gauges (`trainyard_job_*`).
    fn set_gauges(&self, p: &Progress) {
        let finite = |v: f64| v.is_finite().then_some(v);
        metrics().job_progress(
            self.ctx.meta.job.as_str(),
            JobProgress {
                tenant: self.tenant.clone(),
                backend: self.backend.name().to_string(),
                step: u64::from(p.step),
                total_steps: u64::from(p.total),
                loss: p.loss.map(f64::from).and_then(finite),
                learning_rate: p.lr.and_then(finite),
                samples_per_second: p.samples_per_sec.map(f64::from).and_then(finite),
                reported_at: trainyard_core::now_ms() as f64 / 1000.0,
            },
        );
    }

    /// Publishes the `metric` events the throttle lets out now, or, at the
    /// end of the run (`all`), every value still waiting.
    pub(super) async fn send_metrics(&self, all: bool) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(step: u32, loss: Option<f32>) -> Progress {
        Progress {
            step,
            total: 100,
            loss,
            lr: Some(1e-4),
            samples_per_sec: None,
            epoch: None,
        }
    }

    fn is_divergence(result: Result<(), StageError>) -> bool {
        match result {
            Err(StageError::Fail(error)) => error.kind() == ErrorKind::Trainer && !error.retryable,
            _ => false,
        }
    }

    #[test]
    fn a_loss_that_stays_nan_for_the_limit_fails_the_run() {
        let mut guard = NanGuard::new(3);
        assert!(guard.observe(1, Some(f32::NAN)).is_ok());
        assert!(guard.observe(2, Some(f32::INFINITY)).is_ok());
        assert!(is_divergence(guard.observe(3, Some(f32::NAN))));
    }

    #[test]
    fn one_step_reported_twice_counts_once_and_a_finite_loss_resets() {
        let mut guard = NanGuard::new(2);
        assert!(guard.observe(1, Some(f32::NAN)).is_ok());
        assert!(guard.observe(1, Some(f32::NAN)).is_ok());
        // No loss says nothing either way.
        assert!(guard.observe(2, None).is_ok());
        assert!(guard.observe(2, Some(0.5)).is_ok());
        assert!(guard.observe(3, Some(f32::NAN)).is_ok());
        assert!(is_divergence(guard.observe(4, Some(f32::NAN))));
    }

    #[test]
    fn a_nan_limit_of_zero_fails_at_the_first_nan() {
        let mut guard = NanGuard::new(0);
        assert!(is_divergence(guard.observe(7, Some(f32::NAN))));
    }

    #[test]
    fn progress_goes_out_once_per_interval_and_at_the_last_step() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut reported = Reported::new(10 * second);
        assert!(reported.due(1, 100, t0));
        assert!(!reported.due(2, 100, t0 + 9 * second));
        assert!(reported.due(3, 100, t0 + 10 * second));
        assert!(reported.due(100, 100, t0 + 11 * second));
        // The last step restarts the interval.
        assert!(!reported.due(4, 100, t0 + 20 * second));
    }

    #[test]
    fn the_eta_follows_the_pace_since_the_first_step_seen() {
        let t0 = Instant::now();
        let mut reported = Reported::new(Duration::ZERO);
        let first = reported.event(&at(10, Some(f32::NAN)), t0);
        assert_eq!(first.eta_seconds, 0.0);
        assert!(first.loss.is_nan());
        assert_eq!(reported.loss_first, None);
        let later = reported.event(&at(20, Some(0.25)), t0 + Duration::from_secs(5));
        // Half a second a step, 80 steps to go.
        assert_eq!(later.eta_seconds, 40.0);
        assert_eq!(later.step, 20);
        assert_eq!(later.total_steps, 100);
        assert_eq!(later.learning_rate, 1e-4);
        assert_eq!(reported.loss_first, Some(0.25));
        reported.event(&at(30, Some(0.1)), t0 + Duration::from_secs(6));
        assert_eq!(reported.loss_first, Some(0.25));
    }

    #[test]
    fn the_progress_values_keep_their_own_metric_source() {
        assert!(is_progress_value("loss"));
        assert!(is_progress_value("epoch"));
        assert!(!is_progress_value("grad_norm"));
        let values = at(3, Some(0.5)).values();
        assert_eq!(values[0], (LOSS, Some(0.5)));
        assert_eq!(values[3], (EPOCH, None));
    }
}
