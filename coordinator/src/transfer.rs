//! Uploads and downloads through the API: a client streams its dataset into
//! its tenant's uploads (`tenants/<tenant>/uploads/<id>/…`) and reads its
//! jobs' outputs back, so no client holds the store's credentials and none
//! can name a key of its own choosing. Caps hold per call (`[store]
//! max_upload_bytes`, `max_upload_files`); a refused or broken upload leaves
//! nothing behind. The tenant is always the authenticated caller.
//!
//! When the store is S3 the bytes need not pass through here at all:
//! `CreateUpload` and `CreateDownload` hand out presigned URLs (good for
//! `[store] presign_expiry_secs`) for keys of the caller's own upload or
//! job only, under the same checks and caps.

use crate::api::ApiError;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use std::time::Duration;
use trainyard_core::store::{ArtifactStore, ObjectWriter, StoreError, keys};
use trainyard_proto::v1::{
    Artifact, CreateDownloadResponse, CreateUploadRequest, CreateUploadResponse, DownloadChunk,
    JobRecord, PresignedUrl, UploadChunk, UploadResponse,
};
use trainyard_proto::{JobId, TenantId};

/// The store as the API reaches it.
#[derive(Clone)]
pub struct Transfers {
    pub store: ArtifactStore,
    /// Most bytes one upload may store.
    pub max_bytes: u64,
    /// Most files one upload may store.
    pub max_files: u64,
    /// How long a presigned URL stays good.
    pub presign_expiry: Duration,
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
        e @ StoreError::CannotSign(_) => ApiError::FailedPrecondition(format!(
            "{e}: stream the bytes through the API (Upload, Download) instead"
        )),
        e if e.is_retryable() => ApiError::Unavailable(format!("artifact store: {e}")),
        e => ApiError::Internal(e.to_string()),
    }
}

/// Whether `path` is a plain relative file path: no empty, `.` or `..`
/// segment, no backslash or control character, at most 512 bytes.
pub fn plain_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 512
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
        && !path.bytes().any(|b| b == b'\\' || b.is_ascii_control())
}

impl Transfers {
    /// Stores the files `chunks` carry below a fresh upload of `tenant`.
    pub async fn upload<S, E>(
        &self,
        tenant: &TenantId,
        chunks: S,
    ) -> Result<UploadResponse, ApiError>
    where
        S: Stream<Item = Result<UploadChunk, E>> + Unpin,
        E: std::fmt::Display,
    {
        let prefix = keys::upload(tenant, &keys::new_upload_id());
        match self.receive(&prefix, chunks).await {
            Ok((files, bytes)) => {
                tracing::info!(%tenant, upload = %prefix, files, bytes, "upload stored");
                Ok(UploadResponse {
                    uri: self.store.uri(&prefix),
                    files,
                    bytes,
                })
            }
            Err(e) => {
                if let Err(cleanup) = self.store.delete_prefix(&prefix).await {
                    tracing::warn!(%tenant, upload = %prefix, error = %cleanup, "a refused upload could not be removed");
                }
                Err(e)
            }
        }
    }

    async fn receive<S, E>(&self, prefix: &str, mut chunks: S) -> Result<(u64, u64), ApiError>
    where
        S: Stream<Item = Result<UploadChunk, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut current: Option<ObjectWriter> = None;
        let mut seen = std::collections::BTreeSet::new();
        let result = async {
            while let Some(chunk) = chunks.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::Invalid(format!("upload broke off: {e}")))?;
                if !chunk.path.is_empty() {
                    if !plain_path(&chunk.path) {
                        return Err(ApiError::Invalid(format!(
                            "path: {:?} is not a plain relative path",
                            chunk.path
                        )));
                    }
                    if !seen.insert(chunk.path.clone()) {
                        return Err(ApiError::Invalid(format!(
                            "path: {:?} is sent twice",
                            chunk.path
                        )));
                    }
                    files += 1;
                    if files > self.max_files {
                        return Err(ApiError::ResourceExhausted(format!(
                            "upload holds more than {} files (store.max_upload_files)",
                            self.max_files
                        )));
                    }
                    if let Some(done) = current.take() {
                        done.finish().await.map_err(store_error)?;
                    }
                    let key = format!("{prefix}/{}", chunk.path);
                    current = Some(self.store.writer(&key).await.map_err(store_error)?);
                }
                let Some(writer) = current.as_mut() else {
                    return Err(ApiError::Invalid(
                        "path: the first chunk must name its file".into(),
                    ));
                };
                bytes += chunk.data.len() as u64;
                if bytes > self.max_bytes {
                    return Err(ApiError::ResourceExhausted(format!(
                        "upload is larger than {} bytes (store.max_upload_bytes)",
                        self.max_bytes
                    )));
                }
                if !chunk.data.is_empty() {
                    writer
                        .write(Bytes::from(chunk.data))
                        .await
                        .map_err(store_error)?;
                }
            }
            if let Some(done) = current.take() {
                done.finish().await.map_err(store_error)?;
            }
            if files == 0 {
                return Err(ApiError::Invalid("upload holds no files".into()));
            }
            Ok((files, bytes))
        }
        .await;
        if let Some(writer) = current {
            writer.abort().await;
        }
        result
    }

    /// Removes an upload of `tenant` named by the URI an upload returned.
    pub async fn delete_upload(&self, tenant: &TenantId, uri: &str) -> Result<(), ApiError> {
        let key = self
            .store
            .tenant_key(tenant, uri)
            .map_err(|e| ApiError::Invalid(format!("uri: {e}")))?;
        let own = keys::uploads(tenant);
        let rest = key.strip_prefix(&own).unwrap_or_default();
        let Some(id) = rest.strip_prefix('/').and_then(|r| r.split('/').next()) else {
            return Err(ApiError::Invalid(format!(
                "uri: {uri} is not one of your uploads"
            )));
        };
        self.store
            .delete_prefix(&keys::upload(tenant, id))
            .await
            .map_err(store_error)
    }

    /// The artifacts of `record` (the caller's own job, as `Get` found it),
    /// or the one named `name`, as chunks; only objects below the job's own
    /// prefix are read.
    pub async fn download(
        &self,
        record: &JobRecord,
        name: &str,
    ) -> Result<BoxStream<'static, Result<DownloadChunk, ApiError>>, ApiError> {
        let wanted = self.outputs(record, name)?;
        let store = self.store.clone();
        let chunks = futures::stream::iter(wanted)
            .then(move |(artifact, key)| {
                let store = store.clone();
                async move {
                    let head = DownloadChunk {
                        name: artifact.name.clone(),
                        size: artifact.size,
                        sha256: artifact.sha256.clone(),
                        data: Vec::new(),
                    };
                    let body = match store.read_stream(&key).await {
                        Ok(body) => body
                            .map(|chunk| {
                                chunk
                                    .map(|data| DownloadChunk {
                                        data: data.to_vec(),
                                        ..Default::default()
                                    })
                                    .map_err(store_error)
                            })
                            .boxed(),
                        Err(e) => futures::stream::once(async move { Err(store_error(e)) }).boxed(),
                    };
                    futures::stream::once(async move { Ok(head) }).chain(body)
                }
            })
            .flatten()
            .boxed();
        Ok(chunks)
    }
}

impl Transfers {
    /// The artifacts of `record` (or the one named `name`) with their keys,
    /// each checked to lie below the job's own prefix.
    fn outputs(&self, record: &JobRecord, name: &str) -> Result<Vec<(Artifact, String)>, ApiError> {
        let (tenant, job) = match (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) {
            (Ok(tenant), Ok(job)) => (tenant, job),
            _ => return Err(ApiError::Internal("record with a bad id".into())),
        };
        let own = keys::job(&tenant, &job);
        let mut wanted = Vec::new();
        for artifact in &record.artifacts {
            if !name.is_empty() && artifact.name != name {
                continue;
            }
            let key = self
                .store
                .key_of(&artifact.uri)
                .filter(|key| key.strip_prefix(&own).is_some_and(|r| r.starts_with('/')))
                .ok_or_else(|| {
                    ApiError::Internal(format!(
                        "artifact {} is not in the job's folder of the store",
                        artifact.name
                    ))
                })?;
            wanted.push((artifact.clone(), key));
        }
        if wanted.is_empty() {
            return Err(ApiError::NotFound(match name {
                "" => format!("job {job} has no outputs yet"),
                name => format!("job {job} has no output {name:?}"),
            }));
        }
        Ok(wanted)
    }

    /// When the URLs made now stop working, in Unix milliseconds.
    fn expires_at_ms(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from((now + self.presign_expiry).as_millis()).unwrap_or(i64::MAX)
    }

    /// A fresh upload of `tenant` and a presigned PUT URL per file, after
    /// the checks and caps of [`Self::upload`].
    pub async fn create_upload(
        &self,
        tenant: &TenantId,
        request: &CreateUploadRequest,
    ) -> Result<CreateUploadResponse, ApiError> {
        if !self.store.can_sign() {
            return Err(store_error(StoreError::CannotSign(
                self.store.root().to_string(),
            )));
        }
        let files = &request.files;
        if files.is_empty() {
            return Err(ApiError::Invalid("upload holds no files".into()));
        }
        if files.len() as u64 > self.max_files {
            return Err(ApiError::ResourceExhausted(format!(
                "upload holds more than {} files (store.max_upload_files)",
                self.max_files
            )));
        }
        let bytes = files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size));
        if bytes > self.max_bytes {
            return Err(ApiError::ResourceExhausted(format!(
                "upload is larger than {} bytes (store.max_upload_bytes)",
                self.max_bytes
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for file in files {
            if !plain_path(&file.path) {
                return Err(ApiError::Invalid(format!(
                    "path: {:?} is not a plain relative path",
                    file.path
                )));
            }
            if !seen.insert(file.path.as_str()) {
                return Err(ApiError::Invalid(format!(
                    "path: {:?} is sent twice",
                    file.path
                )));
            }
            if file.sha256.len() != 64 || hex::decode(&file.sha256).is_err() {
                return Err(ApiError::Invalid(format!(
                    "sha256: {:?} of {:?} is not 64 hex digits",
                    file.sha256, file.path
                )));
            }
        }
        let prefix = keys::upload(tenant, &keys::new_upload_id());
        let mut urls = Vec::with_capacity(files.len());
        for file in files {
            let key = format!("{prefix}/{}", file.path);
            let url = self
                .store
                .presign_put(&key, &file.sha256.to_ascii_lowercase(), self.presign_expiry)
                .await
                .map_err(store_error)?;
            urls.push(PresignedUrl {
                path: file.path.clone(),
                url,
                size: file.size,
                sha256: file.sha256.to_ascii_lowercase(),
            });
        }
        tracing::info!(%tenant, upload = %prefix, files = files.len(), bytes, "upload URLs issued");
        Ok(CreateUploadResponse {
            uri: self.store.uri(&prefix),
            urls,
            expires_at_ms: self.expires_at_ms(),
        })
    }

    /// A presigned GET URL per output of `record` (the caller's own job, as
    /// `Get` found it), or of the one named `name`.
    pub async fn create_download(
        &self,
        record: &JobRecord,
        name: &str,
    ) -> Result<CreateDownloadResponse, ApiError> {
        if !self.store.can_sign() {
            return Err(store_error(StoreError::CannotSign(
                self.store.root().to_string(),
            )));
        }
        let mut urls = Vec::new();
        for (artifact, key) in self.outputs(record, name)? {
            let url = self
                .store
                .presign_get(&key, self.presign_expiry)
                .await
                .map_err(store_error)?;
            urls.push(PresignedUrl {
                path: artifact.name,
                url,
                size: artifact.size,
                sha256: artifact.sha256,
            });
        }
        Ok(CreateDownloadResponse {
            urls,
            expires_at_ms: self.expires_at_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_uploaded() {
        for ok in ["a.png", "sub/a.txt", "my photo.png", "dataset.zip"] {
            assert!(plain_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "a\nb",
        ] {
            assert!(!plain_path(bad), "{bad:?}");
        }
    }
}
