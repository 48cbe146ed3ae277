//! Each tenant's webhook signing secret: made on first use from the
//! operating system's CSPRNG (32 bytes, Standard Webhooks form
//! `whsec_<base64>`), kept in the coordinators' own KV bucket
//! (`ty_webhook_secrets`, key: the tenant; no other role reads it, and no
//! event or task carries a secret), and rotatable.
//!
//! A rotation makes a new secret and keeps the one it replaces signing for
//! `webhooks.secret_overlap_secs`: meanwhile every delivery carries both
//! signatures (`webhook-signature: v1,<new> v1,<old>`), so a receiver can
//! switch to the new secret at any time in the window. Only the latest
//! replaced secret is kept: rotating twice inside one window ends the
//! first one's overlap.
//!
//! Writes are compare-and-set on the entry's revision, so two replicas
//! making a tenant's first secret at once agree on one, and two rotations
//! at once both take effect in turn.

use super::Secret;
use async_nats::jetstream::kv;
use bytes::Bytes;
use prost::Message;
use rand::TryRngCore;
use std::time::Duration;
use trainyard_proto::TenantId;
use trainyard_proto::v1::{TenantWebhookSecrets, WebhookSecretResponse};

/// Key bytes of a new secret (Standard Webhooks: 24 to 64).
pub const SECRET_BYTES: usize = 32;

/// Why a tenant's secrets could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretStoreError {
    #[error("webhook secrets unavailable: {0}")]
    Unavailable(String),
    #[error("webhook secrets of tenant {0} are not readable")]
    Corrupt(String),
    #[error("webhook secrets of tenant {0} changed too often at once; retry")]
    Contended(String),
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
}

/// One tenant's secrets, as the coordinators hold them.
#[derive(Clone, Debug)]
pub struct TenantSecrets {
    pub current: Secret,
    pub created_at_ms: i64,
    /// The secret `current` replaced, and until when it still signs.
    pub previous: Option<(Secret, i64)>,
}

impl TenantSecrets {
    /// The secrets that sign a delivery made at `now_ms`: the current one,
    /// then the replaced one while its overlap lasts.
    pub fn signing(&self, now_ms: i64) -> Vec<&Secret> {
        let mut keys = vec![&self.current];
        if let Some((previous, until)) = &self.previous
            && now_ms < *until
        {
            keys.push(previous);
        }
        keys
    }

    /// What the tenant is shown.
    pub fn response(&self, now_ms: i64) -> WebhookSecretResponse {
        WebhookSecretResponse {
            secret: self.current.to_whsec(),
            created_at_ms: self.created_at_ms,
            previous_valid_until_ms: match &self.previous {
                Some((_, until)) if now_ms < *until => *until,
                _ => 0,
            },
        }
    }

    fn encode(&self) -> Bytes {
        let (previous, until) = self
            .previous
            .as_ref()
            .map_or((String::new(), 0), |(s, until)| (s.to_whsec(), *until));
        TenantWebhookSecrets {
            current: self.current.to_whsec(),
            created_at_ms: self.created_at_ms,
            previous,
            previous_valid_until_ms: until,
        }
        .encode_to_vec()
        .into()
    }

    fn decode(tenant: &TenantId, bytes: Bytes) -> Result<TenantSecrets, SecretStoreError> {
        let corrupt = || SecretStoreError::Corrupt(tenant.to_string());
        let stored = TenantWebhookSecrets::decode(bytes).map_err(|_| corrupt())?;
        let current = Secret::parse(&stored.current).map_err(|_| corrupt())?;
        let previous = if stored.previous.is_empty() {
            None
        } else {
            let secret = Secret::parse(&stored.previous).map_err(|_| corrupt())?;
            Some((secret, stored.previous_valid_until_ms))
        };
        Ok(TenantSecrets {
            current,
            created_at_ms: stored.created_at_ms,
            previous,
        })
    }

    /// A first secret.
    fn fresh(secret: Secret, now_ms: i64) -> TenantSecrets {
        TenantSecrets {
            current: secret,
            created_at_ms: now_ms,
            previous: None,
        }
    }

    /// After a rotation to `secret` at `now_ms`: the current secret becomes
    /// the previous one, signing until `now_ms + overlap`.
    pub fn rotated(&self, secret: Secret, now_ms: i64, overlap: Duration) -> TenantSecrets {
        let overlap_ms = i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX);
        TenantSecrets {
            current: secret,
            created_at_ms: now_ms,
            previous: Some((self.current.clone(), now_ms.saturating_add(overlap_ms))),
        }
    }
}

/// A new secret from the operating system's CSPRNG.
pub fn generate() -> Result<Secret, SecretStoreError> {
    let mut bytes = vec![0u8; SECRET_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| SecretStoreError::Random(e.to_string()))?;
    Ok(Secret(bytes))
}

/// The tenants' secrets in the `ty_webhook_secrets` bucket.
#[derive(Clone)]
pub struct SecretStore {
    kv: kv::Store,
    overlap: Duration,
}

/// Compare-and-set attempts before giving up on a busy entry.
const CAS_TRIES: usize = 8;

impl SecretStore {
    pub fn new(kv: kv::Store, overlap: Duration) -> SecretStore {
        SecretStore { kv, overlap }
    }

    async fn read(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<(TenantSecrets, u64)>, SecretStoreError> {
        let entry = self
            .kv
            .entry(tenant.as_str())
            .await
            .map_err(|e| SecretStoreError::Unavailable(e.to_string()))?
            .filter(|e| e.operation == kv::Operation::Put);
        match entry {
            None => Ok(None),
            Some(entry) => Ok(Some((
                TenantSecrets::decode(tenant, entry.value)?,
                entry.revision,
            ))),
        }
    }

    /// The tenant's secrets, a first one made and stored when it has none.
    pub async fn get_or_create(
        &self,
        tenant: &TenantId,
    ) -> Result<TenantSecrets, SecretStoreError> {
        for _ in 0..CAS_TRIES {
            if let Some((secrets, _)) = self.read(tenant).await? {
                return Ok(secrets);
            }
            let fresh = TenantSecrets::fresh(generate()?, trainyard_core::now_ms());
            match self.kv.create(tenant.as_str(), fresh.encode()).await {
                Ok(_) => {
                    tracing::info!(%tenant, "webhook signing secret created");
                    return Ok(fresh);
                }
                // Another replica made it first: use that one.
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SecretStoreError::Unavailable(e.to_string())),
            }
        }
        Err(SecretStoreError::Contended(tenant.to_string()))
    }

    /// Replaces the tenant's secret by a new one; the old one keeps signing
    /// for the overlap. A tenant without a secret gets its first.
    pub async fn rotate(&self, tenant: &TenantId) -> Result<TenantSecrets, SecretStoreError> {
        for _ in 0..CAS_TRIES {
            let now = trainyard_core::now_ms();
            let Some((old, revision)) = self.read(tenant).await? else {
                self.get_or_create(tenant).await?;
                continue;
            };
            let next = old.rotated(generate()?, now, self.overlap);
            match self
                .kv
                .update(tenant.as_str(), next.encode(), revision)
                .await
            {
                Ok(_) => {
                    tracing::info!(%tenant, overlap_secs = self.overlap.as_secs(), "webhook signing secret rotated");
                    return Ok(next);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(SecretStoreError::Unavailable(e.to_string())),
            }
        }
        Err(SecretStoreError::Contended(tenant.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_secrets_are_random_whsec_strings_of_32_bytes() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.0.len(), SECRET_BYTES);
        assert_ne!(a.0, b.0);
        let text = a.to_whsec();
        assert!(text.starts_with("whsec_"));
        assert_eq!(Secret::parse(&text).unwrap().0, a.0);
    }

    #[test]
    fn a_rotation_keeps_the_old_secret_signing_for_the_overlap() {
        let first = TenantSecrets::fresh(generate().unwrap(), 1_000);
        assert_eq!(first.signing(5_000).len(), 1);
        assert_eq!(first.response(5_000).previous_valid_until_ms, 0);
        let second = first.rotated(generate().unwrap(), 10_000, Duration::from_secs(60));
        let during: Vec<_> = second.signing(69_999).iter().map(|s| s.0.clone()).collect();
        assert_eq!(during, [second.current.0.clone(), first.current.0.clone()]);
        assert_eq!(second.response(20_000).previous_valid_until_ms, 70_000);
        let after = second.signing(70_000);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].0, second.current.0);
        assert_eq!(second.response(70_000).previous_valid_until_ms, 0);
        assert_eq!(second.response(0).secret, second.current.to_whsec());

        let tenant = TenantId::parse("acme").unwrap();
        let back = TenantSecrets::decode(&tenant, second.encode()).unwrap();
        assert_eq!(back.current.0, second.current.0);
        assert_eq!(back.previous.as_ref().unwrap().1, 70_000);
        assert!(matches!(
            TenantSecrets::decode(&tenant, Bytes::from_static(b"\xff")),
            Err(SecretStoreError::Corrupt(_))
        ));
    }
}
