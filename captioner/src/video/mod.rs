//! Video clips in datasets: `.mp4`, `.webm` and `.mov`, probed with
//! `ffprobe` (Debian's `ffmpeg` package; `scripts/install-ffmpeg`).
//!
//! A clip is first described: duration, frame rate, frame count, picture
//! size and codec ([`ffprobe`] reads the answer, from the container's
//! header). A clip ffprobe cannot read, with no video stream, or with no
//! frames is dropped as undecodable; one over a `[captioner.video]` limit
//! (length, frames, bytes, picture side) is dropped as over the limit, both
//! by name like a broken image. A clip within the limits is then decoded
//! once, its first video stream to nothing (`ffmpeg -xerror … -f null`,
//! `decode_check`): a sound header over corrupt picture data passes the
//! probe, and the trainer would meet it an hour into a GPU job. The limits
//! bound what the decode costs. Kept clips are copied byte for byte.
//!
//! ffprobe reads untrusted files, so it runs like every other child
//! (`trainyard_core::process`: its own process group, the allow-listed
//! environment, killed on drop) under a timeout, reads the file protocol
//! only (`-protocol_whitelist file`: a playlist disguised as `.mp4` cannot
//! make it fetch URLs) and only the container formats clips come in
//! (`-format_whitelist`).
//!
//! `.gif` is an image (its first frame, re-encoded to PNG), except in a
//! dataset for a backend and model that train on video
//! ([`VideoSettings::gif_as_video`]): there a gif ffprobe reads as more
//! than one frame is a clip, converted to H.264 `.mp4` with `ffmpeg` (the
//! video trainers read gifs differently or not at all, mp4 all the same)
//! and described by probing the mp4, so the facts are those of the file the
//! trainer reads.

pub mod ffprobe;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trainyard_core::config::VideoConfig;
use trainyard_core::process::{ChildGroup, CommandSpec, OutputStream};

use crate::caption::VideoInfo;
use crate::error::PrepareError;
use crate::images::{BadImage, MIN_SIDE};
use crate::manifest::DropReason;
pub use ffprobe::ProbeFacts;

/// Extensions collected as video clips (compared lower-case).
pub const VIDEO_EXTENSIONS: &[&str] = &["mp4", "webm", "mov"];

/// The demuxers ffprobe may use: the containers of [`VIDEO_EXTENSIONS`],
/// and gif.
const FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,gif";

/// Most bytes of ffprobe's answer read; more is not an answer about one clip.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// What a clip may be.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipLimits {
    pub max_seconds: f64,
    pub max_frames: u64,
    pub max_bytes: u64,
    /// Longest side of the picture.
    pub max_side: u32,
}

/// How clips are probed, and the limits they are held to.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoSettings {
    pub ffprobe: PathBuf,
    pub ffmpeg: PathBuf,
    pub timeout: Duration,
    pub limits: ClipLimits,
    /// Decode each clip once after its probe, within this time; `None`
    /// trusts the header.
    pub decode_within: Option<Duration>,
    /// An animated gif is a clip (the job trains a video model); off, every
    /// gif is a still image.
    pub gif_as_video: bool,
}

impl VideoSettings {
    pub fn from_config(config: &VideoConfig) -> Self {
        Self {
            ffprobe: config.ffprobe.clone(),
            ffmpeg: config.ffmpeg.clone(),
            timeout: Duration::from_secs(config.probe_timeout_secs),
            limits: ClipLimits {
                max_seconds: config.max_clip_seconds,
                max_frames: config.max_clip_frames,
                max_bytes: config.max_clip_bytes,
                max_side: config.max_clip_side,
            },
            decode_within: config
                .decode_check
                .then(|| Duration::from_secs(config.decode_timeout_secs)),
            gif_as_video: false,
        }
    }
}

impl Default for VideoSettings {
    fn default() -> Self {
        Self::from_config(&VideoConfig::default())
    }
}

impl ProbeFacts {
    /// The facts the caption backends and the manifest keep.
    pub fn info(&self) -> VideoInfo {
        VideoInfo {
            duration_ms: (self.duration_secs * 1000.0).round() as u64,
            fps_milli: (self.fps * 1000.0).round().min(f64::from(u32::MAX)) as u32,
            frames: self.frames,
            codec: self.codec.clone(),
        }
    }
}

/// Whether a clip of `size` bytes described by `facts` is within `limits`.
pub fn check_limits(facts: &ProbeFacts, size: u64, limits: &ClipLimits) -> Result<(), BadImage> {
    let over = |detail: String| Err((DropReason::OverLimit, detail));
    if facts.width.min(facts.height) < MIN_SIDE {
        return Err((
            DropReason::TooSmall,
            format!(
                "{}x{} is smaller than {MIN_SIDE}x{MIN_SIDE}",
                facts.width, facts.height
            ),
        ));
    }
    if size > limits.max_bytes {
        return over(format!(
            "{size} bytes is more than captioner.video.max_clip_bytes ({})",
            limits.max_bytes
        ));
    }
    if facts.duration_secs > limits.max_seconds {
        return over(format!(
            "{:.1} s is longer than captioner.video.max_clip_seconds ({})",
            facts.duration_secs, limits.max_seconds
        ));
    }
    if facts.frames > limits.max_frames {
        return over(format!(
            "{} frames is more than captioner.video.max_clip_frames ({})",
            facts.frames, limits.max_frames
        ));
    }
    if facts.width.max(facts.height) > limits.max_side {
        return over(format!(
            "{}x{} is larger than captioner.video.max_clip_side ({})",
            facts.width, facts.height, limits.max_side
        ));
    }
    Ok(())
}

/// Probes the clip at `path` and holds it to the limits: its facts, or why
/// it is dropped. Only a missing or unstartable `ffprobe` is an error.
pub async fn check_clip(
    path: &Path,
    settings: &VideoSettings,
) -> Result<Result<ProbeFacts, BadImage>, PrepareError> {
    let size = tokio::fs::metadata(path)
        .await
        .map_err(PrepareError::io(path))?
        .len();
    if size > settings.limits.max_bytes {
        // Not worth a probe.
        return Ok(Err((
            DropReason::OverLimit,
            format!(
                "{size} bytes is more than captioner.video.max_clip_bytes ({})",
                settings.limits.max_bytes
            ),
        )));
    }
    let facts = match run_ffprobe(path, settings).await? {
        Ok(answer) => ffprobe::parse(&answer),
        Err(detail) => Err(detail),
    };
    let facts = match facts {
        Ok(facts) => facts,
        Err(detail) => return Ok(Err((DropReason::Undecodable, detail))),
    };
    if let Err(bad) = check_limits(&facts, size, &settings.limits) {
        return Ok(Err(bad));
    }
    if let Some(within) = settings.decode_within
        && let Err(detail) = decode(path, within, settings).await?
    {
        return Ok(Err((DropReason::Undecodable, detail)));
    }
    Ok(Ok(facts))
}

/// Decodes the first video stream of the clip at `path` to nothing,
/// stopping at the first error (`-xerror`); `Err` is what ffmpeg said.
async fn decode(
    path: &Path,
    within: Duration,
    settings: &VideoSettings,
) -> Result<Result<(), String>, PrepareError> {
    let args: Vec<OsString> = [
        "-v",
        "error",
        "-nostdin",
        "-xerror",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        FORMATS,
        "-i",
    ]
    .into_iter()
    .map(OsString::from)
    .chain([file_url(path)])
    .chain(
        ["-map", "0:v:0", "-an", "-f", "null", "-"]
            .into_iter()
            .map(OsString::from),
    )
    .collect();
    let ran = run(&settings.ffmpeg, args, path, within).await?;
    Ok(ran
        .map(drop)
        .map_err(|said| said.replacen("cannot read it", "cannot decode it", 1)))
}

/// Whether `path` is an animated gif that becomes a clip under `settings`.
pub async fn is_animated_gif(path: &Path, settings: &VideoSettings) -> Result<bool, PrepareError> {
    let gif = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gif"));
    if !(settings.gif_as_video && gif) {
        return Ok(false);
    }
    Ok(match run_ffprobe(path, settings).await? {
        Ok(answer) => ffprobe::parse(&answer).is_ok_and(|facts| facts.frames > 1),
        Err(_) => false,
    })
}

/// Converts the gif at `src` to an H.264 mp4 at `dst` (even sides, the
/// gif's own frame timing) and probes the result; `Err` says why the gif
/// cannot be a clip.
pub async fn gif_to_mp4(
    src: &Path,
    dst: &Path,
    settings: &VideoSettings,
) -> Result<Result<ProbeFacts, BadImage>, PrepareError> {
    let args: Vec<OsString> = [
        "-v",
        "error",
        "-nostdin",
        "-protocol_whitelist",
        "file",
        "-f",
        "gif",
        "-i",
    ]
    .into_iter()
    .map(OsString::from)
    .chain([file_url(src)])
    .chain(
        [
            "-an",
            "-fps_mode",
            "passthrough",
            "-vf",
            "scale=trunc(iw/2)*2:trunc(ih/2)*2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
        ]
        .into_iter()
        .map(OsString::from),
    )
    .chain([file_url(dst)])
    .collect();
    if let Err(detail) = run(&settings.ffmpeg, args, dst, settings.timeout).await? {
        return Ok(Err((DropReason::Undecodable, detail)));
    }
    check_clip(dst, settings).await
}

fn file_url(path: &Path) -> OsString {
    let mut url = OsString::from("file:");
    url.push(path.as_os_str());
    url
}

/// ffprobe's JSON answer about `path`, or what it said when it failed.
async fn run_ffprobe(
    path: &Path,
    settings: &VideoSettings,
) -> Result<Result<Vec<u8>, String>, PrepareError> {
    let target = file_url(path);
    let args: Vec<OsString> = [
        "-v",
        "error",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        FORMATS,
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
        "-select_streams",
        "v",
    ]
    .into_iter()
    .map(OsString::from)
    .chain([target])
    .collect();
    run(&settings.ffprobe, args, path, settings.timeout).await
}

/// Runs `program` (ffprobe or ffmpeg) on a file next to `near`: its stdout,
/// or what it said when it failed or ran past the timeout.
async fn run(
    program: &Path,
    args: Vec<OsString>,
    near: &Path,
    timeout: Duration,
) -> Result<Result<Vec<u8>, String>, PrepareError> {
    let spec = CommandSpec {
        program: program.to_owned(),
        args,
        cwd: near.parent().unwrap_or(Path::new("/")).to_owned(),
        env: Vec::new(),
    };
    let (mut child, mut lines) = ChildGroup::spawn(&spec).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            PrepareError::NoProbe {
                program: program.to_owned(),
                error: error.to_string(),
            }
        }
        _ => PrepareError::io(program)(error),
    })?;
    let run = async {
        let (mut answer, mut said, mut overflow) = (Vec::new(), None, false);
        while let Some(line) = lines.recv().await {
            match line.stream {
                OutputStream::Stdout if answer.len() + line.line.len() < MAX_ANSWER_BYTES => {
                    answer.extend_from_slice(line.line.as_bytes());
                    answer.push(b'\n');
                }
                OutputStream::Stdout => overflow = true,
                OutputStream::Stderr => said = Some(line.line),
            }
        }
        let status = child.wait().await;
        (answer, said, overflow, status)
    };
    let outcome = tokio::time::timeout(timeout, run).await;
    let tool = program
        .file_name()
        .map_or_else(|| "ffprobe".into(), |n| n.to_string_lossy());
    let Ok((answer, said, overflow, status)) = outcome else {
        let _ = child.kill().await;
        return Ok(Err(format!(
            "{tool} did not finish within {} s",
            timeout.as_secs()
        )));
    };
    let status = status.map_err(PrepareError::io(program))?;
    Ok(if overflow {
        Err(format!(
            "ffprobe's answer is larger than {MAX_ANSWER_BYTES} bytes"
        ))
    } else if status.success() {
        Ok(answer)
    } else {
        Err(said.map_or_else(
            || format!("{tool} failed ({status})"),
            |said| {
                // ffprobe names the file first; the name is the user's own.
                // A decoder's line starts `[h264 @ 0x…] `: an address, no use.
                let reason = said.rsplit(": ").next().unwrap_or(&said);
                let reason = match reason.split_once("] ") {
                    Some((context, rest)) if context.starts_with('[') => rest,
                    _ => reason,
                };
                format!("{tool} cannot read it: {reason}")
            },
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(width: u32, height: u32, secs: f64, frames: u64) -> ProbeFacts {
        ProbeFacts {
            width,
            height,
            codec: "h264".into(),
            duration_secs: secs,
            fps: frames as f64 / secs,
            frames,
        }
    }

    #[test]
    fn limits_name_the_setting_a_clip_is_over() {
        let limits = VideoSettings::default().limits;
        assert!(check_limits(&facts(832, 480, 5.0, 81), 1 << 20, &limits).is_ok());
        let cases = [
            (facts(832, 480, 5.0, 81), 2 << 30, "max_clip_bytes"),
            (facts(832, 480, 61.0, 976), 1 << 20, "max_clip_seconds"),
            (facts(832, 480, 30.0, 7200), 1 << 20, "max_clip_frames"),
            (facts(7680, 4320, 5.0, 81), 1 << 20, "max_clip_side"),
        ];
        for (facts, size, setting) in cases {
            let (reason, detail) = check_limits(&facts, size, &limits).unwrap_err();
            assert_eq!(reason, DropReason::OverLimit);
            assert!(detail.contains(setting), "{detail}");
        }
        let (reason, _) = check_limits(&facts(4, 480, 5.0, 81), 1, &limits).unwrap_err();
        assert_eq!(reason, DropReason::TooSmall);
    }

    #[test]
    fn info_rounds_to_milliseconds() {
        let info = facts(64, 48, 2.002, 60).info();
        assert_eq!(
            (info.duration_ms, info.fps_milli, info.frames),
            (2002, 29970, 60)
        );
    }
}
