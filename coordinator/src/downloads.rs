//! Signed download URLs: `Get`, `List` and the `job.completed` webhook
//! hand out, per output, a time-limited URL that fetches exactly its bytes
//! without credentials (`Artifact.download_url`, `DeliveredFile.download_url`,
//! each with when it stops working). The coordinator makes its URLs when a
//! record is read and never stores them; the only URLs a record holds are
//! those the uploader signed (below). None is ever logged or put in an
//! event.
//!
//! - A bucket store (S3, GCS, Azure) signs its own URLs (`object_store`'s
//!   signer: the bytes go straight from the bucket).
//! - A local store cannot: its URLs point at this coordinator's route
//!   `GET /v1/download/<token>` (served on the gRPC listener, which also
//!   speaks HTTP/1.1), where the token is `base64url("<expires ms>:<key>")
//!   . base64url(HMAC-SHA256)` under a fleet key derived from the sealing
//!   key (a key of this process's own when the fleet has none). The route
//!   checks the MAC in constant time and the expiry, and serves only keys
//!   below a job's `output/`, streaming the exact bytes with their length.
//! - A delivered file in a bucket destination reached through a fleet
//!   credential (`?credential=<name>`, opened under the same rules as the
//!   uploader used) is signed with that credential, on read.
//! - A delivered file in a bucket destination written with the job's own
//!   keys ([`destination::uses_job_keys`]) is signed by the uploader at
//!   delivery, while it still holds them (`uploader/src/deliver.rs`), for
//!   the task's `download_url_ttl_secs` — this coordinator's own
//!   `download_url_ttl_secs`, which it sets on every deliver task — and
//!   stored in the record with its expiry. The coordinator never re-signs
//!   it: a final job's sealed secrets are dropped from its record
//!   (`repo.rs`), so it holds no keys to sign with. It is shown as stored
//!   until it expires, then omitted ([`drop_expired`], both fields
//!   cleared), alike in `Get`, `List` and the webhook (whose retries may
//!   come after it). Handing it out keeps the threat model: it reads one
//!   object of the tenant's own bucket with the tenant's own keys, the
//!   same bytes as the job's output, and a record is read only by its
//!   tenant (the repository keys records by tenant; the webhook goes to
//!   the job's own URL).
//! - No URL for a local folder (nothing serves it; the artifact store's
//!   URL fetches the same bytes), nor for an Azure container reached with a
//!   SAS token (`object_store` cannot make a SAS from a SAS, and handing out
//!   the tenant's own token would grant its whole scope), nor for an
//!   `hf://` copy: a Hub `resolve` link is neither time-limited nor free of
//!   credentials for a private repository, so it does not fit this field;
//!   the copy's `uri` and `commit` name the exact revision.
//!
//! Only keys of the record's own tenant and job are ever signed: the key
//! is checked against `tenants/<tenant>/jobs/<job>/output/` before signing.

use crate::webhooks::hmac_sha256;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use trainyard_core::destination::{self, Destinations};
use trainyard_core::secrets::Keyring;
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_proto::v1::JobRecord;
use trainyard_proto::{JobId, TenantId};

/// The route's path, before the token.
pub const ROUTE: &str = "/v1/download/";
/// What the fleet key is derived for.
const PURPOSE: &str = "trainyard download urls v1";

/// Why a token is refused. The route answers all of them alike.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a download token")]
    Malformed,
    #[error("the token's signature does not match")]
    BadSignature,
    #[error("the link has expired")]
    Expired,
    #[error("the key is not a job's output")]
    NotAnOutput,
}

/// Makes and checks download URLs.
pub struct DownloadUrls {
    store: ArtifactStore,
    key: [u8; 32],
    ttl: Duration,
    /// `http(s)://host:port` of this coordinator, for local-store URLs.
    base: String,
    destinations: Destinations,
}

/// A key below some job's `output/`: `tenants/<t>/jobs/<j>/output/<rest>`
/// with plain segments.
fn is_output_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    parts.len() >= 6
        && parts[0] == "tenants"
        && parts[2] == "jobs"
        && parts[4] == "output"
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
}

impl DownloadUrls {
    pub fn new(
        store: ArtifactStore,
        ttl: Duration,
        base: String,
        destinations: Destinations,
        secrets: Option<Arc<Keyring>>,
    ) -> Self {
        let key = match &secrets {
            Some(keyring) => keyring.derive(PURPOSE),
            None => rand::random(),
        };
        Self {
            store,
            key,
            ttl,
            base: base.trim_end_matches('/').to_string(),
            destinations,
        }
    }

    fn mac(&self, payload: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.key, payload)
    }

    /// A token for `key` good until `expires_at_ms`.
    pub fn token(&self, key: &str, expires_at_ms: i64) -> String {
        let payload = format!("{expires_at_ms}:{key}");
        format!(
            "{}.{}",
            B64.encode(payload.as_bytes()),
            B64.encode(self.mac(payload.as_bytes()))
        )
    }

    /// The key a token grants at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<String, Refused> {
        let (payload, mac) = token.split_once('.').ok_or(Refused::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| Refused::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| Refused::Malformed)?;
        if !bool::from(self.mac(&payload).as_slice().ct_eq(&mac)) {
            return Err(Refused::BadSignature);
        }
        let payload = String::from_utf8(payload).map_err(|_| Refused::Malformed)?;
        let (expires, key) = payload.split_once(':').ok_or(Refused::Malformed)?;
        let expires: i64 = expires.parse().map_err(|_| Refused::Malformed)?;
        if now_ms >= expires {
            return Err(Refused::Expired);
        }
        if !is_output_key(key) {
            return Err(Refused::NotAnOutput);
        }
        Ok(key.to_string())
    }

    /// A URL for `key` of the artifact store, good until `expires_at_ms`.
    async fn store_url(&self, key: &str, expires_at_ms: i64) -> Option<String> {
        if self.store.can_sign() {
            return self.store.presign_get(key, until(expires_at_ms)).await.ok();
        }
        Some(format!(
            "{}{ROUTE}{}",
            self.base,
            self.token(key, expires_at_ms)
        ))
    }

    /// Fills the download URLs of `record`'s outputs (read as stored;
    /// redact it after). A delivered copy the coordinator cannot sign keeps
    /// what the record holds: the uploader's URL, or none; call
    /// [`drop_expired`] first so an expired one is not shown.
    pub async fn fill(&self, record: &mut JobRecord) {
        let expires_at_ms =
            trainyard_core::now_ms() + i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.fill_until(record, expires_at_ms).await;
    }

    /// [`Self::fill`] with URLs good until `from_ms` + the TTL: a webhook
    /// anchors them at its event, so a retried message carries the same
    /// local-store links (a bucket signs each time anew).
    pub async fn fill_from(&self, record: &mut JobRecord, from_ms: i64) {
        let expires_at_ms = from_ms + i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.fill_until(record, expires_at_ms).await;
    }

    async fn fill_until(&self, record: &mut JobRecord, expires_at_ms: i64) {
        let (Ok(tenant), Ok(job)) = (
            TenantId::parse(&record.tenant),
            JobId::parse(&record.job_id),
        ) else {
            return;
        };
        let own = format!("{}/", keys::output(&tenant, &job));
        for artifact in &mut record.artifacts {
            let Some(key) = self.store.key_of(&artifact.uri) else {
                continue;
            };
            if !key.starts_with(&own) || !is_output_key(&key) {
                continue;
            }
            if let Some(url) = self.store_url(&key, expires_at_ms).await {
                artifact.download_url = url;
                artifact.download_url_expires_at_ms = expires_at_ms;
            }
        }
        for file in &mut record.delivered {
            let url = if let Some(key) = self
                .store
                .key_of(&file.uri)
                .filter(|key| key.starts_with(&own) && is_output_key(key))
            {
                self.store_url(&key, expires_at_ms).await
            } else if destination::uses_job_keys(&file.destination) {
                // Signed by the uploader with the job's keys, or not at all.
                None
            } else if ["s3://", "gs://", "az://", "azure://"]
                .iter()
                .any(|scheme| file.destination.starts_with(scheme))
            {
                self.destination_url(tenant.as_str(), &file.destination, &file.uri, expires_at_ms)
                    .await
            } else {
                None
            };
            if let Some(url) = url {
                file.download_url = url;
                file.download_url_expires_at_ms = expires_at_ms;
            }
        }
    }

    /// A URL a bucket destination reached through a fleet credential signs
    /// for `uri`, opened under the destination rules (never with a job's
    /// keys: the coordinator does not open them to sign).
    async fn destination_url(
        &self,
        tenant: &str,
        destination: &str,
        uri: &str,
        expires_at_ms: i64,
    ) -> Option<String> {
        let store = self.destinations.open(tenant, destination, None).ok()?;
        let key = store.key_of(uri)?;
        store.presign_get(&key, until(expires_at_ms)).await.ok()
    }

    /// The route: `GET /v1/download/<token>`.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(&format!("{ROUTE}{{token}}"), axum::routing::get(serve))
            .with_state(self)
    }
}

/// Clears every download URL of `record` whose time has passed at
/// `now_ms` (or that says no time at all), with its expiry: what the
/// uploader signed is shown only while it works. Run before
/// [`DownloadUrls::fill`] on every record a client or webhook sees.
pub fn drop_expired(record: &mut JobRecord, now_ms: i64) {
    let urls = record
        .artifacts
        .iter_mut()
        .map(|a| (&mut a.download_url, &mut a.download_url_expires_at_ms))
        .chain(
            record
                .delivered
                .iter_mut()
                .map(|d| (&mut d.download_url, &mut d.download_url_expires_at_ms)),
        );
    for (url, expires_at_ms) in urls {
        if *expires_at_ms <= now_ms {
            url.clear();
            *expires_at_ms = 0;
        }
    }
}

/// How long from now until `expires_at_ms` (at least a second).
fn until(expires_at_ms: i64) -> Duration {
    let left = expires_at_ms.saturating_sub(trainyard_core::now_ms());
    Duration::from_millis(u64::try_from(left).unwrap_or(0).max(1000))
}

/// Streams the object a valid token grants, with its length.
async fn serve(State(urls): State<Arc<DownloadUrls>>, Path(token): Path<String>) -> Response {
    let key = match urls.verify(&token, trainyard_core::now_ms()) {
        Ok(key) => key,
        Err(refused) => {
            tracing::info!(%refused, "download link refused");
            return (StatusCode::FORBIDDEN, format!("{refused}\n")).into_response();
        }
    };
    let size = match urls.store.size_within(&key, u64::MAX).await {
        Ok(size) => size,
        Err(trainyard_core::store::StoreError::NotFound(_)) => {
            return (StatusCode::NOT_FOUND, "no such output\n").into_response();
        }
        Err(error) => {
            tracing::warn!(%error, "download: the store cannot be read");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be read\n",
            )
                .into_response();
        }
    };
    let stream = match urls.store.read_stream(&key).await {
        Ok(stream) => stream.map(|chunk| chunk.map_err(std::io::Error::other)),
        Err(error) => {
            tracing::warn!(%error, "download: the store cannot be read");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be read\n",
            )
                .into_response();
        }
    };
    let name = key.rsplit('/').next().unwrap_or("output").replace('"', "");
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, size)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::v1::DeliveredFile;

    fn new_urls() -> DownloadUrls {
        let dir = std::env::temp_dir().join("trainyard-download-urls-test");
        let store = ArtifactStore::open(&dir.display().to_string()).unwrap();
        DownloadUrls::new(
            store,
            Duration::from_secs(60),
            "http://127.0.0.1:1".into(),
            Destinations::default(),
            None,
        )
    }

    #[test]
    fn tokens_grant_their_key_until_they_expire_and_not_when_tampered() {
        let urls = new_urls();
        let key = "tenants/acme/jobs/j-1/output/lora.safetensors";
        let token = urls.token(key, 2_000);
        assert_eq!(urls.verify(&token, 1_999).as_deref(), Ok(key));
        assert_eq!(urls.verify(&token, 2_000), Err(Refused::Expired));
        // Another key or expiry under the same MAC.
        let (_, mac) = token.split_once('.').unwrap();
        for payload in [
            "9999999999999:tenants/acme/jobs/j-1/output/lora.safetensors",
            "2000:tenants/globex/jobs/j-2/output/lora.safetensors",
        ] {
            let forged = format!("{}.{mac}", B64.encode(payload));
            assert_eq!(urls.verify(&forged, 1_000), Err(Refused::BadSignature));
        }
        assert_eq!(urls.verify("nonsense", 0), Err(Refused::Malformed));
        // Another process's key does not verify this one's tokens.
        assert_eq!(new_urls().verify(&token, 1_000), Err(Refused::BadSignature));
        // Only outputs are ever granted, even under a good MAC.
        for key in [
            "tenants/acme/jobs/j-1/dataset/a.png",
            "tenants/acme/uploads/u/a.png",
            "tenants/acme/jobs/j-1/output/../../j-2/output/x",
            "models/base.safetensors",
        ] {
            let token = urls.token(key, 2_000);
            assert_eq!(
                urls.verify(&token, 1_000),
                Err(Refused::NotAnOutput),
                "{key}"
            );
        }
    }

    #[tokio::test]
    async fn a_record_gets_urls_for_its_own_outputs_only() {
        let urls = new_urls();
        let root = urls.store.root().to_string();
        let mut record = JobRecord {
            tenant: "acme".into(),
            job_id: "j-01a24e6c8e6f71778b82b31c9acb8bb0".into(),
            artifacts: vec![
                trainyard_proto::v1::Artifact {
                    name: "lora.safetensors".into(),
                    uri: format!(
                        "{root}/tenants/acme/jobs/j-01a24e6c8e6f71778b82b31c9acb8bb0/output/lora.safetensors"
                    ),
                    ..Default::default()
                },
                trainyard_proto::v1::Artifact {
                    name: "stolen".into(),
                    uri: format!("{root}/tenants/globex/jobs/j-2/output/lora.safetensors"),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        urls.fill(&mut record).await;
        let url = &record.artifacts[0].download_url;
        assert!(url.starts_with("http://127.0.0.1:1/v1/download/"), "{url}");
        assert!(record.artifacts[0].download_url_expires_at_ms > trainyard_core::now_ms());
        assert!(record.artifacts[1].download_url.is_empty());
    }

    fn delivered(destination: &str, url: &str, expires_at_ms: i64) -> DeliveredFile {
        DeliveredFile {
            destination: destination.into(),
            uri: format!(
                "{}/j-01a24e6c8e6f71778b82b31c9acb8bb0/lora.safetensors",
                destination.split('?').next().unwrap()
            ),
            download_url: url.into(),
            download_url_expires_at_ms: expires_at_ms,
            ..Default::default()
        }
    }

    #[test]
    fn stored_urls_are_shown_until_they_expire_then_omitted() {
        let mut record = JobRecord {
            artifacts: vec![trainyard_proto::v1::Artifact {
                download_url: "https://no-expiry".into(),
                ..Default::default()
            }],
            delivered: vec![
                delivered("s3://tenant/out", "https://later", 2_000),
                delivered("gs://tenant/out", "https://sooner", 1_500),
                delivered("file:///srv/out", "", 0),
            ],
            ..Default::default()
        };
        let shown = |r: &JobRecord| -> Vec<(String, i64)> {
            r.delivered
                .iter()
                .map(|d| (d.download_url.clone(), d.download_url_expires_at_ms))
                .collect()
        };
        drop_expired(&mut record, 1_499);
        assert_eq!(
            shown(&record),
            [
                ("https://later".into(), 2_000),
                ("https://sooner".into(), 1_500),
                (String::new(), 0)
            ]
        );
        // A URL that names no expiry is never shown.
        assert_eq!(record.artifacts[0].download_url, "");
        // At its expiry it is gone, with its time: as if there were none.
        drop_expired(&mut record, 1_500);
        assert_eq!(
            shown(&record),
            [
                ("https://later".into(), 2_000),
                (String::new(), 0),
                (String::new(), 0)
            ]
        );
        drop_expired(&mut record, 9_999);
        assert!(
            shown(&record)
                .iter()
                .all(|(url, at)| url.is_empty() && *at == 0)
        );
    }

    #[tokio::test]
    async fn the_uploaders_urls_are_kept_as_stored_and_never_re_signed() {
        let urls = new_urls();
        let far = trainyard_core::now_ms() + 3_600_000;
        let mut record = JobRecord {
            tenant: "acme".into(),
            job_id: "j-01a24e6c8e6f71778b82b31c9acb8bb0".into(),
            delivered: vec![
                // Written with the job's own keys: the uploader's URL stands.
                delivered("s3://tenant/out", "https://tenant.s3/signed", far),
                delivered("az://tenant/out", "https://tenant.blob/signed", far),
                // A job-keys copy the uploader could not sign stays without.
                delivered("az://sas/out", "", 0),
                // A fleet credential this coordinator does not hold: no URL
                // made, none invented.
                delivered("s3://fleet/out?credential=gone", "", 0),
            ],
            ..Default::default()
        };
        let before = record.clone();
        urls.fill(&mut record).await;
        assert_eq!(record.delivered, before.delivered);
    }
}
