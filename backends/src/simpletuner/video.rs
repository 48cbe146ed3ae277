//! Video clips in a SimpleTuner run: Wan (`model_family: wan`) trains on
//! a `dataset_type: "video"` dataset, beside an image dataset when the job
//! has images too.
//!
//! What SimpleTuner does (bghira/SimpleTuner, the snapshot the trainers
//! reference names):
//! - `documentation/DATALOADER.md`: `dataset_type` is `image`, `video`, …;
//!   "Don't combine images and video in a **single** dataset. Split them
//!   out." A video dataset has a `video` block: `num_frames`, `min_frames`
//!   (at least `num_frames`; unset, equal to it), `max_frames`, `is_i2v`
//!   (`documentation/quickstart/WAN.md` shows the same block for Wan).
//! - `simpletuner/helpers/data_backend/factory.py`: a video dataset without
//!   `num_frames` gets `framerate × 5` (150 at the default 30 fps) with a
//!   warning; `min_frames < num_frames`, or either below 1, is refused; the
//!   model's `adjust_video_frames` rounds both down; `is_i2v` is false
//!   unless the flavour is an i2v one.
//! - `simpletuner/helpers/models/wan/model.py` `Wan.adjust_video_frames`:
//!   Wan's frame counts are `8n + 1`, rounded down. Discovery
//!   (`helpers/metadata/backends/discovery.py`) trims each clip the same way
//!   and skips one that then falls below `min_frames`;
//!   `helpers/metadata/backends/base.py` skips one above `max_frames`.
//! - `helpers/caching/vae.py`: a longer clip is cut to its first
//!   `num_frames` frames.
//! - Every image or video dataset lists *all* media files of its folder
//!   (`helpers/training/__init__.py` folds the video extensions into
//!   `image_file_extensions`, which `_discover_new_files` lists), so an
//!   image dataset on a folder with clips would read the clips too.
//!
//! So a dataset of clips only is one video dataset on the dataset folder,
//! one of images only stays one image dataset, and one of both becomes two,
//! each on a folder of links to its own files and their captions under the
//! run folder ([`crate::Launch::links`]): the two must not share a folder.
//! The video block: `num_frames` is the extra's, else derived from the
//! shortest clip in steps of 8 (`crate::common::video`); `min_frames`
//! equals it (upstream's default, written out); `max_frames` is the
//! longest clip, so none is skipped and SimpleTuner need not scan for it;
//! `is_i2v` is false (our Wan presets are text-to-video).

use crate::common::video::{ClipNeed, DatasetFile, dataset_files, derived_frames, round_down};
use crate::{BackendError, TrainInputs};
use serde::Serialize;
use std::path::{Component, Path, PathBuf};
use trainyard_models::ModelFamily;

/// Wan's frame counts in SimpleTuner: `8n + 1` (`Wan.adjust_video_frames`).
const FRAME_STEP: u64 = 8;

/// Whether SimpleTuner trains `family` on clips: Wan. (Its other video
/// families, LTX-Video and HunyuanVideo among them, are not ours.)
pub fn trains_video(family: ModelFamily) -> bool {
    family == ModelFamily::Wan
}

/// The `video` block of a video dataset (`documentation/DATALOADER.md`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct VideoBlock {
    pub num_frames: u64,
    pub min_frames: u64,
    pub max_frames: u64,
    pub is_i2v: bool,
}

/// Where a run's datasets read from.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Layout {
    /// The image dataset's folder, when the job has images.
    pub images: Option<PathBuf>,
    /// The video dataset's folder and block, when it has clips.
    pub clips: Option<(PathBuf, VideoBlock)>,
    /// Links `(link, target)` the folders above need.
    pub links: Vec<(PathBuf, PathBuf)>,
}

/// The frames a run trains each clip at: the extra's, else derived.
fn num_frames(extra: Option<i64>, clip_frames: &[u64]) -> Option<u64> {
    match extra {
        Some(n) => Some(n.max(1) as u64),
        None => derived_frames(clip_frames, FRAME_STEP).map(u64::from),
    }
}

/// What a run needs of every clip: `min_frames` (= `num_frames`, as Wan
/// rounds it), or SimpleTuner skips it.
pub(super) fn need(extra: Option<i64>, clip_frames: &[u64]) -> Option<ClipNeed> {
    if clip_frames.is_empty() {
        return None;
    }
    Some(ClipNeed {
        frames: num_frames(extra, clip_frames).map(|n| round_down(n, FRAME_STEP)),
        set_by: "min_frames (num_frames, rounded down to 8n+1 for Wan)",
        effect: "would skip them",
        extra: "num_frames",
    })
}

/// A manifest name as a relative path of plain components.
fn plain(name: &str) -> Result<&Path, BackendError> {
    let path = Path::new(name);
    if name.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(BackendError::InvalidSettings(format!(
            "the dataset manifest names {name:?}, not a file of the dataset folder"
        )));
    }
    Ok(path)
}

/// Links in `dir` to `files` (and their captions) in `dataset_dir`.
fn links_to(
    dir: &Path,
    dataset_dir: &Path,
    files: &[&DatasetFile],
) -> Result<Vec<(PathBuf, PathBuf)>, BackendError> {
    let mut links = Vec::new();
    for file in files {
        for name in std::iter::once(&file.file).chain(file.caption_file.as_ref()) {
            let rel = plain(name)?;
            links.push((dir.join(rel), dataset_dir.join(rel)));
        }
    }
    Ok(links)
}

/// The datasets of a run: see the module docs. Refuses clips for a
/// family SimpleTuner trains on images only.
pub(super) fn layout(
    inputs: &TrainInputs,
    num_frames_extra: Option<i64>,
) -> Result<Layout, BackendError> {
    let files = dataset_files(&inputs.dataset_dir);
    let (clips, images): (Vec<&DatasetFile>, Vec<&DatasetFile>) =
        files.iter().partition(|f| f.is_clip());
    let family = inputs.model.family;
    let dataset = inputs.dataset_dir.clone();
    if clips.is_empty() {
        return Ok(Layout {
            images: Some(dataset),
            clips: None,
            links: Vec::new(),
        });
    }
    if !trains_video(family) {
        return Err(crate::common::video::images_only(
            clips.len(),
            super::NAME,
            family,
        ));
    }
    let frames: Vec<u64> = clips.iter().filter_map(|c| c.frames).collect();
    let num_frames = num_frames(num_frames_extra, &frames).unwrap_or(1);
    let block = VideoBlock {
        num_frames,
        min_frames: num_frames,
        max_frames: frames
            .iter()
            .copied()
            .max()
            .unwrap_or(num_frames)
            .max(num_frames),
        is_i2v: false,
    };
    if images.is_empty() {
        return Ok(Layout {
            images: None,
            clips: Some((dataset, block)),
            links: Vec::new(),
        });
    }
    let media = inputs.run_dir.join("media");
    let (image_dir, clip_dir) = (media.join("images"), media.join("clips"));
    let mut links = links_to(&image_dir, &dataset, &images)?;
    links.extend(links_to(&clip_dir, &dataset, &clips)?);
    Ok(Layout {
        images: Some(image_dir),
        clips: Some((clip_dir, block)),
        links,
    })
}
