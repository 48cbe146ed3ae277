//! The tonic `JobService`: authentication and type plumbing only; the work
//! is in [`crate::api::JobApi`]. Every call runs inside a server span, a
//! child of the trace context the caller sent in its metadata.

use crate::api::{ApiError, JobApi};
use crate::auth::Auth;
use futures::StreamExt;
use std::pin::Pin;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use trainyard_core::telemetry::propagation::{self, JobAttrs};
use trainyard_proto::v1::job_service_server::JobService;
use trainyard_proto::v1::{
    ApproveCaptionsRequest, ApproveCaptionsResponse, Captions, GetCaptionsRequest,
    UpdateCaptionsRequest,
};
use trainyard_proto::v1::{
    CancelRequest, CancelResponse, CreateDownloadResponse, CreateUploadRequest,
    CreateUploadResponse, DeleteUploadRequest, DeleteUploadResponse, DownloadChunk,
    DownloadRequest, GetMetricsRequest, GetMetricsResponse, GetRequest, GetResponse,
    GetWebhookSecretRequest, JobEvent, ListRequest, ListResponse, RotateWebhookSecretRequest,
    SubmitRequest, SubmitResponse, UploadChunk, UploadResponse, ValidateReply, ValidateRequest,
    WatchRequest, WebhookSecretResponse,
};
use trainyard_proto::{JobId, TenantId};

/// The gRPC service name, as in the method paths.
const SERVICE: &str = "/trainyard.v1.JobService/";

pub struct GrpcJobService {
    pub api: JobApi,
    pub auth: Auth,
    /// Uploads and downloads through the API (`transfer`).
    pub transfers: crate::transfer::Transfers,
}

impl GrpcJobService {
    fn tenant<T>(&self, request: &Request<T>) -> Result<TenantId, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        // The peer's address without its port: one client, many connections.
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
        self.auth.tenant(header, &peer).map_err(|e| e.to_status())
    }

    /// The server span of `method`; carries the job id when the request
    /// names one. The tenant is recorded once authenticated.
    fn span<T>(request: &Request<T>, method: &str, job_id: Option<&str>) -> tracing::Span {
        let span = propagation::rpc_server_span(&format!("{SERVICE}{method}"), request.metadata());
        propagation::record_job(
            &span,
            JobAttrs {
                job_id: job_id.filter(|id| JobId::parse(id).is_ok()),
                ..Default::default()
            },
        );
        span
    }
}

/// Records the tenant in the current (server) span.
fn record_tenant(tenant: &TenantId) {
    propagation::record_job(
        &tracing::Span::current(),
        JobAttrs {
            tenant: Some(tenant.as_str()),
            ..Default::default()
        },
    );
}

/// Records the job id (known once a submit created it) in the current span.
fn record_job_id(job_id: &str) {
    propagation::record_job(
        &tracing::Span::current(),
        JobAttrs {
            job_id: Some(job_id),
            ..Default::default()
        },
    );
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<JobEvent, Status>> + Send>>;
type DownloadStream = Pin<Box<dyn futures::Stream<Item = Result<DownloadChunk, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for GrpcJobService {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let span = Self::span(&request, "Submit", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let spec = request.into_inner().spec;
            let response = self
                .api
                .submit(&tenant, spec)
                .await
                .map_err(|e| e.to_status())?;
            if let Some(job) = &response.job {
                record_job_id(&job.job_id);
            }
            Ok(Response::new(response))
        }
        .instrument(span)
        .await
    }

    async fn get_captions(
        &self,
        request: Request<GetCaptionsRequest>,
    ) -> Result<Response<Captions>, Status> {
        let span = Self::span(&request, "GetCaptions", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.api
                .get_captions(&tenant, &request.get_ref().job_id)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn update_captions(
        &self,
        request: Request<UpdateCaptionsRequest>,
    ) -> Result<Response<Captions>, Status> {
        let span = Self::span(&request, "UpdateCaptions", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.api
                .update_captions(&tenant, request.get_ref())
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn approve_captions(
        &self,
        request: Request<ApproveCaptionsRequest>,
    ) -> Result<Response<ApproveCaptionsResponse>, Status> {
        let span = Self::span(&request, "ApproveCaptions", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let request = request.get_ref();
            self.api
                .approve_captions(&tenant, &request.job_id, request.version)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let span = Self::span(&request, "Get", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let job = self
                .api
                .get(&tenant, &request.get_ref().job_id)
                .await
                .map_err(|e| e.to_status())?;
            Ok(Response::new(GetResponse { job: Some(job) }))
        }
        .instrument(span)
        .await
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let span = Self::span(&request, "List", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let r = request.get_ref();
            self.api
                .list(&tenant, r.state(), r.page_size, &r.page_token)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let span = Self::span(&request, "Cancel", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let r = request.get_ref();
            self.api
                .cancel(&tenant, &r.job_id, &r.reason)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn validate(
        &self,
        request: Request<ValidateRequest>,
    ) -> Result<Response<ValidateReply>, Status> {
        let span = Self::span(&request, "Validate", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let spec = request.into_inner().spec;
            self.api
                .validate(&tenant, spec)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let span = Self::span(&request, "GetMetrics", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let r = request.get_ref();
            self.api
                .get_metrics(&tenant, &r.job_id, &r.names)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn get_webhook_secret(
        &self,
        request: Request<GetWebhookSecretRequest>,
    ) -> Result<Response<WebhookSecretResponse>, Status> {
        let span = Self::span(&request, "GetWebhookSecret", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.api
                .webhook_secret(&tenant)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<RotateWebhookSecretRequest>,
    ) -> Result<Response<WebhookSecretResponse>, Status> {
        let span = Self::span(&request, "RotateWebhookSecret", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.api
                .rotate_webhook_secret(&tenant)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    type WatchStream = WatchStream;

    /// The span covers opening the watch, not the stream that follows.
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let span = Self::span(&request, "Watch", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let events = self
                .api
                .watch(&tenant, &request.get_ref().job_id)
                .await
                .map_err(|e| e.to_status())?;
            let stream = events.map(|item| item.map_err(|e: ApiError| e.to_status()));
            Ok(Response::new(Box::pin(stream) as Self::WatchStream))
        }
        .instrument(span)
        .await
    }

    async fn upload(
        &self,
        request: Request<tonic::Streaming<UploadChunk>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let span = Self::span(&request, "Upload", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.transfers
                .upload(&tenant, request.into_inner())
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn delete_upload(
        &self,
        request: Request<DeleteUploadRequest>,
    ) -> Result<Response<DeleteUploadResponse>, Status> {
        let span = Self::span(&request, "DeleteUpload", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.transfers
                .delete_upload(&tenant, &request.get_ref().uri)
                .await
                .map(|()| Response::new(DeleteUploadResponse {}))
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    type DownloadStream = DownloadStream;

    /// The span covers finding the job, not the stream that follows.
    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let span = Self::span(&request, "Download", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let record = self
                .api
                .get(&tenant, &request.get_ref().job_id)
                .await
                .map_err(|e| e.to_status())?;
            let chunks = self
                .transfers
                .download(&record, &request.get_ref().name)
                .await
                .map_err(|e| e.to_status())?;
            let stream = chunks.map(|item| item.map_err(|e: ApiError| e.to_status()));
            Ok(Response::new(Box::pin(stream) as Self::DownloadStream))
        }
        .instrument(span)
        .await
    }

    async fn create_upload(
        &self,
        request: Request<CreateUploadRequest>,
    ) -> Result<Response<CreateUploadResponse>, Status> {
        let span = Self::span(&request, "CreateUpload", None);
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            self.transfers
                .create_upload(&tenant, request.get_ref())
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    async fn create_download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<CreateDownloadResponse>, Status> {
        let span = Self::span(&request, "CreateDownload", Some(&request.get_ref().job_id));
        async {
            let tenant = self.tenant(&request)?;
            record_tenant(&tenant);
            let record = self
                .api
                .get(&tenant, &request.get_ref().job_id)
                .await
                .map_err(|e| e.to_status())?;
            self.transfers
                .create_download(&record, &request.get_ref().name)
                .await
                .map(Response::new)
                .map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }
}
