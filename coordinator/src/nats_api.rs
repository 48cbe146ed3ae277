//! The job API as NATS request/reply on `ty.api.<op>`, for services that
//! speak NATS rather than gRPC. Same auth (an `authorization: Bearer …`
//! header), same methods, an `ApiReply` back. A bad request gets an error
//! reply (its code from [`ApiError::code`], by its stable name); it never
//! stops the listener. Served by [`trainyard_core::serve`]: up to
//! [`CONCURRENCY`] requests at once, so a `Validate` waiting minutes for a
//! captioner does not hold up a `Get`; each request is handled inside a
//! process span, a child of the trace context its headers carry.

use crate::api::{ApiError, JobApi};
use crate::auth::Auth;
use bytes::Bytes;
use prost::Message;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use trainyard_core::serve::{self, Responder, ServeError};
use trainyard_core::telemetry::propagation::{self, JobAttrs};
use trainyard_core::topology::{self, AUTH_HEADER, ApiOp, subject};
use trainyard_proto::JobId;
use trainyard_proto::v1::{
    ApiReply, ApproveCaptionsRequest, CancelRequest, GetCaptionsRequest, GetMetricsRequest,
    GetRequest, GetResponse, ListRequest, SubmitRequest, UpdateCaptionsRequest, ValidateRequest,
    api_reply::Result as Reply,
};

/// Requests one coordinator answers at once; more wait in the subscription.
pub const CONCURRENCY: usize = 64;

/// Subscribes to the API subjects. Done before the coordinator reports
/// ready, so a request sent right after start-up finds a responder.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    serve::subscribe(client, subject::all_api(), topology::API_QUEUE).await
}

/// Answers API requests until `shutdown`; a request running then finishes.
pub async fn serve(
    client: async_nats::Client,
    requests: async_nats::Subscriber,
    api: JobApi,
    auth: Auth,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let responder = Arc::new(NatsApi { api, auth });
    serve::serve(requests, client, responder, CONCURRENCY, shutdown).await
}

/// The job API as a [`Responder`].
pub struct NatsApi {
    pub api: JobApi,
    pub auth: Auth,
}

/// The operation of an API subject.
fn op_of(api_subject: &str) -> Option<ApiOp> {
    api_subject.rsplit('.').next().and_then(ApiOp::from_name)
}

impl Responder for NatsApi {
    fn destination(&self, api_subject: &str) -> String {
        op_of(api_subject).map_or_else(|| subject::all_api().to_owned(), subject::api)
    }

    async fn answer(&self, request: &async_nats::Message) -> Bytes {
        let result = match handle(&self.api, &self.auth, request).await {
            Ok(result) => result,
            Err(error) => Reply::Error(error.to_wire()),
        };
        ApiReply {
            result: Some(result),
        }
        .encode_to_vec()
        .into()
    }
}

async fn handle(
    api: &JobApi,
    auth: &Auth,
    message: &async_nats::Message,
) -> Result<Reply, ApiError> {
    let header = message
        .headers
        .as_ref()
        .and_then(|h| h.get(AUTH_HEADER))
        .map(|v| v.as_str());
    let tenant = auth.tenant(header, &peer_of(message))?;
    record(JobAttrs {
        tenant: Some(tenant.as_str()),
        ..Default::default()
    });
    let op =
        op_of(&message.subject).ok_or_else(|| ApiError::Invalid("unknown api operation".into()))?;
    let bad =
        |e: prost::DecodeError| ApiError::Invalid(format!("request is not valid protobuf: {e}"));
    let payload = message.payload.clone();
    Ok(match op {
        ApiOp::Submit => {
            let response = api
                .submit(&tenant, SubmitRequest::decode(payload).map_err(bad)?.spec)
                .await?;
            if let Some(job) = &response.job {
                record_job_id(&job.job_id);
            }
            Reply::Submit(response)
        }
        ApiOp::Get => {
            let request = GetRequest::decode(payload).map_err(bad)?;
            record_job_id(&request.job_id);
            Reply::Get(GetResponse {
                job: Some(api.get(&tenant, &request.job_id).await?),
            })
        }
        ApiOp::List => {
            let request = ListRequest::decode(payload).map_err(bad)?;
            Reply::List(
                api.list(
                    &tenant,
                    request.state(),
                    request.page_size,
                    &request.page_token,
                )
                .await?,
            )
        }
        ApiOp::Cancel => {
            let request = CancelRequest::decode(payload).map_err(bad)?;
            record_job_id(&request.job_id);
            Reply::Cancel(
                api.cancel(&tenant, &request.job_id, &request.reason)
                    .await?,
            )
        }
        ApiOp::Validate => Reply::Validate(
            api.validate(&tenant, ValidateRequest::decode(payload).map_err(bad)?.spec)
                .await?,
        ),
        ApiOp::GetMetrics => {
            let request = GetMetricsRequest::decode(payload).map_err(bad)?;
            record_job_id(&request.job_id);
            Reply::Metrics(
                api.get_metrics(&tenant, &request.job_id, &request.names)
                    .await?,
            )
        }
        // The payload (an empty request message) carries nothing: the
        // secret is the authenticated tenant's, never another's.
        ApiOp::WebhookSecret => Reply::WebhookSecret(api.webhook_secret(&tenant).await?),
        ApiOp::RotateWebhookSecret => {
            Reply::WebhookSecret(api.rotate_webhook_secret(&tenant).await?)
        }
        ApiOp::GetCaptions => {
            let request = GetCaptionsRequest::decode(payload).map_err(bad)?;
            record_job_id(&request.job_id);
            Reply::Captions(api.get_captions(&tenant, &request.job_id).await?)
        }
        ApiOp::UpdateCaptions => {
            let request = UpdateCaptionsRequest::decode(payload).map_err(bad)?;
            record_job_id(&request.job_id);
            Reply::Captions(api.update_captions(&tenant, &request).await?)
        }
        ApiOp::ApproveCaptions => {
            let request = ApproveCaptionsRequest::decode(payload).map_err(bad)?;
            record_job_id(&request.job_id);
            Reply::ApproveCaptions(
                api.approve_captions(&tenant, &request.job_id, request.version)
                    .await?,
            )
        }
    })
}

/// Who sent a request, for the failed-authentication limit: NATS does not
/// tell a subscriber the sender's address, so the peer is its reply inbox
/// without the last token (`_INBOX.<connection>`), which is one client
/// connection (and, with per-role inbox prefixes, one role).
fn peer_of(message: &async_nats::Message) -> String {
    let reply = message.reply.as_ref().map_or("", |r| r.as_str());
    let prefix = reply.rsplit_once('.').map_or(reply, |(prefix, _)| prefix);
    format!("nats:{prefix}")
}

fn record(job: JobAttrs<'_>) {
    propagation::record_job(&tracing::Span::current(), job);
}

/// Records a request's job id in the current span, once it parses as one.
fn record_job_id(job_id: &str) {
    if JobId::parse(job_id).is_ok() {
        record(JobAttrs {
            job_id: Some(job_id),
            ..Default::default()
        });
    }
}
