//! Slot accounting for the busy and idle slot-seconds metrics, apart from
//! the run loop because it has its own clock.

use super::RunnerConfig;
use crate::telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How this runtime's task slots are used, for the busy and idle seconds
/// counters: accounted every few seconds (and at the end), so a long task
/// shows as busy while it runs, not only once it ends.
pub(super) struct SlotUsage {
    stage: &'static str,
    pool: String,
    slots: usize,
    running: std::sync::atomic::AtomicUsize,
    occupancy: Arc<crate::registry::Occupancy>,
}

/// A running task of a job; dropping it frees the slot.
pub(super) struct Running<'a>(&'a SlotUsage, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.occupancy.leave(&self.1);
        telemetry::metrics().running_changed(self.0.stage, &self.0.pool, -1);
    }
}

impl SlotUsage {
    const PERIOD: Duration = Duration::from_secs(5);

    pub(super) fn new(config: &RunnerConfig) -> Self {
        Self {
            stage: config.stage.name(),
            pool: config.pool.clone(),
            slots: config.concurrency.max(1),
            running: Default::default(),
            occupancy: config.occupancy.clone(),
        }
    }

    /// A task of `job` starts.
    pub(super) fn start(&self, job: &str) -> Running<'_> {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.occupancy.enter(job);
        telemetry::metrics().running_changed(self.stage, &self.pool, 1);
        Running(self, job.to_string())
    }

    /// Adds busy and idle slot-seconds until `stop`, then once more.
    pub(super) async fn account(self: Arc<Self>, stop: CancellationToken) {
        let metrics = telemetry::metrics();
        metrics.slots_changed(self.stage, &self.pool, self.slots as i64);
        let mut last = tokio::time::Instant::now();
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(Self::PERIOD) => false,
            };
            let now = tokio::time::Instant::now();
            let elapsed = now - last;
            last = now;
            let running = self
                .running
                .load(std::sync::atomic::Ordering::Relaxed)
                .min(self.slots);
            metrics.slot_busy(self.stage, &self.pool, elapsed * running as u32);
            metrics.slot_idle(
                self.stage,
                &self.pool,
                elapsed * (self.slots - running) as u32,
            );
            if stopping {
                break;
            }
        }
        metrics.slots_changed(self.stage, &self.pool, -(self.slots as i64));
    }
}
