//! One delivered object in a store destination: whether an earlier
//! delivery already left the same bytes, reading a copy back to check its
//! sha256, the GET URL signed for a copy written with the job's own keys,
//! and how a store error is reported.

use std::path::Path;
use std::time::Duration;
use trainyard_core::redact::{display_url, redact_in};
use trainyard_core::runtime::StageError;
use trainyard_core::store::{ArtifactStore, StoreError};
use trainyard_proto::v1::{Artifact, ErrorKind};

/// The copy of `artifact` at `key`, if an earlier delivery left one whose
/// bytes match the recorded sha256; a missing or different object is
/// `None` (copied again, whole).
pub(super) async fn already_there(
    store: &ArtifactStore,
    key: &str,
    artifact: &Artifact,
    work: &Path,
) -> Result<Option<Artifact>, StageError> {
    if !store.exists(key).await.map_err(store_error)? {
        return Ok(None);
    }
    let check = work.join("verify").join(key.replace('/', "_"));
    let result = store.get_file(key, &check, Some(&artifact.sha256)).await;
    let _ = tokio::fs::remove_file(&check).await;
    match result {
        Ok((size, sha256)) => Ok(Some(Artifact {
            name: artifact.name.clone(),
            uri: store.uri(key),
            size,
            sha256,
            ..Default::default()
        })),
        Err(StoreError::Checksum { actual, .. }) => {
            tracing::warn!(key, %actual, expected = %artifact.sha256, "a different object is in the way; copying again");
            Ok(None)
        }
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(store_error(e)),
    }
}

/// A store error as the stage reports it; a destination the address
/// guard refused (a job's S3 endpoint on a private address) is permanent,
/// with the guard's reason.
pub(super) fn store_error(error: StoreError) -> StageError {
    match trainyard_core::netguard::refusal_of(&error) {
        Some(refusal) => StageError::fail(
            ErrorKind::InvalidSpec,
            format!("destination refused by the address guard: {refusal}"),
        ),
        None => error.into(),
    }
}

/// A GET URL for `key` of a destination written with the job's own keys
/// (`label`), good for `ttl`, and when it stops working (Unix ms). The
/// expiry is counted from the start of the second of signing, as the
/// signers count theirs (whole seconds), so it is never later than the
/// URL's own. A store that cannot sign (an Azure SAS token) gives none;
/// only the destination and the reason are logged, never the URL.
pub(super) async fn download_url(
    store: &ArtifactStore,
    key: &str,
    ttl: Duration,
    label: &str,
) -> Option<(String, i64)> {
    let from_ms = trainyard_core::now_ms() / 1000 * 1000;
    match store.presign_get(key, ttl).await {
        Ok(url) => Some((
            url,
            from_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)),
        )),
        Err(error) => {
            tracing::info!(
                destination = %display_url(label),
                reason = %redact_in(&error.to_string(), label),
                "no download url for a delivered copy"
            );
            None
        }
    }
}

/// Reads a delivered object back and compares its sha256.
pub(super) async fn verify(
    store: &ArtifactStore,
    key: &str,
    sha256: &str,
    work: &Path,
) -> Result<(), StageError> {
    let check = work.join("verify").join(key.replace('/', "_"));
    let result = store.get_file(key, &check, Some(sha256)).await;
    let _ = tokio::fs::remove_file(&check).await;
    result.map(|_| ()).map_err(store_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_copy_written_with_the_jobs_keys_gets_a_url_of_the_fleets_ttl() {
        let options = trainyard_core::config::S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("tenant-key".into()),
            secret_access_key: Some("tenant-secret".into()),
            ..Default::default()
        };
        let store = ArtifactStore::open_with("s3://deliveries/out", &options).unwrap();
        let before = trainyard_core::now_ms();
        let (url, expires_at_ms) = download_url(
            &store,
            "j-1/lora.safetensors",
            Duration::from_secs(600),
            "s3://deliveries/out",
        )
        .await
        .expect("signed");
        let after = trainyard_core::now_ms();
        assert!(
            url.starts_with("http://127.0.0.1:9/deliveries/out/j-1/lora.safetensors?"),
            "{url}"
        );
        assert!(url.contains("X-Amz-Expires=600"), "{url}");
        // Whole seconds, never later than the URL's own expiry.
        assert_eq!(expires_at_ms % 1000, 0);
        assert!(expires_at_ms <= after + 600_000, "{expires_at_ms}");
        assert!(
            expires_at_ms > before - 1000 + 600_000 - 1,
            "{expires_at_ms}"
        );

        // A container reached with a SAS token cannot sign: no URL.
        let builder = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account("acct")
            .with_container_name("deliveries")
            .with_config(
                object_store::azure::AzureConfigKey::SasKey,
                "sv=2022-11-02&ss=b&srt=co&sp=rwl&se=2099-01-01T00:00:00Z&sig=c2ln",
            );
        let sas = ArtifactStore::open_azure(builder, "out").unwrap();
        assert_eq!(
            download_url(
                &sas,
                "j-1/lora.safetensors",
                Duration::from_secs(600),
                "az://deliveries/out"
            )
            .await,
            None
        );
    }

    #[tokio::test]
    async fn an_earlier_copy_is_kept_only_when_its_sha256_matches() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&dir.path().join("dest").display().to_string()).unwrap();
        let work = dir.path().join("work");
        // The recorded artifact (its sha256 is that of these bytes).
        let recorded = store
            .put_bytes("recorded/lora.safetensors", "whole adapter".into())
            .await
            .unwrap();
        let key = "j1/lora.safetensors";

        // Nothing there yet: copy it.
        assert!(
            already_there(&store, key, &recorded, &work)
                .await
                .unwrap()
                .is_none()
        );

        // A whole earlier copy: kept, pointing at the destination.
        store.put_bytes(key, "whole adapter".into()).await.unwrap();
        let found = already_there(&store, key, &recorded, &work)
            .await
            .unwrap()
            .expect("kept");
        assert_eq!(found.uri, store.uri(key));
        assert_eq!(
            (found.size, &found.sha256),
            (recorded.size, &recorded.sha256)
        );
        assert_eq!(found.name, "lora.safetensors");

        // Different bytes in the way: copied again.
        store.put_bytes(key, "something else".into()).await.unwrap();
        assert!(
            already_there(&store, key, &recorded, &work)
                .await
                .unwrap()
                .is_none()
        );
        // The read-back leaves nothing in the work dir.
        let left: Vec<_> = std::fs::read_dir(work.join("verify"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }
}
