//! The stage runtime: the one run loop every stage service uses. A stage
//! implements [`StageHandler::handle`]; the runtime owns everything about
//! delivery, so no stage touches acks or delivery counts.
//!
//! ```text
//!  pull (one message per free slot)
//!    │                                        admit (pure, admit.rs)
//!    ├─ undecodable / bad ids ───────────────▶ DLQ copy, failed result, TERM
//!    ├─ no record, job final or cancelled,
//!    │  or attempt stale ────────────────────▶ TERM (nothing to do)
//!    ├─ record unreadable (store down) ──────▶ hold (in-progress acks), read again
//!    ├─ delivered > max attempts ────────────▶ DLQ copy, failed result, TERM
//!    ├─ claim held by a live lease elsewhere ─▶ NAK with delay (lease end + margin)
//!    ├─ claim unreadable (store down) ───────▶ hold, read the record again
//!    ▼                                        (a hold past its cap: NAK 2 s)
//!  claim (CAS in ty_claims)
//!    ▼
//!  record final or past its deadline (read again) ──▶ TERM, the handler never runs
//!    ▼
//!  handle(task, ctx) ── every ack_wait/3: renew the lease (CAS), then in-progress ack,
//!    │                  then read the record: final or past its deadline ──▶ cancel token
//!    │                  claim lost ──▶ cancel the handler; publish nothing, settle nothing
//!    ▼
//!  check the claim once more (CAS; not for Cancelled); lost ──▶ publish nothing, settle nothing
//!    │                                        plan (pure, plan.rs)
//!    ├─ Ok(outcome) ──────────▶ publish result (with the claim, dedup id), renew, then ACK;
//!    │                           publish failed: release, NAK 5 s; renewal lost: no ACK
//!    ├─ Retry{delay, report?} ▶ the retry policy (crate::retry) decides:
//!    │                           retry: publish the report if any, release the claim,
//!    │                           DEFER by its backoff delay (≥ delay, a server's
//!    │                           Retry-After; ≤ the fleet's maximum): republish the
//!    │                           task as a schedule due then, then ACK (schedule not
//!    │                           stored: NAK with the delay); a fatal kind: DLQ, failed result, TERM;
//!    │                           out of attempts: DLQ, failed result ("gave up after
//!    │                           N deliveries: …"), TERM
//!    ├─ Fail(error) ──────────▶ DLQ, publish failed result, TERM
//!    ├─ Cancelled ────────────▶ TERM (the coordinator already recorded it; no DLQ);
//!    │                           a Fail or Retry while the cancel token fired counts
//!    │                           as Cancelled
//!    └─ Interrupted ──────────▶ release claim, NAK without delay (service stopping; another replica resumes)
//!                               execute (execute.rs): the one place a plan's I/O is done
//! ```
//!
//! Deciding and doing are apart: [`admit`] and [`plan`] are pure functions
//! from what the runtime read (the task, the job record, the claim, how
//! the handler ended, the retry policy) to a [`plan::Plan`] (a dead letter,
//! a report, a release, a settle), tested row by row without a server in
//! `tests/`; `execute.rs` does the I/O a plan asks for, in that order.
//!
//! Every task termed without success writes exactly one dead letter to
//! `TY_DLQ` first (the reason and the error kind, the payload, the
//! deliveries), whatever ended it: undecodable, out of deliveries, or a
//! fatal error (a non-retryable kind, a config the backend rejects). A
//! cancelled task writes none: the job ended by the client's choice. The
//! letter's dedup id is the task message's stream sequence, so a
//! redelivery of the same message cannot add a second one.
//!
//! A retry waits off the consumer. A NAK with a delay would keep the
//! message pending on the stage's consumer, holding one of its
//! `nats.max_ack_pending` slots (shared by every tenant) for the whole
//! delay: a tenant's failing jobs could hold them all. So a retried task is
//! republished on `ty.retry.<stage>.<tenant>.<job>` with `Nats-Schedule: @at
//! <due>` and `Nats-Schedule-Target: <its task subject>` (a nats-server
//! message schedule; no consumer reads that subject) and the delivery is
//! acked; when due, the server publishes the task to its subject again.
//! The copy carries the task's id (`Ty-Task-Id`: the server drops
//! `Nats-Msg-Id` from what a schedule publishes) and the deliveries so far
//! (`Ty-Delivered`), so the attempt cap, the retry reports' ids and the
//! dead letter's count go on across messages. The schedule's own dedup id
//! is per delivery (`<task>.retry.<n>`); the claim fences a copy that a
//! crash between the schedule and the ACK leaves.
//!
//! Fencing (see [`crate::claim`]): a runtime that lost its claim (its lease
//! ran out and another runtime took the task over) neither publishes nor
//! acks — an ack from the old delivery would remove the message the new
//! holder is working on. The coordinator checks the claim in each result as
//! well, so a result that slips through still counts only once.
//!
//! A cancel message on `ty.control.<job>.cancel` cancels the task's
//! [`TaskContext::cancel`] token; so does the job record, read again once
//! the token is registered and on every heartbeat, when it is final or past
//! its deadline (`control.rs`): a cancel whose message was lost still stops
//! the task. Shutdown stops pulling at once, lets
//! running tasks finish for the drain grace, then cancels their
//! [`TaskContext::stop`] token and waits for them to hand the task back.
//! A drain request from the autoscaler (`drain.rs`) does the same without
//! a shutdown: the service then stays up taking nothing, its registry
//! entry `draining`, until it is terminated.

mod admit;
mod control;
mod drain;
mod execute;
mod heartbeat;
mod plan;
mod process;
mod slots;
mod stage;
#[cfg(test)]
mod tests;
mod waiting;

pub use control::deadline_ms;
pub use drain::DrainReply;
pub use stage::{StageError, StageHandler, StageTask, TaskContext, TaskMeta, job_error};

use crate::claim::Claims;
use crate::config::{NatsConfig, RetryConfig};
use crate::topology::{self, Topology, subject};
use async_nats::jetstream;
use futures::StreamExt;
use slots::SlotUsage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::instrument::WithSubscriber;
use trainyard_proto::JobId;
use trainyard_proto::v1::Stage;

/// How one stage service runs.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    pub stage: Stage,
    /// GPU pool, for the training stage.
    pub pool: String,
    /// Tasks handled at once.
    pub concurrency: usize,
    pub worker_id: String,
    pub nats: NatsConfig,
    /// How long running tasks may go on after shutdown is asked.
    pub drain_grace: Duration,
    /// The `[retry]` section; the stage's policy is used.
    pub retry: RetryConfig,
    /// Tasks running now and since when none, for the registry entry.
    pub occupancy: Arc<crate::registry::Occupancy>,
}

impl RunnerConfig {
    pub fn new(stage: Stage, nats: &NatsConfig) -> Self {
        Self {
            stage,
            pool: "default".into(),
            concurrency: 1,
            worker_id: format!("{}-{}", stage.name(), uuid::Uuid::now_v7().simple()),
            nats: nats.clone(),
            drain_grace: Duration::from_secs(30),
            retry: RetryConfig::default(),
            occupancy: Arc::default(),
        }
    }

    /// [`RunnerConfig::new`] with the service's config applied: its
    /// `[retry]` section and the worker id of `[runtime] worker_id` (a
    /// generated one when empty).
    pub fn for_service(stage: Stage, config: &crate::Config) -> Self {
        let mut runner = Self::new(stage, &config.nats);
        runner.retry = config.retry.clone();
        if !config.runtime.worker_id.is_empty() {
            runner.worker_id = config.runtime.worker_id.clone();
        }
        runner
    }
}

/// The cancel tokens of the running tasks, by job.
type Inflight = Arc<Mutex<HashMap<JobId, CancellationToken>>>;

/// What every task of one runtime shares.
struct Shared {
    claims: Claims,
    topo: Topology,
    config: RunnerConfig,
    inflight: Inflight,
    /// The stage's task type's [`stage::redacted_payload`].
    redact: fn(&[u8]) -> Vec<u8>,
    usage: Arc<SlotUsage>,
}

/// Runs a stage until `shutdown` is cancelled and the running tasks drain.
pub async fn run_stage<H: StageHandler>(
    client: async_nats::Client,
    topo: Topology,
    config: RunnerConfig,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let Some(consumer) = topology::until_ready("the stage's task consumer", &shutdown, || {
        topology::task_consumer(&topo.js, config.stage, &config.pool, &config.nats)
    })
    .await
    else {
        return Ok(());
    };
    let inflight: Inflight = Arc::default();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Cancelled by shutdown, or by a drain request: pulling stops.
    let drain = shutdown.child_token();
    let listeners = TaskTracker::new();
    let listening = CancellationToken::new();
    let cancels = client.subscribe(subject::all_cancels()).await?;
    // Lives until the running tasks are done; it only cancels tokens.
    listeners.spawn(listen_for_cancels(
        cancels,
        inflight.clone(),
        listening.clone(),
    ));
    match subject::drain(config.stage, &config.pool, &config.worker_id) {
        Some(drains) => {
            let requests = client.subscribe(drains).await?;
            let drains = drain::Drains {
                client: client.clone(),
                worker_id: config.worker_id.clone(),
                occupancy: config.occupancy.clone(),
                drain: drain.clone(),
            };
            // Lives until the service stops: a drained service still answers.
            listeners.spawn(drains.listen(requests, listening.clone()));
        }
        None => tracing::warn!(
            worker = %config.worker_id,
            "the worker id is not one subject token: this service cannot be drained, only stopped"
        ),
    }
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let usage = Arc::new(SlotUsage::new(&config));
    // Not tracked: it ends after the drain, once no task runs.
    let accounting = CancellationToken::new();
    let accounting_task = tokio::spawn(usage.clone().account(accounting.clone()));
    let shared = Arc::new(Shared {
        claims: Claims::new(topo.claims.clone(), config.nats.ack_wait()),
        topo,
        config: config.clone(),
        inflight,
        redact: stage::redacted_payload::<H::Task>,
        usage,
    });
    tracing::info!(
        stage = config.stage.name(),
        worker = %config.worker_id,
        "stage runtime started"
    );
    while let Some((message, permit)) = pull_in_slot(&consumer, &slots, &drain).await {
        let shared = shared.clone();
        let handler = handler.clone();
        let stop = stop.clone();
        // Tracked: shutdown waits for it; it ends with its task.
        tracker.spawn(
            async move {
                shared.process(message, handler.as_ref(), stop).await;
                drop(permit);
            }
            .with_current_subscriber(),
        );
    }
    tracker.close();
    if tokio::time::timeout(config.drain_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain grace over; handing running tasks back");
        stop.cancel();
        tracker.wait().await;
    }
    if !shutdown.is_cancelled() {
        tracing::info!(
            worker = %config.worker_id,
            "drained: running nothing and taking nothing until stopped"
        );
        shutdown.cancelled().await;
    }
    listening.cancel();
    listeners.close();
    listeners.wait().await;
    accounting.cancel();
    let _ = accounting_task.await;
    tracing::info!(stage = config.stage.name(), "stage runtime stopped");
    Ok(())
}

/// Cancels the token of a running task when its job's cancel message
/// arrives, until `stop`.
async fn listen_for_cancels(
    mut cancels: async_nats::Subscriber,
    inflight: Inflight,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            msg = cancels.next() => {
                let Some(msg) = msg else { break };
                if let Some(job) = subject::job_of_cancel(&msg.subject)
                    && let Some(token) = inflight.lock().expect("inflight lock").get(&job)
                {
                    tracing::info!(%job, "cancel received for a running task");
                    token.cancel();
                }
            }
        }
    }
}

/// The next message of `consumer`, pulled only once one of `slots` is free
/// (one message per pull: nothing waits in a client buffer while its ack
/// wait runs), with the slot's permit; `None` once `shutdown` is cancelled.
/// A failed pull is retried after a pause.
pub async fn pull_in_slot(
    consumer: &jetstream::consumer::PullConsumer,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(jetstream::Message, tokio::sync::OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        _ = shutdown.cancelled() => return None,
        permit = slots.clone().acquire_owned() => permit.expect("semaphore never closes"),
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return None,
            batch = consumer.batch().max_messages(1).expires(Duration::from_secs(5)).messages() => batch,
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "pull request failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => return None,
            message = batch.next() => message,
        };
        match message {
            Some(Ok(message)) => return Some((message, permit)),
            Some(Err(error)) => tracing::debug!(%error, "pull ended with a status"),
            None => {}
        }
    }
}
