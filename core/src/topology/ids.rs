//! The `Nats-Msg-Id`s the streams deduplicate on, and the schedule time
//! format: one per task, retry, result, state event and dead letter, each
//! naming its job (and its stage and attempt where it has them).

use super::*;

/// The `Nats-Msg-Id` of a task: one per job, stage and attempt, so a
/// republished task within the dedup window is dropped by the server.
pub fn task_msg_id(tenant: &TenantId, job: &JobId, stage: Stage, attempt: Attempt) -> String {
    format!("{tenant}.{job}.{}.{attempt}", stage.name())
}

/// The `Nats-Msg-Id` of a task's retry schedule after delivery `delivered`
/// (counted across messages) failed: the same delivery's retry published
/// twice is stored once.
pub fn retry_msg_id(
    tenant: &TenantId,
    job: &JobId,
    stage: Stage,
    attempt: Attempt,
    delivered: u32,
) -> String {
    format!(
        "{}.retry.{delivered}",
        task_msg_id(tenant, job, stage, attempt)
    )
}

/// The [`SCHEDULE_HEADER`] value of a message due at `due_ms` (Unix ms).
pub fn schedule_at(due_ms: i64) -> String {
    format!("@at {}", crate::rfc3339(due_ms))
}

/// The `Nats-Msg-Id` of a job's state event for `state`: a job reaches
/// each state once, so the coordinator and the reconciler announcing the
/// same state (a final state whose first publish went unacknowledged) store
/// it once within the events stream's dedup window.
pub fn state_event_msg_id(tenant: &TenantId, job: &JobId, state: JobState) -> String {
    format!("{tenant}.{job}.state.{}", state.as_str_name())
}

/// The `Nats-Msg-Id` of a stage result for one attempt under one claim
/// (`claim_token` empty when no claim was taken). The token is part of it:
/// a fenced result must not hide, by dedup, the result of the claim that
/// took the task over.
pub fn result_msg_id(
    tenant: &TenantId,
    job: &JobId,
    stage: Stage,
    attempt: Attempt,
    claim_token: &str,
) -> String {
    let task = task_msg_id(tenant, job, stage, attempt);
    if claim_token.is_empty() {
        format!("{task}.result")
    } else {
        format!("{task}.result.{claim_token}")
    }
}

/// The `Nats-Msg-Id` of the `StageStarted` result a runtime reports when it
/// first runs a task: one per job, stage and attempt.
pub fn started_msg_id(tenant: &TenantId, job: &JobId, stage: Stage, attempt: Attempt) -> String {
    format!("{}.started", task_msg_id(tenant, job, stage, attempt))
}

/// The `Nats-Msg-Id` of the report a handler sends with a retry (the
/// training stage's lighter settings after an OOM), one per delivery: a
/// redelivery reporting again is a new message, the same delivery's
/// report twice is one. The `adjusted` token is kept from when the only
/// such report was a `TrainingAdjusted`, so dedup across versions holds.
pub fn retry_report_msg_id(
    tenant: &TenantId,
    job: &JobId,
    stage: Stage,
    attempt: Attempt,
    delivered: u32,
) -> String {
    format!(
        "{}.adjusted.{delivered}",
        task_msg_id(tenant, job, stage, attempt)
    )
}

/// The `Nats-Msg-Id` of a dead letter: the task message's stream sequence,
/// so a redelivery of the same message cannot add a second letter.
pub fn dead_letter_msg_id(stage: Stage, stream_sequence: u64) -> String {
    format!("dlq.{}.{stream_sequence}", stage.name())
}

/// Reads tenant, job, stage and attempt back from a task's `Nats-Msg-Id`,
/// so even an undecodable task can be traced to its job.
pub fn parse_task_msg_id(id: &str) -> Option<(TenantId, JobId, Stage, Attempt)> {
    let mut parts = id.split('.');
    let tenant = TenantId::parse(parts.next()?).ok()?;
    let job = JobId::parse(parts.next()?).ok()?;
    let stage = Stage::from_name(parts.next()?)?;
    let attempt = Attempt(parts.next()?.parse().ok()?);
    parts
        .next()
        .is_none()
        .then_some((tenant, job, stage, attempt))
}
