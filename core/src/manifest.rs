//! The manifest that describes a prepared dataset.
//!
//! It travels with the dataset (`manifest.json` in the prepared folder,
//! uploaded last) so the training stage can verify every image by size and
//! sha256 before it spends GPU time, and so users can see which captions
//! came from where and which files were dropped and why.
//!
//! Here in `core` because two services read it: the captioner writes it,
//! the coordinator reads it for `GetCaptions` and writes a reviewed
//! dataset's captions back (`coordinator::review`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_VERSION: u32 = 1;
pub const MANIFEST_FILE_NAME: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub version: u32,
    pub trigger_word: String,
    /// `name()` of the backend that captioned images without a sidecar.
    pub caption_backend: String,
    pub images: Vec<ManifestEntry>,
    pub dropped: Vec<DroppedFile>,
    /// The text files of a dataset for a language model (`train.jsonl`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub texts: Vec<TextEntry>,
}

/// One text file of a prepared dataset, a file name inside the prepared folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextEntry {
    pub file: String,
    /// Bytes of `file`.
    pub size: u64,
    /// Lower-case hex sha256 of `file`.
    pub sha256: String,
}

/// One image or clip of the prepared dataset. Paths are file names inside
/// the prepared folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub file: String,
    pub caption_file: String,
    pub width: u32,
    pub height: u32,
    /// Bytes of `file`.
    pub size: u64,
    /// Lower-case hex sha256 of `file`.
    pub sha256: String,
    /// The final caption, exactly as written to `caption_file`.
    pub caption: String,
    pub caption_source: CaptionSource,
    /// An image or a clip; manifests written before clips were accepted
    /// have no `media` and hold images only.
    #[serde(default)]
    pub media: MediaKind,
    /// A clip's stream facts, from `ffprobe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoFacts>,
}

/// What a dataset file is. Serialised `"image"` or `"video"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    #[default]
    Image,
    Video,
}

/// A clip's facts in the manifest (`width`/`height` are the entry's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoFacts {
    pub duration_ms: u64,
    /// Frames per second × 1000.
    pub fps_milli: u32,
    pub frames: u64,
    pub codec: String,
}

impl DatasetManifest {
    /// The entries that are clips.
    pub fn videos(&self) -> impl Iterator<Item = &ManifestEntry> {
        self.images.iter().filter(|e| e.media == MediaKind::Video)
    }
}

/// Where a caption came from: the user's sidecar `.txt`, or a backend by
/// name. Serialised as a plain string: `"sidecar"`, `"template"`, ….
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum CaptionSource {
    Sidecar,
    Backend(String),
}

impl CaptionSource {
    /// The source of a caption a person changed in review.
    pub const EDITED: &'static str = "edited";

    /// `"sidecar"` or `"backend"`: where a caption came from, without the
    /// backend's name (a span attribute).
    pub fn kind(&self) -> &'static str {
        match self {
            CaptionSource::Sidecar => "sidecar",
            CaptionSource::Backend(_) => "backend",
        }
    }
}

impl From<String> for CaptionSource {
    fn from(s: String) -> Self {
        if s == "sidecar" {
            CaptionSource::Sidecar
        } else {
            CaptionSource::Backend(s)
        }
    }
}

impl From<CaptionSource> for String {
    fn from(source: CaptionSource) -> Self {
        match source {
            CaptionSource::Sidecar => "sidecar".to_owned(),
            CaptionSource::Backend(name) => name,
        }
    }
}

/// A file from the input that is not in the prepared dataset. Junk
/// (`__MACOSX`, `.DS_Store`, hidden files) is left out silently instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedFile {
    /// Relative to the dataset root; files from a nested zip are named
    /// `inner.zip/file.png`.
    pub name: String,
    pub reason: DropReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The image crate could not decode it (corrupt, truncated, wrong
    /// format behind an image extension), or, for a clip, ffprobe could not
    /// read it or found no video stream or no frames.
    Undecodable,
    /// A clip over a `[captioner.video]` limit: length, frames, bytes or
    /// picture size.
    OverLimit,
    /// Smaller than the minimum side length.
    TooSmall,
    /// Not an image, caption or zip.
    UnsupportedType,
    /// A `.txt` with no image of the same stem next to it.
    OrphanCaption,
    /// A `.txt` that is not UTF-8 or is unreasonably large.
    InvalidCaption,
    /// A symbolic link (in a folder or an archive); never followed.
    Symlink,
    /// A device, FIFO or other non-regular file.
    SpecialFile,
    /// A zip nested deeper than `limits.max_nested_depth`, or a folder
    /// more than 32 levels deep.
    NestedTooDeep,
    /// A nested `.zip` that is not a readable (or is an encrypted) archive.
    BadArchive,
}

impl DatasetManifest {
    /// Writes `manifest.json` (pretty JSON) into `dir` and returns its path.
    pub async fn write_to_dir(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join(MANIFEST_FILE_NAME);
        let mut json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        json.push(b'\n');
        tokio::fs::write(&path, json).await?;
        Ok(path)
    }

    pub async fn read_from_file(path: &Path) -> io::Result<Self> {
        let bytes = tokio::fs::read(path).await?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Streams `path` through sha256 on the blocking pool; returns the hex
/// digest and the byte count.
pub async fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || sha256_file_blocking(&path))
        .await
        .map_err(io::Error::other)?
}

/// Blocking core of [`sha256_file`].
pub fn sha256_file_blocking(path: &Path) -> io::Result<(String, u64)> {
    copy_hashed(&mut File::open(path)?, &mut io::sink())
}

/// Copies `src` to a new file `dst` and hashes the bytes in the same pass.
pub fn copy_file_hashed_blocking(src: &Path, dst: &Path) -> io::Result<(String, u64)> {
    let mut out = File::create_new(dst)?;
    let result = copy_hashed(&mut File::open(src)?, &mut out)?;
    out.sync_all()?;
    Ok(result)
}

fn copy_hashed(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_source_serialises_as_a_string() {
        let json = serde_json::to_string(&CaptionSource::Backend("template".into())).unwrap();
        assert_eq!(json, "\"template\"");
        let back: CaptionSource = serde_json::from_str("\"sidecar\"").unwrap();
        assert_eq!(back, CaptionSource::Sidecar);
    }

    #[test]
    fn entries_without_media_read_as_images_and_clips_keep_their_facts() {
        let old = r#"{"file":"a.png","caption_file":"a.txt","width":8,"height":8,"size":1,
            "sha256":"00","caption":"x","caption_source":"sidecar"}"#;
        let entry: ManifestEntry = serde_json::from_str(old).unwrap();
        assert_eq!((entry.media, entry.video), (MediaKind::Image, None));
        let clip = ManifestEntry {
            file: "a.mp4".into(),
            media: MediaKind::Video,
            video: Some(VideoFacts {
                duration_ms: 1000,
                fps_milli: 16_000,
                frames: 16,
                codec: "h264".into(),
            }),
            ..entry
        };
        let json = serde_json::to_value(&clip).unwrap();
        assert_eq!(json["media"], "video");
        assert_eq!(json["video"]["frames"], 16);
        let back: ManifestEntry = serde_json::from_value(json).unwrap();
        assert_eq!(back, clip);
    }

    #[test]
    fn hashes_known_bytes() {
        let (hex, n) = copy_hashed(&mut &b"abc"[..], &mut io::sink()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
