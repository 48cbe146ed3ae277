//! Carries out what the state machine decided, after the record is stored:
//! publish the next task (its dedup id makes a repeat harmless), emit state
//! events, send cancel messages.

use crate::job::{Effect, Task};
use async_nats::jetstream;
use async_nats::jetstream::publish::PublishAck;
use prost::Message;
use trainyard_core::events::EventSink;
use trainyard_core::topology::{self, subject};
use trainyard_proto::v1::{JobRecord, Stage, job_event::Kind};
use trainyard_proto::{Attempt, JobId, TenantId};

#[derive(Clone)]
pub struct Effects {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Effects {
    /// Runs every effect; a failed publish is returned so the caller can
    /// retry (the record is already stored, the reconciler also repairs it).
    pub async fn run(&self, record: &JobRecord, effects: Vec<Effect>) -> Result<(), String> {
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            return Err("record has bad ids".into());
        };
        let events = EventSink::new(self.js.clone(), tenant.clone(), job.clone());
        for effect in effects {
            match effect {
                Effect::EmitState(state) => events.emit(Kind::State(state)).await,
                Effect::Publish(task) => self.publish_task(&tenant, &job, *task).await?,
                Effect::SendCancel => {
                    if let Err(error) = self
                        .client
                        .publish(subject::cancel(&job), "cancel".into())
                        .await
                    {
                        tracing::warn!(%job, %error, "could not send cancel message");
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn publish_task(
        &self,
        tenant: &TenantId,
        job: &JobId,
        task: Task,
    ) -> Result<(), String> {
        self.publish_task_acked(tenant, job, task).await.map(|_| ())
    }

    /// Publishes a task and returns the stream's ack; `duplicate` in it
    /// says the stream dropped the message as a repeat of its dedup id.
    pub async fn publish_task_acked(
        &self,
        tenant: &TenantId,
        job: &JobId,
        task: Task,
    ) -> Result<PublishAck, String> {
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
        let failed = |e: String| format!("could not publish {} task: {e}", stage.name());
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(id);
        let ack = self
            .js
            .send_publish(subject::task(stage, &pool), publish)
            .await
            .map_err(|e| failed(e.to_string()))?
            .await
            .map_err(|e| failed(e.to_string()))?;
        tracing::info!(%job, stage = stage.name(), attempt, duplicate = ack.duplicate, "task published");
        Ok(ack)
    }
}
