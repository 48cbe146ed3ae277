//! The reconciler: on start-up and then periodically, every unfinished job
//! whose task is neither in `TY_TASKS` (pending or being worked on) nor
//! answered in `TY_RESULTS` gets its current task published again, under the
//! same dedup id. Safe with several coordinator replicas: the republish is
//! idempotent within the dedup window, and results are applied by CAS.

use crate::effects::Effects;
use crate::job;
use crate::repo::JobRepo;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use std::collections::HashSet;
use std::time::Duration;
use trainyard_core::topology::{self, RESULTS_STREAM, TASKS_STREAM};
use trainyard_proto::v1::Stage;
use trainyard_proto::{Attempt, JobId, TenantId};

/// Message ids present in a stream right now.
async fn ids_in(
    js: &jetstream::Context,
    stream: &str,
) -> Result<HashSet<String>, async_nats::Error> {
    let stream = js.get_stream(stream).await?;
    let mut ids = HashSet::new();
    let total = stream.get_info().await?.state.messages;
    if total == 0 {
        return Ok(ids);
    }
    let mut messages = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            headers_only: true,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(5), messages.next()).await
    {
        if let Some(id) = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            ids.insert(id.as_str().to_string());
        }
        if message.info().map(|i| i.pending).unwrap_or(0) == 0 {
            break;
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
    let tasks = ids_in(js, TASKS_STREAM).await?;
    let results = ids_in(js, RESULTS_STREAM).await?;
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
        if let Some(task) = job::current_task(&record) {
            tracing::warn!(%job, stage = stage.name(), "task not in flight; publishing it again");
            if effects.publish_task(&tenant, &job, task).await.is_ok() {
                republished += 1;
            }
        }
    }
    Ok(republished)
}
