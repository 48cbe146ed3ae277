//! Job events: state changes, progress, metrics, log lines and checkpoints,
//! published to `TY_EVENTS` under `ty.event.<tenant>.<job>.<kind>`. `Watch`,
//! dashboards and webhooks read them; the coordinator's job record stays the
//! truth. Secrets never reach an event: callers pass only redacted data.

use crate::telemetry::propagation;
use crate::topology::{EventKind, subject};
use async_nats::jetstream;
use prost::Message;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use trainyard_proto::v1::{self, job_event::Kind};
use trainyard_proto::{JobId, TenantId};

/// Publishes the events of one job.
#[derive(Clone)]
pub struct EventSink {
    js: jetstream::Context,
    tenant: TenantId,
    job: JobId,
}

impl EventSink {
    pub fn new(js: jetstream::Context, tenant: TenantId, job: JobId) -> Self {
        Self { js, tenant, job }
    }

    pub fn job(&self) -> &JobId {
        &self.job
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The newest `checkpoint` event of this job in `TY_EVENTS`: the last
    /// checkpoint a worker stored for it, with its manifest's sha256. A
    /// restore trusts only what a worker said it stored.
    pub async fn last_checkpoint(&self) -> Result<Option<v1::Checkpoint>, String> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        // A direct get by subject: the one request a worker's NATS
        // permissions allow on `TY_EVENTS` (its subject names the
        // checkpoint events; no stream info, no read by sequence).
        let stream = self
            .js
            .get_stream_no_info(crate::topology::EVENTS_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let subject = subject::event(&self.tenant, &self.job, EventKind::Checkpoint);
        let message = match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => message,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let event = v1::JobEvent::decode(message.payload).map_err(|e| e.to_string())?;
        Ok(match event.kind {
            Some(Kind::Checkpoint(checkpoint)) => Some(checkpoint),
            _ => None,
        })
    }

    /// Publishes and waits for the stream's ack, so events of one publisher
    /// are stored in order. A failure is logged, never fatal to the task.
    pub async fn emit(&self, kind: Kind) {
        let event_kind = match &kind {
            Kind::State(_) => EventKind::State,
            Kind::Progress(_) => EventKind::Progress,
            Kind::Metric(_) => EventKind::Metric,
            Kind::Log(_) => EventKind::Log,
            Kind::Checkpoint(_) => EventKind::Checkpoint,
            Kind::Stuck(_) => EventKind::Stuck,
        };
        let event = v1::JobEvent {
            job_id: self.job.to_string(),
            tenant: self.tenant.to_string(),
            at_ms: crate::now_ms(),
            kind: Some(kind),
        };
        let subject = subject::event(&self.tenant, &self.job, event_kind);
        // Every event carries the trace context it was published in, so a
        // reader (webhooks, dashboards) can join the job's trace. Only state
        // changes get a send span of their own: progress and log events are
        // too many to be worth a span each.
        let mut headers = async_nats::HeaderMap::new();
        let span = match event_kind {
            EventKind::State | EventKind::Checkpoint | EventKind::Stuck => {
                let span = propagation::send_span(
                    &subject::destination(&subject),
                    propagation::JobAttrs {
                        job_id: Some(self.job.as_str()),
                        tenant: Some(self.tenant.as_str()),
                        ..Default::default()
                    },
                );
                propagation::inject_nats(&span.context(), &mut headers);
                span
            }
            _ => {
                propagation::inject_current_nats(&mut headers);
                tracing::Span::none()
            }
        };
        let publish = async {
            match self
                .js
                .publish_with_headers(subject, headers, event.encode_to_vec().into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        let result = publish.instrument(span).await;
        if let Err(error) = result {
            tracing::warn!(job = %self.job, %error, "could not publish job event");
        }
    }

    pub async fn progress(&self, progress: v1::Progress) {
        self.emit(Kind::Progress(progress)).await;
    }

    /// A log event; `line` may hold several lines joined by `\n` (the
    /// worker batches a trainer's output).
    pub async fn log(&self, stage: v1::Stage, stream: &str, line: &str) {
        self.emit(Kind::Log(v1::LogLine {
            stage: stage as i32,
            stream: stream.to_string(),
            line: line.to_string(),
        }))
        .await;
    }

    pub async fn metric(&self, name: &str, value: f64, step: u32) {
        self.emit(Kind::Metric(v1::Metric {
            name: name.to_string(),
            value,
            step,
        }))
        .await;
    }

    pub async fn checkpoint(&self, checkpoint: v1::Checkpoint) {
        self.emit(Kind::Checkpoint(checkpoint)).await;
    }

    pub async fn stuck(&self, stuck: v1::Stuck) {
        self.emit(Kind::Stuck(stuck)).await;
    }
}
