//! Delivery destinations: where a job's outputs go besides the artifact
//! store (`file:///abs/dir`, an absolute path, or `s3://bucket/prefix`).
//!
//! One type decides which destinations a job may use and opens them, so
//! the uploader (which writes to them) and preflight (which probes them
//! before a GPU is held) can never disagree about what is allowed. Local
//! folders must lie inside `[uploader] allowed_local_roots` when that list
//! is set, and never contain `..`.
//!
//! [`Destinations::probe`] answers "could the uploader write here now?"
//! without leaving anything behind: a local folder is checked where it is
//! (or, when it does not exist yet, at the nearest existing parent the
//! uploader would create it under) by creating and removing a probe file;
//! an S3 destination gets a real put and delete of a small probe object.

use crate::store::{ArtifactStore, S3Options, StoreError};
use bytes::Bytes;
use std::path::{Component, Path, PathBuf};

/// Why a destination may not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("destination {uri} contains '..'")]
    ParentDir { uri: String },
    #[error("destination {uri} is outside the uploader's allowed local roots ({roots})")]
    OutsideRoots { uri: String, roots: String },
    #[error("destination {uri}: {source}")]
    Open { uri: String, source: StoreError },
}

/// What a failed probe means for the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The destination is not allowed, or is not a writable folder/bucket.
    Refused,
    /// The credentials were refused.
    Denied,
    /// It could not be checked now (network, server trouble): worth a retry.
    Unavailable,
}

/// A failed probe: what it means and a message naming the destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProbeError {
    pub failure: ProbeFailure,
    pub message: String,
}

impl ProbeError {
    fn new(failure: ProbeFailure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }
}

/// The rules for opening destinations: the allowed local roots and how
/// `s3://` is reached.
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    allowed_roots: Vec<PathBuf>,
    s3: S3Options,
}

/// The local folder of a `file://` or absolute-path destination.
fn local_path(uri: &str) -> Option<&Path> {
    uri.strip_prefix("file://")
        .or_else(|| uri.starts_with('/').then_some(uri))
        .map(Path::new)
}

impl Destinations {
    /// `allowed_roots` empty allows any local folder.
    pub fn new(allowed_roots: Vec<PathBuf>, s3: S3Options) -> Self {
        Self { allowed_roots, s3 }
    }

    /// Whether `uri` may be used, without touching it.
    pub fn check(&self, uri: &str) -> Result<(), DestinationError> {
        let Some(path) = local_path(uri) else {
            return Ok(());
        };
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(DestinationError::ParentDir { uri: uri.into() });
        }
        if !self.allowed_roots.is_empty()
            && !self.allowed_roots.iter().any(|root| path.starts_with(root))
        {
            let roots = self
                .allowed_roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(DestinationError::OutsideRoots {
                uri: uri.into(),
                roots,
            });
        }
        Ok(())
    }

    /// Opens `uri` as a store (a local folder is created when missing).
    pub fn open(&self, uri: &str) -> Result<ArtifactStore, DestinationError> {
        self.check(uri)?;
        ArtifactStore::open_with(uri, &self.s3).map_err(|source| DestinationError::Open {
            uri: uri.into(),
            source,
        })
    }

    /// Checks that the uploader could write to `uri` now; see the module docs.
    pub async fn probe(&self, uri: &str) -> Result<(), ProbeError> {
        self.check(uri)
            .map_err(|e| ProbeError::new(ProbeFailure::Refused, e.to_string()))?;
        match local_path(uri) {
            Some(path) => {
                let (uri, path) = (uri.to_owned(), path.to_owned());
                tokio::task::spawn_blocking(move || probe_local(&uri, &path))
                    .await
                    .map_err(|e| ProbeError::new(ProbeFailure::Unavailable, e.to_string()))?
            }
            None => self.probe_remote(uri).await,
        }
    }

    async fn probe_remote(&self, uri: &str) -> Result<(), ProbeError> {
        let store = ArtifactStore::open_with(uri, &self.s3).map_err(|e| {
            ProbeError::new(ProbeFailure::Refused, format!("destination {uri}: {e}"))
        })?;
        let key = probe_name();
        let written = store.put_bytes(&key, Bytes::from_static(b"ok\n")).await;
        let result = match written {
            Ok(_) => store.delete(&key).await,
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            let failure = match &e {
                StoreError::Backend(
                    object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. },
                ) => ProbeFailure::Denied,
                StoreError::Backend(object_store::Error::NotFound { .. })
                | StoreError::BadUri(_)
                | StoreError::NotFound(_) => ProbeFailure::Refused,
                _ => ProbeFailure::Unavailable,
            };
            let why = match failure {
                ProbeFailure::Denied => "the credentials may not write there",
                ProbeFailure::Refused => "the bucket does not exist or cannot hold objects",
                ProbeFailure::Unavailable => "could not be reached",
            };
            tracing::info!(uri = %crate::redact::display_url(uri), error = %e, "destination probe failed");
            ProbeError::new(
                failure,
                format!("destination {uri} is not writable: {why} ({})", brief(&e)),
            )
        })
    }
}

/// The gist of a store error: the HTTP status an S3 server answered with,
/// else the first line (servers append whole XML bodies).
fn brief(error: &StoreError) -> String {
    let text = error.to_string();
    if let Some((_, rest)) = text.split_once("status code: ") {
        let status = rest.split(':').next().unwrap_or(rest).trim();
        return format!("the server answered {status}");
    }
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

fn probe_name() -> String {
    format!(".trainyard-probe-{}", uuid::Uuid::now_v7().simple())
}

/// Blocking: the folder, or the nearest existing parent it would be made
/// under, is a folder a probe file can be created in and removed from.
fn probe_local(uri: &str, path: &Path) -> Result<(), ProbeError> {
    let refused = |why: String| {
        ProbeError::new(
            ProbeFailure::Refused,
            format!("destination {uri} is not writable: {why}"),
        )
    };
    let mut existing = path;
    let meta = loop {
        match std::fs::metadata(existing) {
            Ok(meta) => break meta,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match existing.parent() {
                    Some(parent) => existing = parent,
                    None => return Err(refused(format!("no part of {} exists", path.display()))),
                }
            }
            Err(e) => return Err(refused(format!("{}: {e}", existing.display()))),
        }
    };
    if !meta.is_dir() {
        return Err(refused(if existing == path {
            format!("{} is a file, not a folder", path.display())
        } else {
            format!(
                "{} is a file, so {} cannot be created",
                existing.display(),
                path.display()
            )
        }));
    }
    let probe = existing.join(probe_name());
    std::fs::File::create_new(&probe).map_err(|e| {
        refused(format!(
            "cannot create a file in {}: {e}",
            existing.display()
        ))
    })?;
    std::fs::remove_file(&probe)
        .map_err(|e| refused(format!("cannot remove {}: {e}", probe.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_folders_are_probed_without_being_created() {
        let dir = tempfile::tempdir().unwrap();
        let any = Destinations::default();
        let missing = dir.path().join("a/b");
        any.probe(&format!("file://{}", missing.display()))
            .await
            .unwrap();
        assert!(!dir.path().join("a").exists(), "the probe creates nothing");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let error = any
            .probe(&file.join("sub").display().to_string())
            .await
            .unwrap_err();
        assert_eq!(error.failure, ProbeFailure::Refused);
        assert!(error.message.contains("is a file"), "{error}");

        let error = any.probe("/tmp/../etc").await.unwrap_err();
        assert!(error.message.contains("'..'"), "{error}");

        let rooted = Destinations::new(vec![dir.path().join("allowed")], S3Options::default());
        let error = rooted.probe("file:///srv/out").await.unwrap_err();
        assert_eq!(error.failure, ProbeFailure::Refused);
        assert!(error.message.contains("allowed local roots"), "{error}");
        assert!(
            rooted
                .check(&format!("{}/allowed/x", dir.path().display()))
                .is_ok()
        );
    }
}
