//! Draining on request. The autoscaler asks one stage service by its
//! worker id to drain ([`subject::drain`](crate::topology::subject::drain),
//! core NATS request/reply, sent again on each of its passes until it
//! releases the machine, so a lost request only delays). The service stops
//! pulling, winds its running tasks down the way shutdown does (the drain
//! grace, then their stop token: a worker's trainer saves through its
//! backend's graceful stop, and the task is handed back with its last
//! checkpoint), then stays up taking nothing, its registry entry saying
//! `draining`, until it is terminated. A second request changes nothing;
//! every request is answered with a [`DrainReply`].

use crate::registry::Occupancy;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What a stage service answers a drain request with (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub worker_id: String,
    /// Always true once asked: the service takes no task any more.
    pub draining: bool,
    /// Tasks still running (being handed back); 0 once drained.
    pub busy_slots: usize,
}

/// What the drain listener works with.
pub(super) struct Drains {
    pub(super) client: async_nats::Client,
    pub(super) worker_id: String,
    pub(super) occupancy: Arc<Occupancy>,
    /// Cancelled on the first request: the run loop stops pulling.
    pub(super) drain: CancellationToken,
}

impl Drains {
    /// Answers drain requests until `stop` (or the subscription ends).
    pub(super) async fn listen(
        self,
        mut requests: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let request = tokio::select! {
                _ = stop.cancelled() => break,
                request = requests.next() => request,
            };
            let Some(request) = request else { break };
            if self.occupancy.drain() {
                tracing::info!(
                    worker = %self.worker_id,
                    running = self.occupancy.running(),
                    "drain requested: taking no more tasks; handing running ones back"
                );
            }
            self.drain.cancel();
            let Some(reply) = request.reply else { continue };
            let answer = DrainReply {
                worker_id: self.worker_id.clone(),
                draining: true,
                busy_slots: self.occupancy.running(),
            };
            match serde_json::to_vec(&answer) {
                Ok(body) => {
                    if let Err(error) = self.client.publish(reply, body.into()).await {
                        tracing::debug!(%error, "cannot answer a drain request");
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot encode a drain reply"),
            }
        }
    }
}
