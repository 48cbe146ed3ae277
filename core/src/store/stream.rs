//! Objects written and read as streams of chunks, for the API's `Upload`
//! and `Download`: the bytes pass through the coordinator, so a client
//! never holds the store's credentials. Hashing a chunk happens on a
//! blocking thread.

use super::{ArtifactStore, StoreError, io_err};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use trainyard_proto::v1::Artifact;

/// One object being written, chunk by chunk; it appears whole at
/// [`ObjectWriter::finish`] or not at all.
pub struct ObjectWriter {
    store: ArtifactStore,
    key: String,
    writer: WriteMultipart,
    hasher: Option<Sha256>,
    size: u64,
}

impl ArtifactStore {
    /// Starts writing `key`.
    pub async fn writer(&self, key: &str) -> Result<ObjectWriter, StoreError> {
        self.remove_stale_staging(key).await;
        let upload = self.store.put_multipart(&self.path(key)).await?;
        Ok(ObjectWriter {
            store: self.clone(),
            key: key.to_string(),
            writer: WriteMultipart::new_with_chunk_size(upload, super::PART),
            hasher: Some(Sha256::new()),
            size: 0,
        })
    }

    /// The bytes of `key`, as they come from the store.
    pub async fn read_stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        match self.store.get(&self.path(key)).await {
            Ok(result) => {
                let this = self.clone();
                Ok(result
                    .into_stream()
                    .map(move |chunk| {
                        let chunk = chunk?;
                        this.count_down(chunk.len() as u64);
                        Ok(chunk)
                    })
                    .boxed())
            }
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(self.uri(key))),
            Err(e) => Err(e.into()),
        }
    }
}

impl ObjectWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let mut hasher = self.hasher.take().unwrap_or_default();
        let data = chunk.clone();
        let hasher = tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            hasher
        })
        .await
        .map_err(|e| io_err(std::path::Path::new(&self.key))(std::io::Error::other(e)))?;
        self.hasher = Some(hasher);
        self.size += chunk.len() as u64;
        self.writer.wait_for_capacity(4).await?;
        self.writer.put(chunk);
        Ok(())
    }

    /// Completes the object; its artifact (name = last path segment).
    pub async fn finish(self) -> Result<Artifact, StoreError> {
        self.writer.finish().await?;
        self.store.count_up(self.size);
        let sha256 = hex::encode(self.hasher.unwrap_or_default().finalize());
        Ok(self.store.artifact(&self.key, self.size, sha256))
    }

    /// Gives the object up: nothing of it is left.
    pub async fn abort(self) {
        let _ = self.writer.abort().await;
    }
}
