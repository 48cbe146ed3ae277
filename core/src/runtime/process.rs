//! One task message from pull to settle: reads what [`super::admit`] and
//! [`super::plan`] decide on (the job record, the claim, the handler's
//! result) and hands their plans to the executor. The decisions are not
//! made here.

use super::admit::{self, Admit, RecordRead, Stop};
use super::plan::{self, Ended, Plan};
use super::stage::{StageError, StageHandler, StageTask, TaskContext, TaskMeta};
use super::waiting::Waiting;
use super::{Shared, execute::Target};
use crate::claim::Held;
use crate::events::EventSink;
use crate::retry::Policy;
use crate::telemetry::{self, propagation};
use crate::topology;
use async_nats::jetstream;
use prost::Message as _;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use trainyard_proto::v1::JobRecord;

/// A task admitted to run: its job record read, its claim taken.
struct Admitted<T> {
    task: T,
    meta: TaskMeta,
    record: Arc<JobRecord>,
    held: Held,
    policy: Policy,
}

impl Shared {
    /// Handles one task message inside its process span: a child of the
    /// context the task's headers carry, so every attempt of a stage (a
    /// retry, a redelivery after a lost worker) is a new span in the job's
    /// trace, with the delivery number as `trainyard.attempt`.
    pub(super) async fn process<H: StageHandler>(
        &self,
        message: jetstream::Message,
        handler: &H,
        stop: CancellationToken,
    ) {
        let stage = self.config.stage;
        let info = message.info().ok();
        let headers = message.headers.as_ref();
        // A task republished for its retry carries the deliveries it had
        // before this message: the count goes on across messages.
        let before = headers
            .and_then(|h| h.get(topology::DELIVERED_HEADER))
            .and_then(|n| n.as_str().parse::<u32>().ok())
            .unwrap_or(0);
        let delivered = info
            .as_ref()
            .map(|i| i.delivered.max(1) as u32)
            .unwrap_or(1)
            .saturating_add(before);
        let header_meta = headers
            .and_then(|h| {
                h.get("Nats-Msg-Id")
                    .or_else(|| h.get(topology::TASK_ID_HEADER))
            })
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
        let target = Target {
            message: &message,
            meta: header_meta.as_ref(),
            delivered,
        };
        self.process_task(target, handler, stop)
            .instrument(span)
            .await
    }

    async fn process_task<H: StageHandler>(
        &self,
        target: Target<'_>,
        handler: &H,
        stop: CancellationToken,
    ) {
        let stage = self.config.stage;
        let (task, meta) = match admit::task::<H::Task>(&target.message.payload, target.meta, stage)
        {
            Ok(ok) => ok,
            Err(stopped) => return self.stopped(stopped, &target).await,
        };
        if target.meta.is_none() {
            propagation::record_job(
                &tracing::Span::current(),
                propagation::JobAttrs {
                    job_id: Some(meta.job.as_str()),
                    tenant: Some(meta.tenant.as_str()),
                    ..Default::default()
                },
            );
        }
        let target = Target {
            meta: Some(&meta),
            ..target
        };
        let policy = Policy::resolve(
            &self.config.retry,
            task.retry_policy(),
            stage,
            self.config.nats.max_deliver,
        );
        let Some((record, held)) = self.admit(&target, &meta, policy.max_attempts, &stop).await
        else {
            return;
        };
        let admitted = Admitted {
            task,
            meta: meta.clone(),
            record,
            held,
            policy,
        };
        self.run(&target, handler, admitted, stop).await
    }

    /// Reads the job record and takes the claim. While either store cannot
    /// be read, keeps the message (in-progress acks) and tries again rather
    /// than handing it back (see [`Waiting`]). `None` once the message is
    /// settled.
    async fn admit(
        &self,
        target: &Target<'_>,
        meta: &TaskMeta,
        max_attempts: u32,
        stop: &CancellationToken,
    ) -> Option<(Arc<JobRecord>, Held)> {
        let mut waiting = Waiting::new(self.config.nats.ack_wait());
        loop {
            let stopped = match self.try_admit(meta, target.delivered, max_attempts).await {
                Ok(admitted) => return Some(admitted),
                Err(stopped) => stopped,
            };
            if let Stop::Hold { store, error } = &stopped {
                tracing::warn!(job = %meta.job, store, %error, "store unreadable; holding the task");
                if waiting.pause(target.message, stop).await {
                    continue;
                }
            }
            self.stopped(stopped, target).await;
            return None;
        }
    }

    async fn try_admit(
        &self,
        meta: &TaskMeta,
        delivered: u32,
        max_attempts: u32,
    ) -> Admit<(Arc<JobRecord>, Held)> {
        let stage = self.config.stage;
        let read = self.read_record(meta).await;
        let record = admit::record(read, meta, stage, delivered, max_attempts)?;
        let acquire = self
            .claims
            .acquire(
                &meta.tenant,
                &meta.job,
                stage,
                meta.attempt,
                &self.config.worker_id,
            )
            .await;
        let held = admit::claim(acquire)?;
        Ok((record, held))
    }

    /// Ends admission: the plan it settled on, or (a hold past its cap)
    /// hands the message back.
    async fn stopped(&self, stopped: Stop, target: &Target<'_>) {
        let plan = match stopped {
            Stop::Settle(plan) => *plan,
            Stop::Hold { .. } => Plan::held_too_long(),
        };
        self.execute(plan, target, None).await
    }

    /// Why the task must stop, by its job record read now; `None` to go on
    /// (also when the record cannot be read: the message path and the next
    /// heartbeat remain).
    pub(super) async fn stop_reason(&self, meta: &TaskMeta) -> Option<&'static str> {
        let RecordRead::Found(bytes) = self.read_record(meta).await else {
            return None;
        };
        let record = JobRecord::decode(bytes).ok()?;
        super::control::stop_reason(&record, crate::now_ms())
    }

    async fn read_record(&self, meta: &TaskMeta) -> RecordRead {
        let key = topology::job_key(&meta.tenant, &meta.job);
        match self.topo.jobs.entry(key).await {
            Ok(Some(entry)) if entry.operation == jetstream::kv::Operation::Put => {
                RecordRead::Found(entry.value)
            }
            Ok(_) => RecordRead::Missing,
            Err(error) => RecordRead::Unavailable(error.to_string()),
        }
    }

    /// Runs an admitted task's handler under its claim, then carries out
    /// the plan for how it ended.
    async fn run<H: StageHandler>(
        &self,
        target: &Target<'_>,
        handler: &H,
        admitted: Admitted<H::Task>,
        stop: CancellationToken,
    ) {
        let stage = self.config.stage;
        let Admitted {
            task,
            meta,
            record,
            mut held,
            policy,
        } = admitted;
        self.started(&meta, &held, target.delivered).await;
        let cancel = CancellationToken::new();
        self.inflight
            .lock()
            .expect("inflight lock")
            .insert(meta.job.clone(), cancel.clone());
        let ctx = TaskContext {
            meta: meta.clone(),
            stage,
            delivered: target.delivered,
            worker_id: self.config.worker_id.clone(),
            record,
            events: EventSink::new(self.topo.js.clone(), meta.tenant.clone(), meta.job.clone()),
            cancel: cancel.clone(),
            stop,
            log_bytes: held.log_bytes.clone(),
        };
        let started = std::time::Instant::now();
        let running = self.usage.start(meta.job.as_str());
        // A cancel sent before the token was registered is in the record.
        let result = match self.stop_reason(&meta).await {
            Some(why) => {
                tracing::info!(job = %meta.job, why, "task stopped before it ran");
                cancel.cancel();
                Some(Err(StageError::Cancelled))
            }
            None => {
                self.with_heartbeat(
                    target.message,
                    &mut held,
                    &cancel,
                    &meta,
                    handler.handle(task, ctx),
                )
                .await
            }
        };
        drop(running);
        let took = started.elapsed();
        self.inflight
            .lock()
            .expect("inflight lock")
            .remove(&meta.job);
        let still_held = match &result {
            Some(result) if plan::checks_claim(result) => self.still_held(&mut held).await,
            _ => true,
        };
        let ended = Ended {
            result,
            cancelled: cancel.is_cancelled(),
            still_held,
            delivered: target.delivered,
        };
        let plan = plan::plan(ended, &policy, stage, &held.claim);
        if let Some(outcome) = plan.finished {
            telemetry::metrics().stage_finished(stage.name(), &self.config.pool, outcome, took);
        }
        self.execute(plan, target, Some(&mut held)).await
    }

    /// Reports the first delivery's start; counts a later one as a
    /// redelivery: handed back (a retry, a stopping service) or taken over
    /// from a holder whose lease ran out (a lost worker).
    async fn started(&self, meta: &TaskMeta, held: &Held, delivered: u32) {
        if delivered == 1 {
            self.publish_started(meta, &held.claim, delivered).await;
        } else {
            let reason = if held.took_over {
                "worker_lost"
            } else {
                "handed_back"
            };
            telemetry::metrics().task_redelivered(self.config.stage.name(), reason);
        }
    }
}
