//! The prepare stage on the shared runtime: fetch the dataset named by the
//! job spec, prepare it with [`crate::prepare_local`], run preflight, and
//! store the prepared folder (manifest last) at `jobs/<job>/dataset/` in the
//! artifact store.
//!
//! ```text
//! fetch ─▶ prepare (unpack, check, caption) ─▶ dataset checks ─┐
//! access checks (base model, destinations) ────────────────────┴▶ verdict ─▶ store
//! ```
//!
//! Preflight decides before anything is stored or a GPU is held: any
//! problem fails the job at once with every problem listed. Errors keep
//! their retry intent: a 503 from a dataset host is a retry with the
//! server's delay, a zip with no usable image fails the job.

use crate::PreparedDataset;
use crate::caption::select::CaptionSetup;
use crate::datasets::{Datasets, access_checks};
use crate::preflight::{self, AccessChecks, Checked};
use std::path::Path;
use std::time::Duration;
use tracing::Instrument;
use trainyard_core::Config;
use trainyard_core::runtime::{StageError, StageHandler, TaskContext};
use trainyard_core::secrets::{Keyring, open_task};
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_proto::v1::{ErrorKind, PrepareOutput, PrepareTask, stage_result::Outcome};

pub struct PrepareStage {
    store: ArtifactStore,
    datasets: Datasets,
    access: AccessChecks,
    /// Opens the jobs' sealed secrets (the Hub token of the access checks).
    secrets: Option<Keyring>,
    /// Builds each job's caption backend (`[captioner.caption]`).
    captions: CaptionSetup,
}

impl PrepareStage {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let store = ArtifactStore::open_config(&config.store)?;
        Ok(Self {
            datasets: Datasets::new(config, store.clone())?,
            access: access_checks(config, store.clone())?,
            captions: CaptionSetup::new(&config.captioner.caption, Some(store.clone()))?
                .with_ffmpeg(config.captioner.video.ffmpeg.clone()),
            store,
            secrets: Keyring::from_config(&config.secrets)?,
        })
    }

    async fn prepare(
        &self,
        task: PrepareTask,
        ctx: &TaskContext,
        work: &Path,
    ) -> Result<Outcome, StageError> {
        let spec = task
            .spec
            .ok_or_else(|| StageError::fail(ErrorKind::InvalidSpec, "task has no job spec"))?;
        let captioner = self.captions.backend(
            &ctx.meta.tenant,
            &spec.caption.clone().unwrap_or_default(),
            Some(&spec.secrets.clone().unwrap_or_default()),
        )?;
        let (dataset, access) = tokio::join!(
            self.datasets
                .prepare(&ctx.meta.tenant, &spec, work, &*captioner, Some(ctx)),
            self.access.run(&task.tenant, &spec)
        );
        let Checked {
            report,
            prepared,
            retry,
        } = preflight::run(&spec, dataset, access).await?;
        for warning in &report.warnings {
            ctx.events
                .log(ctx.stage, "preflight", &format!("warning: {warning}"))
                .await;
        }
        // The dataset host's own retry delay, unless other problems fail the job anyway.
        if let Some(retry) = retry
            && report.problems.is_empty()
        {
            return Err(retry);
        }
        report.verdict()?;
        let prepared = prepared.ok_or_else(|| {
            StageError::fail(ErrorKind::Internal, "preflight passed without a dataset")
        })?;
        if let Some(estimate) = &report.estimate {
            let line = format!("preflight ok: {}", preflight::describe(estimate));
            tracing::info!(job = %ctx.meta.job, estimate = %line, "preflight passed");
            ctx.note(&line).await;
        }
        self.store_dataset(&prepared, ctx).await
    }

    async fn store_dataset(
        &self,
        prepared: &PreparedDataset,
        ctx: &TaskContext,
    ) -> Result<Outcome, StageError> {
        let manifest = &prepared.manifest;
        let videos = manifest.videos().count();
        ctx.note(&match manifest.texts.len() {
            0 if videos > 0 => format!(
                "storing {} images and {videos} video clips",
                manifest.images.len() - videos
            ),
            0 => format!("storing {} images", manifest.images.len()),
            n => format!("storing {n} text file{}", if n == 1 { "" } else { "s" }),
        })
        .await;
        let prefix = keys::dataset(&ctx.meta.tenant, &ctx.meta.job);
        let span = tracing::info_span!(
            "prepare.store",
            trainyard.files = tracing::field::Empty,
            trainyard.bytes = tracing::field::Empty,
            trainyard.outcome = tracing::field::Empty,
        );
        let mut stored = (0u64, 0u64);
        let result = self
            .upload(prepared, &prefix, &mut stored)
            .instrument(span.clone())
            .await;
        span.record("trainyard.files", stored.0);
        span.record("trainyard.bytes", stored.1);
        span.record(
            "trainyard.outcome",
            if result.is_ok() { "ok" } else { "error" },
        );
        trainyard_core::telemetry::metrics().artifact_uploaded("prepare", stored.1);
        result?;
        let sidecar = manifest
            .images
            .iter()
            .filter(|i| matches!(i.caption_source, crate::CaptionSource::Sidecar))
            .count() as u32;
        let images = manifest.images.len() as u32;
        Ok(Outcome::Prepared(PrepareOutput {
            dataset_uri: self.store.uri(&prefix),
            image_count: images,
            captioned: images - sidecar,
            sidecar_captions: sidecar,
            dropped: dropped_summary(&manifest.dropped),
            video_count: videos as u32,
        }))
    }
}

impl PrepareStage {
    /// Uploads every file of `prepared` under `prefix` (manifest last),
    /// counting files and bytes stored into `stored` as it goes.
    async fn upload(
        &self,
        prepared: &PreparedDataset,
        prefix: &str,
        stored: &mut (u64, u64),
    ) -> Result<(), StageError> {
        // A crashed earlier attempt may have left part of a set: start clean.
        self.store
            .delete_prefix(prefix)
            .await
            .map_err(StageError::from)?;
        for file in prepared.files() {
            let rel = file
                .strip_prefix(&prepared.dir)
                .map_err(|_| {
                    StageError::fail(ErrorKind::Internal, "prepared file outside its folder")
                })?
                .to_string_lossy()
                .replace('\\', "/");
            let artifact = self
                .store
                .put_file(&file, &format!("{prefix}/{rel}"))
                .await
                .map_err(StageError::from)?;
            stored.0 += 1;
            stored.1 += artifact.size;
        }
        Ok(())
    }
}

impl StageHandler for PrepareStage {
    type Task = PrepareTask;

    async fn handle(&self, mut task: PrepareTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        open_task(
            self.secrets.as_ref(),
            &mut task.spec,
            &task.tenant,
            &task.job_id,
        )?;
        let work = self
            .datasets
            .work_root
            .join(format!("{}-{}", ctx.meta.job, ctx.meta.attempt));
        let _ = tokio::fs::remove_dir_all(&work).await;
        if let Err(e) = tokio::fs::create_dir_all(&work).await {
            return Err(StageError::retry(
                ErrorKind::Internal,
                format!("cannot create work dir {}: {e}", work.display()),
                Duration::from_secs(5),
            ));
        }
        let result = tokio::select! {
            result = self.prepare(task, &ctx, &work) => result,
            _ = ctx.cancel.cancelled() => Err(StageError::Cancelled),
            _ = ctx.stop.cancelled() => Err(StageError::Interrupted),
        };
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }
}

/// Dropped files named in a stage result (and so in the job record) at
/// most; the dataset's `manifest.json` in the store lists every one.
pub const RESULT_DROPPED_FILES: usize = 100;

/// The dropped files as the result names them: the first
/// [`RESULT_DROPPED_FILES`], then one line counting the rest. A dataset of
/// a million unusable files must not make a result or record larger than
/// NATS carries.
fn dropped_summary(dropped: &[crate::manifest::DroppedFile]) -> Vec<String> {
    let mut out: Vec<String> = dropped
        .iter()
        .take(RESULT_DROPPED_FILES)
        .map(|d| format!("{}: {:?}", d.name, d.reason))
        .collect();
    if dropped.len() > RESULT_DROPPED_FILES {
        out.push(format!(
            "… and {} more (listed in the dataset's manifest.json)",
            dropped.len() - RESULT_DROPPED_FILES
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DropReason, DroppedFile};

    #[test]
    fn a_result_names_a_hundred_dropped_files_and_counts_the_rest() {
        let dropped: Vec<DroppedFile> = (0..1000)
            .map(|i| DroppedFile {
                name: format!("{i:04}.png"),
                reason: DropReason::Undecodable,
                detail: None,
            })
            .collect();
        let summary = dropped_summary(&dropped);
        assert_eq!(summary.len(), RESULT_DROPPED_FILES + 1);
        assert_eq!(summary[0], "0000.png: Undecodable");
        assert!(summary[RESULT_DROPPED_FILES].contains("900 more"));
        assert_eq!(dropped_summary(&dropped[..3]).len(), 3);
    }
}
