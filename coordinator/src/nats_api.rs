//! The job API as NATS request/reply on `ty.api.<op>`, for services that
//! speak NATS rather than gRPC. Same auth (an `authorization: Bearer …`
//! header), same methods, an `ApiReply` back. A bad request gets an error
//! reply; it never stops the listener. Each request is handled inside a
//! process span, a child of the trace context its headers carry.

use crate::api::{ApiError, Auth, JobApi};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use trainyard_core::telemetry::propagation::{self, JobAttrs};
use trainyard_core::topology::{AUTH_HEADER, ApiOp, subject};
use trainyard_proto::JobId;
use trainyard_proto::v1::{
    ApiReply, CancelRequest, GetMetricsRequest, GetRequest, GetResponse, ListRequest,
    SubmitRequest, ValidateRequest, api_reply::Result as Reply,
};

/// Subscribes to the API subjects. Done before the coordinator reports
/// ready, so a request sent right after start-up finds a responder.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    let requests = client
        .queue_subscribe(subject::all_api(), "ty-coordinator".into())
        .await?;
    client.flush().await?;
    Ok(requests)
}

pub async fn serve(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    api: JobApi,
    auth: Auth,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message { Some(m) => m, None => break },
        };
        let Some(reply_to) = message.reply.clone() else {
            continue;
        };
        // A child of the requester's context, if its headers carry one.
        let op = message
            .subject
            .rsplit('.')
            .next()
            .and_then(ApiOp::from_name)
            .map_or("unknown", ApiOp::name);
        let span = propagation::process_span(
            message.headers.as_ref(),
            &format!("ty.api.{op}"),
            JobAttrs::default(),
        );
        let reply = handle(&api, &auth, &message).instrument(span).await;
        let reply = match reply {
            Ok(result) => ApiReply {
                result: Some(result),
            },
            Err(error) => ApiReply {
                result: Some(Reply::Error(trainyard_proto::v1::ApiError {
                    code: format!("{:?}", error.code()),
                    message: error.to_string(),
                })),
            },
        };
        if let Err(error) = client.publish(reply_to, reply.encode_to_vec().into()).await {
            tracing::warn!(%error, "could not send api reply");
        }
    }
    let _ = requests.unsubscribe().await;
    Ok(())
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
    let tenant = auth.tenant(header)?;
    record(JobAttrs {
        tenant: Some(tenant.as_str()),
        ..Default::default()
    });
    let op = message
        .subject
        .rsplit('.')
        .next()
        .and_then(ApiOp::from_name)
        .ok_or_else(|| ApiError::Invalid("unknown api operation".into()))?;
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
    })
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
