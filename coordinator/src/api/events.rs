//! Reading a job's stored events: `GetMetrics` (its `metric` events
//! gathered into series) and `Watch` (its events from the start, then
//! live, ending with exactly one final state).

use super::{ApiError, EventStream, JobApi, parse_job};
use crate::job;
use crate::repo::{JobRepo, RepoError};
use async_nats::jetstream::consumer;
use futures::StreamExt;
use prost::Message;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;
use trainyard_core::topology::{EVENTS_STREAM, EventKind, subject};
use trainyard_proto::v1::{
    GetMetricsResponse, JobEvent, JobRecord, JobState, MetricPoint, MetricSeries, job_event::Kind,
};
use trainyard_proto::{JobId, TenantId};

impl JobApi {
    /// The job's training metrics, one series per name, read from its
    /// `metric` events with an ordered consumer. At most [`MAX_POINTS`]
    /// points are read (the oldest first); `truncated` says there were more.
    pub async fn get_metrics(
        &self,
        tenant: &TenantId,
        job_id: &str,
        names: &[String],
    ) -> Result<GetMetricsResponse, ApiError> {
        let job = parse_job(job_id)?;
        if names.len() > MAX_METRIC_NAMES {
            return Err(ApiError::Invalid(format!(
                "names: at most {MAX_METRIC_NAMES} metric names, got {}",
                names.len()
            )));
        }
        let names: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        // Tenant isolation: another tenant's job is not found.
        self.repo.get(tenant, &job).await?;
        let filter = subject::event(tenant, &job, EventKind::Metric);
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| ApiError::Metrics(e.into()))?;
        let mut stored = 0usize;
        let mut counts = stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| ApiError::Metrics(e.into()))?;
        while let Some(entry) = counts.next().await {
            stored += entry.map_err(|e| ApiError::Metrics(e.into()))?.1;
        }
        let mut series: BTreeMap<String, Vec<MetricPoint>> = BTreeMap::new();
        let mut truncated = false;
        if stored > 0 {
            let mut messages = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: filter,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| ApiError::Metrics(e.into()))?
                .messages()
                .await
                .map_err(|e| ApiError::Metrics(e.into()))?;
            let mut read = 0usize;
            loop {
                let message = tokio::time::timeout(METRICS_READ_TIMEOUT, messages.next())
                    .await
                    .map_err(|_| {
                        ApiError::Metrics("the events stream did not answer in time".into())
                    })?
                    .ok_or_else(|| ApiError::Metrics("the events stream ended".into()))?
                    .map_err(|e| ApiError::Metrics(e.into()))?;
                read += 1;
                let pending = message.info().map(|i| i.pending).unwrap_or(0);
                if let Ok(JobEvent {
                    at_ms,
                    kind: Some(Kind::Metric(metric)),
                    ..
                }) = JobEvent::decode(message.payload.clone())
                    && (names.is_empty() || names.contains(metric.name.as_str()))
                {
                    series.entry(metric.name).or_default().push(MetricPoint {
                        step: metric.step,
                        value: metric.value,
                        at_ms,
                    });
                }
                if pending == 0 {
                    break;
                }
                if read >= MAX_POINTS {
                    truncated = true;
                    break;
                }
            }
        }
        Ok(GetMetricsResponse {
            series: series
                .into_iter()
                .map(|(name, points)| MetricSeries { name, points })
                .collect(),
            truncated,
        })
    }

    /// The job's events from the start, then live; ends after the final state.
    pub async fn watch(&self, tenant: &TenantId, job_id: &str) -> Result<EventStream, ApiError> {
        let job = parse_job(job_id)?;
        let record = self.repo.get(tenant, &job).await?.record;
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| ApiError::Nats(e.into()))?;
        let messages = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject::job_events(&tenant.clone(), &job),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ApiError::Nats(e.into()))?
            .messages()
            .await
            .map_err(|e| ApiError::Nats(e.into()))?;
        let final_record = record.state().is_final().then_some(record);
        let state = WatchState {
            messages: Box::pin(messages),
            final_record,
            done: false,
            repo: self.repo.clone(),
            tenant: tenant.clone(),
            job,
        };
        Ok(Box::pin(futures::stream::unfold(state, next_event)))
    }
}

/// Most metric events one GetMetrics reads: about 420 KiB of answer, under
/// NATS' default 1 MiB message limit for the `ty.api.metrics` reply.
pub const MAX_POINTS: usize = 20_000;
/// Most names one GetMetrics may filter on.
pub const MAX_METRIC_NAMES: usize = 64;
/// How long GetMetrics waits for the next stored metric event.
const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a Watch of a running job waits for an event before it reads
/// the record again.
const WATCH_IDLE: Duration = Duration::from_secs(5);
/// How long a Watch of a final job waits for more stored events before it
/// ends with a state event made from the record.
const REPLAY_IDLE: Duration = Duration::from_secs(2);

/// A Watch ends with exactly one final state event, the record's: the
/// stored one, or, when none comes (its publish was lost and the
/// reconciler has not repeated it yet, or the events were purged), one
/// made from the record. The record is read again whenever the job's events
/// go quiet for [`WATCH_IDLE`]; once it is final, stored events are
/// replayed until [`REPLAY_IDLE`] passes without one.
struct WatchState {
    messages: Pin<Box<consumer::pull::Ordered>>,
    /// Set once the record is known to be final.
    final_record: Option<JobRecord>,
    done: bool,
    repo: JobRepo,
    tenant: TenantId,
    job: JobId,
}

async fn next_event(mut state: WatchState) -> Option<(Result<JobEvent, ApiError>, WatchState)> {
    if state.done {
        return None;
    }
    loop {
        let message = match state.final_record.as_ref() {
            // Replaying a finished job: stop when the stored events run out.
            Some(_) => tokio::time::timeout(REPLAY_IDLE, state.messages.next())
                .await
                .ok()
                .flatten(),
            None => match tokio::time::timeout(WATCH_IDLE, state.messages.next()).await {
                Ok(message) => message,
                Err(_quiet) => {
                    // Read the record again; a failure waits for the next quiet spell.
                    match state.repo.get(&state.tenant, &state.job).await {
                        Ok(found) if found.record.state().is_final() => {
                            state.final_record = Some(found.record);
                        }
                        Err(RepoError::NotFound(_)) => {
                            state.done = true;
                            let gone = ApiError::NotFound("job removed while watched".into());
                            return Some((Err(gone), state));
                        }
                        _ => {}
                    }
                    continue;
                }
            },
        };
        let Some(message) = message else {
            let record = state.final_record.take()?;
            state.done = true;
            let event = JobEvent {
                job_id: record.job_id.clone(),
                tenant: record.tenant.clone(),
                at_ms: record.updated_at_ms,
                kind: Some(Kind::State(job::state_changed(&record))),
            };
            return Some((Ok(event), state));
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                state.done = true;
                return Some((Err(ApiError::Nats(e.into())), state));
            }
        };
        let Ok(event) = JobEvent::decode(message.payload.clone()) else {
            continue;
        };
        if let Some(Kind::State(change)) = &event.kind
            && JobState::try_from(change.state)
                .unwrap_or_default()
                .is_final()
        {
            state.done = true;
        }
        return Some((Ok(event), state));
    }
}
