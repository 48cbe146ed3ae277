//! The artifact store: one `object_store` abstraction for every byte a job
//! produces or consumes. A store is opened at a URI (`file:///abs/dir`, a
//! local path, or `s3://bucket/prefix`, configured by [`S3Options`] — the
//! `[store.s3]` table — over the usual `AWS_*` variables; `gs://` and
//! `az://` ones by `[store.gcs]` and `[store.azure]`, in `cloud.rs`) and
//! addresses objects by keys below it.
//!
//! Layout by tenant (see [`keys`]): `tenants/<tenant>/uploads/<id>/…`,
//! `tenants/<tenant>/jobs/<job>/{dataset,checkpoints/<step>,output,logs}/…`,
//! and `models/<name>/…` for the base models the fleet makes. What a spec
//! may name, and how much of it may be read, is [`scope`]'s; checkpoints
//! and how a restore trusts them are in `checkpoint.rs`; presigned URLs an
//! S3 store hands clients (and the client's PUT and GET of them) in
//! `presign.rs`.
//!
//! Files move as streams: a blocking thread reads (or writes) the local file
//! and hashes it, the async side feeds a multipart upload, so a 2 GB
//! checkpoint never sits in memory or on a runtime thread. Every put returns
//! the object's size and sha256; readers verify them.
//!
//! A store labelled with a stage ([`ArtifactStore::for_stage`]) counts the
//! bytes it moves: every completed put (`put_file`, `put_bytes`, and what is
//! built on them) adds to `trainyard_artifact_uploaded_bytes_total{stage}`,
//! every completed get (`get_file`, `get_bytes`, …) to
//! `trainyard_artifact_downloaded_bytes_total{stage}`. An unlabelled store
//! counts nothing.

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use trainyard_proto::TenantId;
use trainyard_proto::v1::Artifact;

mod checkpoint;
mod cloud;
pub mod keys;
mod presign;
pub mod scope;
mod stream;

pub use crate::config::{AzureOptions, GcsOptions, S3Options};
pub use checkpoint::{CheckpointFile, CheckpointManifest};
pub use presign::{CHECKSUM_HEADER, get_url, put_url};
pub use scope::{ReadCaps, ScopeError};
pub use stream::ObjectWriter;

/// Bytes read from or written to a local file at a time.
const CHUNK: usize = 4 << 20;
/// Size of each part of a multipart upload. S3 refuses parts under 5 MiB
/// (all but the last) with `EntityTooSmall`, and allows 10,000 parts: 8 MiB
/// parts carry objects up to ~78 GiB.
const PART: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store uri {0:?}: use file://, a local path, s3://, gs:// or az://")]
    BadUri(String),
    #[error("object {0} not found")]
    NotFound(String),
    #[error("object {key} failed its checksum: expected {expected}, got {actual}")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("object {0} is corrupt")]
    Corrupt(String),
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error("{uri} holds more than {max} files (the cap of one read)")]
    TooManyFiles { uri: String, max: usize },
    #[error("{uri} holds more than {max} bytes (the cap of one read)")]
    TooLarge { uri: String, max: u64 },
    #[error("the store {0} cannot sign URLs (a local one cannot; nor one reached by a SAS token)")]
    CannotSign(String),
    #[error("artifact store: {0}")]
    Backend(#[from] object_store::Error),
    #[error("local file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// Store trouble is worth a retry unless the object or the URI is wrong.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Backend(_) | StoreError::Io { .. })
    }

    /// The URI names something the job may not read, or more than it may.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            StoreError::Scope(_) | StoreError::TooManyFiles { .. } | StoreError::TooLarge { .. }
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A store rooted at a URI.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    root: String,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// The stage label its byte counters carry; `None` counts nothing.
    stage: Option<&'static str>,
    /// Signs presigned URLs (`presign.rs`): set for an S3, GCS or Azure store.
    signer: Option<Arc<dyn object_store::signer::Signer>>,
}

impl ArtifactStore {
    /// Opens the store at `uri` with S3 settings from the `AWS_*` environment
    /// only. A local root is created when missing.
    pub fn open(uri: &str) -> Result<Self, StoreError> {
        Self::open_with(uri, &S3Options::default())
    }

    /// Opens the store at `uri`; an `s3://` one is reached with `s3`, whose
    /// unset fields fall back to the `AWS_*` environment. A local root is
    /// created when missing.
    pub fn open_with(uri: &str, s3: &S3Options) -> Result<Self, StoreError> {
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadUri(uri.into()));
            }
            return Self::open_s3(s3_builder(bucket, s3), prefix);
        }
        let local = match uri.strip_prefix("file://") {
            Some(path) => PathBuf::from(path),
            None if uri.contains("://") => return Err(StoreError::BadUri(uri.into())),
            None => PathBuf::from(uri),
        };
        if local.as_os_str().is_empty() {
            return Err(StoreError::BadUri(uri.into()));
        }
        std::fs::create_dir_all(&local).map_err(io_err(&local))?;
        let local = std::fs::canonicalize(&local).map_err(io_err(&local))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&local)?
            .with_automatic_cleanup(true);
        Ok(Self {
            root: format!("file://{}", local.display()),
            store: Arc::new(store),
            prefix: StorePath::default(),
            stage: None,
            signer: None,
        })
    }

    /// `s3://<the builder's bucket>/<prefix>`, reached exactly as `builder`
    /// says (a destination's own credentials, never the environment's).
    pub fn open_s3(builder: AmazonS3Builder, prefix: &str) -> Result<Self, StoreError> {
        let bucket = builder
            .get_config_value(&AmazonS3ConfigKey::Bucket)
            .unwrap_or_default();
        let store = Arc::new(builder.build()?);
        let prefix = prefix.trim_matches('/');
        Ok(Self {
            root: format!("s3://{bucket}/{prefix}")
                .trim_end_matches('/')
                .to_string(),
            store: store.clone(),
            prefix: StorePath::from(prefix),
            stage: None,
            signer: Some(store),
        })
    }

    /// This store, counting the bytes it moves under `stage` ("prepare",
    /// "train", "deliver"): see the module documentation.
    pub fn for_stage(mut self, stage: &'static str) -> Self {
        self.stage = Some(stage);
        self
    }

    fn count_up(&self, bytes: u64) {
        if let Some(stage) = self.stage {
            crate::telemetry::metrics().artifact_uploaded(stage, bytes);
        }
    }

    fn count_down(&self, bytes: u64) {
        if let Some(stage) = self.stage {
            crate::telemetry::metrics().artifact_downloaded(stage, bytes);
        }
    }

    /// The root URI, without a trailing slash.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The URI of a key in this store.
    pub fn uri(&self, key: &str) -> String {
        format!("{}/{}", self.root, key.trim_start_matches('/'))
    }

    /// The key of a URI inside this store, if it is inside.
    pub fn key_of(&self, uri: &str) -> Option<String> {
        let rest = uri.strip_prefix(&self.root)?;
        if rest.is_empty() {
            return Some(String::new());
        }
        rest.strip_prefix('/').map(str::to_string)
    }

    /// The key `tenant`'s spec may read at `uri`: see [`scope`].
    pub fn tenant_key(&self, tenant: &TenantId, uri: &str) -> Result<String, ScopeError> {
        scope::tenant_key(&self.root, tenant, uri)
    }

    fn path(&self, key: &str) -> StorePath {
        let mut path = self.prefix.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// Stores a local file under `key`, streaming, and returns its artifact
    /// (name = last path segment). The object appears whole or not at all.
    pub async fn put_file(&self, local: &Path, key: &str) -> Result<Artifact, StoreError> {
        self.remove_stale_staging(key).await;
        let upload = self.store.put_multipart(&self.path(key)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let path = local.to_owned();
        let reader = tokio::task::spawn_blocking(move || -> Result<(u64, String), StoreError> {
            let mut file = std::fs::File::open(&path).map_err(io_err(&path))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = file.read(&mut buf).map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                hasher.update(&buf);
                size += n as u64;
                if tx.blocking_send(Bytes::from(buf)).is_err() {
                    break;
                }
            }
            Ok((size, hex::encode(hasher.finalize())))
        });
        while let Some(chunk) = rx.recv().await {
            writer.wait_for_capacity(4).await?;
            writer.put(chunk);
        }
        let read = reader.await.map_err(|e| StoreError::Io {
            path: local.to_owned(),
            source: std::io::Error::other(e),
        });
        match read {
            Ok(Ok((size, sha256))) => {
                writer.finish().await?;
                self.count_up(size);
                Ok(self.artifact(key, size, sha256))
            }
            Ok(Err(e)) | Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Stores bytes under `key`.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<Artifact, StoreError> {
        let size = bytes.len() as u64;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        self.store.put(&self.path(key), bytes.into()).await?;
        self.count_up(size);
        Ok(self.artifact(key, size, sha256))
    }

    fn artifact(&self, key: &str, size: u64, sha256: String) -> Artifact {
        Artifact {
            name: key.rsplit('/').next().unwrap_or(key).to_string(),
            uri: self.uri(key),
            size,
            sha256,
            ..Default::default()
        }
    }

    /// Reads a whole (small) object.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        match self.store.get(&self.path(key)).await {
            Ok(result) => {
                let bytes = result.bytes().await?;
                self.count_down(bytes.len() as u64);
                Ok(bytes)
            }
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(self.uri(key))),
            Err(e) => Err(e.into()),
        }
    }

    /// The size of an object, refused when over `max_bytes`: checked before
    /// a single object a tenant named is fetched.
    pub async fn size_within(&self, key: &str, max_bytes: u64) -> Result<u64, StoreError> {
        let size = match self.store.head(&self.path(key)).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(self.uri(key)));
            }
            Err(e) => return Err(e.into()),
        };
        if size > max_bytes {
            return Err(StoreError::TooLarge {
                uri: self.uri(key),
                max: max_bytes,
            });
        }
        Ok(size)
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Downloads `key` to `local` (through a temporary file renamed at the
    /// end) and returns its size and sha256. With `expect_sha256`, a mismatch
    /// is an error and the file is not left behind.
    pub async fn get_file(
        &self,
        key: &str,
        local: &Path,
        expect_sha256: Option<&str>,
    ) -> Result<(u64, String), StoreError> {
        let result = match self.store.get(&self.path(key)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(self.uri(key)));
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err(parent))?;
        }
        let partial = local.with_extension("partial");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let target = partial.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<(u64, String), StoreError> {
            let mut file = std::fs::File::create(&target).map_err(io_err(&target))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).map_err(io_err(&target))?;
            }
            file.sync_all().map_err(io_err(&target))?;
            Ok((size, hex::encode(hasher.finalize())))
        });
        let mut stream = result.into_stream();
        let mut failure = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(StoreError::from(e));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| StoreError::Io {
            path: partial.clone(),
            source: std::io::Error::other(e),
        })?;
        let (size, sha256) = match (failure, written) {
            (None, Ok(done)) => done,
            (Some(e), _) | (None, Err(e)) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        };
        // Read from the store, whatever the checksum says.
        self.count_down(size);
        if let Some(expected) = expect_sha256
            && expected != sha256
        {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(StoreError::Checksum {
                key: self.uri(key),
                expected: expected.to_string(),
                actual: sha256,
            });
        }
        tokio::fs::rename(&partial, local)
            .await
            .map_err(io_err(local))?;
        Ok((size, sha256))
    }

    /// Keys below a prefix, with their sizes, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.list_capped(prefix, ReadCaps::NONE).await
    }

    /// Keys below a prefix, with their sizes, sorted; the listing stops with
    /// an error as soon as it passes `caps`, before anything is fetched.
    pub async fn list_capped(
        &self,
        prefix: &str,
        caps: ReadCaps,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let base = self.path(prefix);
        let mut items = Vec::new();
        let mut total = 0u64;
        let mut stream = self.store.list(Some(&base));
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            total = total.saturating_add(meta.size);
            if items.len() >= caps.max_files {
                return Err(StoreError::TooManyFiles {
                    uri: self.uri(prefix),
                    max: caps.max_files,
                });
            }
            if total > caps.max_bytes {
                return Err(StoreError::TooLarge {
                    uri: self.uri(prefix),
                    max: caps.max_bytes,
                });
            }
            let full = meta.location.as_ref();
            let key = match self.prefix.as_ref() {
                "" => full.to_string(),
                p => full
                    .strip_prefix(p)
                    .unwrap_or(full)
                    .trim_start_matches('/')
                    .to_string(),
            };
            items.push((key, meta.size));
        }
        items.sort();
        Ok(items)
    }

    /// Uploads every regular file below `dir` to `prefix/<relative path>`.
    /// `last` names files uploaded after all others (a manifest), so a reader
    /// that finds it knows the rest is there.
    pub async fn put_dir(
        &self,
        dir: &Path,
        prefix: &str,
        last: &[&str],
    ) -> Result<Vec<Artifact>, StoreError> {
        let root = dir.to_owned();
        let mut files = tokio::task::spawn_blocking(move || walk(&root))
            .await
            .map_err(|e| StoreError::Io {
                path: dir.to_owned(),
                source: std::io::Error::other(e),
            })??;
        files.sort_by_key(|rel| (last.contains(&rel.as_str()), rel.clone()));
        let mut artifacts = Vec::with_capacity(files.len());
        for rel in files {
            let key = format!("{}/{rel}", prefix.trim_end_matches('/'));
            let mut artifact = self.put_file(&dir.join(&rel), &key).await?;
            artifact.name = rel;
            artifacts.push(artifact);
        }
        Ok(artifacts)
    }

    /// Downloads every object below `prefix` into `dir`, keeping relative paths.
    pub async fn get_dir(
        &self,
        prefix: &str,
        dir: &Path,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.get_dir_capped(prefix, dir, ReadCaps::NONE).await
    }

    /// [`Self::get_dir`] of at most `caps`: the whole listing is checked
    /// before the first byte is fetched.
    pub async fn get_dir_capped(
        &self,
        prefix: &str,
        dir: &Path,
        caps: ReadCaps,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = prefix.trim_end_matches('/');
        let mut fetched = Vec::new();
        for (key, size) in self.list_capped(prefix, caps).await? {
            let Some(rel) = key.strip_prefix(prefix).map(|r| r.trim_start_matches('/')) else {
                continue;
            };
            if rel.is_empty() || rel.split('/').any(|p| p == ".." || p.is_empty()) {
                continue;
            }
            self.get_file(&key, &dir.join(rel), None).await?;
            fetched.push((rel.to_string(), size));
        }
        Ok(fetched)
    }

    /// Removes one object; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A local store writes a multipart upload to `<file>#<n>` and renames it
    /// when complete; a process killed mid-upload leaves that staging file
    /// behind, visible next to the real ones. Writing the key again removes
    /// it once nothing has written it for [`STALE_STAGING`]: a staging file
    /// written more recently is another process's upload under way (two
    /// workers storing the same shared model), not a leftover.
    async fn remove_stale_staging(&self, key: &str) {
        let Some(root) = self.root.strip_prefix("file://") else {
            return;
        };
        let target = Path::new(root).join(self.path(key).as_ref());
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return;
        };
        let stem = format!("{}#", name.to_string_lossy());
        let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file
                .strip_prefix(&stem)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                && is_stale(&entry).await
            {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }

    /// Removes every object below a prefix.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        for (key, _) in self.list(prefix).await? {
            self.delete(&key).await?;
        }
        Ok(())
    }
}

/// The S3 client settings: the `AWS_*` environment, then every field set in
/// `options` on top. An `http://` endpoint is allowed unless said otherwise.
fn s3_builder(bucket: &str, options: &S3Options) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(endpoint) = &options.endpoint {
        // AWS_ENDPOINT_URL_S3 would win over a plain endpoint: set both.
        builder = builder
            .with_endpoint(endpoint)
            .with_config(AmazonS3ConfigKey::S3Endpoint, endpoint);
    }
    if let Some(region) = &options.region {
        builder = builder.with_region(region);
    }
    if let Some(id) = &options.access_key_id {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = &options.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    if let Some(virtual_hosted) = options.virtual_hosted_style {
        builder = builder.with_virtual_hosted_style_request(virtual_hosted);
    }
    let plain_http = [AmazonS3ConfigKey::S3Endpoint, AmazonS3ConfigKey::Endpoint]
        .iter()
        .find_map(|key| builder.get_config_value(key))
        .is_some_and(|endpoint| endpoint.starts_with("http://"));
    match options.allow_http {
        Some(allow) => builder.with_allow_http(allow),
        None if plain_http => builder.with_allow_http(true),
        None => builder,
    }
}

/// Relative paths of the regular files below `root` (links are skipped),
/// with `/` as separator. Blocking: call it on a blocking thread.
pub fn walk(root: &Path) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file()
                && let Ok(rel) = entry.path().strip_prefix(root)
            {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    Ok(out)
}

/// sha256 of a local file, in hex, computed on a blocking thread.
pub async fn sha256_file(path: &Path) -> Result<(u64, String), StoreError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(io_err(&path))?;
        Ok((size, hex::encode(hasher.finalize())))
    })
    .await
    .map_err(|e| StoreError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other(e),
    })?
}

/// How long a local store's staging file goes unwritten before a new
/// upload of its key takes it for a killed upload's leftover.
pub const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether a staging file has gone unwritten for [`STALE_STAGING`].
async fn is_stale(entry: &tokio::fs::DirEntry) -> bool {
    entry
        .metadata()
        .await
        .and_then(|m| m.modified())
        .is_ok_and(|at| at.elapsed().is_ok_and(|idle| idle >= STALE_STAGING))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writing_a_key_again_removes_a_killed_uploads_staging_file_not_one_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&dir.path().join("store").display().to_string()).unwrap();
        let folder = dir.path().join("store/jobs/j1/output");
        std::fs::create_dir_all(&folder).unwrap();
        // What a process killed mid-upload leaves behind, unwritten since.
        let killed = folder.join("lora.safetensors#1");
        std::fs::write(&killed, b"partial").unwrap();
        let long_ago = std::time::SystemTime::now() - STALE_STAGING * 2;
        std::fs::File::options()
            .write(true)
            .open(&killed)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        // Another process's upload of the same key, under way.
        std::fs::write(folder.join("lora.safetensors#2"), b"being written").unwrap();
        std::fs::write(folder.join("lora.safetensors#notes"), b"kept").unwrap();
        let local = dir.path().join("lora.safetensors");
        std::fs::write(&local, b"whole adapter").unwrap();
        store
            .put_file(&local, "jobs/j1/output/lora.safetensors")
            .await
            .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "lora.safetensors",
                "lora.safetensors#2",
                "lora.safetensors#notes"
            ]
        );
    }

    #[test]
    fn s3_options_reach_the_client() {
        use object_store::ClientConfigKey;
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("eu-west-3".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            allow_http: None,
            virtual_hosted_style: Some(false),
        };
        let builder = s3_builder("bucket", &options);
        let value = |key: AmazonS3ConfigKey| builder.get_config_value(&key);
        assert_eq!(
            value(AmazonS3ConfigKey::S3Endpoint).as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(
            value(AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-west-3")
        );
        assert_eq!(value(AmazonS3ConfigKey::AccessKeyId).as_deref(), Some("id"));
        assert_eq!(
            value(AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(),
            Some("true"),
            "an http:// endpoint is allowed by default"
        );
        let refused = S3Options {
            allow_http: Some(false),
            ..options
        };
        assert_eq!(
            s3_builder("bucket", &refused)
                .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
                .as_deref(),
            Some("false")
        );
        let store = ArtifactStore::open_with("s3://bucket/some/prefix/", &refused).unwrap();
        assert_eq!(store.root(), "s3://bucket/some/prefix");
        assert_eq!(store.uri("a/b"), "s3://bucket/some/prefix/a/b");
        assert_eq!(
            store.key_of("s3://bucket/some/prefix/a/b").as_deref(),
            Some("a/b")
        );
        assert_eq!(store.key_of("s3://bucket/some/prefixed/a"), None);
        assert!(matches!(
            ArtifactStore::open_with("s3:///x", &refused).unwrap_err(),
            StoreError::BadUri(_)
        ));
    }

    #[tokio::test]
    async fn files_round_trip_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.bin"), vec![7u8; 9 << 20]).unwrap();
        std::fs::write(src.join("sub/manifest.json"), b"{}").unwrap();
        std::fs::write(src.join("sub/b.txt"), b"hello").unwrap();
        let artifacts = store
            .put_dir(&src, "jobs/j-1/dataset", &["sub/manifest.json"])
            .await
            .unwrap();
        assert_eq!(artifacts.last().unwrap().name, "sub/manifest.json");
        let big = artifacts.iter().find(|a| a.name == "a.bin").unwrap();
        assert_eq!(big.size, 9 << 20);
        assert_eq!(store.key_of(&big.uri).unwrap(), "jobs/j-1/dataset/a.bin");

        let out = dir.path().join("out");
        let got = store.get_dir("jobs/j-1/dataset", &out).await.unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(std::fs::read(out.join("sub/b.txt")).unwrap(), b"hello");
        let (_, sha) = sha256_file(&out.join("a.bin")).await.unwrap();
        assert_eq!(sha, big.sha256);

        let err = store
            .get_file("jobs/j-1/dataset/sub/b.txt", &out.join("x"), Some("00"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Checksum { .. }));
        assert!(!out.join("x").exists());
        assert!(matches!(
            store.get_bytes("nope").await.unwrap_err(),
            StoreError::NotFound(_)
        ));
        assert!(matches!(
            ArtifactStore::open("gopher://x").unwrap_err(),
            StoreError::BadUri(_)
        ));
    }
}
