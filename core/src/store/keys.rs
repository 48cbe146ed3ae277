//! Keys of the store's layout, built here and nowhere else. Everything a
//! job writes or reads lies below its tenant's prefix:
//!
//! - `tenants/<tenant>/uploads/<id>/…`: what a client uploaded;
//! - `tenants/<tenant>/jobs/<job>/{dataset,input,checkpoints/<step>,output,logs}/…`;
//! - `models/<name>/…`: base models the fleet makes itself (the reference
//!   model); never named by a spec.
//!
//! Tenant and job ids hold only ascii letters, digits, `-` and `_`, so a
//! key built from them is one path segment each, whatever the tenant sent.

use trainyard_proto::{JobId, TenantId};

/// The first segment of every tenant's prefix.
pub const TENANTS: &str = "tenants";
/// The folder of a tenant's uploads.
pub const UPLOADS: &str = "uploads";
/// The folder of a tenant's jobs.
pub const JOBS: &str = "jobs";

/// Everything stored for a tenant.
pub fn tenant(tenant: &TenantId) -> String {
    format!("{TENANTS}/{tenant}")
}

/// A tenant's uploads.
pub fn uploads(tenant_id: &TenantId) -> String {
    format!("{}/{UPLOADS}", tenant(tenant_id))
}

/// One upload of a tenant; `id` must be one path segment (see
/// [`new_upload_id`]).
pub fn upload(tenant_id: &TenantId, id: &str) -> String {
    debug_assert!(is_segment(id), "upload id {id:?}");
    format!("{}/{id}", uploads(tenant_id))
}

/// A fresh, time-ordered upload id.
pub fn new_upload_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Whether `id` is a plain path segment: ascii letters, digits, `-`, `_`, `.`
/// and not `.` or `..`.
pub fn is_segment(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Everything stored for a job.
pub fn job(tenant_id: &TenantId, job: &JobId) -> String {
    format!("{}/{JOBS}/{job}", tenant(tenant_id))
}

pub fn dataset(tenant: &TenantId, job_id: &JobId) -> String {
    format!("{}/dataset", job(tenant, job_id))
}

/// A file of a job's prepared dataset (`manifest.json`, `<stem>.txt`).
pub fn dataset_file(tenant: &TenantId, job_id: &JobId, name: &str) -> String {
    format!("{}/{name}", dataset(tenant, job_id))
}

/// The captions of a job at `version` (2 and up: version 1 is the
/// prepared dataset's manifest), written once by the `UpdateCaptions`
/// that reserved that version.
pub fn captions(tenant: &TenantId, job_id: &JobId, version: u32) -> String {
    format!("{}/captions/v{version:06}.json", job(tenant, job_id))
}

pub fn input(tenant: &TenantId, job_id: &JobId) -> String {
    format!("{}/input", job(tenant, job_id))
}

/// The folder of a job's checkpoints.
pub fn checkpoints(tenant: &TenantId, job_id: &JobId) -> String {
    format!("{}/checkpoints", job(tenant, job_id))
}

pub fn checkpoint(tenant: &TenantId, job_id: &JobId, step: u32) -> String {
    format!("{}/{step:08}", checkpoints(tenant, job_id))
}

/// The manifest of a checkpoint stored at `prefix`.
pub fn checkpoint_manifest(prefix: &str) -> String {
    format!("{}/checkpoint.json", prefix.trim_end_matches('/'))
}

/// A file of a checkpoint stored at `prefix`, relative to the run's output.
pub fn checkpoint_file(prefix: &str, rel: &str) -> String {
    format!("{}/files/{rel}", prefix.trim_end_matches('/'))
}

pub fn output(tenant: &TenantId, job_id: &JobId) -> String {
    format!("{}/output", job(tenant, job_id))
}

/// A file of a job's output folder.
pub fn output_file(tenant: &TenantId, job_id: &JobId, name: &str) -> String {
    format!("{}/{name}", output(tenant, job_id))
}

/// A base model the fleet makes itself; not below any tenant.
pub fn model(name: &str) -> String {
    format!("models/{name}")
}

/// A job's log artifacts.
pub fn logs(tenant: &TenantId, job_id: &JobId) -> String {
    format!("{}/logs", job(tenant, job_id))
}

/// The trainer output of one run of the training stage: its attempt
/// and, as a transient failure is retried by redelivering the same
/// attempt, the delivery (`train-attempt-1-delivery-2.log`).
pub fn train_log(tenant: &TenantId, job: &JobId, attempt: u32, delivery: u32) -> String {
    format!(
        "{}/train-attempt-{attempt}-delivery-{delivery}.log",
        logs(tenant, job)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_key_is_below_its_tenant() {
        let (t, j) = (
            TenantId::parse("acme").unwrap(),
            JobId::parse("j-1").unwrap(),
        );
        for key in [
            dataset(&t, &j),
            input(&t, &j),
            checkpoint(&t, &j, 7),
            output(&t, &j),
            logs(&t, &j),
            train_log(&t, &j, 1, 2),
            upload(&t, "u1"),
        ] {
            assert!(key.starts_with("tenants/acme/"), "{key}");
        }
        assert_eq!(
            checkpoint(&t, &j, 7),
            "tenants/acme/jobs/j-1/checkpoints/00000007"
        );
        assert!(!is_segment(".."));
        assert!(!is_segment("a/b"));
        assert!(!is_segment("a%2fb"));
        assert!(is_segment(&new_upload_id()));
    }
}
