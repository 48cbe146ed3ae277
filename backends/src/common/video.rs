//! Video clips in a prepared dataset, shared by the backends that train on
//! them (diffusion-pipe, ai-toolkit and SimpleTuner, all on Wan) and by
//! preflight, so a run's config and the checks before it agree on which
//! clips a run trains on.
//!
//! - **What the dataset holds** comes from its `manifest.json` (entries
//!   with `"media": "video"` and the frame count ffprobe found), never from
//!   decoding a clip.
//! - **How many frames a run trains each clip at** is derived from the
//!   shortest clip when the job does not say: its length rounded down to a
//!   count the model's VAE takes (`step·n + 1`: Wan's VAE compresses time
//!   four to one after the first frame; SimpleTuner trims Wan clips further,
//!   to `8n + 1`), at most [`MAX_DERIVED_FRAMES`], so every clip is long
//!   enough and none is left out.
//! - **What a run needs** ([`ClipNeed`]): the fewest frames a clip must have
//!   for the rendered config to train on it. Each video backend says it
//!   (`TrainerBackend::clip_need`) with the same numbers it renders;
//!   preflight names the clips below it.

use std::path::Path;

/// The longest derived frame count: the video bucket of diffusion-pipe's
/// example dataset (`examples/dataset.toml`, `frame_buckets = [1, 33]`),
/// about two seconds of Wan's 16 fps. Longer clips cost memory a LoRA run
/// rarely needs; a job asks for more through its backend's extra.
pub const MAX_DERIVED_FRAMES: u32 = 33;

/// One file of a prepared dataset, as its manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetFile {
    /// The file name inside the dataset folder.
    pub file: String,
    /// Its caption file's name (`<stem>.txt`), when the manifest names one.
    pub caption_file: Option<String>,
    /// A clip's frame count; `None` for an image.
    pub frames: Option<u64>,
}

impl DatasetFile {
    pub fn is_clip(&self) -> bool {
        self.frames.is_some()
    }
}

/// The images and clips a prepared dataset folder holds, from its
/// `manifest.json`. An unreadable or missing manifest holds none. The
/// names were checked by the worker against the manifest (no `..`, not
/// absolute) before any run is rendered.
pub fn dataset_files(dataset_dir: &Path) -> Vec<DatasetFile> {
    let Ok(bytes) = std::fs::read(dataset_dir.join("manifest.json")) else {
        return Vec::new();
    };
    let Ok(manifest) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    manifest["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let frames = match e["media"].as_str() {
                Some("video") => Some(e["video"]["frames"].as_u64()?),
                _ => None,
            };
            Some(DatasetFile {
                file: e["file"].as_str()?.to_owned(),
                caption_file: e["caption_file"]
                    .as_str()
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
                frames,
            })
        })
        .collect()
}

/// The clips a prepared dataset folder holds, by file name with their frame
/// counts (see [`dataset_files`]).
pub fn clips_in(dataset_dir: &Path) -> Vec<(String, u64)> {
    dataset_files(dataset_dir)
        .into_iter()
        .filter_map(|f| Some((f.file, f.frames?)))
        .collect()
}

/// The refusal of a dataset with `clips` clips by a backend that trains
/// `family` on images only.
pub fn images_only(
    clips: usize,
    backend: &str,
    family: impl std::fmt::Display,
) -> crate::BackendError {
    let clips = match clips {
        1 => "1 video clip".to_owned(),
        n => format!("{n} video clips"),
    };
    crate::BackendError::InvalidSettings(format!(
        "the dataset holds {clips}; {backend} trains {family} on images only"
    ))
}

/// `frames` rounded down to the nearest `step·n + 1` (n ≥ 0).
pub fn round_down(frames: u64, step: u64) -> u64 {
    let step = step.max(1);
    frames.saturating_sub(1) / step * step + 1
}

/// The frames a run trains every clip at when the job does not say: the
/// shortest clip rounded down to `step·n + 1`, at most
/// [`MAX_DERIVED_FRAMES`], and at least `step + 1` (one step of the VAE; a
/// shorter clip is named by preflight). `None` without clips.
pub fn derived_frames(clip_frames: &[u64], step: u64) -> Option<u32> {
    let shortest = *clip_frames.iter().min()?;
    let step = step.max(1);
    let frames = round_down(shortest.min(u64::from(MAX_DERIVED_FRAMES)), step).max(step + 1);
    Some(frames.min(u64::from(u32::MAX)) as u32)
}

/// What a rendered run needs of every clip, for preflight to hold the
/// dataset to before a GPU is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipNeed {
    /// The fewest frames a clip must have; `None` when the config trains no
    /// clip at all (diffusion-pipe given no video frame bucket).
    pub frames: Option<u64>,
    /// What sets the number, for people: `the smallest video frame bucket`,
    /// `num_frames`.
    pub set_by: &'static str,
    /// What the trainer does with a shorter clip: `would skip them`.
    pub effect: &'static str,
    /// The extra that changes the number (`frame_buckets`).
    pub extra: &'static str,
}

impl ClipNeed {
    /// The clips (name, frames) shorter than the need.
    pub fn too_short<'a>(&self, clips: &'a [(String, u64)]) -> Vec<&'a (String, u64)> {
        clips
            .iter()
            .filter(|(_, frames)| self.frames.is_none_or(|need| *frames < need))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_frames_fit_the_shortest_clip_in_steps_of_the_vae() {
        assert_eq!(derived_frames(&[], 4), None);
        assert_eq!(derived_frames(&[81, 120], 4), Some(33));
        assert_eq!(derived_frames(&[16, 120], 4), Some(13));
        assert_eq!(derived_frames(&[17], 4), Some(17));
        assert_eq!(derived_frames(&[3, 40], 4), Some(5));
        assert_eq!(derived_frames(&[16, 40], 8), Some(9));
        assert_eq!(derived_frames(&[40, 120], 8), Some(33));
        assert_eq!(derived_frames(&[30], 8), Some(25));
        assert_eq!(round_down(0, 8), 1);
        assert_eq!(round_down(119, 8), 113);
    }

    #[test]
    fn the_manifest_gives_images_clips_and_captions() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("manifest.json"),
            serde_json::json!({"images": [
                {"file": "a.png", "caption_file": "a.txt"},
                {"file": "b.mp4", "caption_file": "b.txt", "media": "video",
                 "video": {"frames": 16}},
                {"file": "c.mp4", "media": "video"},
            ]})
            .to_string(),
        )
        .unwrap();
        let files = dataset_files(tmp.path());
        assert_eq!(
            files,
            [
                DatasetFile {
                    file: "a.png".into(),
                    caption_file: Some("a.txt".into()),
                    frames: None
                },
                DatasetFile {
                    file: "b.mp4".into(),
                    caption_file: Some("b.txt".into()),
                    frames: Some(16)
                },
            ]
        );
        assert_eq!(clips_in(tmp.path()), [("b.mp4".to_owned(), 16)]);
        assert!(clips_in(&tmp.path().join("missing")).is_empty());
    }

    #[test]
    fn clips_below_the_need_are_named() {
        let clips = vec![("a.mp4".to_owned(), 16), ("b.mp4".to_owned(), 40)];
        let need = |frames| ClipNeed {
            frames,
            set_by: "num_frames",
            effect: "would skip them",
            extra: "num_frames",
        };
        let names = |need: ClipNeed| -> Vec<String> {
            need.too_short(&clips).iter().map(|c| c.0.clone()).collect()
        };
        assert_eq!(names(need(Some(33))), ["a.mp4"]);
        assert!(names(need(Some(16))).is_empty());
        assert_eq!(names(need(None)).len(), 2);
    }
}
