//! The tonic `JobService`: authentication and type plumbing only; the work
//! is in [`crate::api::JobApi`].

use crate::api::{ApiError, Auth, JobApi};
use futures::StreamExt;
use std::pin::Pin;
use tonic::{Request, Response, Status};
use trainyard_proto::TenantId;
use trainyard_proto::v1::job_service_server::JobService;
use trainyard_proto::v1::{
    CancelRequest, CancelResponse, GetRequest, GetResponse, JobEvent, ListRequest, ListResponse,
    SubmitRequest, SubmitResponse, ValidateReply, ValidateRequest, WatchRequest,
};

pub struct GrpcJobService {
    pub api: JobApi,
    pub auth: Auth,
}

impl GrpcJobService {
    fn tenant<T>(&self, request: &Request<T>) -> Result<TenantId, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.auth.tenant(header).map_err(|e| e.to_status())
    }
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for GrpcJobService {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let spec = request.into_inner().spec;
        self.api
            .submit(&tenant, spec)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let job = self
            .api
            .get(&tenant, &request.get_ref().job_id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(GetResponse { job: Some(job) }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let r = request.get_ref();
        self.api
            .list(&tenant, r.state(), r.page_size, &r.page_token)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let r = request.get_ref();
        self.api
            .cancel(&tenant, &r.job_id, &r.reason)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn validate(
        &self,
        request: Request<ValidateRequest>,
    ) -> Result<Response<ValidateReply>, Status> {
        let tenant = self.tenant(&request)?;
        let spec = request.into_inner().spec;
        self.api
            .validate(&tenant, spec)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = self.tenant(&request)?;
        let events = self
            .api
            .watch(&tenant, &request.get_ref().job_id)
            .await
            .map_err(|e| e.to_status())?;
        let stream = events.map(|item| item.map_err(|e: ApiError| e.to_status()));
        Ok(Response::new(Box::pin(stream)))
    }
}
