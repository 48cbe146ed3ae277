//! Video clips in a diffusion-pipe dataset: frame buckets and the clips
//! they leave out.
//!
//! diffusion-pipe reads images and videos from the same `[[directory]]`
//! (`utils/dataset.py`: every file but `.txt`, `.json`, … is a sample;
//! videos by extension through imageio). A video goes to the largest frame
//! bucket that is not longer than the clip (frames counted at the clip's
//! own rate), never to bucket 1 (images); a clip shorter than every video
//! bucket is skipped with `video with frames=N is being skipped because it
//! is too short`. The buckets are `frame_buckets` of the dataset TOML (1 is
//! always added).
//!
//! Ours come from `training.extras.frame_buckets` (text such as `"1, 33"`)
//! when given, else from the clips: one video bucket, the frames every
//! video backend derives from the shortest clip (`crate::common::video`:
//! rounded down to 4n+1, Wan's VAE compressing time four to one after the
//! first frame, and at most [`MAX_DERIVED_FRAMES`]), so every clip is
//! trained on. Preflight names the clips a bucket list would skip
//! ([`clip_need`]), before a GPU is held.

use crate::common::video::{ClipNeed, MAX_DERIVED_FRAMES, derived_frames};

/// The video bucket of diffusion-pipe's examples (`frame_buckets = [1, 33]`),
/// the longest a derived bucket gets.
pub const DEFAULT_VIDEO_BUCKET: u32 = MAX_DERIVED_FRAMES;

/// Wan's VAE takes `4n + 1` frames.
const FRAME_STEP: u64 = 4;

/// Most frame buckets the extra may list.
const MAX_BUCKETS: usize = 8;

/// `frame_buckets` as written in the extra: integers of at least 1,
/// separated by commas or spaces, optionally in brackets; sorted, 1 added.
pub fn parse_frame_buckets(text: &str) -> Result<Vec<u32>, String> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    let mut buckets = vec![1];
    for part in inner.split([',', ' ']).filter(|p| !p.trim().is_empty()) {
        match part.trim().parse::<u32>() {
            Ok(n) if n >= 1 => buckets.push(n),
            _ => {
                return Err(format!(
                    "{text:?} must list frame counts of at least 1, such as \"1, 33\""
                ));
            }
        }
    }
    buckets.sort_unstable();
    buckets.dedup();
    if buckets.len() > MAX_BUCKETS {
        return Err(format!("lists more than {MAX_BUCKETS} frame buckets"));
    }
    Ok(buckets)
}

/// The frame buckets of a run: the extra's when given, else derived from
/// the clips' frame counts (see the module docs); `None` when there are
/// neither (an image dataset keeps diffusion-pipe's default, `[1]`).
pub fn frame_buckets(extra: Option<&str>, clip_frames: &[u64]) -> Result<Option<Vec<u32>>, String> {
    if let Some(text) = extra {
        return parse_frame_buckets(text).map(Some);
    }
    Ok(derived_frames(clip_frames, FRAME_STEP).map(|bucket| vec![1, bucket]))
}

/// What a run with `buckets` needs of a clip: at least the smallest video
/// bucket's frames, or diffusion-pipe skips it.
pub fn need(buckets: &[u32]) -> ClipNeed {
    ClipNeed {
        frames: buckets
            .iter()
            .copied()
            .filter(|&b| b > 1)
            .min()
            .map(u64::from),
        set_by: "the smallest video frame bucket",
        effect: "would skip them",
        extra: "frame_buckets",
    }
}

/// What a run of `extra` (the `frame_buckets` extra) on clips of
/// `clip_frames` needs of every clip; `None` without clips or with a
/// malformed extra (the settings checks name that).
pub fn clip_need(extra: Option<&str>, clip_frames: &[u64]) -> Option<ClipNeed> {
    if clip_frames.is_empty() {
        return None;
    }
    frame_buckets(extra, clip_frames)
        .ok()
        .flatten()
        .map(|b| need(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extra_is_parsed_sorted_and_gets_the_image_bucket() {
        assert_eq!(parse_frame_buckets("33, 65").unwrap(), [1, 33, 65]);
        assert_eq!(parse_frame_buckets("[1, 17 33]").unwrap(), [1, 17, 33]);
        assert!(parse_frame_buckets("1, x").is_err());
        assert!(parse_frame_buckets("0").is_err());
        assert!(parse_frame_buckets("2 3 4 5 6 7 8 9 10").is_err());
    }

    #[test]
    fn derived_buckets_fit_the_shortest_clip() {
        assert_eq!(frame_buckets(None, &[]).unwrap(), None);
        assert_eq!(frame_buckets(None, &[81, 120]).unwrap(), Some(vec![1, 33]));
        assert_eq!(frame_buckets(None, &[16, 120]).unwrap(), Some(vec![1, 13]));
        assert_eq!(frame_buckets(None, &[17]).unwrap(), Some(vec![1, 17]));
        assert_eq!(frame_buckets(None, &[3, 40]).unwrap(), Some(vec![1, 5]));
        assert_eq!(
            frame_buckets(Some("1, 65"), &[16]).unwrap(),
            Some(vec![1, 65])
        );
    }

    #[test]
    fn clips_shorter_than_every_video_bucket_are_named() {
        let clips = vec![("a.mp4".to_owned(), 16), ("b.mp4".to_owned(), 40)];
        let short: Vec<&str> = need(&[1, 33])
            .too_short(&clips)
            .iter()
            .map(|c| c.0.as_str())
            .collect();
        assert_eq!(short, ["a.mp4"]);
        assert!(need(&[1, 9, 33]).too_short(&clips).is_empty());
        assert_eq!(need(&[1]).too_short(&clips).len(), 2);
        assert_eq!(clip_need(Some("1, 9"), &[16]).unwrap().frames, Some(9));
        assert_eq!(clip_need(None, &[16, 40]).unwrap().frames, Some(13));
        assert_eq!(clip_need(None, &[]), None);
        assert_eq!(clip_need(Some("x"), &[16]), None);
    }
}
