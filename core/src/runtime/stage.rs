//! What a stage sees of the runtime: the task trait, the handler trait, the
//! context a handler runs in and the error that says how a task ended. Kept
//! apart from the run loop so a stage's author reads only this.

use crate::events::EventSink;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_proto::v1::{self, ErrorKind, JobError, JobRecord, Stage, stage_result::Outcome};
use trainyard_proto::{Attempt, IdError, JobId, TenantId};

/// Who a task is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMeta {
    pub tenant: TenantId,
    pub job: JobId,
    pub attempt: Attempt,
}

/// A task message of some stage.
pub trait StageTask: prost::Message + Default + Send + 'static {
    fn meta(&self) -> Result<TaskMeta, IdError>;
    /// The job's own retry policy, if its spec has one.
    fn retry_policy(&self) -> Option<&v1::RetryPolicy>;
    /// Drops the spec's secrets (a dead letter keeps a copy of the task).
    fn redact(&mut self);
}

/// A task message with its spec's secrets redacted, for a dead letter;
/// bytes that do not decode are kept as they are (nothing to redact in).
pub(super) fn redacted_payload<T: StageTask>(payload: &[u8]) -> Vec<u8> {
    match T::decode(payload) {
        Ok(mut task) => {
            task.redact();
            task.encode_to_vec()
        }
        Err(_) => payload.to_vec(),
    }
}

macro_rules! stage_task {
    ($t:ty) => {
        impl StageTask for $t {
            fn meta(&self) -> Result<TaskMeta, IdError> {
                Ok(TaskMeta {
                    tenant: TenantId::parse(&self.tenant)?,
                    job: JobId::parse(&self.job_id)?,
                    attempt: Attempt(self.attempt),
                })
            }
            fn retry_policy(&self) -> Option<&v1::RetryPolicy> {
                self.spec.as_ref().and_then(|s| s.retry.as_ref())
            }
            fn redact(&mut self) {
                if let Some(spec) = self.spec.as_mut() {
                    *spec = spec.redacted();
                }
            }
        }
    };
}
stage_task!(v1::PrepareTask);
stage_task!(v1::TrainTask);
stage_task!(v1::DeliverTask);

/// How a task ended, when it did not succeed. Retry intent is part of the
/// type. Shown to people as the error's message.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Transient: try again (the same attempt, redelivered) after the retry
    /// policy's delay, and not before `delay` (a server's `Retry-After`;
    /// zero when the handler has no such hint). The policy may still fail
    /// the job: a non-retryable kind, or out of attempts.
    #[error("{}", error.message)]
    Retry { error: JobError, delay: Duration },
    /// As [`StageError::Retry`], and when the policy does retry, the
    /// runtime first publishes `report` as a result of this delivery (under
    /// the task's claim, before the NAK), so the coordinator can record
    /// what the next delivery should do differently; the next delivery
    /// finds it in [`TaskContext::record`]. The training stage reports
    /// lighter settings after an OOM this way (`Outcome::Adjusted`).
    #[error("{}", error.message)]
    RetryWithReport {
        error: JobError,
        delay: Duration,
        report: Box<Outcome>,
    },
    /// Permanent: the job fails with this error.
    #[error("{}", .0.message)]
    Fail(JobError),
    /// The job was cancelled while the task ran.
    #[error("the job was cancelled")]
    Cancelled,
    /// The service is stopping; hand the task back at once.
    #[error("the service is stopping; the task is handed back")]
    Interrupted,
}

impl StageError {
    pub fn fail(kind: ErrorKind, message: impl Into<String>) -> Self {
        StageError::Fail(job_error(kind, message, false))
    }

    pub fn retry(kind: ErrorKind, message: impl Into<String>, delay: Duration) -> Self {
        StageError::Retry {
            error: job_error(kind, message, true),
            delay,
        }
    }
}

/// Artifact-store trouble is worth a retry unless the object or URI is wrong;
/// a URI the job may not read (or not that much of) is its spec's fault.
impl From<crate::store::StoreError> for StageError {
    fn from(error: crate::store::StoreError) -> Self {
        if error.is_retryable() {
            StageError::retry(ErrorKind::Storage, error.to_string(), Duration::ZERO)
        } else if error.is_refused() {
            StageError::fail(ErrorKind::InvalidSpec, error.to_string())
        } else {
            StageError::fail(ErrorKind::Storage, error.to_string())
        }
    }
}

pub fn job_error(kind: ErrorKind, message: impl Into<String>, retryable: bool) -> JobError {
    JobError {
        kind: kind as i32,
        message: message.into(),
        retryable,
        stage: Stage::Unspecified as i32,
    }
}

/// What a handler gets besides its task: who it is for, the job record the
/// runtime checked it against, where to send events, and the tokens that
/// tell it to stop.
pub struct TaskContext {
    pub meta: TaskMeta,
    pub stage: Stage,
    /// Deliveries of this message so far, from 1.
    pub delivered: u32,
    pub worker_id: String,
    /// The job record as read just before the task was claimed: the job
    /// runs this stage and attempt. It carries what earlier deliveries
    /// reported with a retry ([`StageError::RetryWithReport`]), e.g. the
    /// training stage's `effective_training`.
    pub record: Arc<JobRecord>,
    pub events: EventSink,
    /// Cancelled when the job is cancelled, or when this runtime lost its
    /// claim on the task to another one: stop at once (kill the trainer);
    /// whatever the handler returns then is dropped.
    pub cancel: CancellationToken,
    /// Cancelled when the service must hand the task back (shutdown, or a
    /// drain request, past the drain grace).
    pub stop: CancellationToken,
    /// Bytes of log events the job has published from this stage so far,
    /// over all its attempts (carried by the task's claim,
    /// [`trainyard_proto::v1::TaskClaim::log_bytes`]): a handler that
    /// meters its logs starts from it and adds what it publishes; the
    /// runtime writes it into the claim with each heartbeat.
    pub log_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TaskContext {
    /// A short progress note for this stage ("fetching dataset").
    pub async fn note(&self, message: &str) {
        self.events
            .progress(v1::Progress {
                stage: self.stage as i32,
                message: message.to_string(),
                ..Default::default()
            })
            .await;
    }
}

/// A stage's logic. Everything else is the runtime's.
pub trait StageHandler: Send + Sync + 'static {
    type Task: StageTask;
    fn handle(
        &self,
        task: Self::Task,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Outcome, StageError>> + Send;
}
