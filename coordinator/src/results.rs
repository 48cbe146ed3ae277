//! Applies stage results to job records. Each result is applied with a
//! compare-and-set through the pure state machine, then its effects run,
//! then it is acked. A result that changes nothing (duplicate, stale, late)
//! is acked too; if its job is still running, the current task is published
//! again under its dedup id, which repairs a crash between the record write
//! and the task publish.
//!
//! Fencing: a result counts only while the claim it carries is the live one
//! in `ty_claims` ([`trainyard_core::claim::admits`]); a zombie's late
//! result, or a duplicate run under an older claim, is acked and dropped.
//!
//! Each result is handled inside a process span (`process ty.result.<stage>`),
//! a child of the context its headers carry, so the task or event its
//! effects publish continues the job's trace.

use crate::effects::Effects;
use crate::job::{self, Decision, Event};
use crate::repo::{JobRepo, RepoError};
use async_nats::jetstream::{AckKind, consumer::PullConsumer, kv};
use futures::StreamExt;
use prost::Message;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use trainyard_core::claim::{self, Claims};
use trainyard_core::telemetry::propagation::{self, JobAttrs};
use trainyard_core::topology::subject;
use trainyard_proto::v1::{StageResult, stage_result::Outcome};
use trainyard_proto::{Attempt, JobId, TenantId};

pub async fn run(
    consumer: PullConsumer,
    repo: JobRepo,
    claims: kv::Store,
    effects: Effects,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = messages.next() => match message {
                Some(Ok(m)) => m,
                Some(Err(error)) => {
                    tracing::warn!(%error, "result stream error");
                    continue;
                }
                None => break,
            },
        };
        let ack = match StageResult::decode(message.payload.clone()) {
            Ok(result) => {
                // A child of the result's publish: the next task the
                // effects publish stays in the job's trace.
                let span = propagation::process_span(
                    message.headers.as_ref(),
                    &subject::result(result.stage()),
                    JobAttrs {
                        job_id: Some(&result.job_id),
                        tenant: Some(&result.tenant),
                        stage: Some(result.stage().name()),
                        attempt: Some(result.attempt),
                    },
                );
                apply(&repo, &claims, &effects, result)
                    .instrument(span)
                    .await
            }
            Err(error) => {
                tracing::error!(%error, "undecodable stage result dropped");
                AckKind::Term
            }
        };
        if let Err(error) = message.ack_with(ack).await {
            tracing::warn!(%error, "could not ack stage result");
        }
    }
    Ok(())
}

async fn apply(
    repo: &JobRepo,
    claims: &kv::Store,
    effects: &Effects,
    result: StageResult,
) -> AckKind {
    let (Ok(tenant), Ok(job)) = (
        TenantId::parse(&result.tenant),
        JobId::parse(&result.job_id),
    ) else {
        tracing::error!(job = %result.job_id, "stage result with bad ids dropped");
        return AckKind::Term;
    };
    let stored = match Claims::stored(claims, &tenant, &job, result.stage()).await {
        Ok(stored) => stored,
        Err(error) => {
            tracing::warn!(%job, %error, "cannot read the task's claim");
            return AckKind::Nak(Some(Duration::from_secs(2)));
        }
    };
    let now = trainyard_core::now_ms();
    let attempt = Attempt(result.attempt);
    if let Err(why) = claim::admits(result.claim.as_ref(), attempt, stored.as_ref(), now) {
        tracing::warn!(
            %job,
            %attempt,
            worker = %result.worker_id,
            token = result.claim.as_ref().map(|c| c.token.as_str()).unwrap_or_default(),
            live = stored.as_ref().map(|c| c.token.as_str()).unwrap_or_default(),
            %why,
            "fenced result dropped"
        );
        return AckKind::Ack;
    }
    // Neither a start nor an adjustment means the task is missing.
    let started = matches!(
        result.outcome,
        Some(Outcome::Started(_) | Outcome::Adjusted(_))
    );
    let event = Event::Result(Box::new(result));
    let outcome = repo
        .update(&tenant, &job, |record| {
            let decision = job::transition(&record, &event, now);
            let tenant = tenant.clone();
            async move {
                match decision {
                    Decision::Apply(mut next, mut todo) => {
                        if next.stage != record.stage {
                            hold_if_full(repo, effects, &tenant, &mut next, &mut todo).await;
                        }
                        (Some(*next), (todo, None))
                    }
                    Decision::Ignore(why) => (None, (Vec::new(), Some((why, record)))),
                }
            }
        })
        .await;
    match outcome {
        Ok((Some(record), (todo, _))) => {
            tracing::info!(%job, state = ?record.state(), stage = ?record.stage(), "job advanced");
            match effects.run(&record, todo).await {
                Ok(()) => AckKind::Ack,
                // The record moved; the redelivered result is ignored and republishes the task.
                Err(error) => {
                    tracing::warn!(%job, %error, "effects failed; will retry");
                    AckKind::Nak(Some(Duration::from_secs(2)))
                }
            }
        }
        Ok((None, (_, ignored))) => {
            if let Some((why, record)) = ignored {
                tracing::debug!(%job, why, "result ignored");
                if !started
                    && let Some(task) = job::current_task(&record)
                    && let Err(error) = effects.publish_task(&tenant, &job, task).await
                {
                    tracing::warn!(%job, %error, "could not republish current task");
                    return AckKind::Nak(Some(Duration::from_secs(2)));
                }
            }
            AckKind::Ack
        }
        Err(RepoError::NotFound(_)) | Err(RepoError::Corrupt(_)) => {
            tracing::warn!(%job, "result for an unknown job dropped");
            AckKind::Term
        }
        Err(error) => {
            tracing::warn!(%job, %error, "cannot apply result now");
            AckKind::Nak(Some(Duration::from_secs(2)))
        }
    }
}

/// Holds a job that a result moved into a new stage when its tenant has
/// that stage's quota of tasks out ([`crate::quota::hold_at_stage`]). The
/// tenant's records are read only when the stage has a limit; when they
/// cannot be read the job goes on unheld (quotas are soft, as across
/// coordinator replicas).
pub(crate) async fn hold_if_full(
    repo: &JobRepo,
    effects: &Effects,
    tenant: &TenantId,
    next: &mut trainyard_proto::v1::JobRecord,
    todo: &mut Vec<job::Effect>,
) {
    let quota = effects.quotas.for_tenant(tenant.as_str());
    let limited = crate::quota::slot_of(next)
        .and_then(|slot| quota.max_running_tasks.limit(&slot))
        .is_some();
    if !limited || next.state().is_final() {
        return;
    }
    match repo.of_tenant(tenant).await {
        Ok(records) => {
            if crate::quota::hold_at_stage(&records, &quota, next, todo) {
                tracing::info!(job = %next.job_id, %tenant, hold = %next.quota_hold, "job held at its stage");
            }
        }
        Err(error) => {
            tracing::warn!(job = %next.job_id, %error, "cannot read the tenant's jobs; stage quota not applied")
        }
    }
}
