//! Presigned URLs: an S3 store hands a client a time-limited URL for one
//! object (a PUT into its tenant's uploads, a GET of its job's outputs), so
//! the bytes go straight between the client and the bucket and the client
//! still never holds the store's credentials. A local store cannot sign:
//! its bytes stream through the API (`stream.rs`).
//!
//! A PUT URL binds the object's sha256 (`x-amz-checksum-sha256`) into its
//! signature: S3 refuses a body other than the one declared, so a URL is
//! good for those bytes only.
//!
//! The client side ([`put_url`], [`get_url`]) is here too, so every client
//! moves bytes the same way.

use super::{ArtifactStore, StoreError, io_err};
use base64::Engine;
use futures::StreamExt;
use object_store::signer::{HeaderName, HeaderValue, Method, SignedUrlOptions};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The header a presigned PUT must carry: the body's sha256, base64.
pub const CHECKSUM_HEADER: &str = "x-amz-checksum-sha256";

/// Bytes read from a local file per piece of a PUT body.
const PIECE: usize = 1 << 20;

impl ArtifactStore {
    /// Whether this store can hand out presigned URLs (an S3 one).
    pub fn can_sign(&self) -> bool {
        self.signer.is_some()
    }

    /// A URL that lets its holder PUT exactly the bytes whose sha256 (hex)
    /// is `sha256` to `key`, for `expires_in`.
    pub async fn presign_put(
        &self,
        key: &str,
        sha256: &str,
        expires_in: Duration,
    ) -> Result<String, StoreError> {
        let digest = hex::decode(sha256)
            .ok()
            .filter(|d| d.len() == 32)
            .ok_or_else(|| StoreError::Corrupt(format!("sha256 {sha256:?} of {key}")))?;
        let value = base64::engine::general_purpose::STANDARD.encode(digest);
        let options = SignedUrlOptions::default().with_signed_header(
            HeaderName::from_static(CHECKSUM_HEADER),
            HeaderValue::from_str(&value).expect("base64 is a header value"),
        );
        self.presign(Method::PUT, key, expires_in, &options).await
    }

    /// A URL that lets its holder GET `key`, for `expires_in`.
    pub async fn presign_get(&self, key: &str, expires_in: Duration) -> Result<String, StoreError> {
        self.presign(Method::GET, key, expires_in, &SignedUrlOptions::default())
            .await
    }

    async fn presign(
        &self,
        method: Method,
        key: &str,
        expires_in: Duration,
        options: &SignedUrlOptions,
    ) -> Result<String, StoreError> {
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| StoreError::CannotSign(self.root.clone()))?;
        let url = signer
            .signed_url_opts(method, &self.path(key), expires_in, options)
            .await?;
        Ok(url.to_string())
    }
}

/// What a URL holder got wrong or the server refused.
fn http_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: what.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// PUTs the local file `local` (of `size` bytes and sha256 `sha256`, hex) to
/// a URL from [`ArtifactStore::presign_put`], streaming.
pub async fn put_url(
    http: &reqwest::Client,
    url: &str,
    local: &Path,
    size: u64,
    sha256: &str,
) -> Result<(), StoreError> {
    let digest = hex::decode(sha256).map_err(|e| http_err(sha256, e))?;
    let checksum = base64::engine::general_purpose::STANDARD.encode(digest);
    let file = tokio::fs::File::open(local).await.map_err(io_err(local))?;
    let body = futures::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; PIECE];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let response = http
        .put(url)
        .header(CHECKSUM_HEADER, checksum)
        // S3 takes no chunked body: say the length up front.
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(|e| http_err(&local.display().to_string(), e))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(http_err(
            &local.display().to_string(),
            format!("the store answered {status}: {}", text.trim()),
        ));
    }
    Ok(())
}

/// GETs a URL from [`ArtifactStore::presign_get`] into `local` (through a
/// `.partial` file renamed at the end); a body of another size or sha256
/// (hex) than expected is an error and leaves nothing behind.
pub async fn get_url(
    http: &reqwest::Client,
    url: &str,
    local: &Path,
    size: u64,
    sha256: &str,
) -> Result<(), StoreError> {
    let shown = local.display().to_string();
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| http_err(&shown, e))?;
    if !response.status().is_success() {
        return Err(http_err(
            &shown,
            format!("the store answered {}", response.status()),
        ));
    }
    if let Some(parent) = local.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io_err(parent))?;
    }
    let partial = local.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(io_err(&partial))?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut body = response.bytes_stream();
    let result = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| http_err(&shown, e))?;
            got += chunk.len() as u64;
            if got > size {
                break;
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err(&partial))?;
        }
        file.flush().await.map_err(io_err(&partial))?;
        let actual = hex::encode(hasher.finalize());
        if got != size || actual != sha256 {
            return Err(StoreError::Checksum {
                key: shown.clone(),
                expected: format!("{size} bytes with sha256 {sha256}"),
                actual: format!("{got} bytes with sha256 {actual}"),
            });
        }
        Ok(())
    }
    .await;
    drop(file);
    match result {
        Ok(()) => tokio::fs::rename(&partial, local)
            .await
            .map_err(io_err(local)),
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::S3Options;

    #[tokio::test]
    async fn a_put_url_binds_its_sha256_and_a_local_store_cannot_sign() {
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..Default::default()
        };
        let store = ArtifactStore::open_with("s3://bucket/root", &options).unwrap();
        assert!(store.can_sign());
        let sha256 = hex::encode(Sha256::digest(b"bytes"));
        let url = store
            .presign_put(
                "tenants/acme/uploads/u1/a.png",
                &sha256,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(
            url.starts_with("http://127.0.0.1:9/bucket/root/tenants/acme/uploads/u1/a.png?"),
            "{url}"
        );
        assert!(url.contains("X-Amz-Expires=60"), "{url}");
        assert!(
            url.contains("x-amz-checksum-sha256"),
            "the checksum is signed: {url}"
        );
        assert!(
            store
                .presign_put("k", "zz", Duration::from_secs(60))
                .await
                .is_err()
        );
        let get = store
            .presign_get("k", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!get.contains("checksum"), "{get}");

        let dir = tempfile::tempdir().unwrap();
        let local = ArtifactStore::open(dir.path().to_str().unwrap()).unwrap();
        assert!(!local.can_sign());
        assert!(matches!(
            local
                .presign_get("k", Duration::from_secs(5))
                .await
                .unwrap_err(),
            StoreError::CannotSign(_)
        ));
    }
}
