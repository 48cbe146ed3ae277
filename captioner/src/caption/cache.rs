//! The caption cache: a model's caption of a file, kept in the artifact
//! store under a key made of everything that decides it — the file's
//! sha256, the backend, its endpoint and model, the prompt and the
//! sampling parameters — so a retried or resubmitted job pays for no
//! caption twice, and any change to one of them misses.
//!
//! Entries live under the tenant's own prefix
//! (`tenants/<tenant>/caption-cache/<key>.txt`): a caption one tenant paid
//! for is never served to another (nor does an answer from one tenant's
//! caption server reach another's dataset), and a job's spec cannot name
//! the prefix (specs may read only `uploads/` and `jobs/`). A cache that
//! cannot be read or written is a miss, never a failed job.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use trainyard_core::store::{ArtifactStore, StoreError};
use trainyard_proto::TenantId;

/// What decides a caption besides the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptionRecipe {
    /// `openai`, `gemini`, `command`, …
    pub backend: String,
    /// The server (or program) that answers.
    pub endpoint: String,
    pub model: String,
    pub system_prompt: String,
    pub prompt: String,
    /// Sampling and post-processing settings, by name (`temperature`,
    /// `max_tokens`, …), as their text.
    pub parameters: BTreeMap<String, String>,
}

impl CaptionRecipe {
    /// The cache key of this recipe applied to a file of `file_sha256`
    /// (hex): the sha256 of every field, each length-prefixed so no two
    /// recipes share a key.
    pub fn key(&self, file_sha256: &str) -> String {
        let mut hash = Sha256::new();
        let mut field = |value: &str| {
            hash.update((value.len() as u64).to_be_bytes());
            hash.update(value.as_bytes());
        };
        field("trainyard-caption-v1");
        field(file_sha256);
        field(&self.backend);
        field(&self.endpoint);
        field(&self.model);
        field(&self.system_prompt);
        field(&self.prompt);
        for (name, value) in &self.parameters {
            field(name);
            field(value);
        }
        hex::encode(hash.finalize())
    }
}

/// Captions kept in the artifact store, per tenant.
#[derive(Clone)]
pub struct CaptionCache {
    store: ArtifactStore,
}

impl CaptionCache {
    pub fn new(store: ArtifactStore) -> Self {
        Self { store }
    }

    fn object(tenant: &TenantId, key: &str) -> String {
        format!("tenants/{tenant}/caption-cache/{key}.txt")
    }

    /// The caption kept under `key`, if any.
    pub async fn get(&self, tenant: &TenantId, key: &str) -> Option<String> {
        match self.store.get_bytes(&Self::object(tenant, key)).await {
            Ok(bytes) => String::from_utf8(bytes.to_vec()).ok(),
            Err(StoreError::NotFound(_)) => None,
            Err(error) => {
                tracing::warn!(%error, "cannot read the caption cache; captioning anew");
                None
            }
        }
    }

    /// Keeps `caption` under `key` (a failure is logged).
    pub async fn put(&self, tenant: &TenantId, key: &str, caption: &str) {
        let bytes = Bytes::copy_from_slice(caption.as_bytes());
        if let Err(error) = self
            .store
            .put_bytes(&Self::object(tenant, key), bytes)
            .await
        {
            tracing::warn!(%error, "cannot keep a caption in the cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> CaptionRecipe {
        CaptionRecipe {
            backend: "openai".into(),
            endpoint: "http://127.0.0.1:8000/v1".into(),
            model: "joycaption".into(),
            system_prompt: "You caption images.".into(),
            prompt: "Describe the image.".into(),
            parameters: [("temperature".to_string(), "0.2".to_string())].into(),
        }
    }

    #[test]
    fn every_field_of_the_recipe_changes_the_key() {
        let file = "ab".repeat(32);
        let base = recipe().key(&file);
        assert_eq!(base, recipe().key(&file), "the same recipe, the same key");
        assert_eq!(base.len(), 64);
        let changed: Vec<CaptionRecipe> = vec![
            CaptionRecipe {
                backend: "gemini".into(),
                ..recipe()
            },
            CaptionRecipe {
                endpoint: "http://other/v1".into(),
                ..recipe()
            },
            CaptionRecipe {
                model: "qwen2-vl".into(),
                ..recipe()
            },
            CaptionRecipe {
                system_prompt: String::new(),
                ..recipe()
            },
            CaptionRecipe {
                prompt: "Describe it.".into(),
                ..recipe()
            },
            CaptionRecipe {
                parameters: [("temperature".to_string(), "0.3".to_string())].into(),
                ..recipe()
            },
            // Moving text between fields is another recipe too.
            CaptionRecipe {
                system_prompt: "You caption images.Describe the image.".into(),
                prompt: String::new(),
                ..recipe()
            },
        ];
        for other in changed {
            assert_ne!(other.key(&file), base, "{other:?}");
        }
        assert_ne!(recipe().key(&"cd".repeat(32)), base, "another file");
    }

    #[tokio::test]
    async fn a_kept_caption_is_found_by_its_tenant_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = ArtifactStore::open(&root.display().to_string()).unwrap();
        let cache = CaptionCache::new(store);
        let (acme, globex) = (
            TenantId::parse("acme").unwrap(),
            TenantId::parse("globex").unwrap(),
        );
        let key = recipe().key(&"ab".repeat(32));
        assert_eq!(cache.get(&acme, &key).await, None);
        cache.put(&acme, &key, "a red car").await;
        assert_eq!(cache.get(&acme, &key).await.as_deref(), Some("a red car"));
        assert_eq!(cache.get(&globex, &key).await, None, "another tenant's");
        assert!(
            root.join(format!("tenants/acme/caption-cache/{key}.txt"))
                .is_file(),
            "kept under the tenant's prefix"
        );
    }
}
