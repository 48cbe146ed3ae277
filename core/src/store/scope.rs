//! What a tenant may name in the store, and how much of it may be read.
//!
//! A spec names store objects by URI (`dataset.artifact_uri`, a store
//! `base_model.uri`). Such a URI is accepted only when it lies below its own
//! tenant's uploads or jobs (`tenants/<tenant>/uploads/<id>…`,
//! `tenants/<tenant>/jobs/<job>…`): never another tenant's prefix, the
//! fleet's `models/`, `tenants/` or the store's root. Paths are taken
//! literally: an empty, `.` or `..` segment, a `%` (an encoded separator),
//! a backslash or a control character refuses the URI, so no two spellings
//! name the same key. The coordinator checks at `Submit` and `Validate`; the
//! captioner and the worker check again against the task's tenant before
//! they read anything.
//!
//! Reads a tenant causes are capped before any byte moves: listing a prefix
//! stops at a file count and sums sizes against a byte cap ([`ReadCaps`]).

use super::keys;
use trainyard_proto::TenantId;

/// Why a URI named by a spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("{uri} is not in the artifact store")]
    NotInStore { uri: String },
    #[error(
        "{uri}: a path segment is empty, '.' or '..', or holds '%', '\\' or a control character"
    )]
    BadPath { uri: String },
    #[error(
        "{uri} is outside tenants/{tenant}/uploads/<id> and tenants/{tenant}/jobs/<job>: a job may read only its own tenant's uploads and jobs"
    )]
    OtherTenant { uri: String, tenant: String },
}

/// The key a spec of `tenant` may read at `uri`, in the store rooted at
/// `root` (`file:///abs` or `s3://bucket/prefix`, no trailing slash). A
/// plain absolute path is read as a `file://` URI.
pub fn tenant_key(root: &str, tenant: &TenantId, uri: &str) -> Result<String, ScopeError> {
    let shown = || crate::redact::display_url(uri);
    let full = match uri.strip_prefix('/') {
        Some(_) if root.starts_with("file://") => format!("file://{uri}"),
        _ => uri.to_string(),
    };
    let rest = full
        .strip_prefix(root)
        .ok_or_else(|| ScopeError::NotInStore { uri: shown() })?;
    let key = match rest {
        "" | "/" => "",
        rest => rest
            .strip_prefix('/')
            .ok_or_else(|| ScopeError::NotInStore { uri: shown() })?,
    };
    let key = key.strip_suffix('/').unwrap_or(key);
    let segments: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('/').collect()
    };
    let bad_segment = |s: &&str| {
        s.is_empty()
            || *s == "."
            || *s == ".."
            || s.bytes()
                .any(|b| b == b'%' || b == b'\\' || b.is_ascii_control())
    };
    if segments.iter().any(bad_segment) {
        return Err(ScopeError::BadPath { uri: shown() });
    }
    match segments.as_slice() {
        [keys::TENANTS, t, kind, _id, ..]
            if *t == tenant.as_str() && (*kind == keys::UPLOADS || *kind == keys::JOBS) =>
        {
            Ok(key.to_string())
        }
        _ => Err(ScopeError::OtherTenant {
            uri: shown(),
            tenant: tenant.to_string(),
        }),
    }
}

/// How much one read a tenant caused may take from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadCaps {
    pub max_files: usize,
    pub max_bytes: u64,
}

impl ReadCaps {
    /// No cap: for the fleet's own reads (its checkpoints, its models).
    pub const NONE: ReadCaps = ReadCaps {
        max_files: usize::MAX,
        max_bytes: u64::MAX,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "file:///srv/store";

    fn key(uri: &str) -> Result<String, ScopeError> {
        tenant_key(ROOT, &TenantId::parse("acme").unwrap(), uri)
    }

    #[test]
    fn a_tenant_names_only_its_own_uploads_and_jobs() {
        assert_eq!(
            key("file:///srv/store/tenants/acme/uploads/u1").unwrap(),
            "tenants/acme/uploads/u1"
        );
        assert_eq!(
            key("/srv/store/tenants/acme/jobs/j-1/output/lora.safetensors/").unwrap(),
            "tenants/acme/jobs/j-1/output/lora.safetensors"
        );
        for other in [
            "file:///srv/store",
            "file:///srv/store/",
            "file:///srv/store/tenants",
            "file:///srv/store/tenants/acme",
            "file:///srv/store/tenants/acme/jobs",
            "file:///srv/store/tenants/globex/uploads/u1",
            "file:///srv/store/tenants/globex/jobs/j-1/dataset",
            "file:///srv/store/jobs/j-1/dataset",
            "file:///srv/store/models/reference-denoiser-v1-r32/model.safetensors",
            "file:///srv/store/tenants/acme/secrets/x",
        ] {
            assert!(
                matches!(key(other), Err(ScopeError::OtherTenant { .. })),
                "{other}: {:?}",
                key(other)
            );
        }
        for bad in [
            "file:///srv/store/tenants/acme/uploads/../../globex/uploads/u1",
            "file:///srv/store/tenants/acme/uploads/./u1",
            "file:///srv/store/tenants/acme/uploads//u1",
            "file:///srv/store/tenants/acme/uploads/u1%2f..%2f..%2fglobex",
            "file:///srv/store/tenants/acme/uploads/u1\\..\\x",
        ] {
            assert!(
                matches!(key(bad), Err(ScopeError::BadPath { .. })),
                "{bad}: {:?}",
                key(bad)
            );
        }
        for outside in [
            "file:///srv/storex/tenants/acme/uploads/u1",
            "file:///etc/passwd",
            "s3://bucket/tenants/acme/uploads/u1",
        ] {
            assert!(
                matches!(key(outside), Err(ScopeError::NotInStore { .. })),
                "{outside}"
            );
        }
    }
}
