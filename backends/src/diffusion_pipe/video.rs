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
//! when given, else from the clips: one video bucket, the shortest clip's
//! length rounded down to 4n+1 frames (Wan's VAE compresses time four to
//! one after the first frame) and at most [`DEFAULT_VIDEO_BUCKET`], so
//! every clip is trained on. Preflight names the clips a bucket list would
//! skip, before a GPU is held.

use std::path::Path;

/// The video bucket of diffusion-pipe's examples (`frame_buckets = [1, 33]`),
/// the longest a derived bucket gets.
pub const DEFAULT_VIDEO_BUCKET: u32 = 33;

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
    let Some(&shortest) = clip_frames.iter().min() else {
        return Ok(None);
    };
    let longest = u64::from(DEFAULT_VIDEO_BUCKET);
    let bucket = match shortest.min(longest) {
        n if n >= 5 => ((n - 1) / 4 * 4 + 1) as u32,
        // Shorter than any useful bucket: preflight names these clips.
        _ => 5,
    };
    Ok(Some(vec![1, bucket]))
}

/// The clips (name, frames) shorter than every video bucket of `buckets`:
/// diffusion-pipe skips them.
pub fn too_short<'a>(buckets: &[u32], clips: &'a [(String, u64)]) -> Vec<&'a (String, u64)> {
    let shortest = buckets.iter().copied().filter(|&b| b > 1).min();
    clips
        .iter()
        .filter(|(_, frames)| shortest.is_none_or(|b| *frames < u64::from(b)))
        .collect()
}

/// The clips a prepared dataset folder holds, by file name with their frame
/// counts, from its `manifest.json` (entries with `"media": "video"`). An
/// unreadable or missing manifest holds none.
pub fn clips_in(dataset_dir: &Path) -> Vec<(String, u64)> {
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
        .filter(|e| e["media"] == "video")
        .filter_map(|e| {
            Some((
                e["file"].as_str()?.to_owned(),
                e["video"]["frames"].as_u64()?,
            ))
        })
        .collect()
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
        let short: Vec<&str> = too_short(&[1, 33], &clips)
            .iter()
            .map(|c| c.0.as_str())
            .collect();
        assert_eq!(short, ["a.mp4"]);
        assert!(too_short(&[1, 9, 33], &clips).is_empty());
        assert_eq!(too_short(&[1], &clips).len(), 2);
    }
}
