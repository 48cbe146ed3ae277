//! The prepare pipeline: local input in, prepared folder plus manifest out.
//!
//! ```text
//! LocalInput ─▶ unpack (guarded) ─▶ collect (junk, flatten, nested zips, sidecars)
//!            ─▶ decode every image, probe every clip ─▶ copy into prepared/ + sha256
//!            ─▶ caption (sidecar | backend, trigger word) ─▶ <stem>.txt ─▶ manifest.json
//! ```
//!
//! Work happens under `work_dir`: `scratch/` for unpacked archives (removed
//! at the end) and `prepared/` for the result. Both are emptied first, so a
//! retried attempt in the same work dir starts clean. The function never
//! touches the network or the artifact store; callers fetch with
//! [`crate::fetch_source`] and upload [`PreparedDataset::files`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::Instrument;

use crate::caption::{
    CaptionBackend, CaptionJob, CaptionPolicy, ImageInfo, TemplateCaptioner, caption_all,
};
use crate::collect::{Collected, collect_dir, collect_files, dropped_from_skip};
use crate::error::{PrepareError, blocking};
use crate::images::{check_all, write_all};
use crate::manifest::{
    DatasetManifest, DropReason, MANIFEST_FILE_NAME, MANIFEST_VERSION, ManifestEntry, MediaKind,
};
use crate::unpack::{UnpackBudget, UnpackLimits, unpack_zip_blocking};
use crate::video::VideoSettings;

/// A dataset already on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalInput {
    /// A zip archive (unpacked through the guarded reader).
    Zip(PathBuf),
    /// A folder, read in place and never modified.
    Dir(PathBuf),
    /// Loose files, e.g. downloaded image URLs; zips among them are expanded.
    Files(Vec<PathBuf>),
}

/// What the user asked for, plus safety limits.
#[derive(Debug, Clone)]
pub struct PrepareSettings {
    /// Put in front of every caption; empty for none.
    pub trigger_word: String,
    /// Template for [`PrepareSettings::template_captioner`].
    pub template: String,
    /// Caption every image with the backend, ignoring sidecar `.txt` files.
    pub overwrite_sidecar: bool,
    /// Backend calls in flight at once.
    pub caption_concurrency: usize,
    /// Tries per image when the backend fails with a retryable error.
    pub caption_attempts: u32,
    /// First wait between caption tries (doubled each try).
    pub caption_retry_delay: Duration,
    pub limits: UnpackLimits,
    /// Fewer usable images than this fails the job.
    pub min_images: usize,
    /// How clips are probed and the limits they are held to.
    pub video: VideoSettings,
}

impl Default for PrepareSettings {
    fn default() -> Self {
        Self {
            trigger_word: String::new(),
            template: TemplateCaptioner::DEFAULT_TEMPLATE.to_owned(),
            overwrite_sidecar: false,
            caption_concurrency: 4,
            caption_attempts: 3,
            caption_retry_delay: Duration::from_secs(1),
            limits: UnpackLimits::default(),
            min_images: 1,
            video: VideoSettings::default(),
        }
    }
}

impl PrepareSettings {
    /// A template backend for `self.template`.
    pub fn template_captioner(&self) -> TemplateCaptioner {
        TemplateCaptioner::new(self.template.clone())
    }

    pub fn validate(&self) -> Result<(), PrepareError> {
        let invalid = |field, reason: &str| {
            Err(PrepareError::InvalidSettings {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.caption_concurrency == 0 {
            return invalid("caption_concurrency", "must be at least 1");
        }
        if self.caption_attempts == 0 {
            return invalid("caption_attempts", "must be at least 1");
        }
        if self.limits.max_files == 0 || self.limits.max_total_bytes == 0 {
            return invalid("limits", "max_files and max_total_bytes must be positive");
        }
        if self.trigger_word.contains(['\n', '\r']) {
            return invalid("trigger_word", "must be a single line");
        }
        Ok(())
    }

    fn caption_policy(&self) -> CaptionPolicy {
        CaptionPolicy {
            trigger_word: self.trigger_word.trim().to_owned(),
            overwrite_sidecar: self.overwrite_sidecar,
            concurrency: self.caption_concurrency,
            max_attempts: self.caption_attempts,
            retry_delay: self.caption_retry_delay,
        }
    }
}

/// The result: a folder of images, `<stem>.txt` captions and
/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedDataset {
    /// The `prepared/` folder.
    pub dir: PathBuf,
    pub manifest: DatasetManifest,
}

impl PreparedDataset {
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE_NAME)
    }

    /// Every file of the dataset, each image followed by its caption, then
    /// the text files, and `manifest.json` last — upload in this order so a
    /// reader that sees the manifest can rely on everything it lists.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .manifest
            .images
            .iter()
            .flat_map(|e| [self.dir.join(&e.file), self.dir.join(&e.caption_file)])
            .collect();
        files.extend(self.manifest.texts.iter().map(|t| self.dir.join(&t.file)));
        files.push(self.manifest_path());
        files
    }
}

/// Prepares `input` into `work_dir/prepared`. See the module docs.
pub async fn prepare_local(
    input: LocalInput,
    work_dir: &Path,
    settings: &PrepareSettings,
    captioner: &dyn CaptionBackend,
) -> Result<PreparedDataset, PrepareError> {
    settings.validate()?;
    check_input_exists(&input).await?;
    let scratch = work_dir.join("scratch");
    let prepared = work_dir.join("prepared");
    for dir in [&scratch, &prepared] {
        if tokio::fs::try_exists(dir)
            .await
            .map_err(PrepareError::io(dir))?
        {
            tokio::fs::remove_dir_all(dir)
                .await
                .map_err(PrepareError::io(dir))?;
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(PrepareError::io(dir))?;
    }

    let limits = settings.limits;
    let scratch2 = scratch.clone();
    let unpack = tracing::info_span!(
        "prepare.unpack",
        trainyard.files = tracing::field::Empty,
        trainyard.bytes = tracing::field::Empty,
    );
    let (collected, files, bytes) = blocking(move || collect_input(input, &scratch2, limits))
        .instrument(unpack.clone())
        .await??;
    unpack.record("trainyard.files", files);
    unpack.record("trainyard.bytes", bytes);
    drop(unpack);
    let Collected {
        images,
        mut dropped,
    } = collected;
    tracing::info!(
        candidates = images.len(),
        dropped = dropped.len(),
        "collected dataset"
    );

    let validate = tracing::info_span!(
        "prepare.validate_images",
        trainyard.images = images.len(),
        trainyard.rejected = tracing::field::Empty,
    );
    let (good, bad) = check_all(images, &settings.video, &scratch)
        .instrument(validate.clone())
        .await?;
    validate.record("trainyard.rejected", bad.len());
    drop(validate);
    if good.is_empty() {
        let bad = bad.into_iter().map(|d| d.name).collect();
        return Err(PrepareError::NoUsableImages { bad });
    }
    if good.len() < settings.min_images {
        return Err(PrepareError::TooFewImages {
            found: good.len(),
            required: settings.min_images,
        });
    }
    dropped.extend(bad);
    dropped.sort_by(|a, b| a.name.cmp(&b.name));

    let written = write_all(good, &prepared).await?;
    let policy = settings.caption_policy();
    let jobs: Vec<CaptionJob> = written
        .iter()
        .enumerate()
        .map(|(i, w)| CaptionJob {
            image: ImageInfo {
                path: w.path.clone(),
                file_name: w.file_name.clone(),
                stem: w.stem.clone(),
                source_name: w.source.candidate.rel.clone(),
                index: i + 1,
                width: w.source.width,
                height: w.source.height,
                trigger_word: policy.trigger_word.clone(),
                media: w.source.media.clone(),
            },
            sidecar: w.source.candidate.sidecar.clone(),
        })
        .collect();
    let captions = caption_all(&jobs, captioner, &policy).await?;

    let mut entries = Vec::with_capacity(written.len());
    for (image, caption) in written.into_iter().zip(captions) {
        let caption_file = format!("{}.txt", image.stem);
        let path = prepared.join(&caption_file);
        tokio::fs::write(&path, caption.text.as_bytes())
            .await
            .map_err(PrepareError::io(&path))?;
        entries.push(ManifestEntry {
            file: image.file_name,
            caption_file,
            width: image.source.width,
            height: image.source.height,
            size: image.size,
            sha256: image.sha256,
            caption: caption.text,
            caption_source: caption.source,
            media: match &image.source.media {
                crate::caption::Media::Image => MediaKind::Image,
                crate::caption::Media::Video(_) => MediaKind::Video,
            },
            video: match &image.source.media {
                crate::caption::Media::Image => None,
                crate::caption::Media::Video(info) => Some(info.into()),
            },
        });
    }
    let manifest = DatasetManifest {
        version: MANIFEST_VERSION,
        trigger_word: policy.trigger_word.clone(),
        caption_backend: captioner.name().to_owned(),
        images: entries,
        dropped,
        texts: Vec::new(),
    };
    manifest
        .write_to_dir(&prepared)
        .await
        .map_err(PrepareError::io(prepared.join(MANIFEST_FILE_NAME)))?;
    if let Err(error) = tokio::fs::remove_dir_all(&scratch).await {
        tracing::warn!(path = %scratch.display(), %error, "could not remove scratch space");
    }
    let bad_images = manifest
        .dropped
        .iter()
        .filter(|d| {
            matches!(
                d.reason,
                DropReason::Undecodable | DropReason::TooSmall | DropReason::OverLimit
            )
        })
        .count();
    tracing::info!(
        images = manifest.images.len(),
        videos = manifest.videos().count(),
        bad_images,
        dropped = manifest.dropped.len(),
        "prepared dataset"
    );
    Ok(PreparedDataset {
        dir: prepared,
        manifest,
    })
}

async fn check_input_exists(input: &LocalInput) -> Result<(), PrepareError> {
    let paths: Vec<&PathBuf> = match input {
        LocalInput::Zip(p) | LocalInput::Dir(p) => vec![p],
        LocalInput::Files(files) => files.iter().collect(),
    };
    for path in paths {
        if !tokio::fs::try_exists(path).await.unwrap_or(false) {
            return Err(PrepareError::InputNotFound { path: path.clone() });
        }
    }
    Ok(())
}

/// Blocking: unpack (for zips) and collect. Also returns the files seen
/// (archive entries and walked files) and the bytes unpacked.
fn collect_input(
    input: LocalInput,
    scratch: &Path,
    limits: UnpackLimits,
) -> Result<(Collected, usize, u64), PrepareError> {
    let mut budget = UnpackBudget::new(limits);
    let collected = collect_with(input, scratch, &mut budget)?;
    Ok((collected, budget.entries_used(), budget.bytes_used()))
}

fn collect_with(
    input: LocalInput,
    scratch: &Path,
    budget: &mut UnpackBudget,
) -> Result<Collected, PrepareError> {
    match input {
        LocalInput::Zip(archive) => {
            let dest = scratch.join("unpacked");
            let report = unpack_zip_blocking(&archive, &dest, budget).map_err(|error| {
                PrepareError::Unpack {
                    archive: archive
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    error,
                }
            })?;
            let mut collected = collect_dir(&dest, scratch, budget)?;
            collected.dropped.extend(
                report
                    .skipped
                    .into_iter()
                    .map(|s| dropped_from_skip(s.name, s.kind)),
            );
            collected.dropped.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(collected)
        }
        LocalInput::Dir(dir) => collect_dir(&dir, scratch, budget),
        LocalInput::Files(files) => collect_files(&files, scratch, budget),
    }
}
