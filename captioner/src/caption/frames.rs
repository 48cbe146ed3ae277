//! Frames sampled from a clip for a backend that reads only images
//! (`openai`): `ffmpeg` writes `n` JPEG frames spread evenly over the
//! clip's duration into a temporary folder, read back in order and the
//! folder removed. `ffmpeg` runs through [`trainyard_core::process`] like
//! any child (own process group, allow-listed environment, argv only).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trainyard_core::process::CommandSpec;

use super::command::run;
use super::{CaptionError, VideoInfo};

/// How long sampling one clip may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(120);

/// `n` frames (JPEG bytes, in order) of the clip at `video`.
pub async fn sample(
    ffmpeg: &Path,
    video: &Path,
    info: &VideoInfo,
    n: u32,
) -> Result<Vec<Vec<u8>>, CaptionError> {
    let n = n.max(1);
    let dir = std::env::temp_dir().join(format!(
        "trainyard-frames-{}",
        uuid::Uuid::now_v7().simple()
    ));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| super::http::unavailable(format!("cannot make a frames folder: {e}")))?;
    let result = sample_into(ffmpeg, video, info, n, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn sample_into(
    ffmpeg: &Path,
    video: &Path,
    info: &VideoInfo,
    n: u32,
    dir: &Path,
) -> Result<Vec<Vec<u8>>, CaptionError> {
    let mut args: Vec<OsString> = ["-nostdin", "-v", "error", "-i"]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.push(video.as_os_str().to_owned());
    if info.duration_ms > 0 && n > 1 {
        // n frames over the duration: a rate of n per duration.
        args.extend([
            "-vf".into(),
            format!("fps={}/{}", u64::from(n) * 1000, info.duration_ms).into(),
        ]);
    }
    args.extend([
        "-frames:v".into(),
        n.to_string().into(),
        "-q:v".into(),
        "3".into(),
    ]);
    args.push(dir.join("frame_%03d.jpg").into_os_string());
    let spec = CommandSpec {
        program: if ffmpeg.as_os_str().is_empty() {
            PathBuf::from("ffmpeg")
        } else {
            ffmpeg.to_owned()
        },
        args,
        cwd: dir.to_owned(),
        env: Vec::new(),
    };
    let out = run(&spec, Some(SAMPLE_TIMEOUT)).await?;
    if out.code != Some(0) {
        return Err(CaptionError::Rejected {
            message: format!("ffmpeg could not sample frames: {}", out.stderr_tail()),
        });
    }
    let mut frames = Vec::new();
    for i in 1..=n {
        match tokio::fs::read(dir.join(format!("frame_{i:03}.jpg"))).await {
            Ok(bytes) => frames.push(bytes),
            Err(_) => break,
        }
    }
    if frames.is_empty() {
        return Err(CaptionError::Rejected {
            message: "ffmpeg wrote no frame".into(),
        });
    }
    Ok(frames)
}
