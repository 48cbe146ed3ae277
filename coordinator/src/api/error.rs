//! The job API's one error type: a kind per answer, mapped to a gRPC
//! status ([`ApiError::to_status`]) and to the NATS front-end's wire
//! error in one place.

use crate::repo::RepoError;
use crate::validate;
use trainyard_proto::JobId;

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
