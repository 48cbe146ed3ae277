//! The reconciler, run on start-up and then periodically. Safe with several
//! coordinator replicas: every record write is a compare-and-set, and every
//! publish carries a dedup id.
//!
//! One pass lists the job keys once, reads each record once and applies to
//! it the checks that concern it:
//!
//! - Deadlines: an unfinished job past `timeout_secs` from its submission
//!   fails with `DEADLINE_EXCEEDED`, and its running task is cancelled.
//! - Lost tasks: an unfinished job whose record is stale and whose task is
//!   neither in `TY_TASKS` (pending, being worked on, or waiting for its
//!   retry on `ty.retry.>`) nor answered in
//!   `TY_RESULTS` gets its current task published again, under the same
//!   dedup id. If the stream drops that publish as a duplicate (the first
//!   copy was consumed inside the dedup window, yet nothing answered it), the
//!   attempt is raised by CAS and the new attempt's task, with a new id, is
//!   published: the old attempt's late results are then ignored. The two
//!   streams are read once per pass, and only when some record needs them.
//! - Lost final state events: a stale final record not marked
//!   `final_event_stored` gets its final state event published again
//!   (unless the events stream holds it already), then the mark; see
//!   [`crate::effects`].
//! - Quotas: a tenant's jobs held `QUEUED` by its running quota are
//!   started as slots are free ([`crate::quota`]), in case the start
//!   that a job's end makes was lost.
//! - TTLs: a finished job past `ttl_secs` from its end loses its artifacts
//!   (`jobs/<job>/`), its events, its idempotency key and then its record.
//!   A job that is not final is never removed.
//!
//! Each repair runs inside a span whose remote parent is the trace context
//! the record stores ([`crate::trace::job_span`]): a republished task or
//! final event rejoins the job's trace.

use crate::effects::{EffectError, Effects};
use crate::job::{self, Effect};
use crate::repo::{JobRepo, RepoError, Versioned};
use crate::trace::job_span;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, RawMessageErrorKind};
use async_nats::jetstream::{self, kv};
use prost::Message;
use std::collections::HashSet;
use tracing::Instrument;
use trainyard_core::store::{ArtifactStore, StoreError, keys};
use trainyard_core::topology::{
    self, EVENTS_STREAM, EventKind, RESULTS_STREAM, TASKS_STREAM, subject,
};
use trainyard_proto::v1::{ErrorKind, JobError, JobEvent, JobRecord, JobState, job_event::Kind};
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
                // A task waiting for its retry, or republished by its
                // schedule, names its task in its own header.
                if let Some(id) = message
                    .headers
                    .get(topology::TASK_ID_HEADER)
                    .or_else(|| message.headers.get("Nats-Msg-Id"))
                {
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

/// Why a repair of one job stopped half-way (the next pass goes on).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("artifacts: {0}")]
    Artifacts(#[source] StoreError),
    #[error("events: {0}")]
    Events(#[source] async_nats::Error),
    #[error("idempotency key: {0}")]
    IdempotencyKey(#[source] async_nats::Error),
    #[error(transparent)]
    Record(#[from] RepoError),
    #[error(transparent)]
    Effect(#[from] EffectError),
}

/// What the reconciler needs.
#[derive(Clone)]
pub struct Reconciler {
    pub js: jetstream::Context,
    pub repo: JobRepo,
    pub effects: Effects,
    pub idem: kv::Store,
    pub store: ArtifactStore,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Lost tasks published again (or as their next attempt).
    pub republished: usize,
    /// Jobs failed past their deadline.
    pub failed: usize,
    /// Final state events published again.
    pub announced: usize,
    /// Finished jobs past their TTL removed.
    pub removed: usize,
    /// Jobs held by their tenant's quota started.
    pub started: usize,
}

/// The message ids in `TY_TASKS` and `TY_RESULTS`.
enum InFlight {
    /// Not read yet: no record has needed them so far.
    Unread,
    Read {
        tasks: HashSet<String>,
        /// Task ids with a result waiting in `TY_RESULTS`.
        answered: HashSet<String>,
    },
    /// Reading failed: no task can be called lost in this pass.
    Unreadable,
}

impl Reconciler {
    /// One pass over every record; a record is stale once not updated for
    /// `stale_after_ms`. A failure with one record is logged and the next
    /// pass tries again; only a failure to list the records is an error.
    pub async fn pass(&self, stale_after_ms: i64) -> Result<Pass, RepoError> {
        let records = self.repo.all().await?;
        let now = trainyard_core::now_ms();
        let mut pass = Pass::default();
        let mut in_flight = InFlight::Unread;
        let mut held = std::collections::BTreeSet::new();
        for found in records {
            let record = &found.record;
            let (Ok(tenant), Ok(job)) = (
                TenantId::parse(&record.tenant),
                JobId::parse(&record.job_id),
            ) else {
                continue;
            };
            let stale = now.saturating_sub(record.updated_at_ms) >= stale_after_ms;
            if record.state().is_final() {
                if expired(record, now) {
                    let span = job_span("reconcile expire", record);
                    match self.expire(&tenant, &job, &found).instrument(span).await {
                        Ok(true) => pass.removed += 1,
                        Ok(false) => {}
                        Err(error) => {
                            tracing::warn!(%job, %error, "could not remove an expired job")
                        }
                    }
                } else if stale
                    && !record.final_event_stored
                    && self
                        .announce(&tenant, &job, record)
                        .instrument(job_span("reconcile announce", record))
                        .await
                {
                    pass.announced += 1;
                }
                continue;
            }
            if deadline_exceeded(record, now).is_some() {
                let span = job_span("reconcile deadline", record);
                match self
                    .fail_past_deadline(&tenant, &job, now)
                    .instrument(span)
                    .await
                {
                    Ok(true) => pass.failed += 1,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%job, %error, "could not fail a job past its deadline")
                    }
                }
                continue;
            }
            if crate::quota::is_held(record) {
                // No task to lose: it waits for a running slot.
                held.insert(tenant);
                continue;
            }
            if record.state() == JobState::AwaitingReview {
                // No task to lose: it waits for a person's approval.
                continue;
            }
            if !stale {
                continue;
            }
            if matches!(in_flight, InFlight::Unread) {
                in_flight = self.in_flight().await;
            }
            let InFlight::Read { tasks, answered } = &in_flight else {
                continue;
            };
            let id = topology::task_msg_id(&tenant, &job, record.stage(), Attempt(record.attempt));
            if tasks.contains(&id) || answered.contains(&id) {
                continue;
            }
            let span = job_span("reconcile republish", record);
            if self
                .republish(&tenant, &job, record, now)
                .instrument(span)
                .await
            {
                pass.republished += 1;
            }
        }
        // A start lost when a job ended (a coordinator stopping between
        // the two) is made here.
        for tenant in held {
            pass.started += self.effects.start_held(&tenant).await;
        }
        Ok(pass)
    }

    /// [`Reconciler::pass`] with every outcome logged.
    pub async fn pass_logged(&self, stale_after_ms: i64) {
        match self.pass(stale_after_ms).await {
            Ok(pass) if pass == Pass::default() => {}
            Ok(Pass {
                republished,
                failed,
                announced,
                removed,
                started,
            }) => tracing::warn!(
                republished,
                failed,
                announced,
                removed,
                started,
                "reconciler repaired jobs"
            ),
            Err(error) => tracing::warn!(%error, "reconcile pass failed"),
        }
    }

    async fn in_flight(&self) -> InFlight {
        let tasks = match ids_in(&self.js, TASKS_STREAM, subject::all_tasks()).await {
            Ok(mut tasks) => ids_in(&self.js, TASKS_STREAM, subject::all_retries())
                .await
                .map(|waiting| {
                    tasks.extend(waiting);
                    tasks
                }),
            Err(error) => Err(error),
        };
        let results = ids_in(&self.js, RESULTS_STREAM, subject::all_results()).await;
        match (tasks, results) {
            (Ok(tasks), Ok(results)) => InFlight::Read {
                tasks,
                answered: results.iter().filter_map(|id| answered_task(id)).collect(),
            },
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "cannot read the task and result streams; lost tasks wait for the next pass");
                InFlight::Unreadable
            }
        }
    }

    /// Publishes the current task of a job that has none in flight, under
    /// its dedup id; if the stream drops it as a duplicate, raises the
    /// attempt. True when a task was published.
    async fn republish(
        &self,
        tenant: &TenantId,
        job: &JobId,
        record: &JobRecord,
        now: i64,
    ) -> bool {
        let Some(task) = job::current_task(record) else {
            return false;
        };
        tracing::warn!(%job, stage = record.stage().name(), "task not in flight; publishing it again");
        match self.effects.publish_task_acked(tenant, job, task).await {
            Ok(ack) if !ack.duplicate => true,
            // Consumed inside the dedup window yet unanswered: the same
            // id would be dropped again until the window ends.
            Ok(_) => next_attempt(&self.repo, &self.effects, record, now).await,
            Err(error) => {
                tracing::warn!(%job, %error, "could not publish the task again");
                false
            }
        }
    }

    /// Fails a job past its deadline by CAS and cancels its running task.
    /// False when another replica (or a result) changed it first.
    async fn fail_past_deadline(
        &self,
        tenant: &TenantId,
        job: &JobId,
        now_ms: i64,
    ) -> Result<bool, RepoError> {
        let (stored, ()) = self
            .repo
            .update(tenant, job, |current| {
                let next = deadline_exceeded(&current, now_ms);
                async move { (next, ()) }
            })
            .await?;
        let Some(next) = stored else {
            return Ok(false);
        };
        tracing::warn!(%job, stage = next.stage().name(), "job past its deadline: failed");
        let effects = vec![
            Effect::SendCancel,
            Effect::EmitState(job::state_changed(&next)),
        ];
        if let Err(error) = self.effects.run(&next, effects).await {
            tracing::warn!(%job, %error, "could not announce the deadline");
        }
        Ok(true)
    }

    /// Makes sure the events stream holds the final state event of a final
    /// record, then marks the record. True when the event was published
    /// again (it was missing).
    async fn announce(&self, tenant: &TenantId, job: &JobId, record: &JobRecord) -> bool {
        let state = record.state();
        let stored = match self.js.get_stream(EVENTS_STREAM).await {
            Ok(stream) => match stream
                .get_last_raw_message_by_subject(&subject::event(tenant, job, EventKind::State))
                .await
            {
                Ok(last) => Ok(JobEvent::decode(last.payload).is_ok_and(
                    |event| matches!(event.kind, Some(Kind::State(s)) if s.state() == state),
                )),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
                Err(e) => Err(RepairError::Events(e.into())),
            },
            Err(e) => Err(RepairError::Events(e.into())),
        };
        let result = match stored {
            Ok(true) => self
                .effects
                .mark_final_event_stored(tenant, job, state)
                .await
                .map(|()| false)
                .map_err(RepairError::from),
            Ok(false) => {
                tracing::warn!(%job, state = state.as_str_name(), "final state event missing; publishing it again");
                self.effects
                    .announce_final(tenant, job, job::state_changed(record))
                    .await
                    .map(|()| true)
                    .map_err(RepairError::from)
            }
            Err(error) => Err(error),
        };
        result.unwrap_or_else(|error| {
            tracing::warn!(%job, %error, "could not make sure the final state event is stored");
            false
        })
    }

    /// Removes a finished job past its TTL: its artifacts and events
    /// first, then its idempotency key, then its record by CAS (a pass that
    /// stops half-way is finished by the next one). True when the record
    /// was removed.
    async fn expire(
        &self,
        tenant: &TenantId,
        job: &JobId,
        found: &Versioned,
    ) -> Result<bool, RepairError> {
        self.store
            .delete_prefix(&keys::job(tenant, job))
            .await
            .map_err(RepairError::Artifacts)?;
        self.js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| RepairError::Events(e.into()))?
            .purge()
            .filter(subject::job_events(tenant, job))
            .await
            .map_err(|e| RepairError::Events(e.into()))?;
        let key = found
            .record
            .spec
            .as_ref()
            .map_or("", |s| s.idempotency_key.as_str());
        if !key.is_empty() {
            let key = crate::api::idem_key(tenant, key);
            if let Ok(Some(entry)) = self.idem.entry(&key).await
                && entry.value.as_ref() == job.as_str().as_bytes()
            {
                self.idem
                    .purge_expect_revision(&key, Some(entry.revision))
                    .await
                    .map_err(|e| RepairError::IdempotencyKey(e.into()))?;
            }
        }
        let removed = self.repo.remove(tenant, job, found.revision).await?;
        if removed {
            tracing::info!(%job, "finished job past its ttl: removed");
        }
        Ok(removed)
    }
}

/// The task id a result's message id answers (`<task>.result`, or
/// `<task>.result.<claim token>`); `None` for a start or an adjustment
/// report, which answer nothing.
pub fn answered_task(result_id: &str) -> Option<String> {
    let task = match result_id.strip_suffix(".result") {
        Some(task) => task,
        None => result_id.rsplit_once('.')?.0.strip_suffix(".result")?,
    };
    Some(task.to_string())
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

/// The failed record of a job past its deadline, or `None`. The deadline
/// is the stage runtime's ([`trainyard_core::runtime::deadline_ms`]): time
/// spent awaiting caption review does not count.
pub fn deadline_exceeded(record: &JobRecord, now_ms: i64) -> Option<JobRecord> {
    let timeout = record.spec.as_ref()?.timeout_secs;
    if record.state().is_final() {
        return None;
    }
    let deadline = trainyard_core::runtime::deadline_ms(record)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::{JobSpec, Stage, StageTimes};

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
    fn a_job_in_review_is_past_no_deadline_and_gets_its_pause_back() {
        let waiting = record(JobState::AwaitingReview, 1, 0);
        assert_eq!(deadline_exceeded(&waiting, i64::MAX), None);
        let mut approved = record(JobState::Training, 10, 0);
        approved.review_paused_ms = 60_000;
        assert_eq!(deadline_exceeded(&approved, 70_999), None);
        assert!(deadline_exceeded(&approved, 71_000).is_some());
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
    fn a_result_answers_its_task_with_or_without_a_claim() {
        let tenant = TenantId::parse("acme").unwrap();
        let job = JobId::parse("j-1").unwrap();
        let task = topology::task_msg_id(&tenant, &job, Stage::Train, Attempt(2));
        for token in ["", "0190c3a1b2"] {
            let id = topology::result_msg_id(&tenant, &job, Stage::Train, Attempt(2), token);
            assert_eq!(answered_task(&id), Some(task.clone()), "{id}");
        }
        assert_eq!(answered_task(&format!("{task}.started")), None);
        assert_eq!(answered_task(&format!("{task}.adjusted.2")), None);
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
