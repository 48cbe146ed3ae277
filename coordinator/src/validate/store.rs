//! Store URIs a spec names (`dataset.artifact_uri`, a store
//! `base_model.uri`) must lie below its own tenant's uploads or jobs:
//! refused here, at `Submit` and `Validate`, before any service reads them.
//! The captioner and the worker check again against the task's tenant.

use super::{FieldError, Invalid};
use trainyard_core::store::scope::tenant_key;
use trainyard_models::ModelSource;
use trainyard_proto::TenantId;
use trainyard_proto::v1::{JobSpec, dataset_source::Source};

/// Every store URI of `spec` checked against `tenant`'s prefix of the store
/// rooted at `root`.
pub fn check_store_refs(root: &str, tenant: &TenantId, spec: &JobSpec) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    if let Some(Source::ArtifactUri(uri)) = spec.dataset.as_ref().and_then(|d| d.source.as_ref())
        && let Err(e) = tenant_key(root, tenant, uri)
    {
        problems.push(FieldError::new("dataset.artifact_uri", e.to_string()));
    }
    if let Some(model) = &spec.base_model
        && let Ok(ModelSource::Store(uri)) = ModelSource::parse(&model.uri)
        && let Err(e) = tenant_key(root, tenant, &uri)
    {
        problems.push(FieldError::new("base_model.uri", e.to_string()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid(problems))
    }
}
