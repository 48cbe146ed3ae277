//! Video clips in an ai-toolkit dataset: Wan (`arch: wan21`) trains on
//! clips and images from one folder.
//!
//! What ai-toolkit does (ostris/ai-toolkit, the snapshot the trainers
//! reference names):
//! - `toolkit/config_modules.py` `DatasetConfig`: `num_frames` (default 1)
//!   above 1 makes the dataset a video dataset; `shrink_video_to_frames`
//!   (default true) takes `num_frames` frames evenly spaced over the whole
//!   clip (`fps` is read only when it is false); `do_i2v` (default false).
//! - `toolkit/data_loader.py` `AiToolkitDataset`: a video dataset lists the
//!   video extensions (`.mp4 .avi .mov .webm .mkv .wmv .m4v .flv`) *and* the
//!   image extensions of its folder, images becoming one-frame items that
//!   `toolkit/dataloader_mixins.py` buckets apart from clips (bucket key
//!   `…x{num_frames}f`). With `num_frames: 1` it lists images only: clips
//!   would be left out without a word.
//! - `toolkit/dataloader_mixins.py` `load_and_process_video`: a clip
//!   shorter than `num_frames` is stretched, the evenly spaced indices
//!   repeating frames; nothing is skipped.
//! - Wan's VAE takes `4n + 1` frames (`get_auto_frame_count` snaps to
//!   `temporal_compression · n + 1`, 4 for Wan 2.1).
//!
//! So a run on clips gets `num_frames` (the extra's, else derived from the
//! shortest clip by the rule every video backend shares,
//! `crate::common::video`) and `shrink_video_to_frames: true` (upstream's
//! default, written out; the extra may turn it off). A stretched clip
//! teaches stuttering motion, so preflight names clips shorter than
//! `num_frames` ([`need`]) as it names clips diffusion-pipe would skip.

use crate::common::video::{ClipNeed, derived_frames};
use crate::{Extra, SettingProblem};
use std::collections::BTreeMap;
use trainyard_models::ModelFamily;

/// Wan's VAE takes `4n + 1` frames.
const FRAME_STEP: u64 = 4;

/// The dataset options only a family trained on video takes.
pub(super) const VIDEO_OPTIONS: &[&str] = &["num_frames", "shrink_video_to_frames"];

/// Whether ai-toolkit trains `family` on clips: Wan. (Its other video
/// archs, Wan 2.2 and LTX, are not families of ours.)
pub fn trains_video(family: ModelFamily) -> bool {
    family == ModelFamily::Wan
}

/// Problems with the video extras for `family`.
pub(super) fn problems(
    extras: &BTreeMap<String, Extra>,
    family: ModelFamily,
) -> Vec<SettingProblem> {
    let mut problems = Vec::new();
    for key in VIDEO_OPTIONS {
        if extras.contains_key(*key) && !trains_video(family) {
            problems.push(SettingProblem::extra(
                key,
                format!("ai-toolkit trains {family} on images only; only wan takes {key}"),
            ));
        }
    }
    if let Some(Extra::Int(n)) = extras.get("num_frames")
        && *n < 2
    {
        problems.push(SettingProblem::extra(
            "num_frames",
            "must be at least 2 (at 1 ai-toolkit reads images only and leaves every clip out)",
        ));
    }
    problems
}

/// The frames a run trains each clip at: the extra's, else derived from
/// the clips; `None` with neither (an image dataset keeps `num_frames: 1`).
fn num_frames(extras: &BTreeMap<String, Extra>, clip_frames: &[u64]) -> Option<u64> {
    match extras.get("num_frames") {
        Some(Extra::Int(n)) => Some((*n).max(1) as u64),
        _ => derived_frames(clip_frames, FRAME_STEP).map(u64::from),
    }
}

/// The dataset entry's video options for a run on clips of `clip_frames`
/// frames: `num_frames` and `shrink_video_to_frames`, extras first; none
/// for a run without clips or a `num_frames` extra.
pub(super) fn dataset_options(
    extras: &BTreeMap<String, Extra>,
    clip_frames: &[u64],
) -> BTreeMap<String, Extra> {
    let Some(frames) = num_frames(extras, clip_frames) else {
        return BTreeMap::new();
    };
    let shrink = extras
        .get("shrink_video_to_frames")
        .cloned()
        .unwrap_or(Extra::Flag(true));
    BTreeMap::from([
        ("num_frames".to_string(), Extra::Int(frames as i64)),
        ("shrink_video_to_frames".to_string(), shrink),
    ])
}

/// What a run needs of every clip: `num_frames` frames, or ai-toolkit
/// stretches it.
pub(super) fn need(extras: &BTreeMap<String, Extra>, clip_frames: &[u64]) -> Option<ClipNeed> {
    if clip_frames.is_empty() {
        return None;
    }
    Some(ClipNeed {
        frames: num_frames(extras, clip_frames),
        set_by: "num_frames",
        effect: "would stretch them to it by repeating frames",
        extra: "num_frames",
    })
}
