//! The reconciler, run on start-up and then periodically. Safe with several
//! coordinator replicas: every record write is a compare-and-set, and every
//! publish carries a dedup id.
//!
//! - Lost tasks: an unfinished job whose record is stale and whose task is
//!   neither in `TY_TASKS` (pending or being worked on) nor answered in
//!   `TY_RESULTS` gets its current task published again, under the same
//!   dedup id. If the stream drops that publish as a duplicate (the first
//!   copy was consumed inside the dedup window, yet nothing answered it), the
//!   attempt is raised by CAS and the new attempt's task, with a new id, is
//!   published: the old attempt's late results are then ignored.
//! - Deadlines: an unfinished job past `timeout_secs` from its submission
//!   fails with `DEADLINE_EXCEEDED`, and its running task is cancelled.
//! - TTLs: a finished job past `ttl_secs` from its end loses its artifacts
//!   (`jobs/<job>/`), its events, its idempotency key and then its record.
//!   A job that is not final is never removed.

use crate::effects::Effects;
use crate::job::{self, Effect};
use crate::repo::{JobRepo, RepoError};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, kv};
use std::collections::HashSet;
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_core::topology::{self, EVENTS_STREAM, RESULTS_STREAM, TASKS_STREAM, subject};
use trainyard_proto::v1::{ErrorKind, JobError, JobRecord, JobState, Stage};
use trainyard_proto::{Attempt, JobId, TenantId};

/// Message ids present in a stream right now (pending or unacked). Read
/// message by message with the stream's get API: a work-queue stream allows
/// no extra consumer overlapping the stages' consumers.
async fn ids_in(
    js: &jetstream::Context,
    stream: &str,
    subjects: &str,
) -> Result<HashSet<String>, async_nats::Error> {
    let mut stream = js.get_stream(stream).await?;
    let state = stream.info().await?.state.clone();
    let mut ids = HashSet::new();
    if state.messages == 0 {
        return Ok(ids);
    }
    let mut sequence = state.first_sequence;
    while sequence <= state.last_sequence {
        match stream
            .get_first_raw_message_by_subject(subjects, sequence)
            .await
        {
            Ok(message) => {
                if let Some(id) = message.headers.get("Nats-Msg-Id") {
                    ids.insert(id.as_str().to_string());
                }
                sequence = message.sequence + 1;
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ids)
}

/// One pass. Returns how many tasks were published again.
pub async fn reconcile(
    js: &jetstream::Context,
    repo: &JobRepo,
    effects: &Effects,
    stale_after_ms: i64,
) -> Result<usize, async_nats::Error> {
    let records = repo.unfinished().await?;
    if records.is_empty() {
        return Ok(0);
    }
    let tasks = ids_in(js, TASKS_STREAM, subject::all_tasks()).await?;
    let results = ids_in(js, RESULTS_STREAM, subject::all_results()).await?;
    let now = trainyard_core::now_ms();
    let mut republished = 0;
    for record in records {
        if now - record.updated_at_ms < stale_after_ms {
            continue;
        }
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            continue;
        };
        let stage: Stage = record.stage();
        let id = topology::task_msg_id(&tenant, &job, stage, Attempt(record.attempt));
        let answered = results.contains(&format!("{id}.result"));
        if tasks.contains(&id) || answered {
            continue;
        }
        let Some(task) = job::current_task(&record) else {
            continue;
        };
        tracing::warn!(%job, stage = stage.name(), "task not in flight; publishing it again");
        match effects.publish_task_acked(&tenant, &job, task).await {
            Ok(ack) if !ack.duplicate => republished += 1,
            Ok(_) => {
                // Consumed inside the dedup window yet unanswered: the same
                // id would be dropped again until the window ends.
                if next_attempt(repo, effects, &record, now).await {
                    republished += 1;
                }
            }
            Err(error) => tracing::warn!(%job, %error, "could not publish the task again"),
        }
    }
    Ok(republished)
}

/// The record with its current stage's attempt raised, if it is still at
/// `seen`'s stage and attempt and not final.
pub fn raised_attempt(current: &JobRecord, seen: &JobRecord, now_ms: i64) -> Option<JobRecord> {
    if current.state().is_final() || current.stage != seen.stage || current.attempt != seen.attempt
    {
        return None;
    }
    let mut next = current.clone();
    next.attempt += 1;
    next.updated_at_ms = now_ms;
    Some(next)
}

/// Raises the attempt by CAS and publishes the new attempt's task. Another
/// replica that raced us finds the record moved on and does nothing.
async fn next_attempt(repo: &JobRepo, effects: &Effects, seen: &JobRecord, now: i64) -> bool {
    let (Ok(tenant), Ok(job)) = (TenantId::parse(&seen.tenant), JobId::parse(&seen.job_id)) else {
        return false;
    };
    let raised = repo
        .update(&tenant, &job, |current| {
            let next = raised_attempt(&current, seen, now);
            async move { (next, ()) }
        })
        .await;
    let next = match raised {
        Ok((Some(next), ())) => next,
        Ok((None, ())) => return false,
        Err(error) => {
            tracing::warn!(%job, %error, "could not raise the attempt of a lost task");
            return false;
        }
    };
    tracing::warn!(%job, attempt = next.attempt, "lost task deduplicated; publishing the next attempt");
    let Some(task) = job::current_task(&next) else {
        return false;
    };
    match effects.publish_task(&tenant, &job, task).await {
        Ok(()) => true,
        // The record is stored: the next pass publishes it.
        Err(error) => {
            tracing::warn!(%job, %error, "could not publish the next attempt");
            false
        }
    }
}

/// The failed record of a job past its deadline, or `None`.
pub fn deadline_exceeded(record: &JobRecord, now_ms: i64) -> Option<JobRecord> {
    let timeout = record.spec.as_ref()?.timeout_secs;
    if timeout == 0 || record.state().is_final() {
        return None;
    }
    let deadline = record
        .created_at_ms
        .saturating_add(i64::try_from(timeout.saturating_mul(1000)).unwrap_or(i64::MAX));
    if now_ms < deadline {
        return None;
    }
    let mut next = record.clone();
    next.state = JobState::Failed as i32;
    next.error = Some(JobError {
        kind: ErrorKind::DeadlineExceeded as i32,
        message: format!(
            "job exceeded its timeout of {timeout}s during the {} stage",
            record.stage().name()
        ),
        retryable: false,
        stage: record.stage,
    });
    next.updated_at_ms = now_ms;
    next.times.get_or_insert_default().finished_at_ms = now_ms;
    Some(next)
}

/// Fails every unfinished job past its deadline, by CAS, and cancels its
/// running task. Returns how many jobs it failed.
pub async fn enforce_deadlines(
    repo: &JobRepo,
    effects: &Effects,
    now_ms: i64,
) -> Result<usize, RepoError> {
    let mut failed = 0;
    for record in repo.unfinished().await? {
        if deadline_exceeded(&record, now_ms).is_none() {
            continue;
        }
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            continue;
        };
        let (stored, ()) = repo
            .update(&tenant, &job, |current| {
                let next = deadline_exceeded(&current, now_ms);
                async move { (next, ()) }
            })
            .await?;
        let Some(next) = stored else { continue };
        tracing::warn!(%job, stage = next.stage().name(), "job past its deadline: failed");
        failed += 1;
        let effects_of = vec![
            Effect::SendCancel,
            Effect::EmitState(job::state_changed(&next)),
        ];
        if let Err(error) = effects.run(&next, effects_of).await {
            tracing::warn!(%job, %error, "could not announce the deadline");
        }
    }
    Ok(failed)
}

/// What the deadline and TTL passes need.
#[derive(Clone)]
pub struct Lifetimes {
    pub repo: JobRepo,
    pub effects: Effects,
    pub idem: kv::Store,
    pub store: ArtifactStore,
}

impl Lifetimes {
    /// One deadline pass and one TTL pass; failures are logged and the next
    /// pass tries again.
    pub async fn pass(&self) {
        let now = trainyard_core::now_ms();
        match enforce_deadlines(&self.repo, &self.effects, now).await {
            Ok(0) => {}
            Ok(failed) => tracing::warn!(failed, "jobs past their deadline failed"),
            Err(error) => tracing::warn!(%error, "deadline pass failed"),
        }
        match expire(&self.repo, &self.effects.js, &self.idem, &self.store, now).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "finished jobs past their ttl removed"),
            Err(error) => tracing::warn!(%error, "ttl pass failed"),
        }
    }
}

/// Whether a finished job's TTL has run out.
pub fn expired(record: &JobRecord, now_ms: i64) -> bool {
    let ttl = record.spec.as_ref().map_or(0, |s| s.ttl_secs);
    if ttl == 0 || !record.state().is_final() {
        return false;
    }
    let finished = record
        .times
        .as_ref()
        .map(|t| t.finished_at_ms)
        .filter(|t| *t > 0)
        .unwrap_or(record.updated_at_ms);
    let ttl_ms = i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX);
    now_ms >= finished.saturating_add(ttl_ms)
}

/// Removes every finished job past its TTL: its artifacts and events
/// first, then its idempotency key, then its record by CAS (a pass that stops half-way is
/// finished by the next one). Returns how many records it removed.
pub async fn expire(
    repo: &JobRepo,
    js: &jetstream::Context,
    idem: &kv::Store,
    store: &ArtifactStore,
    now_ms: i64,
) -> Result<usize, RepoError> {
    let mut removed = 0;
    for found in repo.all().await? {
        let record = &found.record;
        if !expired(record, now_ms) {
            continue;
        }
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            continue;
        };
        if let Err(error) = store.delete_prefix(&keys::job(&job)).await {
            tracing::warn!(%job, %error, "could not remove the artifacts of an expired job");
            continue;
        }
        let events = match js.get_stream(EVENTS_STREAM).await {
            Ok(stream) => stream
                .purge()
                .filter(subject::job_events(&tenant, &job))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = events {
            tracing::warn!(%job, %error, "could not remove the events of an expired job");
            continue;
        }
        let key = record
            .spec
            .as_ref()
            .map_or("", |s| s.idempotency_key.as_str());
        if !key.is_empty() {
            let key = crate::api::idem_key(&tenant, key);
            if let Ok(Some(entry)) = idem.entry(&key).await
                && entry.value.as_ref() == job.as_str().as_bytes()
                && let Err(error) = idem.purge_expect_revision(&key, Some(entry.revision)).await
            {
                tracing::warn!(%job, %error, "could not remove the idempotency key of an expired job");
                continue;
            }
        }
        if repo.remove(&tenant, &job, found.revision).await? {
            tracing::info!(%job, "finished job past its ttl: removed");
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{JobSpec, StageTimes};

    fn record(state: JobState, timeout_secs: u64, ttl_secs: u64) -> JobRecord {
        JobRecord {
            job_id: "j-1".into(),
            tenant: "acme".into(),
            spec: Some(JobSpec {
                timeout_secs,
                ttl_secs,
                ..Default::default()
            }),
            state: state as i32,
            stage: Stage::Train as i32,
            attempt: 2,
            created_at_ms: 1_000,
            updated_at_ms: 5_000,
            times: Some(StageTimes {
                finished_at_ms: if state.is_final() { 5_000 } else { 0 },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_job_fails_at_its_deadline_and_not_before() {
        let r = record(JobState::Training, 10, 0);
        assert_eq!(deadline_exceeded(&r, 10_999), None);
        let failed = deadline_exceeded(&r, 11_000).unwrap();
        assert_eq!(failed.state(), JobState::Failed);
        let error = failed.error.unwrap();
        assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
        assert_eq!((error.stage(), error.retryable), (Stage::Train, false));
        assert!(job::is_legal(JobState::Training, JobState::Failed));
        // No timeout, or already final: nothing to do.
        assert_eq!(
            deadline_exceeded(&record(JobState::Training, 0, 0), i64::MAX),
            None
        );
        assert_eq!(
            deadline_exceeded(&record(JobState::Succeeded, 10, 0), i64::MAX),
            None
        );
    }

    #[test]
    fn only_a_finished_job_expires_and_only_after_its_ttl() {
        assert!(!expired(&record(JobState::Succeeded, 0, 10), 14_999));
        assert!(expired(&record(JobState::Succeeded, 0, 10), 15_000));
        assert!(expired(&record(JobState::Failed, 0, 10), 15_000));
        assert!(!expired(&record(JobState::Succeeded, 0, 0), i64::MAX));
        for running in [
            JobState::Queued,
            JobState::Preparing,
            JobState::Training,
            JobState::Delivering,
        ] {
            assert!(!expired(&record(running, 0, 1), i64::MAX));
        }
    }

    #[test]
    fn the_attempt_is_raised_once_and_only_for_the_attempt_seen() {
        let seen = record(JobState::Training, 0, 0);
        let raised = raised_attempt(&seen, &seen, 9_000).unwrap();
        assert_eq!((raised.attempt, raised.updated_at_ms), (3, 9_000));
        // Another replica already raised it, or the job moved on.
        assert_eq!(raised_attempt(&raised, &seen, 9_001), None);
        assert_eq!(
            raised_attempt(&record(JobState::Failed, 0, 0), &seen, 9_001),
            None
        );
    }
}
