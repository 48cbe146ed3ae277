//! Checks of a dataset's video clips against the trainer: a backend and
//! model family that train on images only cannot use clips, and
//! diffusion-pipe skips clips shorter than its smallest video frame bucket
//! (`trainyard_backends::diffusion_pipe::video`).

use super::{Report, list_names};
use crate::manifest::DatasetManifest;
use trainyard_backends::diffusion_pipe::video::{frame_buckets, too_short};
use trainyard_backends::{Tools, by_name};
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{ErrorKind, JobSpec, extra_value};

/// Names of the checks, as they appear in problems.
pub const VIDEOS: &str = "dataset.videos";
pub const FRAME_BUCKETS: &str = "dataset.frame_buckets";

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
        report.problem(
            VIDEOS,
            ErrorKind::BadDataset,
            format!(
                "the dataset holds {} video clip{} ({}), but {} trains {family} models on images \
                 only; train a video model (wan) with diffusion-pipe, or leave the clips out",
                clips.len(),
                if clips.len() == 1 { "" } else { "s" },
                list_names(&names),
                t.backend
            ),
        );
        return report;
    }
    if t.backend == "diffusion-pipe" {
        let extra = match t.extras.get("frame_buckets").and_then(|v| v.kind.as_ref()) {
            Some(extra_value::Kind::Text(text)) => Some(text.as_str()),
            _ => None,
        };
        let frames: Vec<u64> = clips.iter().map(|(_, frames)| *frames).collect();
        // A malformed extra is the settings checks' problem.
        if let Ok(Some(buckets)) = frame_buckets(extra, &frames) {
            let short = too_short(&buckets, &clips);
            if !short.is_empty() {
                let smallest = buckets.iter().copied().filter(|&b| b > 1).min();
                let named: Vec<String> = short
                    .iter()
                    .map(|(name, frames)| format!("{name} ({frames} frames)"))
                    .collect();
                report.problem(
                    FRAME_BUCKETS,
                    ErrorKind::BadDataset,
                    format!(
                        "{} shorter than the smallest video frame bucket ({}), so diffusion-pipe \
                         would skip {}: {}; use longer clips or a smaller bucket in \
                         training.extras.frame_buckets",
                        if short.len() == 1 {
                            "1 clip is".to_owned()
                        } else {
                            format!("{} clips are", short.len())
                        },
                        smallest.map_or("none given".to_owned(), |b| format!("{b} frames")),
                        if short.len() == 1 { "it" } else { "them" },
                        list_names(&named)
                    ),
                );
            }
        }
    }
    report
}
