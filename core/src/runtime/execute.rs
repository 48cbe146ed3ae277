//! The one place a [`Plan`] turns into I/O: the dead letter, the stage
//! result, the claim's release and the message's settle, in that order.
//! Nothing is decided here beyond what a plan leaves to the outcome of its
//! own steps (a required report not stored, a claim lost at the last check).

use super::Shared;
use super::plan::{Letter, Plan, Report, ReportId, Settle, Why};
use super::stage::TaskMeta;
use crate::claim::{Held, Renew};
use crate::telemetry;
use crate::topology::{self, subject};
use async_nats::jetstream::{self, AckKind};
use prost::Message as _;
use trainyard_proto::v1::{
    self, DeadLetter, ErrorKind, StageResult, TaskClaim, stage_result::Outcome,
};

/// The message a plan is for, and what is known of its task.
#[derive(Clone, Copy)]
pub(super) struct Target<'a> {
    pub message: &'a jetstream::Message,
    /// The task's ids: from the decoded task, or (an undecodable one) from
    /// its `Nats-Msg-Id`; `None` when neither has them.
    pub meta: Option<&'a TaskMeta>,
    /// Deliveries of the message so far, from 1.
    pub delivered: u32,
}

impl Shared {
    /// Carries out `plan` for `target`; `held` is the claim, once taken.
    pub(super) async fn execute(
        &self,
        mut plan: Plan,
        target: &Target<'_>,
        mut held: Option<&mut Held>,
    ) {
        self.log(&plan, target);
        if let Some(letter) = plan.dead_letter.take() {
            self.dead_letter(target, &letter).await;
        }
        if let Some(report) = plan.report.take() {
            let published = match target.meta {
                Some(meta) => self.publish_report(meta, &report).await,
                None => false,
            };
            if !published && report.required {
                plan = plan.unreported();
            }
        }
        if plan.release
            && let Some(held) = held.as_deref_mut()
        {
            self.release(held).await;
        }
        let settle = match (plan.settle, held) {
            (Settle::Ack, Some(held)) => {
                let settle = Settle::Ack.fenced(self.still_held(held).await);
                if settle == Settle::Leave {
                    tracing::warn!("claim lost after reporting; message left to its holder");
                }
                settle
            }
            (settle, _) => settle,
        };
        self.settle(target, settle).await;
    }

    /// What a plan's reason says in logs and metrics.
    fn log(&self, plan: &Plan, target: &Target<'_>) {
        let stage = self.config.stage.name();
        let job = target.meta.map(|m| m.job.as_str()).unwrap_or_default();
        let reason = plan.dead_letter.as_ref().map(|l| l.reason.as_str());
        match &plan.why {
            Why::Poison => tracing::error!(stage, reason, "poison task"),
            Why::OutOfDeliveries => tracing::error!(job, reason, "task ran out of deliveries"),
            Why::Dropped(why) => tracing::info!(job, why, "dropping task"),
            Why::Busy => {
                tracing::info!(job, settle = ?plan.settle, "task claimed by a live runtime; retrying later")
            }
            Why::Retry {
                kind,
                delay,
                message,
            } => {
                tracing::warn!(job, delivered = target.delivered, ?delay, error = %message, "retrying task");
                telemetry::metrics().task_retried(stage, &kind_label(*kind));
            }
            Why::Failed => tracing::warn!(job, error = reason, "task failed"),
            Why::Fatal => {
                tracing::warn!(
                    job,
                    error = reason,
                    "task failed with a non-retryable error"
                )
            }
            Why::GaveUp => tracing::warn!(job, error = reason, "task out of attempts"),
            Why::ClaimLost(when) => tracing::warn!(job, when, "claim lost; result dropped"),
            Why::HeldTooLong | Why::Done | Why::Cancelled | Why::Interrupted => {}
        }
    }

    async fn release(&self, held: &mut Held) {
        if let Renew::Unavailable(error) = self.claims.release(held).await {
            tracing::debug!(%error, "could not release claim; its lease runs out by itself");
        }
    }

    async fn settle(&self, target: &Target<'_>, settle: Settle) {
        let message = target.message;
        let result = match settle {
            Settle::Ack => message.double_ack().await,
            Settle::Nak(delay) => message.ack_with(AckKind::Nak(delay)).await,
            Settle::Defer(delay) => {
                if self.defer(target, delay).await {
                    message.double_ack().await
                } else {
                    message.ack_with(AckKind::Nak(Some(delay))).await
                }
            }
            Settle::Term => message.ack_with(AckKind::Term).await,
            Settle::Leave => return,
        };
        if let Err(error) = result {
            tracing::warn!(%error, "could not settle task message");
        }
    }

    /// Republishes the task as a schedule due after `delay` (see
    /// [`topology::subject::retry`]), carrying the task's id and the
    /// deliveries so far. False when it could not be stored: the caller
    /// falls back to a NAK with the delay.
    async fn defer(&self, target: &Target<'_>, delay: std::time::Duration) -> bool {
        let Some(meta) = target.meta else {
            return false;
        };
        let (tenant, job, stage, attempt) =
            (&meta.tenant, &meta.job, self.config.stage, meta.attempt);
        let due_ms = crate::now_ms().saturating_add(delay.as_millis() as i64);
        let mut headers = async_nats::HeaderMap::new();
        let task_id = topology::task_msg_id(tenant, job, stage, attempt);
        headers.insert(topology::TASK_ID_HEADER, task_id.as_str());
        headers.insert(
            topology::DELIVERED_HEADER,
            target.delivered.to_string().as_str(),
        );
        headers.insert(
            topology::SCHEDULE_HEADER,
            topology::schedule_at(due_ms).as_str(),
        );
        headers.insert(
            topology::SCHEDULE_TARGET_HEADER,
            target.message.subject.as_str(),
        );
        let id = topology::retry_msg_id(tenant, job, stage, attempt, target.delivered);
        match crate::nats::publish_durable(
            &self.topo.js,
            subject::retry(tenant, job, stage),
            &id,
            Some(headers),
            target.message.payload.clone(),
        )
        .await
        {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%job, %error, "could not schedule the retry; holding the task instead");
                false
            }
        }
    }

    /// The stage result of this runtime for `meta`'s task.
    fn stage_result(
        &self,
        meta: &TaskMeta,
        claim: Option<&TaskClaim>,
        outcome: Outcome,
    ) -> StageResult {
        StageResult {
            job_id: meta.job.to_string(),
            tenant: meta.tenant.to_string(),
            stage: self.config.stage as i32,
            attempt: meta.attempt.0,
            worker_id: self.config.worker_id.clone(),
            claim: claim.cloned(),
            outcome: Some(outcome),
        }
    }

    /// Publishes a stage result under `id`.
    async fn publish(
        &self,
        id: &str,
        result: StageResult,
    ) -> Result<(), jetstream::context::PublishError> {
        crate::nats::publish_durable(
            &self.topo.js,
            subject::result(self.config.stage),
            id,
            None,
            result.encode_to_vec().into(),
        )
        .await
        .map(drop)
    }

    async fn publish_report(&self, meta: &TaskMeta, report: &Report) -> bool {
        let (tenant, job, stage, attempt) =
            (&meta.tenant, &meta.job, self.config.stage, meta.attempt);
        let id = match report.id {
            ReportId::Result => {
                let token = report.claim.as_ref().map(|c| c.token.as_str());
                topology::result_msg_id(tenant, job, stage, attempt, token.unwrap_or_default())
            }
            ReportId::Retry { delivered } => {
                topology::retry_report_msg_id(tenant, job, stage, attempt, delivered)
            }
        };
        let result = self.stage_result(meta, report.claim.as_ref(), report.outcome.clone());
        let mut published = self.publish(&id, result).await;
        if let Err(error) = &published
            && error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
            && !matches!(report.outcome, Outcome::Failed(_))
        {
            // The result will never fit: the job fails with the reason
            // rather than retrying a publish the server always refuses.
            tracing::error!(job = %meta.job, %error, "stage result larger than the server takes; reporting a failure");
            let failed = Outcome::Failed(oversized_result(stage, error));
            let result = self.stage_result(meta, report.claim.as_ref(), failed);
            published = self.publish(&id, result).await;
        }
        match published {
            Ok(()) => true,
            Err(error) if report.required => {
                tracing::error!(job = %meta.job, %error, "could not publish stage result");
                false
            }
            Err(error) => {
                tracing::warn!(job = %meta.job, %error, "could not publish stage result");
                false
            }
        }
    }

    /// Reports that this runtime started the task (first delivery only).
    pub(super) async fn publish_started(&self, meta: &TaskMeta, claim: &TaskClaim, delivered: u32) {
        let outcome = Outcome::Started(v1::StageStarted { delivered });
        let id = topology::started_msg_id(&meta.tenant, &meta.job, self.config.stage, meta.attempt);
        let result = self.stage_result(meta, Some(claim), outcome);
        if let Err(error) = self.publish(&id, result).await {
            tracing::warn!(job = %meta.job, %error, "could not report task start");
        }
    }

    /// Writes the task's one dead letter (its payload with the spec's
    /// secrets redacted), deduplicated by the message's stream sequence.
    async fn dead_letter(&self, target: &Target<'_>, letter: &Letter) {
        let (stage, message, meta) = (self.config.stage, target.message, target.meta);
        let dead = DeadLetter {
            kind: letter.kind as i32,
            stage: stage as i32,
            subject: message.subject.to_string(),
            reason: letter.reason.clone(),
            // Secrets never outlive their job in the dead-letter stream.
            payload: (self.redact)(&message.payload),
            deliveries: target.delivered as u64,
            job_id: meta.map(|m| m.job.to_string()).unwrap_or_default(),
            tenant: meta.map(|m| m.tenant.to_string()).unwrap_or_default(),
            at_ms: crate::now_ms(),
        };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let id = topology::dead_letter_msg_id(stage, seq);
        telemetry::metrics().dead_lettered(stage.name(), &kind_label(letter.kind));
        if let Err(error) = crate::nats::publish_durable(
            &self.topo.js,
            subject::dlq(stage),
            &id,
            None,
            dead.encode_to_vec().into(),
        )
        .await
        {
            tracing::error!(%error, "could not write dead letter");
        }
    }
}

/// The failure reported in place of a result the NATS server refuses as
/// larger than its `max_payload`.
fn oversized_result(stage: v1::Stage, error: &jetstream::context::PublishError) -> v1::JobError {
    v1::JobError {
        kind: ErrorKind::Internal as i32,
        message: format!(
            "the {} stage's result is larger than the NATS server carries: {error}",
            stage.name()
        ),
        retryable: false,
        stage: stage as i32,
    }
}

/// The label of an error kind in metrics: `ERROR_KIND_OOM` → `oom`.
fn kind_label(kind: ErrorKind) -> String {
    kind.as_str_name()
        .trim_start_matches("ERROR_KIND_")
        .to_ascii_lowercase()
}
