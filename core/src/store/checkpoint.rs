//! Checkpoints in the store: a job's own prefix
//! (`tenants/<tenant>/jobs/<job>/checkpoints/<step>/`) holds the files and
//! `checkpoint.json`, which lists each file's size and sha256. The
//! manifest's own sha256 travels in the `checkpoint` event and the job
//! record ([`v1::Checkpoint::manifest_sha256`]); a restore reads only a
//! manifest whose sha256 it was told, then only files that match it. A
//! checkpoint planted or altered in the store — trainers unpickle what they
//! resume from — is never handed to a trainer.

use super::{ArtifactStore, StoreError, keys};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use trainyard_proto::v1;
use trainyard_proto::{JobId, TenantId};

/// `checkpoint.json`: what a stored checkpoint holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointManifest {
    pub step: u32,
    pub files: Vec<CheckpointFile>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointFile {
    /// Relative to the run's output folder.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

fn plain_relative(path: &str) -> bool {
    !path.starts_with('/') && !path.split('/').any(|p| p == ".." || p.is_empty())
}

impl ArtifactStore {
    /// Uploads a checkpoint: `files` (relative to `root`) to
    /// `<job>/checkpoints/<step>/files/…`, then `checkpoint.json` listing
    /// each file's size and sha256. A checkpoint without its manifest is
    /// incomplete and never used. Returns its URI, step and the manifest's
    /// sha256.
    pub async fn put_checkpoint(
        &self,
        tenant: &TenantId,
        job: &JobId,
        step: u32,
        root: &Path,
        files: &[PathBuf],
    ) -> Result<v1::Checkpoint, StoreError> {
        let prefix = keys::checkpoint(tenant, job, step);
        let manifest_key = keys::checkpoint_manifest(&prefix);
        // Storing a step again (a second attempt got there too): the old
        // manifest goes first, so no reader pairs it with the new files.
        self.delete(&manifest_key).await?;
        let mut listed = Vec::with_capacity(files.len());
        for rel in files {
            let rel_str = rel.to_string_lossy().replace('\\', "/");
            if rel.is_absolute() || !plain_relative(&rel_str) {
                return Err(StoreError::Io {
                    path: rel.clone(),
                    source: std::io::Error::other("checkpoint file outside the output folder"),
                });
            }
            let artifact = self
                .put_file(&root.join(rel), &keys::checkpoint_file(&prefix, &rel_str))
                .await?;
            listed.push(CheckpointFile {
                path: rel_str,
                size: artifact.size,
                sha256: artifact.sha256,
            });
        }
        let manifest = CheckpointManifest {
            step,
            files: listed,
        };
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Io {
            path: PathBuf::from("checkpoint.json"),
            source: std::io::Error::other(e),
        })?;
        let stored = self.put_bytes(&manifest_key, Bytes::from(body)).await?;
        Ok(v1::Checkpoint {
            step,
            uri: self.uri(&prefix),
            manifest_sha256: stored.sha256,
        })
    }

    /// The steps of a job's complete checkpoints (those with a manifest),
    /// newest first.
    pub async fn checkpoints(
        &self,
        tenant: &TenantId,
        job: &JobId,
    ) -> Result<Vec<u32>, StoreError> {
        let base = keys::checkpoints(tenant, job);
        let mut steps: Vec<u32> = self
            .list(&base)
            .await?
            .into_iter()
            .filter_map(|(key, _)| {
                let rest = key.strip_prefix(&base)?.trim_start_matches('/');
                let (step, name) = rest.split_once('/')?;
                (name == "checkpoint.json").then(|| step.parse::<u32>().ok())?
            })
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        Ok(steps)
    }

    /// Puts a checkpoint stored by [`Self::put_checkpoint`] back under
    /// `root`: its manifest only when its sha256 is `manifest_sha256`, each
    /// file only when it matches the manifest. Returns the step and files.
    pub async fn get_checkpoint(
        &self,
        prefix: &str,
        manifest_sha256: &str,
        root: &Path,
    ) -> Result<(u32, Vec<PathBuf>), StoreError> {
        let prefix = prefix.trim_end_matches('/');
        let manifest_key = keys::checkpoint_manifest(prefix);
        let body = self.get_bytes(&manifest_key).await?;
        let actual = hex::encode(Sha256::digest(&body));
        if manifest_sha256.is_empty() || actual != manifest_sha256 {
            return Err(StoreError::Checksum {
                key: self.uri(&manifest_key),
                expected: manifest_sha256.to_string(),
                actual,
            });
        }
        let manifest: CheckpointManifest = serde_json::from_slice(&body)
            .map_err(|e| StoreError::Corrupt(format!("{manifest_key}: {e}")))?;
        let mut files = Vec::with_capacity(manifest.files.len());
        for file in &manifest.files {
            if !plain_relative(&file.path) {
                return Err(StoreError::Corrupt(format!(
                    "{manifest_key} names {} outside its folder",
                    file.path
                )));
            }
            self.get_file(
                &keys::checkpoint_file(prefix, &file.path),
                &root.join(&file.path),
                Some(&file.sha256),
            )
            .await?;
            files.push(PathBuf::from(&file.path));
        }
        Ok((manifest.step, files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_checkpoint_whose_manifest_matches_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
        let (t, j) = (
            TenantId::parse("acme").unwrap(),
            JobId::parse("j-1").unwrap(),
        );
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("state.pt"), b"weights").unwrap();
        let stored = store
            .put_checkpoint(&t, &j, 5, &run, &[PathBuf::from("state.pt")])
            .await
            .unwrap();
        assert_eq!(store.checkpoints(&t, &j).await.unwrap(), [5]);
        let prefix = store.key_of(&stored.uri).unwrap();
        let out = dir.path().join("out");
        let (step, files) = store
            .get_checkpoint(&prefix, &stored.manifest_sha256, &out)
            .await
            .unwrap();
        assert_eq!((step, files.len()), (5, 1));

        // A manifest rewritten to match planted files is refused.
        let planted = CheckpointManifest {
            step: 5,
            files: vec![CheckpointFile {
                path: "state.pt".into(),
                size: 4,
                sha256: hex::encode(Sha256::digest(b"evil")),
            }],
        };
        store
            .put_bytes(
                &keys::checkpoint_file(&prefix, "state.pt"),
                Bytes::from_static(b"evil"),
            )
            .await
            .unwrap();
        store
            .put_bytes(
                &keys::checkpoint_manifest(&prefix),
                serde_json::to_vec(&planted).unwrap().into(),
            )
            .await
            .unwrap();
        let err = store
            .get_checkpoint(&prefix, &stored.manifest_sha256, &dir.path().join("o2"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Checksum { .. }), "{err}");
        assert!(!dir.path().join("o2/state.pt").exists());
        // Without a known sha256 nothing is read.
        assert!(matches!(
            store
                .get_checkpoint(&prefix, "", &dir.path().join("o3"))
                .await,
            Err(StoreError::Checksum { .. })
        ));
    }
}
