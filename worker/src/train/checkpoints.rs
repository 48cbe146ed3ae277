//! Checkpoints while a run goes: every new complete checkpoint the backend
//! finds is copied to a staging folder (so a trainer that prunes or
//! rewrites its files cannot tear the stored copy) and uploaded, one upload
//! at a time, never stopping the trainer. However a run ends short of its
//! adapter, [`Run::keep_latest`] stores what it saved, so the next attempt
//! resumes from it.

use super::supervise::Run;
use std::path::{Path, PathBuf};
use tokio::task::JoinHandle;
use tracing::Instrument;
use trainyard_backends::FoundCheckpoint;
use trainyard_core::store::StoreError;
use trainyard_proto::v1::Checkpoint;

type Upload = JoinHandle<Result<Checkpoint, StoreError>>;

/// The run's checkpoint uploads.
pub(super) struct Uploads {
    /// The step of the newest checkpoint stored (or restored).
    pub stored_step: Option<u32>,
    /// The newest checkpoint this run stored.
    pub latest: Option<Checkpoint>,
    /// The upload in flight and its step.
    running: Option<(u32, Upload)>,
}

impl Uploads {
    pub(super) fn new(restored_step: Option<u32>) -> Self {
        Self {
            stored_step: restored_step,
            latest: None,
            running: None,
        }
    }

    /// Lets a running upload finish on its own (never torn off mid-way)
    /// without waiting for it.
    pub(super) fn let_go(&mut self) {
        self.running = None;
    }
}

/// Whether a checkpoint of `step` is worth storing: newer than the one
/// stored, and not of the last step (the run is about to finish, and some
/// trainers cannot resume from one).
fn worth_storing(step: u32, stored: Option<u32>, steps: u32) -> bool {
    stored.is_none_or(|s| step > s) && step < steps
}

impl Run<'_> {
    /// Stores whatever state the trainer saved: waits for the running
    /// upload, uploads the newest complete checkpoint if it is newer, and
    /// waits for that too.
    pub(super) async fn keep_latest(&self, uploads: &mut Uploads) {
        self.finish_uploads(uploads).await;
        self.poll_checkpoints(uploads).await;
        self.finish_uploads(uploads).await;
    }

    /// Uploads the newest complete checkpoint if it is newer than the last
    /// one stored, one upload at a time. Store or staging trouble never
    /// stops the trainer: the checkpoint is tried again at the next scan
    /// (or a newer one is).
    pub(super) async fn poll_checkpoints(&self, uploads: &mut Uploads) {
        if let Some((_, upload)) = &uploads.running {
            if !upload.is_finished() {
                return;
            }
            let (step, upload) = uploads.running.take().expect("checked");
            self.uploaded(step, upload.await, uploads).await;
        }
        let Some(found) = self.backend.latest_checkpoint(self.inputs) else {
            return;
        };
        if !worth_storing(found.step, uploads.stored_step, self.inputs.settings.steps) {
            return;
        }
        if let Some(upload) = self.start_upload(found).await {
            uploads.running = Some(upload);
        }
    }

    /// Stages `found` and starts its upload; `None` when it changed while
    /// being copied (pruned or rewritten: tried again later).
    async fn start_upload(&self, found: FoundCheckpoint) -> Option<(u32, Upload)> {
        let output_dir = self.inputs.output_dir.clone();
        let dir = self.staging.join(format!("{:08}", found.step));
        let files = found.files.clone();
        let staged =
            tokio::task::spawn_blocking(move || stage_checkpoint(&output_dir, &files, &dir))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
        let (staged, bytes) = match staged {
            Ok(staged) => staged,
            Err(e) => {
                tracing::debug!(job = %self.ctx.meta.job, step = found.step, error = %e, "checkpoint changed while staging");
                return None;
            }
        };
        let store = self.stage.store.clone();
        let (tenant, job) = (self.ctx.meta.tenant.clone(), self.ctx.meta.job.clone());
        let step = found.step;
        let span = tracing::info_span!(
            "train.checkpoint.upload",
            trainyard.job.id = %job,
            step,
            bytes,
        );
        let upload = async move {
            let stored = store
                .put_checkpoint(&tenant, &job, step, &staged, &found.files)
                .await;
            let _ = tokio::fs::remove_dir_all(&staged).await;
            stored
        };
        Some((step, tokio::spawn(upload.instrument(span))))
    }

    async fn uploaded(
        &self,
        step: u32,
        joined: Result<Result<Checkpoint, StoreError>, tokio::task::JoinError>,
        uploads: &mut Uploads,
    ) {
        match upload_result(joined) {
            Ok(checkpoint) => {
                tracing::info!(job = %self.ctx.meta.job, step, "checkpoint stored");
                uploads.stored_step = Some(step).max(uploads.stored_step);
                self.ctx.events.checkpoint(checkpoint.clone()).await;
                uploads.latest = Some(checkpoint);
            }
            Err(e) => {
                tracing::warn!(job = %self.ctx.meta.job, step, error = %e, "checkpoint upload failed; it is tried again");
                self.logs.note(&format!(
                    "checkpoint of step {step} could not be stored: {e}"
                ));
            }
        }
    }

    /// Waits for a running upload.
    pub(super) async fn finish_uploads(&self, uploads: &mut Uploads) {
        if let Some((step, upload)) = uploads.running.take() {
            self.uploaded(step, upload.await, uploads).await;
        }
    }
}

/// A finished upload's checkpoint, or why it failed in words for people
/// (the message, never a `Debug` dump).
fn upload_result(
    joined: Result<Result<Checkpoint, StoreError>, tokio::task::JoinError>,
) -> Result<Checkpoint, String> {
    joined
        .map_err(|e| format!("upload task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// Copies a checkpoint's files into a staging folder, failing if any of
/// them changed while it was copied (some trainers rewrite files in place,
/// ai-toolkit's `optimizer.pt`, or prune old checkpoints); returns the
/// folder and the bytes copied.
fn stage_checkpoint(
    output_dir: &Path,
    files: &[PathBuf],
    dir: &Path,
) -> std::io::Result<(PathBuf, u64)> {
    let _ = std::fs::remove_dir_all(dir);
    let result = (|| {
        let mut bytes = 0;
        for rel in files {
            let from = output_dir.join(rel);
            let to = dir.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let stamp = |m: std::fs::Metadata| (m.len(), m.modified().ok());
            let before = stamp(std::fs::metadata(&from)?);
            bytes += std::fs::copy(&from, &to)?;
            if stamp(std::fs::metadata(&from)?) != before {
                return Err(std::io::Error::other(format!(
                    "{} changed while it was copied",
                    rel.display()
                )));
            }
        }
        Ok((dir.to_owned(), bytes))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_newer_checkpoint_short_of_the_last_step_is_stored() {
        assert!(worth_storing(10, None, 100));
        assert!(worth_storing(20, Some(10), 100));
        assert!(!worth_storing(10, Some(10), 100));
        assert!(!worth_storing(5, Some(10), 100));
        assert!(!worth_storing(100, None, 100));
    }

    #[test]
    fn a_failed_upload_is_told_by_its_message() {
        let failed = upload_result(Ok(Err(StoreError::NotFound("jobs/j/ckpt".into()))));
        assert_eq!(failed.unwrap_err(), "object jobs/j/ckpt not found");
        let stored = Checkpoint {
            step: 10,
            uri: "file:///store/jobs/j/ckpt".into(),
            ..Default::default()
        };
        assert_eq!(upload_result(Ok(Ok(stored.clone()))), Ok(stored));
    }

    #[test]
    fn staging_copies_the_files_and_counts_their_bytes() {
        let root = tempfile::tempdir().unwrap();
        let output = root.path().join("output");
        std::fs::create_dir_all(output.join("step-10")).unwrap();
        std::fs::write(output.join("step-10/model.bin"), b"weights").unwrap();
        std::fs::write(output.join("step-10/state.json"), b"{}").unwrap();
        let files = vec![
            PathBuf::from("step-10/model.bin"),
            PathBuf::from("step-10/state.json"),
        ];
        let dir = root.path().join("staging/00000010");
        let (staged, bytes) = stage_checkpoint(&output, &files, &dir).unwrap();
        assert_eq!(staged, dir);
        assert_eq!(bytes, 9);
        assert_eq!(
            std::fs::read(dir.join("step-10/model.bin")).unwrap(),
            b"weights"
        );
    }

    #[test]
    fn a_file_gone_before_staging_leaves_no_staging_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("staging/00000010");
        let files = vec![PathBuf::from("missing.bin")];
        assert!(stage_checkpoint(root.path(), &files, &dir).is_err());
        assert!(!dir.exists());
    }
}
