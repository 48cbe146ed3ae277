//! Carries out what the state machine decided, after the record is stored:
//! publish the next task (its dedup id makes a repeat harmless), emit state
//! events, send cancel messages.
//!
//! State events carry a dedup id per job and state
//! ([`topology::state_event_msg_id`]). Once the events stream acknowledges
//! a final state's event, the record is marked `final_event_stored` by
//! CAS; a final record left unmarked (the stream's leader died under the
//! publish, or this coordinator did) gets its event published again by the
//! reconciler, so the events of every job end with its final state.

use crate::job::{Effect, Task};
use crate::repo::{JobRepo, RepoError};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use prost::Message;
use trainyard_core::telemetry::propagation;
use trainyard_core::topology::{self, EventKind, subject};
use trainyard_proto::v1::{JobEvent, JobRecord, JobState, Stage, StateChanged, job_event::Kind};
use trainyard_proto::{Attempt, JobId, TenantId};

/// Why an effect was not carried out. The record is stored either way:
/// a caller retries, or leaves the repair to the reconciler.
#[derive(Debug, thiserror::Error)]
pub enum EffectError {
    #[error("record has bad ids")]
    BadIds,
    /// The stream did not take a task.
    #[error("could not publish {} task: {source}", stage.name())]
    Task {
        stage: Stage,
        #[source]
        source: PublishError,
    },
    /// The stream did not take a state event.
    #[error(transparent)]
    Event(PublishError),
    /// The record could not be marked as having its final event stored.
    #[error(transparent)]
    Mark(#[from] RepoError),
}

#[derive(Clone)]
pub struct Effects {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// To mark a record once its final state event is stored.
    pub repo: JobRepo,
    /// The `[quotas]` section: a job's end starts its tenant's held jobs.
    pub quotas: std::sync::Arc<trainyard_core::config::QuotasConfig>,
    /// `[coordinator] download_url_ttl_secs`, set on every deliver task
    /// published: the uploader signs the URLs of copies written with a
    /// job's own keys for this long (the fleet's one setting).
    pub download_url_ttl_secs: u64,
}

impl Effects {
    /// Runs every effect; a failed publish is returned so the caller can
    /// retry (the record is already stored, the reconciler also repairs it).
    pub async fn run(&self, record: &JobRecord, effects: Vec<Effect>) -> Result<(), EffectError> {
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            return Err(EffectError::BadIds);
        };
        for effect in effects {
            match effect {
                Effect::EmitState(state) => {
                    let entered = state.state();
                    let is_final = entered.is_final();
                    if is_final {
                        // Once per job: only the transition that made the
                        // record final runs this effect.
                        trainyard_core::telemetry::metrics().job_finished(
                            &record.tenant,
                            backend_of(record),
                            final_state_label(state.state()),
                        );
                    }
                    let result = if state.state().is_final() {
                        self.announce_final(&tenant, &job, state).await
                    } else {
                        self.emit_state(&tenant, &job, state).await
                    };
                    // The record is the truth; the reconciler repeats a lost final event.
                    if let Err(error) = result {
                        tracing::warn!(%job, %error, "state event not confirmed");
                    }
                    // A job that ends frees a running slot and its stage's;
                    // one that moves on frees its last stage's. A start
                    // lost here is made by the reconciler's next pass.
                    let left_a_stage = matches!(entered, JobState::Training | JobState::Delivering)
                        && self
                            .quotas
                            .for_tenant(tenant.as_str())
                            .max_running_tasks
                            .any();
                    // A job awaiting review holds neither a running slot
                    // nor its stage's (`quota`): its tenant's held jobs may start.
                    let awaits_review = entered == JobState::AwaitingReview;
                    if is_final || left_a_stage || awaits_review {
                        self.start_held(&tenant).await;
                    }
                }
                Effect::Publish(task) => self.publish_task(&tenant, &job, *task).await?,
                Effect::SendCancel => {
                    let mut headers = async_nats::HeaderMap::new();
                    propagation::inject_current_nats(&mut headers);
                    if let Err(error) = self
                        .client
                        .publish_with_headers(subject::cancel(&job), headers, "cancel".into())
                        .await
                    {
                        tracing::warn!(%job, %error, "could not send cancel message");
                    }
                }
            }
        }
        Ok(())
    }

    /// Publishes the task of each of `tenant`'s held jobs whose slot has
    /// room, oldest first: a running slot and GPU budget for those held
    /// before their first task, room in its stage (and pool) for the rest
    /// (see [`crate::quota::to_start`]); returns how many started.
    /// Failures are logged: the reconciler's next pass tries again.
    pub async fn start_held(&self, tenant: &TenantId) -> usize {
        let records = match self.repo.of_tenant(tenant).await {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%tenant, %error, "cannot read the tenant's jobs to start held ones");
                return 0;
            }
        };
        let quota = self.quotas.for_tenant(tenant.as_str());
        let mut count = 0;
        for held in crate::quota::to_start(&records, &quota, trainyard_core::now_ms()) {
            let Ok(job) = JobId::parse(&held.job_id) else {
                continue;
            };
            let now = trainyard_core::now_ms();
            let started = self
                .repo
                .update(tenant, &job, |current| {
                    let next = crate::quota::started(&current, now);
                    async move { (next, ()) }
                })
                .await;
            let record = match started {
                Ok((Some(record), ())) => record,
                Ok((None, ())) => continue,
                Err(error) => {
                    tracing::warn!(%job, %error, "could not start a held job");
                    continue;
                }
            };
            let Some(task) = crate::job::current_task(&record) else {
                continue;
            };
            tracing::info!(%job, %tenant, "held job started: a running slot is free");
            // Stored without its hold: a lost publish is republished by
            // the reconciler like any lost task.
            if let Err(error) = self.publish_task(tenant, &job, task).await {
                tracing::warn!(%job, %error, "could not publish a started job's task");
            }
            count += 1;
        }
        count
    }

    pub async fn emit_state(
        &self,
        tenant: &TenantId,
        job: &JobId,
        state: StateChanged,
    ) -> Result<(), EffectError> {
        let id = topology::state_event_msg_id(tenant, job, state.state());
        let event = JobEvent {
            job_id: job.to_string(),
            tenant: tenant.to_string(),
            at_ms: trainyard_core::now_ms(),
            kind: Some(Kind::State(state)),
        };
        trainyard_core::nats::publish_durable(
            &self.js,
            subject::event(tenant, job, EventKind::State),
            &id,
            None,
            event.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
        .map_err(EffectError::Event)
    }

    /// Publishes the event of a final state, then marks the record.
    pub async fn announce_final(
        &self,
        tenant: &TenantId,
        job: &JobId,
        state: StateChanged,
    ) -> Result<(), EffectError> {
        let final_state = state.state();
        self.emit_state(tenant, job, state).await?;
        self.mark_final_event_stored(tenant, job, final_state).await
    }

    /// Marks the record, by CAS, as having its final state's event stored
    /// (if it is still in `state` and not marked yet).
    pub async fn mark_final_event_stored(
        &self,
        tenant: &TenantId,
        job: &JobId,
        state: JobState,
    ) -> Result<(), EffectError> {
        self.repo
            .update(tenant, job, |current| {
                let next = (current.state() == state && !current.final_event_stored).then(|| {
                    let mut next = current;
                    next.final_event_stored = true;
                    next
                });
                async move { (next, ()) }
            })
            .await
            .map(|_| ())
            .map_err(EffectError::from)
    }

    pub async fn publish_task(
        &self,
        tenant: &TenantId,
        job: &JobId,
        task: Task,
    ) -> Result<(), EffectError> {
        self.publish_task_acked(tenant, job, task).await.map(|_| ())
    }

    /// Publishes a task and returns the stream's ack; `duplicate` in it
    /// says the stream dropped the message as a repeat of its dedup id.
    pub async fn publish_task_acked(
        &self,
        tenant: &TenantId,
        job: &JobId,
        mut task: Task,
    ) -> Result<PublishAck, EffectError> {
        if let Task::Deliver(t) = &mut task {
            t.download_url_ttl_secs = self.download_url_ttl_secs;
        }
        let (stage, attempt, pool, payload) = match &task {
            Task::Prepare(t) => (Stage::Prepare, t.attempt, String::new(), t.encode_to_vec()),
            Task::Train(t) => (
                Stage::Train,
                t.attempt,
                t.spec.as_ref().map(|s| s.pool.clone()).unwrap_or_default(),
                t.encode_to_vec(),
            ),
            Task::Deliver(t) => (Stage::Deliver, t.attempt, String::new(), t.encode_to_vec()),
        };
        let pool = if pool.is_empty() {
            "default".to_string()
        } else {
            pool
        };
        let id = topology::task_msg_id(tenant, job, stage, Attempt(attempt));
        let subject = subject::task(stage, &pool);
        // A child of the current span (the submit call, the result handled,
        // the reconciler's job span); the task carries its context.
        let ack =
            trainyard_core::nats::publish_durable(&self.js, subject, &id, None, payload.into())
                .await
                .map_err(|source| EffectError::Task { stage, source })?;
        tracing::info!(%job, stage = stage.name(), attempt, duplicate = ack.duplicate, "task published");
        Ok(ack)
    }
}

/// The training backend of a job, the `backend` label of its metrics.
pub fn backend_of(record: &JobRecord) -> &str {
    record
        .spec
        .as_ref()
        .and_then(|s| s.training.as_ref())
        .map(|t| t.backend.as_str())
        .filter(|b| !b.is_empty())
        .unwrap_or("unknown")
}

/// The `state` label of a finished job.
fn final_state_label(state: JobState) -> &'static str {
    match state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        _ => "unknown",
    }
}
