//! Keeping a claimed task: while the handler runs, the claim's lease is
//! renewed and the message kept with in-progress acks; a claim found lost
//! stops the handler. Apart from the run loop because it has its own clock.

use super::Shared;
use super::stage::{StageError, TaskMeta};
use crate::claim::{Held, Renew};
use async_nats::jetstream::{self, AckKind};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_proto::v1::stage_result::Outcome;

impl Shared {
    /// Runs the handler; every ack_wait/3 renews the claim's lease and then
    /// sends an in-progress ack. When the claim is lost (taken over, or the
    /// lease ran out without a renewal getting through) it cancels the
    /// handler, waits for it to stop and returns `None`. Each beat also
    /// reads the job record and cancels the handler's token when the job is
    /// final or past its deadline (a cancel whose message was lost).
    pub(super) async fn with_heartbeat<F: Future<Output = Result<Outcome, StageError>>>(
        &self,
        message: &jetstream::Message,
        held: &mut Held,
        cancel: &CancellationToken,
        meta: &TaskMeta,
        work: F,
    ) -> Option<Result<Outcome, StageError>> {
        let period = (self.config.nats.ack_wait() / 3).max(Duration::from_millis(200));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => return Some(result),
                _ = ticker.tick() => {
                    if !self.still_held(held).await {
                        tracing::warn!(worker = %held.claim.worker_id, token = %held.claim.token, "claim lost; stopping the handler");
                        cancel.cancel();
                        // Dropped: the handler stops on its cancel token.
                        let _ = work.await;
                        return None;
                    }
                    if let Err(error) = message.ack_with(AckKind::Progress).await {
                        tracing::debug!(%error, "in-progress ack failed");
                    }
                    // A cancel or deadline whose message never arrived.
                    if !cancel.is_cancelled()
                        && let Some(why) = self.stop_reason(meta).await
                    {
                        tracing::info!(job = %meta.job, why, "stopping the handler: its job record says so");
                        cancel.cancel();
                    }
                }
            }
        }
    }

    /// Renews the lease; false once the claim is someone else's, or its
    /// lease ran out by this runtime's clock without a renewal getting through.
    pub(super) async fn still_held(&self, held: &mut Held) -> bool {
        match self.claims.renew(held).await {
            Renew::Renewed => true,
            Renew::Lost => false,
            Renew::Unavailable(error) => {
                tracing::warn!(%error, "cannot renew claim");
                !held.expired(crate::now_ms())
            }
        }
    }
}
