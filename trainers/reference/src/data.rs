//! Loading the training images once, up front, into the model's patch
//! layout, plus the deterministic order in which steps consume them.
//!
//! Images are center-cropped to a square, resized to `resolution` (triangle
//! filter), scaled to `[-1, 1]` and stored as `[N, 48]` patches (`(py, px,
//! channel)` inside a patch). Files that fail to decode are skipped with a
//! warning on stderr; a directory with no usable image is a dataset error.
//! Captions (`<stem>.txt`, comma-separated tags) are only used for metadata:
//! the model is unconditional.

use std::collections::BTreeMap;
use std::path::Path;

use image::imageops::FilterType;
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainerError};
use crate::model::{ModelSpec, PATCH};
use crate::rng::{self, Purpose};

/// Extensions (lower-case) treated as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// One usable training image.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `tokens × patch_dim` values in `[-1, 1]`.
    pub patches: Vec<f32>,
}

/// The decoded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Usable images, sorted by file name.
    pub samples: Vec<Sample>,
    /// Files that looked like images but could not be decoded.
    pub skipped: Vec<String>,
    /// kohya-style tag counts over all captions (one count per image).
    pub tag_frequency: BTreeMap<String, u64>,
    /// sha256 over the used files' names and bytes (detects a changed dataset on resume).
    pub fingerprint: String,
}

impl Dataset {
    /// Reads every image of `dir` (not recursive).
    pub fn load(dir: &Path, spec: &ModelSpec) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            TrainerError::Dataset(format!("cannot read dataset_dir {}: {e}", dir.display()))
        })?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        files.sort();
        let mut ds = Dataset {
            samples: Vec::new(),
            skipped: Vec::new(),
            tag_frequency: BTreeMap::new(),
            fingerprint: String::new(),
        };
        let mut hasher = Sha256::new();
        for path in files {
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!(
                        "ty-warning skipping unreadable image {}: {e}",
                        path.display()
                    );
                    ds.skipped.push(file_name);
                    continue;
                }
            };
            let patches = match decode(&bytes, spec) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!(
                        "ty-warning skipping undecodable image {}: {e}",
                        path.display()
                    );
                    ds.skipped.push(file_name);
                    continue;
                }
            };
            let caption = std::fs::read_to_string(path.with_extension("txt")).unwrap_or_default();
            let mut tags: Vec<&str> = caption
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            tags.sort_unstable();
            tags.dedup();
            for tag in tags {
                *ds.tag_frequency.entry(tag.to_owned()).or_default() += 1;
            }
            hasher.update((file_name.len() as u64).to_le_bytes());
            hasher.update(file_name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            ds.samples.push(Sample { patches });
        }
        if ds.samples.is_empty() {
            return Err(TrainerError::Dataset(format!(
                "no usable image in {} ({} undecodable; looked for {})",
                dir.display(),
                ds.skipped.len(),
                IMAGE_EXTENSIONS.join("/")
            )));
        }
        ds.fingerprint = hex::encode(hasher.finalize());
        Ok(ds)
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes, crops, resizes and patchifies one image.
fn decode(bytes: &[u8], spec: &ModelSpec) -> std::result::Result<Vec<f32>, image::ImageError> {
    let img = image::load_from_memory(bytes)?;
    let (w, h) = (img.width(), img.height());
    let side = w.min(h);
    let r = spec.resolution as u32;
    let img = img
        .crop_imm((w - side) / 2, (h - side) / 2, side, side)
        .resize_exact(r, r, FilterType::Triangle)
        .to_rgb8();
    Ok(patchify(&img, spec))
}

/// RGB image (`resolution` square) → `[tokens, patch_dim]` in `[-1, 1]`.
pub fn patchify(img: &image::RgbImage, spec: &ModelSpec) -> Vec<f32> {
    let grid = spec.resolution / PATCH;
    let mut out = Vec::with_capacity(spec.tokens() * spec.patch_dim());
    for gy in 0..grid {
        for gx in 0..grid {
            for py in 0..PATCH {
                for px in 0..PATCH {
                    let p = img.get_pixel((gx * PATCH + px) as u32, (gy * PATCH + py) as u32);
                    out.extend(p.0.iter().map(|&c| f32::from(c) / 127.5 - 1.0));
                }
            }
        }
    }
    out
}

/// Which image each position of the endless sample stream holds: epoch `e`
/// is a shuffle (stream `(EpochShuffle, seed, e)`) of `images × repeats`
/// items, and step `k` (0-based) takes positions `k*B .. (k+1)*B`.
pub struct Order {
    n_images: usize,
    epoch_len: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl Order {
    /// Order over `n_images` images each repeated `repeats` times per epoch.
    pub fn new(n_images: usize, repeats: usize, seed: u64) -> Self {
        Self {
            n_images,
            epoch_len: n_images * repeats,
            seed,
            cached: None,
        }
    }

    /// 1-based epoch of the `pos`-th sample of the stream.
    pub fn epoch_of(&self, pos: u64) -> u64 {
        pos / self.epoch_len as u64 + 1
    }

    /// Image index at stream position `pos`.
    pub fn image_at(&mut self, pos: u64) -> usize {
        let epoch = pos / self.epoch_len as u64;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let perm = rng::permutation(
                &mut rng::stream(Purpose::EpochShuffle, self.seed, epoch),
                self.epoch_len,
            );
            self.cached = Some((epoch, perm));
        }
        let perm = self
            .cached
            .as_ref()
            .map(|(_, p)| p.as_slice())
            .unwrap_or_default();
        perm.get((pos % self.epoch_len as u64) as usize)
            .copied()
            .unwrap_or(0)
            % self.n_images
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_visits_every_item_once() {
        let mut o = Order::new(3, 2, 9);
        let mut seen: Vec<usize> = (0..6).map(|p| o.image_at(p)).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(o.epoch_of(5), 1);
        assert_eq!(o.epoch_of(6), 2);
    }

    #[test]
    fn patchify_groups_4x4_rgb_blocks() {
        let spec = ModelSpec::new(8).unwrap();
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 10) as u8, 255])
        });
        let p = patchify(&img, &spec);
        assert_eq!(p.len(), 4 * 48);
        // Second token is the top-right patch: first pixel is (x=4, y=0).
        assert_eq!(p[48], 40.0 / 127.5 - 1.0);
        assert_eq!(p[50], 1.0);
    }
}
