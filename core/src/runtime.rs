//! The stage runtime: the one run loop every stage service uses. A stage
//! implements [`StageHandler::handle`]; the runtime owns everything about
//! delivery, so no stage touches acks or delivery counts.
//!
//! ```text
//!  pull (one message per free slot)
//!    │
//!    ├─ undecodable / bad ids ───────────────▶ DLQ copy, failed result, TERM
//!    ├─ delivered > max attempts ────────────▶ DLQ copy, failed result, TERM
//!    ├─ job final, cancelled or attempt stale ▶ TERM (nothing to do)
//!    ├─ claim held by a live lease elsewhere ─▶ NAK with delay (lease end + margin)
//!    ▼
//!  claim (CAS in ty_claims)
//!    ▼
//!  handle(task, ctx) ── every ack_wait/3: renew the lease (CAS), then in-progress ack
//!    │                  claim lost ──▶ cancel the handler; publish nothing, settle nothing
//!    ▼
//!  check the claim once more (CAS); lost ──▶ publish nothing, settle nothing
//!    ├─ Ok(outcome) ──────────▶ publish result (with the claim, dedup id), renew, then ACK
//!    ├─ RetryLighter ─────────▶ as Retry; when retried, a TrainingAdjusted result first
//!    ├─ Retry{delay} ─────────▶ the retry policy (crate::retry) decides:
//!    │                           release the claim, NAK with its backoff delay (≥ delay,
//!    │                           a server's Retry-After), or a fatal kind: DLQ, failed
//!    │                           result, TERM, or out of attempts: DLQ, failed result, TERM
//!    ├─ Fail(error) ──────────▶ DLQ, publish failed result, TERM
//!    ├─ Cancelled ────────────▶ TERM (the coordinator already recorded it; no DLQ)
//!    └─ Interrupted ──────────▶ release claim, NAK without delay (service stopping; another replica resumes)
//! ```
//!
//! Every task termed without success writes exactly one dead letter to
//! `TY_DLQ` first (the reason and the error kind, the payload, the
//! deliveries), whatever ended it: undecodable, out of deliveries, or a
//! fatal error (a non-retryable kind, a config the backend rejects). A
//! cancelled task writes none: the job ended by the client's choice. The
//! letter's dedup id is the task message's stream sequence, so a
//! redelivery of the same message cannot add a second one.
//!
//! Fencing (see [`crate::claim`]): a runtime that lost its claim (its lease
//! ran out and another runtime took the task over) neither publishes nor
//! acks — an ack from the old delivery would remove the message the new
//! holder is working on. The coordinator checks the claim in each result as
//! well, so a result that slips through still counts only once.
//!
//! A cancel message on `ty.control.<job>.cancel` cancels the task's
//! [`TaskContext::cancel`] token. Shutdown stops pulling at once, lets
//! running tasks finish for the drain grace, then cancels their
//! [`TaskContext::stop`] token and waits for them to hand the task back.

use crate::claim::{Acquire, Claims, Held, Renew};
use crate::config::{NatsConfig, RetryConfig};
use crate::events::EventSink;
use crate::retry::{Decision, Policy};
use crate::telemetry::{self, propagation};
use crate::topology::{self, Topology, subject};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use prost::Message as _;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use trainyard_proto::v1::{
    self, DeadLetter, ErrorKind, JobError, JobRecord, Stage, StageResult, TaskClaim,
    stage_result::Outcome,
};
use trainyard_proto::{Attempt, IdError, JobId, TenantId};

/// Who a task is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMeta {
    pub tenant: TenantId,
    pub job: JobId,
    pub attempt: Attempt,
}

/// A task message of some stage.
pub trait StageTask: prost::Message + Default + Send + 'static {
    fn meta(&self) -> Result<TaskMeta, IdError>;
    /// The job's own retry policy, if its spec has one.
    fn retry_policy(&self) -> Option<&v1::RetryPolicy>;
    /// Takes in what earlier deliveries recorded in the job record (the
    /// training stage: settings lightened after an OOM).
    fn adjust(&mut self, _record: &JobRecord) {}
    /// Drops the spec's secrets (a dead letter keeps a copy of the task).
    fn redact(&mut self);
}

/// A task message with its spec's secrets redacted, for a dead letter;
/// bytes that do not decode are kept as they are (nothing to redact in).
fn redacted_payload<T: StageTask>(payload: &[u8]) -> Vec<u8> {
    match T::decode(payload) {
        Ok(mut task) => {
            task.redact();
            task.encode_to_vec()
        }
        Err(_) => payload.to_vec(),
    }
}

macro_rules! stage_task {
    ($t:ty $(, $adjust:item)?) => {
        impl StageTask for $t {
            fn meta(&self) -> Result<TaskMeta, IdError> {
                Ok(TaskMeta {
                    tenant: TenantId::parse(&self.tenant)?,
                    job: JobId::parse(&self.job_id)?,
                    attempt: Attempt(self.attempt),
                })
            }
            fn retry_policy(&self) -> Option<&v1::RetryPolicy> {
                self.spec.as_ref().and_then(|s| s.retry.as_ref())
            }
            fn redact(&mut self) {
                if let Some(spec) = self.spec.as_mut() {
                    *spec = spec.redacted();
                }
            }
            $($adjust)?
        }
    };
}
stage_task!(v1::PrepareTask);
stage_task!(
    v1::TrainTask,
    fn adjust(&mut self, record: &JobRecord) {
        if let (Some(lighter), Some(spec)) = (&record.effective_training, self.spec.as_mut()) {
            spec.training = Some(lighter.clone());
        }
    }
);
stage_task!(v1::DeliverTask);

/// How a task ended, when it did not succeed. Retry intent is part of the type.
#[derive(Debug)]
pub enum StageError {
    /// Transient: try again (the same attempt, redelivered) after the retry
    /// policy's delay, and not before `delay` (a server's `Retry-After`;
    /// zero when the handler has no such hint). The policy may still fail
    /// the job: a non-retryable kind, or out of attempts.
    Retry { error: JobError, delay: Duration },
    /// Transient, and the next delivery should run with lighter training
    /// settings (an OOM): when the policy retries, the runtime reports them
    /// to the coordinator (a `TrainingAdjusted` result) before the NAK; the
    /// coordinator records them (`effective_training`, `adjustments`) and
    /// the next delivery's task carries them ([`StageTask::adjust`]).
    RetryLighter {
        error: JobError,
        training: Box<v1::TrainingSettings>,
        adjustment: String,
    },
    /// Permanent: the job fails with this error.
    Fail(JobError),
    /// The job was cancelled while the task ran.
    Cancelled,
    /// The service is stopping; hand the task back at once.
    Interrupted,
}

impl StageError {
    pub fn fail(kind: ErrorKind, message: impl Into<String>) -> Self {
        StageError::Fail(job_error(kind, message, false))
    }

    pub fn retry(kind: ErrorKind, message: impl Into<String>, delay: Duration) -> Self {
        StageError::Retry {
            error: job_error(kind, message, true),
            delay,
        }
    }
}

/// Artifact-store trouble is worth a retry unless the object or URI is wrong.
impl From<crate::store::StoreError> for StageError {
    fn from(error: crate::store::StoreError) -> Self {
        if error.is_retryable() {
            StageError::retry(ErrorKind::Storage, error.to_string(), Duration::ZERO)
        } else {
            StageError::fail(ErrorKind::Storage, error.to_string())
        }
    }
}

pub fn job_error(kind: ErrorKind, message: impl Into<String>, retryable: bool) -> JobError {
    JobError {
        kind: kind as i32,
        message: message.into(),
        retryable,
        stage: Stage::Unspecified as i32,
    }
}

/// What a handler gets besides its task: who it is for, where to send
/// events, and the tokens that tell it to stop.
pub struct TaskContext {
    pub meta: TaskMeta,
    pub stage: Stage,
    /// Deliveries of this message so far, from 1.
    pub delivered: u32,
    pub worker_id: String,
    pub events: EventSink,
    /// Cancelled when the job is cancelled, or when this runtime lost its
    /// claim on the task to another one: stop at once (kill the trainer);
    /// whatever the handler returns then is dropped.
    pub cancel: CancellationToken,
    /// Cancelled when the service must hand the task back (shutdown past its grace).
    pub stop: CancellationToken,
}

impl TaskContext {
    /// A short progress note for this stage ("fetching dataset").
    pub async fn note(&self, message: &str) {
        self.events
            .progress(v1::Progress {
                stage: self.stage as i32,
                message: message.to_string(),
                ..Default::default()
            })
            .await;
    }
}

/// A stage's logic. Everything else is the runtime's.
pub trait StageHandler: Send + Sync + 'static {
    type Task: StageTask;
    fn handle(
        &self,
        task: Self::Task,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Outcome, StageError>> + Send;
}

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
        }
    }
}

type Inflight = Arc<Mutex<HashMap<JobId, CancellationToken>>>;

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
    let mut cancels = client.subscribe(subject::all_cancels()).await?;
    let cancel_map = inflight.clone();
    let cancel_listener = shutdown.child_token();
    let listener_stop = cancel_listener.clone();
    // Lives until shutdown; it only cancels tokens.
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = listener_stop.cancelled() => break,
                msg = cancels.next() => {
                    let Some(msg) = msg else { break };
                    if let Some(job) = subject::job_of_cancel(&msg.subject)
                        && let Some(token) = cancel_map.lock().expect("inflight lock").get(&job)
                    {
                        tracing::info!(%job, "cancel received for a running task");
                        token.cancel();
                    }
                }
            }
        }
    });
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let usage = Arc::new(SlotUsage::new(&config));
    // Not tracked: it ends after the drain, once no task runs.
    let accounting = CancellationToken::new();
    let accounting_task = tokio::spawn(usage.clone().account(accounting.clone()));
    let claims = Claims::new(topo.claims.clone(), config.nats.ack_wait());
    let shared = Arc::new(Shared {
        claims,
        topo,
        config: config.clone(),
        inflight,
        redact: redacted_payload::<H::Task>,
        usage: usage.clone(),
    });
    tracing::info!(
        stage = config.stage.name(),
        worker = %config.worker_id,
        "stage runtime started"
    );
    while let Some((message, permit)) = pull_in_slot(&consumer, &slots, &shutdown).await {
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
    cancel_listener.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain grace over; handing running tasks back");
        stop.cancel();
        tracker.wait().await;
    }
    accounting.cancel();
    let _ = accounting_task.await;
    tracing::info!(stage = config.stage.name(), "stage runtime stopped");
    Ok(())
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

struct Shared {
    claims: Claims,
    topo: Topology,
    config: RunnerConfig,
    inflight: Inflight,
    /// The stage's task type's [`redacted_payload`].
    redact: fn(&[u8]) -> Vec<u8>,
    usage: Arc<SlotUsage>,
}

impl Shared {
    /// Handles one task message inside its process span: a child of the
    /// context the task's headers carry, so every attempt of a stage (a
    /// retry, a redelivery after a lost worker) is a new span in the job's
    /// trace, with the delivery number as `trainyard.attempt`.
    async fn process<H: StageHandler>(
        &self,
        message: jetstream::Message,
        handler: &H,
        stop: CancellationToken,
    ) {
        let stage = self.config.stage;
        let info = message.info().ok();
        let delivered = info
            .as_ref()
            .map(|i| i.delivered.max(1) as u32)
            .unwrap_or(1);
        let header_meta = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .and_then(|id| topology::parse_task_msg_id(id.as_str()))
            .map(|(tenant, job, _, attempt)| TaskMeta {
                tenant,
                job,
                attempt,
            });
        let span = propagation::process_span(
            message.headers.as_ref(),
            &message.subject,
            propagation::JobAttrs {
                job_id: header_meta.as_ref().map(|m| m.job.as_str()),
                tenant: header_meta.as_ref().map(|m| m.tenant.as_str()),
                stage: Some(stage.name()),
                attempt: Some(delivered),
            },
        );
        if delivered == 1
            && let Some(info) = &info
        {
            let published_ns = info.published.unix_timestamp_nanos();
            let now_ns = i128::from(crate::now_ms()) * 1_000_000;
            let waited = Duration::from_nanos((now_ns - published_ns).max(0) as u64);
            telemetry::metrics().queue_waited(stage.name(), &self.config.pool, waited);
        }
        self.process_task(message, handler, stop, delivered, header_meta)
            .instrument(span)
            .await
    }

    async fn process_task<H: StageHandler>(
        &self,
        message: jetstream::Message,
        handler: &H,
        stop: CancellationToken,
        delivered: u32,
        header_meta: Option<TaskMeta>,
    ) {
        let stage = self.config.stage;
        let metrics = telemetry::metrics();
        let decoded = H::Task::decode(message.payload.clone())
            .map_err(|e| {
                format!(
                    "task is not a valid {} message: {e}",
                    std::any::type_name::<H::Task>()
                )
            })
            .and_then(|task| {
                task.meta()
                    .map(|meta| (task, meta))
                    .map_err(|e| format!("task has a bad id: {e}"))
            });
        let (mut task, meta) = match decoded {
            Ok(ok) => {
                if header_meta.is_none() {
                    propagation::record_job(
                        &tracing::Span::current(),
                        propagation::JobAttrs {
                            job_id: Some(ok.1.job.as_str()),
                            tenant: Some(ok.1.tenant.as_str()),
                            ..Default::default()
                        },
                    );
                }
                ok
            }
            Err(reason) => {
                tracing::error!(stage = stage.name(), %reason, "poison task");
                self.dead_letter(
                    &message,
                    header_meta.as_ref(),
                    &reason,
                    ErrorKind::Poison,
                    delivered,
                )
                .await;
                if let Some(meta) = &header_meta {
                    self.publish_failure(meta, None, job_error(ErrorKind::Poison, reason, false))
                        .await;
                }
                self.settle(&message, AckKind::Term).await;
                return;
            }
        };
        let policy = Policy::resolve(
            self.config.retry.for_stage(stage),
            task.retry_policy(),
            stage,
            self.config.nats.max_deliver,
        );
        // While the jobs or claims bucket cannot be read, keep the message
        // (in-progress acks) and try again, rather than handing it back: every
        // hand-back is a delivery, and a few seconds of outage must not use
        // up the task's attempts without the handler ever running.
        let mut waiting = Waiting::new(self.config.nats.ack_wait());
        let mut held = loop {
            match self.current(&meta).await {
                Current::Run(record) => task.adjust(&record),
                Current::Skip(why) => {
                    tracing::info!(job = %meta.job, attempt = %meta.attempt, why, "dropping task");
                    self.settle(&message, AckKind::Term).await;
                    return;
                }
                Current::Unknown => {
                    tracing::warn!(job = %meta.job, "job record unreadable; holding the task");
                    if !waiting.pause(&message, &stop).await {
                        self.settle(&message, AckKind::Nak(Some(Duration::from_secs(2))))
                            .await;
                        return;
                    }
                    continue;
                }
            }
            // Checked against the record first: a redelivered task of a job
            // already cancelled or finished is dropped above, with no letter.
            if delivered > policy.max_attempts {
                let reason = format!("{} task ran out of deliveries ({delivered})", stage.name());
                self.dead_letter(&message, Some(&meta), &reason, ErrorKind::Poison, delivered)
                    .await;
                self.publish_failure(&meta, None, job_error(ErrorKind::Poison, reason, false))
                    .await;
                self.settle(&message, AckKind::Term).await;
                return;
            }
            match self
                .claims
                .acquire(
                    &meta.tenant,
                    &meta.job,
                    stage,
                    meta.attempt,
                    &self.config.worker_id,
                )
                .await
            {
                Acquire::Held(held) => break held,
                Acquire::Busy(wait) => {
                    tracing::info!(job = %meta.job, attempt = %meta.attempt, ?wait, "task claimed by a live runtime; retrying later");
                    self.settle(&message, AckKind::Nak(Some(wait))).await;
                    return;
                }
                Acquire::Unavailable(error) => {
                    tracing::warn!(%error, job = %meta.job, "cannot claim task; holding it");
                    if !waiting.pause(&message, &stop).await {
                        self.settle(&message, AckKind::Nak(Some(Duration::from_secs(2))))
                            .await;
                        return;
                    }
                }
            }
        };
        if delivered == 1 {
            self.publish_started(&meta, &held.claim, delivered).await;
        } else {
            // Handed back (a retry, a stopping service) or taken over from a
            // holder whose lease ran out (a lost worker).
            let reason = if held.took_over {
                "worker_lost"
            } else {
                "handed_back"
            };
            metrics.task_redelivered(stage.name(), reason);
        }
        let cancel = CancellationToken::new();
        self.inflight
            .lock()
            .expect("inflight lock")
            .insert(meta.job.clone(), cancel.clone());
        let ctx = TaskContext {
            meta: meta.clone(),
            stage,
            delivered,
            worker_id: self.config.worker_id.clone(),
            events: EventSink::new(self.topo.js.clone(), meta.tenant.clone(), meta.job.clone()),
            cancel: cancel.clone(),
            stop,
        };
        let started = std::time::Instant::now();
        let running = self.usage.start();
        let result = self
            .with_heartbeat(&message, &mut held, &cancel, handler.handle(task, ctx))
            .await;
        drop(running);
        let took = started.elapsed();
        let finished = |outcome: &str| {
            metrics.stage_finished(stage.name(), &self.config.pool, outcome, took);
        };
        self.inflight
            .lock()
            .expect("inflight lock")
            .remove(&meta.job);
        let result = match result {
            Some(result) => result,
            None => {
                tracing::warn!(job = %meta.job, attempt = %meta.attempt, "claim lost while running; result dropped");
                finished("claim_lost");
                return;
            }
        };
        // The handler's outcome counts only if the claim is still ours.
        if !matches!(result, Err(StageError::Cancelled)) && !self.still_held(&mut held).await {
            tracing::warn!(job = %meta.job, attempt = %meta.attempt, "claim lost before reporting; result dropped");
            finished("claim_lost");
            return;
        }
        // A cancel message arrived while it ran: the job is final already,
        // and however the handler ended (a killed trainer looks like a
        // failure) nothing is reported and nothing dead-lettered.
        let result = match result {
            Err(
                StageError::Fail(_) | StageError::Retry { .. } | StageError::RetryLighter { .. },
            ) if cancel.is_cancelled() => Err(StageError::Cancelled),
            other => other,
        };
        finished(match &result {
            Ok(_) => "ok",
            Err(StageError::Retry { .. } | StageError::RetryLighter { .. }) => "retry",
            Err(StageError::Fail(_)) => "failed",
            Err(StageError::Cancelled) => "cancelled",
            Err(StageError::Interrupted) => "interrupted",
        });
        let claim = held.claim.clone();
        match result {
            Ok(outcome) => {
                if self.publish_result(&meta, Some(&claim), outcome).await {
                    // A takeover between the report and the ack (this runtime
                    // frozen in between) must not lose the new holder's message.
                    if self.still_held(&mut held).await {
                        self.settle(&message, AckKind::Ack).await;
                    } else {
                        tracing::warn!(job = %meta.job, "claim lost after reporting; message left to its holder");
                    }
                } else {
                    self.release(&mut held).await;
                    self.settle(&message, AckKind::Nak(Some(Duration::from_secs(5))))
                        .await;
                }
            }
            Err(StageError::Retry { error, delay }) => {
                self.retry(&message, &meta, &mut held, &policy, delivered, error, delay)
                    .await;
            }
            Err(StageError::RetryLighter {
                error,
                training,
                adjustment,
            }) => {
                let decision = policy.decide(&error, delivered, Duration::ZERO);
                if matches!(decision, Decision::Retry(_)) {
                    self.report_adjustment(&meta, &claim, delivered, *training, &adjustment)
                        .await;
                }
                self.retry(
                    &message,
                    &meta,
                    &mut held,
                    &policy,
                    delivered,
                    error,
                    Duration::ZERO,
                )
                .await;
            }
            Err(StageError::Fail(error)) => {
                tracing::warn!(job = %meta.job, error = %error.message, "task failed");
                self.fail_fatally(&message, &meta, &claim, delivered, error)
                    .await;
            }
            Err(StageError::Cancelled) => self.settle(&message, AckKind::Term).await,
            Err(StageError::Interrupted) => {
                self.release(&mut held).await;
                self.settle(&message, AckKind::Nak(None)).await
            }
        }
    }

    /// Applies the retry policy to a transient failure.
    #[allow(clippy::too_many_arguments)]
    async fn retry(
        &self,
        message: &jetstream::Message,
        meta: &TaskMeta,
        held: &mut Held,
        policy: &Policy,
        delivered: u32,
        mut error: JobError,
        hint: Duration,
    ) {
        match policy.decide(&error, delivered, hint) {
            Decision::Retry(delay) => {
                tracing::warn!(job = %meta.job, delivered, ?delay, error = %error.message, "retrying task");
                telemetry::metrics()
                    .task_retried(self.config.stage.name(), &kind_label(error.kind()));
                self.release(held).await;
                self.settle(message, AckKind::Nak(Some(delay))).await;
            }
            Decision::Fail => {
                tracing::warn!(job = %meta.job, error = %error.message, "task failed with a non-retryable error");
                error.retryable = false;
                self.fail_fatally(message, meta, &held.claim, delivered, error)
                    .await;
            }
            Decision::GiveUp => {
                error.message = format!("gave up after {delivered} deliveries: {}", error.message);
                error.retryable = false;
                self.fail_fatally(message, meta, &held.claim, delivered, error)
                    .await;
            }
        }
    }

    /// Ends a task that failed for good: one dead letter (the reason and
    /// kind), then the failed result, then TERM.
    async fn fail_fatally(
        &self,
        message: &jetstream::Message,
        meta: &TaskMeta,
        claim: &TaskClaim,
        delivered: u32,
        error: JobError,
    ) {
        self.dead_letter(message, Some(meta), &error.message, error.kind(), delivered)
            .await;
        self.publish_failure(meta, Some(claim), error).await;
        self.settle(message, AckKind::Term).await;
    }

    /// Reports lighter training settings to the coordinator, which records
    /// them in the job record; the next delivery reads them there
    /// ([`StageTask::adjust`]). Published (and stored) before the NAK.
    async fn report_adjustment(
        &self,
        meta: &TaskMeta,
        claim: &TaskClaim,
        delivered: u32,
        training: v1::TrainingSettings,
        note: &str,
    ) {
        let stage = self.config.stage;
        let result = StageResult {
            job_id: meta.job.to_string(),
            tenant: meta.tenant.to_string(),
            stage: stage as i32,
            attempt: meta.attempt.0,
            worker_id: self.config.worker_id.clone(),
            outcome: Some(Outcome::Adjusted(v1::TrainingAdjusted {
                training: Some(Box::new(training)),
                note: note.to_string(),
                delivered,
            })),
            claim: Some(claim.clone()),
        };
        let id = format!(
            "{}.adjusted.{delivered}",
            topology::task_msg_id(&meta.tenant, &meta.job, stage, meta.attempt)
        );
        if let Err(error) = crate::nats::publish_durable(
            &self.topo.js,
            subject::result(stage),
            &id,
            None,
            result.encode_to_vec().into(),
        )
        .await
        {
            // The next delivery runs with the settings it had.
            tracing::warn!(job = %meta.job, %error, %note, "could not report lighter settings");
        }
    }

    /// Runs the handler; every ack_wait/3 renews the claim's lease and then
    /// sends an in-progress ack. When the claim is lost (taken over, or the
    /// lease ran out without a renewal getting through) it cancels the
    /// handler, waits for it to stop and returns `None`.
    async fn with_heartbeat<F: Future<Output = Result<Outcome, StageError>>>(
        &self,
        message: &jetstream::Message,
        held: &mut Held,
        cancel: &CancellationToken,
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
                }
            }
        }
    }

    /// Renews the lease; false once the claim is someone else's, or its
    /// lease ran out by this runtime's clock without a renewal getting through.
    async fn still_held(&self, held: &mut Held) -> bool {
        match self.claims.renew(held).await {
            Renew::Renewed => true,
            Renew::Lost => false,
            Renew::Unavailable(error) => {
                tracing::warn!(%error, "cannot renew claim");
                !held.expired(crate::now_ms())
            }
        }
    }

    async fn release(&self, held: &mut Held) {
        if let Renew::Unavailable(error) = self.claims.release(held).await {
            tracing::debug!(%error, "could not release claim; its lease runs out by itself");
        }
    }

    async fn current(&self, meta: &TaskMeta) -> Current {
        let key = topology::job_key(&meta.tenant, &meta.job);
        let entry = match self.topo.jobs.entry(key).await {
            Ok(Some(entry)) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                entry.value
            }
            Ok(_) => return Current::Skip("no job record"),
            Err(error) => {
                tracing::warn!(%error, "cannot read job record");
                return Current::Unknown;
            }
        };
        let Ok(record) = JobRecord::decode(entry) else {
            return Current::Skip("job record unreadable");
        };
        let state = record.state();
        if state.is_final() {
            return Current::Skip("job already finished");
        }
        if record.stage() != self.config.stage || record.attempt != meta.attempt.0 {
            return Current::Skip("stale attempt");
        }
        Current::Run(Box::new(record))
    }

    async fn publish_result(
        &self,
        meta: &TaskMeta,
        claim: Option<&TaskClaim>,
        outcome: Outcome,
    ) -> bool {
        let stage = self.config.stage;
        let result = StageResult {
            job_id: meta.job.to_string(),
            tenant: meta.tenant.to_string(),
            stage: stage as i32,
            attempt: meta.attempt.0,
            worker_id: self.config.worker_id.clone(),
            claim: claim.cloned(),
            outcome: Some(outcome),
        };
        let token = claim.map(|c| c.token.as_str()).unwrap_or_default();
        let id = topology::result_msg_id(&meta.tenant, &meta.job, stage, meta.attempt, token);
        match crate::nats::publish_durable(
            &self.topo.js,
            subject::result(stage),
            &id,
            None,
            result.encode_to_vec().into(),
        )
        .await
        {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(job = %meta.job, %error, "could not publish stage result");
                false
            }
        }
    }

    async fn publish_started(&self, meta: &TaskMeta, claim: &TaskClaim, delivered: u32) {
        let result = StageResult {
            job_id: meta.job.to_string(),
            tenant: meta.tenant.to_string(),
            stage: self.config.stage as i32,
            attempt: meta.attempt.0,
            worker_id: self.config.worker_id.clone(),
            claim: Some(claim.clone()),
            outcome: Some(Outcome::Started(v1::StageStarted { delivered })),
        };
        let id = format!(
            "{}.started",
            topology::task_msg_id(&meta.tenant, &meta.job, self.config.stage, meta.attempt)
        );
        if let Err(error) = crate::nats::publish_durable(
            &self.topo.js,
            subject::result(self.config.stage),
            &id,
            None,
            result.encode_to_vec().into(),
        )
        .await
        {
            tracing::warn!(job = %meta.job, %error, "could not report task start");
        }
    }

    async fn publish_failure(
        &self,
        meta: &TaskMeta,
        claim: Option<&TaskClaim>,
        mut error: JobError,
    ) {
        error.stage = self.config.stage as i32;
        self.publish_result(meta, claim, Outcome::Failed(error))
            .await;
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        meta: Option<&TaskMeta>,
        reason: &str,
        kind: ErrorKind,
        delivered: u32,
    ) {
        let stage = self.config.stage;
        let letter = DeadLetter {
            kind: kind as i32,
            stage: stage as i32,
            subject: message.subject.to_string(),
            reason: reason.to_string(),
            // Secrets never outlive their job in the dead-letter stream.
            payload: (self.redact)(&message.payload),
            deliveries: delivered as u64,
            job_id: meta.map(|m| m.job.to_string()).unwrap_or_default(),
            tenant: meta.map(|m| m.tenant.to_string()).unwrap_or_default(),
            at_ms: crate::now_ms(),
        };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let id = format!("dlq.{}.{seq}", stage.name());
        telemetry::metrics().dead_lettered(stage.name(), &kind_label(kind));
        if let Err(error) = crate::nats::publish_durable(
            &self.topo.js,
            subject::dlq(stage),
            &id,
            None,
            letter.encode_to_vec().into(),
        )
        .await
        {
            tracing::error!(%error, "could not write dead letter");
        }
    }

    async fn settle(&self, message: &jetstream::Message, kind: AckKind) {
        let result = match kind {
            AckKind::Ack => message.double_ack().await,
            other => message.ack_with(other).await,
        };
        if let Err(error) = result {
            tracing::warn!(%error, "could not settle task message");
        }
    }
}

/// Holding a task while the stores it needs cannot be read: waits with a
/// growing pause (0.5 s doubling to 4 s) and keeps the message with an
/// in-progress ack at least every `ack_wait/3`, for at most [`Waiting::CAP`]
/// ack waits (a lasting fault then hands the task back, which spends a
/// delivery).
struct Waiting {
    pause: Duration,
    ack_every: Duration,
    last_ack: tokio::time::Instant,
    give_up: tokio::time::Instant,
}

impl Waiting {
    /// How long one task is held at most, in ack waits.
    const CAP: u32 = 10;

    fn new(ack_wait: Duration) -> Self {
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
    async fn pause(&mut self, message: &jetstream::Message, stop: &CancellationToken) -> bool {
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

/// The label of an error kind in metrics: `ERROR_KIND_OOM` → `oom`.
fn kind_label(kind: ErrorKind) -> String {
    kind.as_str_name()
        .trim_start_matches("ERROR_KIND_")
        .to_ascii_lowercase()
}

/// How this runtime's task slots are used, for the busy and idle seconds
/// counters: accounted every few seconds (and at the end), so a long task
/// shows as busy while it runs, not only once it ends.
struct SlotUsage {
    stage: &'static str,
    pool: String,
    slots: usize,
    running: std::sync::atomic::AtomicUsize,
}

/// A running task; dropping it frees the slot.
struct Running<'a>(&'a SlotUsage);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        telemetry::metrics().running_changed(self.0.stage, &self.0.pool, -1);
    }
}

impl SlotUsage {
    const PERIOD: Duration = Duration::from_secs(5);

    fn new(config: &RunnerConfig) -> Self {
        Self {
            stage: config.stage.name(),
            pool: config.pool.clone(),
            slots: config.concurrency.max(1),
            running: Default::default(),
        }
    }

    fn start(&self) -> Running<'_> {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        telemetry::metrics().running_changed(self.stage, &self.pool, 1);
        Running(self)
    }

    /// Adds busy and idle slot-seconds until `stop`, then once more.
    async fn account(self: Arc<Self>, stop: CancellationToken) {
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

enum Current {
    Run(Box<JobRecord>),
    Skip(&'static str),
    Unknown,
}
