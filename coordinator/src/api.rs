//! The job API, once: gRPC and the NATS request/reply front-ends both call
//! these methods with an authenticated tenant. Errors are [`ApiError`]
//! kinds, mapped to a gRPC status in one place ([`ApiError::to_status`]).

use crate::effects::Effects;
use crate::job::{self, Decision, Event};
use crate::repo::{JobRepo, RepoError};
use crate::validate;
use async_nats::RequestErrorKind;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;
use tracing::Instrument;
use trainyard_core::topology::{EVENTS_STREAM, EventKind, subject};
use trainyard_proto::v1::{
    CancelResponse, GetMetricsResponse, JobEvent, JobRecord, JobSpec, JobState, ListResponse,
    MetricPoint, MetricSeries, PreflightRequest, Problem, SubmitResponse, ValidateReply,
    WebhookSecretResponse, job_event::Kind,
};
use trainyard_proto::{JobId, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    /// The spec's problems, every one (the message is the user's guide).
    #[error(transparent)]
    Spec(#[from] validate::Invalid),
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// Too many failed authentications from this caller.
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    NotFound(String),
    /// A version the caller named is not the current one (caption review):
    /// the message names the current one.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    /// The fleet is not set up for this operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Past a tenant's quota (`[quotas]`) or one of the fleet's caps (an
    /// upload's bytes or files): the reason.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The record is stored but its first task is not published yet.
    #[error("job {job} stored but not queued yet: {source}; retry with the same idempotency key")]
    NotQueued {
        job: JobId,
        #[source]
        source: crate::effects::EffectError,
    },
    /// A JetStream or KV call failed.
    #[error("{0}")]
    Nats(#[source] async_nats::Error),
    /// A job's metric events could not be read.
    #[error("cannot read metrics: {0}")]
    Metrics(#[source] async_nats::Error),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The status code of each kind: the one mapping, for gRPC
    /// ([`Self::to_status`]) and the NATS API ([`Self::to_wire`]) alike.
    pub fn code(&self) -> tonic::Code {
        match self {
            ApiError::Invalid(_) | ApiError::Spec(_) => tonic::Code::InvalidArgument,
            ApiError::Unauthenticated => tonic::Code::Unauthenticated,
            ApiError::RateLimited(_) => tonic::Code::ResourceExhausted,
            ApiError::NotFound(_) => tonic::Code::NotFound,
            ApiError::Aborted(_) => tonic::Code::Aborted,
            ApiError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            ApiError::Unavailable(_)
            | ApiError::NotQueued { .. }
            | ApiError::Nats(_)
            | ApiError::Metrics(_) => tonic::Code::Unavailable,
            ApiError::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }

    /// The error in an `ApiReply`: the code by its stable name.
    pub fn to_wire(&self) -> trainyard_proto::v1::ApiError {
        trainyard_proto::v1::ApiError {
            code: trainyard_core::serve::code_name(self.code()).to_owned(),
            message: self.to_string(),
        }
    }
}

impl From<crate::webhooks::SecretStoreError> for ApiError {
    fn from(error: crate::webhooks::SecretStoreError) -> Self {
        use crate::webhooks::SecretStoreError as E;
        match error {
            E::Unavailable(_) | E::Contended(_) => ApiError::Unavailable(error.to_string()),
            E::Corrupt(_) | E::Random(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<RepoError> for ApiError {
    fn from(error: RepoError) -> Self {
        match error {
            RepoError::NotFound(_) => ApiError::NotFound("job not found".into()),
            RepoError::Unavailable(m) => ApiError::Unavailable(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, ApiError>> + Send>>;

#[derive(Clone)]
pub struct JobApi {
    pub repo: JobRepo,
    pub idem: jetstream::kv::Store,
    pub js: jetstream::Context,
    pub effects: Effects,
    /// For `ty.preflight` requests to the captioners.
    pub client: async_nats::Client,
    /// How long a captioner may take to answer a preflight request.
    pub validate_timeout: Duration,
    /// What a job's webhook must satisfy on this fleet.
    pub webhooks: crate::validate::SubmitRules,
    /// What the fleet's `[captioner.caption]` allows a job's captions.
    pub captions: crate::validate::CaptionRules,
    /// The tenants' webhook signing secrets; `None` when webhooks are off.
    pub webhook_secrets: Option<crate::webhooks::SecretStore>,
    /// Which destinations a job may use on this fleet.
    pub destinations: trainyard_core::destination::Destinations,
    /// The fleet key that seals jobs' secrets; `None`: jobs with secrets
    /// are refused.
    pub secrets: Option<std::sync::Arc<trainyard_core::secrets::Keyring>>,
    /// `[coordinator] max_spec_bytes`.
    pub max_spec_bytes: usize,
    /// The artifact store's root URI: a spec may name only its tenant's
    /// prefix below it.
    pub store_root: String,
    /// Signs the download URLs of the outputs `Get` and `List` show;
    /// `None`: they show none.
    pub download_urls: Option<std::sync::Arc<crate::downloads::DownloadUrls>>,
    /// The artifact store: a job's captions for review (`review`).
    pub store: trainyard_core::store::ArtifactStore,
}

/// The `ty_idem` key of a tenant's idempotency key.
pub fn idem_key(tenant: &TenantId, key: &str) -> String {
    format!(
        "{tenant}.{}",
        hex::encode(&Sha256::digest(key.as_bytes())[..16])
    )
}

/// Seals `spec`'s secrets for `tenant`'s `job` ("" for a preflight).
fn seal(
    keyring: Option<&trainyard_core::secrets::Keyring>,
    spec: &mut JobSpec,
    tenant: &TenantId,
    job: &str,
) -> Result<(), ApiError> {
    trainyard_core::secrets::seal_spec(keyring, spec, tenant.as_str(), job).map_err(|e| {
        ApiError::FailedPrecondition(format!(
            "secrets: this fleet cannot keep them ({e}); its operator sets [secrets] key_file"
        ))
    })
}

/// A record as a call other than `Get`/`List` answers it (submit, cancel,
/// approve): redacted, and with no stored download URL past its time, as
/// `Get` would show it (only `Get`, `List` and the webhook sign new ones).
pub(crate) fn answered(record: &JobRecord) -> JobRecord {
    let mut shown = record.redacted();
    crate::downloads::drop_expired(&mut shown, trainyard_core::now_ms());
    shown
}

pub(crate) fn parse_job(id: &str) -> Result<JobId, ApiError> {
    JobId::parse(id).map_err(|e| ApiError::Invalid(format!("job_id: {e}")))
}

impl JobApi {
    /// The largest spec this fleet takes: the configured limit, and never
    /// more than a quarter of what the NATS server carries in one message
    /// (the spec travels in the job record and in every task, beside other
    /// fields).
    fn spec_limit(&self) -> usize {
        let server = self.client.server_info().max_payload;
        match server {
            0 => self.max_spec_bytes,
            max => self.max_spec_bytes.min(max / 4),
        }
    }

    /// Refuses a spec over [`Self::spec_limit`], before anything else looks at it.
    fn check_spec_size(&self, spec: &JobSpec) -> Result<(), ApiError> {
        let (size, limit) = (spec.encoded_len(), self.spec_limit());
        if size > limit {
            return Err(validate::Invalid(vec![validate::FieldError::new(
                "spec",
                format!("is {size} bytes encoded, over this fleet's limit of {limit} bytes"),
            )])
            .into());
        }
        Ok(())
    }

    fn webhook_secrets(&self) -> Result<&crate::webhooks::SecretStore, ApiError> {
        self.webhook_secrets.as_ref().ok_or_else(|| {
            ApiError::FailedPrecondition("webhooks are not configured on this fleet".into())
        })
    }

    /// The caller's own webhook signing secret, made on first use. The
    /// tenant is the authenticated caller: no request names another.
    pub async fn webhook_secret(
        &self,
        tenant: &TenantId,
    ) -> Result<WebhookSecretResponse, ApiError> {
        let secrets = self.webhook_secrets()?.get_or_create(tenant).await?;
        Ok(secrets.response(trainyard_core::now_ms()))
    }

    /// Rotates the caller's webhook signing secret; the replaced one keeps
    /// signing for the fleet's overlap.
    pub async fn rotate_webhook_secret(
        &self,
        tenant: &TenantId,
    ) -> Result<WebhookSecretResponse, ApiError> {
        let secrets = self.webhook_secrets()?.rotate(tenant).await?;
        Ok(secrets.response(trainyard_core::now_ms()))
    }

    /// The fleet-dependent caption checks, every problem at once.
    fn check_captions(&self, spec: &JobSpec) -> Result<(), validate::Invalid> {
        let problems = self.captions.check(spec);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(validate::Invalid(problems))
        }
    }

    pub async fn submit(
        &self,
        tenant: &TenantId,
        spec: Option<JobSpec>,
    ) -> Result<SubmitResponse, ApiError> {
        let spec = spec.ok_or_else(|| ApiError::Invalid("spec: is required".into()))?;
        self.check_spec_size(&spec)?;
        let spec = validate::normalise(spec)?;
        self.check_spec_size(&spec)?;
        self.webhooks
            .check(&spec)
            .map_err(|e| validate::Invalid(vec![e]))?;
        self.check_captions(&spec)?;
        validate::check_destinations(&self.destinations, tenant, &spec)?;
        validate::check_store_refs(&self.store_root, tenant, &spec)?;
        let mut job = JobId::generate();
        if !spec.idempotency_key.is_empty() {
            let key = idem_key(tenant, &spec.idempotency_key);
            match self.idem.create(&key, Bytes::from(job.to_string())).await {
                Ok(_) => {}
                Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                    let first = self
                        .idem
                        .get(&key)
                        .await
                        .map_err(|e| ApiError::Nats(e.into()))?
                        .ok_or_else(|| {
                            ApiError::Unavailable("idempotency record vanished; retry".into())
                        })?;
                    let first = parse_job(&String::from_utf8_lossy(&first))?;
                    match self.repo.get(tenant, &first).await {
                        Ok(found) => {
                            self.requeue(&found.record).await?;
                            return Ok(SubmitResponse {
                                job: Some(answered(&found.record)),
                                duplicate: true,
                            });
                        }
                        // The first submission stopped between its two writes: finish it.
                        Err(RepoError::NotFound(_)) => job = first,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(ApiError::Nats(e.into())),
            }
        }
        let quota_hold = match crate::quota::admit(
            &self.repo.of_tenant(tenant).await?,
            &self.effects.quotas.for_tenant(tenant.as_str()),
            trainyard_core::now_ms(),
        ) {
            crate::quota::Admission::Start => String::new(),
            crate::quota::Admission::Hold(reason) => reason,
            crate::quota::Admission::Refuse(reason) => {
                return Err(ApiError::ResourceExhausted(reason));
            }
        };
        // From here on the secrets exist only sealed, for this job.
        let mut spec = spec;
        seal(self.secrets.as_deref(), &mut spec, tenant, job.as_str())?;
        let record = JobRecord {
            job_id: job.to_string(),
            tenant: tenant.to_string(),
            spec: Some(spec),
            trace_context: crate::trace::current_context(),
            quota_hold,
            ..Default::default()
        };
        let (record, effects) = job::submitted(record, trainyard_core::now_ms());
        match self.repo.create(&record).await {
            Ok(_) => {}
            Err(RepoError::Exists(_)) => {
                let found = self.repo.get(tenant, &job).await?;
                self.requeue(&found.record).await?;
                return Ok(SubmitResponse {
                    job: Some(answered(&found.record)),
                    duplicate: true,
                });
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(%job, %tenant, "job submitted");
        trainyard_core::telemetry::metrics()
            .job_submitted(tenant.as_str(), crate::effects::backend_of(&record));
        self.effects
            .run(&record, effects)
            .await
            .map_err(|source| ApiError::NotQueued {
                job: job.clone(),
                source,
            })?;
        Ok(SubmitResponse {
            job: Some(answered(&record)),
            duplicate: false,
        })
    }

    /// A retried submission of a job still `QUEUED` publishes its first task
    /// again: the first try may have stored the record and then failed to
    /// publish (`UNAVAILABLE`). The dedup id makes a repeat harmless.
    async fn requeue(&self, record: &JobRecord) -> Result<(), ApiError> {
        if record.state() != JobState::Queued {
            return Ok(());
        }
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            return Ok(());
        };
        let Some(task) = job::current_task(record) else {
            return Ok(());
        };
        self.effects
            .publish_task(&tenant, &job, task)
            .await
            .map_err(|source| ApiError::NotQueued { job, source })
    }

    /// Every check a job passes before training, without creating it: the
    /// submission checks here, then the dataset, model and destination
    /// checks by a captioner (which can fetch and unpack the dataset).
    pub async fn validate(
        &self,
        tenant: &TenantId,
        spec: Option<JobSpec>,
    ) -> Result<ValidateReply, ApiError> {
        let spec = spec.ok_or_else(|| ApiError::Invalid("spec: is required".into()))?;
        self.check_spec_size(&spec)?;
        let spec = match validate::normalise(spec).and_then(|spec| {
            self.webhooks
                .check(&spec)
                .map_err(|e| validate::Invalid(vec![e]))?;
            self.check_captions(&spec)?;
            validate::check_destinations(&self.destinations, tenant, &spec)?;
            validate::check_store_refs(&self.store_root, tenant, &spec)?;
            Ok(spec)
        }) {
            Ok(spec) => spec,
            // The captioner needs a normalised spec: stop at these.
            Err(validate::Invalid(problems)) => {
                return Ok(ValidateReply {
                    ok: false,
                    problems: problems
                        .into_iter()
                        .map(|p| Problem {
                            check: p.field,
                            message: p.problem,
                        })
                        .collect(),
                    ..Default::default()
                });
            }
        };
        let mut spec = spec;
        seal(self.secrets.as_deref(), &mut spec, tenant, "")?;
        let request = PreflightRequest {
            tenant: tenant.to_string(),
            spec: Some(spec),
        };
        let request = async_nats::Request::new()
            .payload(request.encode_to_vec().into())
            .timeout(Some(self.validate_timeout));
        let reply = self
            .client
            .send_request(subject::preflight(), request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => ApiError::Unavailable(
                    "no captioner is running to fetch and check the dataset; start one and retry"
                        .into(),
                ),
                RequestErrorKind::TimedOut => ApiError::Unavailable(format!(
                    "no captioner answered within {}s (coordinator.validate_timeout_secs); \
                     the dataset may be large or every captioner busy",
                    self.validate_timeout.as_secs()
                )),
                RequestErrorKind::MaxPayloadExceeded => {
                    ApiError::Invalid(format!("spec: too large to send for checking: {e}"))
                }
                _ => ApiError::Unavailable(format!("preflight request failed: {e}")),
            })?;
        ValidateReply::decode(reply.payload).map_err(|e| {
            ApiError::Internal(format!(
                "a captioner answered with an undecodable reply: {e}"
            ))
        })
    }

    pub async fn get(&self, tenant: &TenantId, job_id: &str) -> Result<JobRecord, ApiError> {
        let job = parse_job(job_id)?;
        let record = self.repo.get(tenant, &job).await?.record;
        Ok(self.shown(record).await)
    }

    /// A record as a client sees it: stored download URLs past their time
    /// dropped, the others filled, then redacted.
    async fn shown(&self, mut record: JobRecord) -> JobRecord {
        crate::downloads::drop_expired(&mut record, trainyard_core::now_ms());
        if let Some(urls) = &self.download_urls {
            urls.fill(&mut record).await;
        }
        record.redacted()
    }

    pub async fn list(
        &self,
        tenant: &TenantId,
        state: JobState,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListResponse, ApiError> {
        let size = match page_size {
            0 => 50,
            n => n.min(500),
        } as usize;
        let after = if page_token.is_empty() {
            None
        } else {
            Some(parse_job(page_token)?)
        };
        let mut jobs = Vec::new();
        let mut next_page_token = String::new();
        for id in self.repo.ids_of(tenant).await? {
            if after.as_ref().is_some_and(|after| &id >= after) {
                continue;
            }
            let record = match self.repo.get(tenant, &id).await {
                Ok(v) => v.record,
                Err(RepoError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            if state != JobState::Unspecified && record.state() != state {
                continue;
            }
            if jobs.len() == size {
                next_page_token = jobs
                    .last()
                    .map(|r: &JobRecord| r.job_id.clone())
                    .unwrap_or_default();
                break;
            }
            jobs.push(self.shown(record).await);
        }
        Ok(ListResponse {
            jobs,
            next_page_token,
        })
    }

    pub async fn cancel(
        &self,
        tenant: &TenantId,
        job_id: &str,
        reason: &str,
    ) -> Result<CancelResponse, ApiError> {
        let job = parse_job(job_id)?;
        let reason = if reason.is_empty() {
            "cancelled by client"
        } else {
            reason
        };
        let now = trainyard_core::now_ms();
        let (stored, decision) = self
            .repo
            .update(tenant, &job, |record| async move {
                match job::transition(
                    &record,
                    &Event::Cancel {
                        reason: reason.to_string(),
                    },
                    now,
                ) {
                    Decision::Apply(next, effects) => (Some(*next), (effects, record)),
                    Decision::Ignore(_) => (None, (Vec::new(), record)),
                }
            })
            .await?;
        let (effects, before) = decision;
        let record = match stored {
            Some(record) => {
                tracing::info!(%job, "job cancelled");
                // The cancel message and the state event join the job's trace.
                let span = crate::trace::job_span("cancel", &record);
                let _ = self.effects.run(&record, effects).instrument(span).await;
                record
            }
            None => before,
        };
        Ok(CancelResponse {
            job: Some(answered(&record)),
        })
    }

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
