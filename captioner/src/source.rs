//! Turning a remote dataset source (a zip URL or a list of image URLs) into
//! a [`LocalInput`], always through the [`GuardedClient`].
//!
//! Image URLs often have no useful file name (`/img?id=3`) or extension, so
//! each download is named after the last path segment when it has one, and
//! its extension comes from the URL, else the `Content-Type`, else the
//! file's magic bytes. Names are made unique so sidecars and stems stay
//! one-to-one. Artifact-store URIs are not handled here; the stage fetches
//! those through the object store and passes a [`LocalInput`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;

use crate::collect::{IMAGE_EXTENSIONS, split_ext};
use crate::error::PrepareError;
use crate::fetch::{Downloaded, GuardedClient};
use crate::prepare::LocalInput;
use crate::unpack::UnpackLimits;

/// Image downloads in flight at once.
const DOWNLOAD_CONCURRENCY: usize = 4;

/// Where a dataset comes from, when it is not local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteSource {
    ZipUrl(String),
    ImageUrls(Vec<String>),
}

/// Downloads `source` under `work_dir/download/` and returns the local
/// input to prepare. The client's policy bounds each download; `limits`
/// bounds the number of URLs and their total size.
pub async fn fetch_source(
    client: &GuardedClient,
    source: &RemoteSource,
    work_dir: &Path,
    limits: &UnpackLimits,
) -> Result<LocalInput, PrepareError> {
    let dir = work_dir.join("download");
    if tokio::fs::try_exists(&dir)
        .await
        .map_err(PrepareError::io(&dir))?
    {
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(PrepareError::io(&dir))?;
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(PrepareError::io(&dir))?;
    match source {
        RemoteSource::ZipUrl(url) => fetch_zip(client, url, &dir).await,
        RemoteSource::ImageUrls(urls) => fetch_images(client, urls, &dir, limits).await,
    }
}

/// Downloads one zip to `dir/dataset.zip`.
pub async fn fetch_zip(
    client: &GuardedClient,
    url: &str,
    dir: &Path,
) -> Result<LocalInput, PrepareError> {
    let dest = dir.join("dataset.zip");
    client.download_to_file(url, &dest).await?;
    Ok(LocalInput::Zip(dest))
}

/// Downloads every URL into `dir`, a few at a time.
pub async fn fetch_images(
    client: &GuardedClient,
    urls: &[String],
    dir: &Path,
    limits: &UnpackLimits,
) -> Result<LocalInput, PrepareError> {
    if urls.len() > limits.max_files {
        return Err(PrepareError::TooManyFiles {
            limit: limits.max_files,
        });
    }
    let total = AtomicU64::new(0);
    let total = &total;
    // Indices, not borrowed items, keep the future `Send` (see caption_all).
    let downloads: Vec<(usize, Downloaded)> = futures::stream::iter(0..urls.len())
        .map(|i| async move {
            let dest = dir.join(format!("{i:05}.download"));
            let downloaded = client.download_to_file(&urls[i], &dest).await?;
            let sum = total.fetch_add(downloaded.bytes, Ordering::Relaxed) + downloaded.bytes;
            if sum > limits.max_total_bytes {
                return Err(PrepareError::InputTooLarge {
                    limit: limits.max_total_bytes,
                });
            }
            Ok((i, downloaded))
        })
        .buffered(DOWNLOAD_CONCURRENCY)
        .try_collect()
        .await?;

    let mut used = HashSet::new();
    let mut files = Vec::with_capacity(downloads.len());
    for (i, downloaded) in downloads {
        let (stem, url_ext) = name_from_url(&downloaded.final_url);
        let ext = match url_ext {
            Some(ext) => ext,
            None => match ext_from_content_type(downloaded.content_type.as_deref()) {
                Some(ext) => ext.to_owned(),
                None => sniff_ext(&downloaded.path).await,
            },
        };
        let stem = stem.unwrap_or_else(|| format!("image_{}", i + 1));
        let mut unique = stem.clone();
        let mut n = 1;
        while !used.insert(unique.to_lowercase()) {
            n += 1;
            unique = format!("{stem}_{n}");
        }
        let path = dir.join(format!("{unique}.{ext}"));
        tokio::fs::rename(&downloaded.path, &path)
            .await
            .map_err(PrepareError::io(&path))?;
        files.push(path);
    }
    Ok(LocalInput::Files(files))
}

/// A safe stem (ASCII letters, digits, `._-`; at most 100 chars) and a
/// known image or clip extension, from the URL's last path segment.
fn name_from_url(url: &reqwest::Url) -> (Option<String>, Option<String>) {
    let last = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("");
    let (stem, ext) = split_ext(last);
    let ext = ext.to_ascii_lowercase();
    let ext = (IMAGE_EXTENSIONS.contains(&ext.as_str())
        || crate::video::VIDEO_EXTENSIONS.contains(&ext.as_str()))
    .then_some(ext);
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let stem = stem.trim_start_matches('.').to_owned();
    (Some(stem).filter(|s| !s.is_empty()), ext)
}

fn ext_from_content_type(content_type: Option<&str>) -> Option<&'static str> {
    let mime = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "image/png" => Some("png"),
        "image/jpeg" | "image/jpg" => Some("jpg"),
        "image/webp" => Some("webp"),
        "image/gif" => Some("gif"),
        "image/bmp" | "image/x-ms-bmp" => Some("bmp"),
        "video/mp4" => Some("mp4"),
        "video/webm" => Some("webm"),
        "video/quicktime" => Some("mov"),
        "application/zip" | "application/x-zip-compressed" => Some("zip"),
        _ => None,
    }
}

/// Guesses from magic bytes; unknown content keeps a `bin` extension and
/// is later dropped as an unsupported type.
async fn sniff_ext(path: &Path) -> String {
    let mut head = [0u8; 64];
    let read = match tokio::fs::File::open(path).await {
        Ok(mut file) => file.read(&mut head).await.unwrap_or(0),
        Err(_) => 0,
    };
    let ext = match image::guess_format(&head[..read]) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::Jpeg) => "jpg",
        Ok(image::ImageFormat::WebP) => "webp",
        Ok(image::ImageFormat::Gif) => "gif",
        Ok(image::ImageFormat::Bmp) => "bmp",
        _ if head[..read].starts_with(b"PK\x03\x04") => "zip",
        _ => "bin",
    };
    ext.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_last_segment() {
        let url = reqwest::Url::parse("https://x.example/a/My%20Cat.JPG?sig=1").unwrap();
        assert_eq!(
            name_from_url(&url),
            (Some("My_20Cat".into()), Some("jpg".into()))
        );
        let url = reqwest::Url::parse("https://x.example/clips/walk.MP4").unwrap();
        assert_eq!(
            name_from_url(&url),
            (Some("walk".into()), Some("mp4".into()))
        );
        let url = reqwest::Url::parse("https://x.example/img").unwrap();
        assert_eq!(name_from_url(&url), (Some("img".into()), None));
        let url = reqwest::Url::parse("https://x.example/").unwrap();
        assert_eq!(name_from_url(&url), (None, None));
    }
}
