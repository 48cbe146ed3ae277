//! Datasets for language models: one `train.jsonl`, not images.
//!
//! The input is fetched like an image dataset (a zip URL, a zip or folder in
//! the artifact store, or a `.jsonl` file there) and goes through the same
//! guarded unpacker. The JSONL file is found after flattening wrapper
//! folders: `train.jsonl` at the root, else the only `.jsonl` file there. It
//! is copied to `prepared/train.jsonl` and listed with its sha256 under
//! `texts` in `manifest.json`, which the worker verifies. Its rows are
//! checked by preflight (`trainyard_backends::trl::check_jsonl`), not here.

use std::path::{Path, PathBuf};

use crate::collect::{flatten, sorted_entries};
use crate::error::{PrepareError, blocking};
use crate::manifest::{
    DatasetManifest, MANIFEST_FILE_NAME, MANIFEST_VERSION, TextEntry, copy_file_hashed_blocking,
};
use crate::prepare::{LocalInput, PreparedDataset};
use crate::unpack::{UnpackBudget, UnpackLimits, unpack_zip_blocking};

/// The file name a language-model dataset has in the prepared folder.
pub const TRAIN_JSONL: &str = "train.jsonl";

/// Prepares a language-model dataset into `work_dir/prepared`.
pub async fn prepare_text(
    input: LocalInput,
    work_dir: &Path,
    limits: UnpackLimits,
) -> Result<PreparedDataset, PrepareError> {
    let scratch = work_dir.join("scratch");
    let prepared = work_dir.join("prepared");
    let (scratch2, prepared2) = (scratch.clone(), prepared.clone());
    let entry = blocking(move || -> Result<TextEntry, PrepareError> {
        for dir in [&scratch2, &prepared2] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(PrepareError::io(dir))?;
            }
            std::fs::create_dir_all(dir).map_err(PrepareError::io(dir))?;
        }
        let source = find_jsonl(input, &scratch2, limits)?;
        let dest = prepared2.join(TRAIN_JSONL);
        let (sha256, size) =
            copy_file_hashed_blocking(&source, &dest).map_err(PrepareError::io(&dest))?;
        Ok(TextEntry {
            file: TRAIN_JSONL.to_owned(),
            size,
            sha256,
        })
    })
    .await??;
    let manifest = DatasetManifest {
        version: MANIFEST_VERSION,
        trigger_word: String::new(),
        caption_backend: String::new(),
        images: Vec::new(),
        dropped: Vec::new(),
        texts: vec![entry],
    };
    manifest
        .write_to_dir(&prepared)
        .await
        .map_err(PrepareError::io(prepared.join(MANIFEST_FILE_NAME)))?;
    if let Err(error) = tokio::fs::remove_dir_all(&scratch).await {
        tracing::warn!(path = %scratch.display(), %error, "could not remove scratch space");
    }
    Ok(PreparedDataset {
        dir: prepared,
        manifest,
    })
}

/// Blocking: the JSONL file of `input`, unpacking a zip into `scratch`.
fn find_jsonl(
    input: LocalInput,
    scratch: &Path,
    limits: UnpackLimits,
) -> Result<PathBuf, PrepareError> {
    let files: Vec<(String, PathBuf)> = match input {
        LocalInput::Zip(archive) => {
            let dest = scratch.join("unpacked");
            let mut budget = UnpackBudget::new(limits);
            unpack_zip_blocking(&archive, &dest, &mut budget).map_err(|error| {
                PrepareError::Unpack {
                    archive: archive
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    error,
                }
            })?;
            regular_files(&flatten(&dest)?)?
        }
        LocalInput::Dir(dir) => regular_files(&flatten(&dir)?)?,
        LocalInput::Files(files) => files
            .into_iter()
            .filter(|p| p.is_file())
            .map(|p| (name_of(&p), p))
            .collect(),
    };
    let is_jsonl = |name: &str| name.to_ascii_lowercase().ends_with(".jsonl");
    if let Some((_, path)) = files.iter().find(|(name, _)| name == TRAIN_JSONL) {
        return Ok(path.clone());
    }
    let mut jsonl = files.iter().filter(|(name, _)| is_jsonl(name));
    match (jsonl.next(), jsonl.next()) {
        (Some((_, only)), None) => Ok(only.clone()),
        _ => Err(PrepareError::NoTextDataset {
            found: files.into_iter().map(|(name, _)| name).collect(),
        }),
    }
}

/// The regular files directly in `dir` (no links, no junk), by name.
fn regular_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, PrepareError> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|(name, path)| {
            !crate::collect::is_junk(name)
                && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
        })
        .collect())
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
