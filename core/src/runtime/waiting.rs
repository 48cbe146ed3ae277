//! Holding a task while the stores it needs (the jobs and claims buckets)
//! cannot be read: every hand-back is a delivery, and a few seconds of
//! outage must not use up a task's attempts before its handler ever ran.

use async_nats::jetstream::{self, AckKind};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Holding a task while the stores it needs cannot be read: waits with a
/// growing pause (0.5 s doubling to 4 s) and keeps the message with an
/// in-progress ack at least every `ack_wait/3`, for at most [`Waiting::CAP`]
/// ack waits (a lasting fault then hands the task back, which spends a
/// delivery).
pub(super) struct Waiting {
    pause: Duration,
    ack_every: Duration,
    last_ack: tokio::time::Instant,
    give_up: tokio::time::Instant,
}

impl Waiting {
    /// How long one task is held at most, in ack waits.
    const CAP: u32 = 10;

    pub(super) fn new(ack_wait: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            pause: Duration::from_millis(500),
            ack_every: (ack_wait / 3).max(Duration::from_millis(200)),
            last_ack: now,
            give_up: now + ack_wait * Self::CAP,
        }
    }

    /// Waits once; false when the runtime is stopping, the hold is over its
    /// cap, or the message could not be kept (the caller hands it back).
    pub(super) async fn pause(
        &mut self,
        message: &jetstream::Message,
        stop: &CancellationToken,
    ) -> bool {
        if tokio::time::Instant::now() >= self.give_up {
            tracing::error!(
                "stores unreadable for {} ack waits; handing the task back",
                Self::CAP
            );
            return false;
        }
        let until = tokio::time::Instant::now() + self.pause;
        self.pause = (self.pause * 2).min(Duration::from_secs(4));
        loop {
            let next_ack = self.last_ack + self.ack_every;
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(until.min(next_ack)) => {}
            }
            if tokio::time::Instant::now() >= next_ack {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(%error, "in-progress ack failed while holding a task");
                    return false;
                }
                self.last_ack = tokio::time::Instant::now();
            }
            if tokio::time::Instant::now() >= until {
                return true;
            }
        }
    }
}
