//! Checks of a dataset's video clips against the trainer: a backend and
//! model family that train on images only cannot use clips, and a clip
//! shorter than the run's config needs (`TrainerBackend::clip_need`:
//! diffusion-pipe's smallest frame bucket, ai-toolkit's `num_frames`,
//! SimpleTuner's `min_frames`) is named, since the trainer would skip or
//! stretch it.

use super::{Report, list_names};
use crate::manifest::DatasetManifest;
use trainyard_backends::{REGISTRY, Tools, by_name};
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{ErrorKind, JobSpec};

/// Names of the checks, as they appear in problems.
pub const VIDEOS: &str = "dataset.videos";
pub const CLIP_FRAMES: &str = "dataset.clip_frames";

/// The backends that train `family` on clips, by name.
fn video_backends(family: ModelFamily) -> Vec<&'static str> {
    let tools = Tools::default();
    REGISTRY
        .iter()
        .filter(|row| (row.make)(&tools).trains_video(family))
        .map(|row| row.name)
        .collect()
}

/// The clip checks; nothing for a dataset without clips.
pub fn check(spec: &JobSpec, manifest: &DatasetManifest) -> Report {
    let mut report = Report::default();
    let clips: Vec<(String, u64)> = manifest
        .videos()
        .map(|e| (e.file.clone(), e.video.as_ref().map_or(0, |v| v.frames)))
        .collect();
    if clips.is_empty() {
        return report;
    }
    let t = spec.training.clone().unwrap_or_default();
    let family_name = spec
        .base_model
        .as_ref()
        .map(|m| m.family.clone())
        .unwrap_or_default();
    // An unknown backend or family is the spec checks' problem.
    let (Some(trainer), Some(family)) = (
        by_name(&t.backend, &Tools::default()),
        ModelFamily::from_name(&family_name),
    ) else {
        return report;
    };
    let names: Vec<&str> = clips.iter().map(|(name, _)| name.as_str()).collect();
    if !trainer.trains_video(family) {
        let trains = video_backends(ModelFamily::Wan);
        report.problem(
            VIDEOS,
            ErrorKind::BadDataset,
            format!(
                "the dataset holds {} video clip{} ({}), but {} trains {family} models on images \
                 only; train a video model (wan) with {}, or leave the clips out",
                clips.len(),
                if clips.len() == 1 { "" } else { "s" },
                list_names(&names),
                t.backend,
                trains.join(", ")
            ),
        );
        return report;
    }
    let frames: Vec<u64> = clips.iter().map(|(_, frames)| *frames).collect();
    // A malformed extra is the settings checks' problem.
    let Some(need) = trainer.clip_need(&t, family, &frames) else {
        return report;
    };
    let short = need.too_short(&clips);
    if !short.is_empty() {
        let named: Vec<String> = short
            .iter()
            .map(|(name, frames)| format!("{name} ({frames} frames)"))
            .collect();
        report.problem(
            CLIP_FRAMES,
            ErrorKind::BadDataset,
            format!(
                "{} shorter than {} ({}): {}; {} {}; use longer clips or a smaller value in \
                 training.extras.{}",
                if short.len() == 1 {
                    "1 clip is".to_owned()
                } else {
                    format!("{} clips are", short.len())
                },
                need.set_by,
                need.frames
                    .map_or("none given".to_owned(), |f| format!("{f} frames")),
                list_names(&named),
                t.backend,
                need.effect,
                need.extra
            ),
        );
    }
    report
}
