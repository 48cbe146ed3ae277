//! The job API, once: gRPC and the NATS request/reply front-ends both call
//! these methods with an authenticated tenant. Errors are [`ApiError`]
//! kinds, mapped to a gRPC status in one place ([`ApiError::to_status`]).
//! Reading a job's events (`GetMetrics`, `Watch`) is in [`events`].

mod error;
mod events;

use crate::effects::Effects;
use crate::job::{self, Decision, Event};
use crate::repo::{JobRepo, RepoError};
use crate::validate;
use async_nats::RequestErrorKind;
use async_nats::jetstream;
use bytes::Bytes;
use futures::Stream;
use prost::Message;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::time::Duration;
use tracing::Instrument;
use trainyard_core::topology::subject;
use trainyard_proto::v1::{
    CancelResponse, JobEvent, JobRecord, JobSpec, JobState, ListResponse, PreflightRequest,
    Problem, SubmitResponse, ValidateReply, WebhookSecretResponse,
};
use trainyard_proto::{JobId, TenantId};

pub use error::ApiError;
pub use events::{MAX_METRIC_NAMES, MAX_POINTS};

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
}
