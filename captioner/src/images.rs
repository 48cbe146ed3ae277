//! Validating candidate images and clips and writing them into the
//! prepared folder.
//!
//! Every image is fully decoded (not just its header read), so a truncated
//! upload or a text file renamed `.png` is caught here and not by a trainer
//! an hour into a GPU job. Decoding runs on the blocking pool, a few images
//! at a time, under the `image` crate's allocation limits; a decoder panic
//! marks that one image bad instead of failing the job.
//!
//! Output format: png, jpg/jpeg and webp are copied byte for byte (no
//! generation loss, and the manifest's sha256 is of the user's own bytes),
//! with the extension lower-cased. bmp and gif are re-encoded to PNG (gif:
//! first frame), because several trainers accept only png/jpg/webp.
//! Clips are probed, not decoded ([`crate::video`]), and copied byte for
//! byte with the extension lower-cased.
//! Output names are the original file names; when two images would share a
//! stem (case-insensitively, after flattening sub-folders) the later one
//! gets `_2`, `_3`, … so every image has its own `<stem>.txt`.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use image::{ImageFormat, ImageReader, Limits};

use crate::caption::Media;
use crate::collect::{Candidate, split_ext};
use crate::error::{PrepareError, blocking};
use crate::manifest::MediaKind;
use crate::manifest::{DropReason, DroppedFile, copy_file_hashed_blocking, sha256_file_blocking};
use crate::video::VideoSettings;

/// Images smaller than this on either side are refused.
pub const MIN_SIDE: u32 = 8;

/// Why a candidate image is unusable: the reason and a human detail.
pub type BadImage = (DropReason, String);

/// Width and height of a usable image, or why it is unusable.
pub type ImageCheck = Result<(u32, u32), BadImage>;

/// Width, height and kind of a usable image or clip, or why it is unusable.
type MediaCheck = Result<(u32, u32, Media), BadImage>;

/// A decoded (image) or probed (clip) and accepted candidate.
#[derive(Debug, Clone)]
pub struct GoodImage {
    pub candidate: Candidate,
    pub width: u32,
    pub height: u32,
    /// An image, or a clip with its stream facts.
    pub media: Media,
}

/// An image written to the prepared folder.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub source: GoodImage,
    pub file_name: String,
    pub stem: String,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

/// Decodes every image and probes every clip; returns the good ones (in
/// input order) and a dropped entry for each bad one. An animated gif that
/// becomes a clip ([`VideoSettings::gif_as_video`]) is converted into
/// `scratch` and its candidate points at the mp4 from then on.
pub async fn check_all(
    candidates: Vec<Candidate>,
    video: &VideoSettings,
    scratch: &Path,
) -> Result<(Vec<GoodImage>, Vec<DroppedFile>), PrepareError> {
    let checked: Vec<(Candidate, MediaCheck)> =
        futures::stream::iter(candidates.into_iter().enumerate())
            .map(|(i, mut candidate)| async move {
                let path = candidate.path.clone();
                let result = match candidate.kind {
                    MediaKind::Image if crate::video::is_animated_gif(&path, video).await? => {
                        let mp4 = scratch.join(format!("gif-{i}.mp4"));
                        let converted = crate::video::gif_to_mp4(&path, &mp4, video).await?;
                        if converted.is_ok() {
                            candidate.path = mp4;
                            candidate.kind = MediaKind::Video;
                        }
                        converted
                            .map(|facts| (facts.width, facts.height, Media::Video(facts.info())))
                    }
                    MediaKind::Image => blocking(move || check_image_blocking(&path))
                        .await?
                        .map(|(w, h)| (w, h, Media::Image)),
                    MediaKind::Video => crate::video::check_clip(&path, video)
                        .await?
                        .map(|facts| (facts.width, facts.height, Media::Video(facts.info()))),
                };
                Ok::<_, PrepareError>((candidate, result))
            })
            .buffered(parallelism())
            .try_collect()
            .await?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (candidate, result) in checked {
        match result {
            Ok((width, height, media)) => good.push(GoodImage {
                candidate,
                width,
                height,
                media,
            }),
            Err((reason, detail)) => bad.push(DroppedFile {
                name: candidate.rel,
                reason,
                detail: Some(detail),
            }),
        }
    }
    Ok((good, bad))
}

/// Fully decodes one image; `Err` says why it is unusable.
pub fn check_image_blocking(path: &Path) -> ImageCheck {
    let decoded = catch_unwind(AssertUnwindSafe(|| decode(path)))
        .unwrap_or_else(|_| Err("the image decoder crashed".to_owned()))
        .map_err(|detail| (DropReason::Undecodable, detail))?;
    let (width, height) = (decoded.width(), decoded.height());
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err((
            DropReason::TooSmall,
            format!("{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE}"),
        ));
    }
    Ok((width, height))
}

fn decode(path: &Path) -> Result<image::DynamicImage, String> {
    let mut reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?;
    let mut limits = Limits::default(); // 512 MiB allocation cap
    limits.max_image_width = Some(32_768);
    limits.max_image_height = Some(32_768);
    reader.limits(limits);
    reader.decode().map_err(|e| e.to_string())
}

/// Chooses a unique output file name for every image, in order.
pub fn output_names(images: &[GoodImage]) -> Vec<(String, String)> {
    let mut used: HashSet<String> = HashSet::new();
    images
        .iter()
        .map(|image| {
            let name = image.candidate.rel.rsplit('/').next().unwrap_or_default();
            let (stem, ext) = split_ext(name);
            let stem: String = stem
                .chars()
                .map(|c| if c.is_control() { '_' } else { c })
                .collect();
            // An animated gif that became a clip is an mp4 now.
            let ext = match image.media {
                Media::Video(_) if ext.eq_ignore_ascii_case("gif") => "mp4",
                _ => output_ext(ext),
            };
            let mut unique = stem.clone();
            let mut n = 1;
            while !used.insert(unique.to_lowercase()) {
                n += 1;
                unique = format!("{stem}_{n}");
            }
            (unique, ext.to_owned())
        })
        .collect()
}

fn output_ext(ext: &str) -> &'static str {
    match ext.to_ascii_lowercase().as_str() {
        "png" => "png",
        "jpg" => "jpg",
        "jpeg" => "jpeg",
        "webp" => "webp",
        "mp4" => "mp4",
        "webm" => "webm",
        "mov" => "mov",
        _ => "png", // bmp, gif: re-encoded
    }
}

/// bmp and gif are re-encoded to PNG; a gif converted to a clip is an mp4
/// already (its candidate's path).
fn needs_reencode(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("bmp" | "gif"))
}

/// Writes every image into `dir` under its unique name and hashes it.
pub async fn write_all(
    images: Vec<GoodImage>,
    dir: &Path,
) -> Result<Vec<WrittenImage>, PrepareError> {
    let names = output_names(&images);
    futures::stream::iter(images.into_iter().zip(names))
        .map(|(image, (stem, ext))| async move {
            let file_name = format!("{stem}.{ext}");
            let dst = dir.join(&file_name);
            let (src, dst2) = (image.candidate.path.clone(), dst.clone());
            let (sha256, size) = blocking(move || write_one_blocking(&src, &dst2))
                .await?
                .map_err(PrepareError::io(&dst))?;
            Ok::<_, PrepareError>(WrittenImage {
                source: image,
                file_name,
                stem,
                path: dst,
                size,
                sha256,
            })
        })
        .buffered(parallelism())
        .try_collect()
        .await
}

fn write_one_blocking(src: &Path, dst: &Path) -> std::io::Result<(String, u64)> {
    if !needs_reencode(src) {
        return copy_file_hashed_blocking(src, dst);
    }
    let image = decode(src).map_err(std::io::Error::other)?;
    let file = std::fs::File::create_new(dst)?;
    let mut out = std::io::BufWriter::new(file);
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    sha256_file_blocking(dst)
}
