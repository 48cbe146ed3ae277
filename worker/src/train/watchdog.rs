//! When a trainer counts as stuck (`[worker.stuck]`, limits per backend):
//! the run's clocks (last output, the highest step and when it was first
//! seen, GPUs last busy), how often to look, and the verdict. The verdict
//! is a pure function of the clocks, the limits and `now`, so it is tested
//! here with made-up instants; only [`Watchdog::check`] reads the GPUs.

use super::TrainStage;
use crate::gpu::{Gpus, visible_devices};
use std::time::Duration;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use trainyard_backends::Slot;
use trainyard_core::config::StuckLimits;
use trainyard_proto::v1::{Stage, Stuck};

/// The stuck watchdog's clocks.
#[derive(Clone, Debug)]
pub(super) struct Clocks {
    /// When the last output line (or progress post) arrived.
    line_at: Instant,
    /// The highest step reported and when it was first seen (the start
    /// until then).
    top_step: Option<u32>,
    step_at: Instant,
    /// When the GPUs were last seen busy (or the first step, if later).
    gpu_busy_at: Instant,
}

impl Clocks {
    pub(super) fn start(now: Instant) -> Self {
        Self {
            line_at: now,
            top_step: None,
            step_at: now,
            gpu_busy_at: now,
        }
    }

    /// The trainer said something (a line or a post).
    pub(super) fn output(&mut self, now: Instant) {
        self.line_at = now;
    }

    /// A progress reported `step`; only a new highest step resets the step
    /// clock.
    pub(super) fn step(&mut self, step: u32, now: Instant) {
        if self.top_step.is_none_or(|top| step > top) {
            if self.top_step.is_none() {
                // GPU idleness counts from the first step (loading is not idle).
                self.gpu_busy_at = now;
            }
            self.top_step = Some(step);
            self.step_at = now;
        }
    }

    pub(super) fn gpus_busy(&mut self, now: Instant) {
        self.gpu_busy_at = now;
    }

    /// Whether the trainer is stuck at `now`: no output for the silent
    /// limit, no first step within its allowance, no new step since the
    /// last one for the step limit, or (sampled by the caller) idle GPUs
    /// since the first step for the GPU limit.
    pub(super) fn stuck_at(&self, limits: &StuckLimits, now: Instant) -> Option<Stuck> {
        let stuck = |cause: &str, since: Instant, what: String| {
            let seconds = now.duration_since(since).as_secs_f64();
            Stuck {
                stage: Stage::Train as i32,
                step: self.top_step.unwrap_or(0),
                seconds,
                cause: cause.into(),
                message: format!("trainer stuck: {what} for {seconds:.0}s; killed"),
            }
        };
        if let Some(limit) = limits.silent
            && now.duration_since(self.line_at) >= limit
        {
            return Some(stuck("silent", self.line_at, "no output".into()));
        }
        if let Some(limit) = limits.gpu_idle
            && self.top_step.is_some()
            && now.duration_since(self.gpu_busy_at) >= limit
        {
            return Some(stuck("gpu_idle", self.gpu_busy_at, "GPUs idle".into()));
        }
        match self.top_step {
            None => limits
                .first_step
                .filter(|limit| now.duration_since(self.step_at) >= *limit)
                .map(|_| stuck("first_step", self.step_at, "no first step".into())),
            Some(step) => limits
                .step
                .filter(|limit| now.duration_since(self.step_at) >= *limit)
                .map(|_| stuck("no_step", self.step_at, format!("no step after {step}"))),
        }
    }
}

/// How often to look: a few times per the shortest limit, never more than
/// every 100 ms nor less than every 5 s; `None` when every limit is off.
fn period(limits: &StuckLimits) -> Option<Duration> {
    let shortest = [
        limits.step,
        limits.first_step,
        limits.silent,
        limits.gpu_idle,
    ]
    .into_iter()
    .flatten()
    .min()?;
    Some((shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)))
}

/// One run's watchdog: its limits, its GPUs and its timer.
pub(super) struct Watchdog {
    limits: StuckLimits,
    /// This run's own GPUs where its slot names them: another run's busy
    /// GPU must not hide this one's idleness.
    devices: Vec<u32>,
    timer: Option<Interval>,
}

impl Watchdog {
    pub(super) fn new(stage: &TrainStage, backend: &str, slot: &Slot) -> Self {
        let mut limits = stage.stuck.limits(backend);
        if !stage.gpus.present() {
            limits.gpu_idle = None;
        }
        let devices = if slot.gpus.is_empty() {
            visible_devices(
                stage
                    .trainer_env
                    .iter()
                    .find(|(k, _)| k == "CUDA_VISIBLE_DEVICES")
                    .map(|(_, v)| v.as_str()),
            )
        } else {
            slot.gpus.clone()
        };
        let timer = period(&limits).map(|period| {
            let mut timer = tokio::time::interval(period);
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
            timer
        });
        Self {
            limits,
            devices,
            timer,
        }
    }

    /// When it is time to look again; never, with every limit off.
    pub(super) async fn tick(&mut self) {
        match &mut self.timer {
            Some(timer) => {
                timer.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Samples the GPUs (where the GPU limit is on and steps have begun)
    /// and gives the verdict.
    pub(super) async fn check(&self, gpus: &Gpus, clocks: &mut Clocks) -> Option<Stuck> {
        if self.limits.gpu_idle.is_some()
            && clocks.top_step.is_some()
            && gpus
                .busiest(&self.devices)
                .await
                .is_some_and(|busy| busy > 0)
        {
            clocks.gpus_busy(Instant::now());
        }
        clocks.stuck_at(&self.limits, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn limits() -> StuckLimits {
        StuckLimits {
            step: Some(30 * SECOND),
            first_step: Some(120 * SECOND),
            silent: Some(60 * SECOND),
            gpu_idle: None,
        }
    }

    fn cause(stuck: Option<Stuck>) -> Option<String> {
        stuck.map(|s| s.cause)
    }

    #[test]
    fn before_the_first_step_only_the_first_step_allowance_and_silence_count() {
        let t0 = Instant::now();
        let mut clocks = Clocks::start(t0);
        let limits = StuckLimits {
            silent: Some(300 * SECOND),
            ..limits()
        };
        clocks.output(t0 + 100 * SECOND);
        assert_eq!(cause(clocks.stuck_at(&limits, t0 + 119 * SECOND)), None);
        let stuck = clocks.stuck_at(&limits, t0 + 120 * SECOND).unwrap();
        assert_eq!(stuck.cause, "first_step");
        assert_eq!(stuck.step, 0);
        assert_eq!(stuck.seconds, 120.0);
        assert_eq!(
            stuck.message,
            "trainer stuck: no first step for 120s; killed"
        );
    }

    #[test]
    fn silence_wins_over_a_missing_step() {
        let t0 = Instant::now();
        let clocks = Clocks::start(t0);
        let stuck = clocks.stuck_at(&limits(), t0 + 200 * SECOND).unwrap();
        assert_eq!(stuck.cause, "silent");
        assert_eq!(stuck.message, "trainer stuck: no output for 200s; killed");
    }

    #[test]
    fn only_a_new_highest_step_resets_the_step_clock() {
        let t0 = Instant::now();
        let mut clocks = Clocks::start(t0);
        clocks.step(5, t0 + 10 * SECOND);
        // The same step again (bar and postfix) and a lower one do not count.
        clocks.step(5, t0 + 20 * SECOND);
        clocks.step(4, t0 + 25 * SECOND);
        clocks.output(t0 + 39 * SECOND);
        assert_eq!(cause(clocks.stuck_at(&limits(), t0 + 39 * SECOND)), None);
        let stuck = clocks.stuck_at(&limits(), t0 + 40 * SECOND).unwrap();
        assert_eq!(stuck.cause, "no_step");
        assert_eq!(stuck.step, 5);
        assert_eq!(
            stuck.message,
            "trainer stuck: no step after 5 for 30s; killed"
        );
        clocks.step(6, t0 + 40 * SECOND);
        assert_eq!(cause(clocks.stuck_at(&limits(), t0 + 40 * SECOND)), None);
    }

    #[test]
    fn idle_gpus_count_from_the_first_step_until_seen_busy() {
        let t0 = Instant::now();
        let limits = StuckLimits {
            gpu_idle: Some(15 * SECOND),
            step: None,
            ..limits()
        };
        let mut clocks = Clocks::start(t0);
        clocks.output(t0 + 50 * SECOND);
        // Loading the model is not idleness.
        assert_eq!(cause(clocks.stuck_at(&limits, t0 + 50 * SECOND)), None);
        clocks.step(1, t0 + 50 * SECOND);
        clocks.gpus_busy(t0 + 60 * SECOND);
        assert_eq!(cause(clocks.stuck_at(&limits, t0 + 74 * SECOND)), None);
        assert_eq!(
            cause(clocks.stuck_at(&limits, t0 + 75 * SECOND)).as_deref(),
            Some("gpu_idle")
        );
    }

    #[test]
    fn every_limit_off_is_never_stuck_and_never_looks() {
        let off = StuckLimits {
            step: None,
            first_step: None,
            silent: None,
            gpu_idle: None,
        };
        let t0 = Instant::now();
        assert_eq!(
            cause(Clocks::start(t0).stuck_at(&off, t0 + 86_400 * SECOND)),
            None
        );
        assert_eq!(period(&off), None);
    }

    #[test]
    fn the_watchdog_looks_four_times_per_shortest_limit_within_bounds() {
        assert_eq!(period(&limits()), Some(5 * SECOND));
        let short = StuckLimits {
            silent: Some(2 * SECOND),
            ..limits()
        };
        assert_eq!(period(&short), Some(Duration::from_millis(500)));
        let tiny = StuckLimits {
            step: Some(Duration::from_millis(100)),
            ..limits()
        };
        assert_eq!(period(&tiny), Some(Duration::from_millis(100)));
    }
}
