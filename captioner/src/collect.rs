//! Normalising what the user gave us into a flat list of candidate images
//! with their sidecar captions.
//!
//! Users zip datasets every possible way: from macOS Finder (with
//! `__MACOSX/` and `.DS_Store`), inside one or more wrapper folders, with
//! sub-folders per concept, with zips inside the zip. This module hides all
//! of that:
//! - junk (`__MACOSX`, `.DS_Store`, `Thumbs.db`, `desktop.ini`) and hidden
//!   files and folders are ignored silently;
//! - a root holding exactly one folder and no files is replaced by that
//!   folder, repeatedly, so names are relative to the real dataset root;
//! - images (png, jpg, jpeg, webp, bmp, gif, any case) and video clips
//!   (mp4, webm, mov) are collected from every sub-folder, sorted by
//!   relative name;
//! - a `.zip` inside is expanded through the guarded unpacker into scratch
//!   space, sharing the dataset's [`UnpackBudget`], up to
//!   `max_nested_depth`; its files are named `inner.zip/file.png`;
//! - `<stem>.txt` next to an image or clip is its caption (UTF-8, one line);
//! - symlinks are never followed, and everything else is reported in
//!   [`DroppedFile`]s.
//!
//! Everything here is blocking file-system work; callers run it on the
//! blocking pool.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::caption::normalize_caption;
use crate::error::PrepareError;
use crate::manifest::{DropReason, DroppedFile, MediaKind};
use crate::unpack::{SkipKind, UnpackBudget, UnpackError, unpack_zip_blocking};

/// Extensions collected as images (compared lower-case).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Folders deeper than this (below the flattened root) are dropped.
const MAX_FOLDER_LEVELS: usize = 32;

/// Sidecar captions larger than this are refused as not being captions.
const MAX_CAPTION_BYTES: u64 = 64 * 1024;

/// An image or clip found in the input, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Relative to the (flattened) dataset root, `/`-separated.
    pub rel: String,
    pub path: PathBuf,
    /// By extension: an image, or a clip (`crate::video::VIDEO_EXTENSIONS`).
    pub kind: MediaKind,
    /// Normalised sidecar caption; `None` when absent or empty.
    pub sidecar: Option<String>,
}

#[derive(Debug, Default)]
pub struct Collected {
    /// Sorted by `rel`.
    pub images: Vec<Candidate>,
    pub dropped: Vec<DroppedFile>,
}

/// Names ignored without a trace: OS metadata and hidden entries.
pub fn is_junk(name: &str) -> bool {
    name.starts_with('.')
        || name == "__MACOSX"
        || name.eq_ignore_ascii_case("thumbs.db")
        || name.eq_ignore_ascii_case("desktop.ini")
}

/// Collects a folder (flattening single wrapper folders first).
/// `scratch` receives expanded nested zips.
pub fn collect_dir(
    root: &Path,
    scratch: &Path,
    budget: &mut UnpackBudget,
) -> Result<Collected, PrepareError> {
    let mut walker = Walker::new(scratch, budget);
    walker.walk_root(root, "", 0)?;
    Ok(walker.finish())
}

/// Collects a flat list of files (downloaded image URLs), as if they were
/// one folder.
pub fn collect_files(
    files: &[PathBuf],
    scratch: &Path,
    budget: &mut UnpackBudget,
) -> Result<Collected, PrepareError> {
    let mut walker = Walker::new(scratch, budget);
    for path in files {
        let name = file_name(path);
        walker.visit(path, &name, "", 0)?;
    }
    Ok(walker.finish())
}

/// Turns a skipped archive entry into a dropped file.
pub fn dropped_from_skip(name: String, kind: SkipKind) -> DroppedFile {
    let reason = match kind {
        SkipKind::Symlink => DropReason::Symlink,
        SkipKind::Special => DropReason::SpecialFile,
    };
    DroppedFile {
        name,
        reason,
        detail: None,
    }
}

struct Walker<'a> {
    scratch: &'a Path,
    budget: &'a mut UnpackBudget,
    walked: usize,
    nested: usize,
    /// (dir key, stem) → (relative name, path) for every `.txt` seen.
    captions: BTreeMap<(String, String), (String, PathBuf)>,
    /// (dir key, stem, candidate) for every image seen.
    images: Vec<(String, String, Candidate)>,
    dropped: Vec<DroppedFile>,
}

impl<'a> Walker<'a> {
    fn new(scratch: &'a Path, budget: &'a mut UnpackBudget) -> Self {
        Self {
            scratch,
            budget,
            walked: 0,
            nested: 0,
            captions: BTreeMap::new(),
            images: Vec::new(),
            dropped: Vec::new(),
        }
    }

    fn drop_file(&mut self, name: String, reason: DropReason, detail: Option<String>) {
        self.dropped.push(DroppedFile {
            name,
            reason,
            detail,
        });
    }

    /// Walks `root` after flattening, naming files `prefix` + relative path.
    fn walk_root(&mut self, root: &Path, prefix: &str, depth: usize) -> Result<(), PrepareError> {
        let root = flatten(root)?;
        self.walk_dir(&root, prefix, depth, 0)
    }

    /// `depth` counts zips, `level` folders (bounded so a hostile tree
    /// cannot exhaust the blocking thread's stack).
    fn walk_dir(
        &mut self,
        dir: &Path,
        prefix: &str,
        depth: usize,
        level: usize,
    ) -> Result<(), PrepareError> {
        for (name, path) in sorted_entries(dir)? {
            if is_junk(&name) {
                continue;
            }
            let meta = fs::symlink_metadata(&path).map_err(PrepareError::io(&path))?;
            let rel = format!("{prefix}{name}");
            if meta.is_symlink() {
                self.drop_file(rel, DropReason::Symlink, None);
            } else if meta.is_dir() && level >= MAX_FOLDER_LEVELS {
                let detail = format!("more than {MAX_FOLDER_LEVELS} folder levels");
                self.drop_file(rel, DropReason::NestedTooDeep, Some(detail));
            } else if meta.is_dir() {
                self.walk_dir(&path, &format!("{rel}/"), depth, level + 1)?;
            } else if meta.is_file() {
                self.visit(&path, &name, prefix, depth)?;
            } else {
                self.drop_file(rel, DropReason::SpecialFile, None);
            }
        }
        Ok(())
    }

    /// Classifies one regular file `name` living in folder `dir_key`.
    fn visit(
        &mut self,
        path: &Path,
        name: &str,
        dir_key: &str,
        depth: usize,
    ) -> Result<(), PrepareError> {
        self.walked += 1;
        let limit = self.budget.limits().max_files;
        if self.walked > limit {
            return Err(PrepareError::TooManyFiles { limit });
        }
        let rel = format!("{dir_key}{name}");
        let (stem, ext) = split_ext(name);
        let ext = ext.to_ascii_lowercase();
        let kind = if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            Some(MediaKind::Image)
        } else if crate::video::VIDEO_EXTENSIONS.contains(&ext.as_str()) {
            Some(MediaKind::Video)
        } else {
            None
        };
        if let Some(kind) = kind {
            let candidate = Candidate {
                rel,
                path: path.to_owned(),
                kind,
                sidecar: None,
            };
            self.images
                .push((dir_key.to_owned(), stem.to_owned(), candidate));
        } else if ext == "txt" {
            self.captions.insert(
                (dir_key.to_owned(), stem.to_owned()),
                (rel, path.to_owned()),
            );
        } else if ext == "zip" {
            if depth >= self.budget.limits().max_nested_depth {
                self.drop_file(rel, DropReason::NestedTooDeep, None);
            } else {
                self.expand_nested(path, &rel, depth)?;
            }
        } else {
            self.drop_file(rel, DropReason::UnsupportedType, None);
        }
        Ok(())
    }

    fn expand_nested(
        &mut self,
        archive: &Path,
        rel: &str,
        depth: usize,
    ) -> Result<(), PrepareError> {
        self.nested += 1;
        let dest = self.scratch.join(format!("nested-{depth}-{}", self.nested));
        let report = match unpack_zip_blocking(archive, &dest, self.budget) {
            Ok(report) => report,
            // An unreadable inner zip is like a broken image: dropped. Path
            // escapes and limits still fail the whole dataset.
            Err(
                error @ (UnpackError::NotAZip { .. }
                | UnpackError::Corrupt { .. }
                | UnpackError::Encrypted { .. }),
            ) => {
                let detail = Some(error.to_string());
                self.drop_file(rel.to_owned(), DropReason::BadArchive, detail);
                return Ok(());
            }
            Err(error) => {
                return Err(PrepareError::Unpack {
                    archive: rel.to_owned(),
                    error,
                });
            }
        };
        for skipped in report.skipped {
            self.dropped.push(dropped_from_skip(
                format!("{rel}/{}", skipped.name),
                skipped.kind,
            ));
        }
        self.walk_root(&dest, &format!("{rel}/"), depth + 1)
    }

    /// Pairs images with sidecars (one `.txt` may serve `a.png` and
    /// `a.jpg`); captions no image uses are dropped.
    fn finish(self) -> Collected {
        let Walker {
            captions,
            images: found,
            mut dropped,
            ..
        } = self;
        let mut read: BTreeMap<&(String, String), Option<String>> = BTreeMap::new();
        let mut images = Vec::with_capacity(found.len());
        for (dir_key, stem, mut candidate) in found {
            let key = (dir_key, stem);
            if let Some((key, (rel, path))) = captions.get_key_value(&key) {
                let text = read.entry(key).or_insert_with(|| match read_caption(path) {
                    Ok(text) => Some(text).filter(|t| !t.is_empty()),
                    Err(detail) => {
                        dropped.push(DroppedFile {
                            name: rel.clone(),
                            reason: DropReason::InvalidCaption,
                            detail: Some(detail),
                        });
                        None
                    }
                });
                candidate.sidecar = text.clone();
            }
            images.push(candidate);
        }
        for (key, (rel, _)) in &captions {
            if !read.contains_key(key) {
                dropped.push(DroppedFile {
                    name: rel.clone(),
                    reason: DropReason::OrphanCaption,
                    detail: None,
                });
            }
        }
        images.sort_by(|a, b| a.rel.cmp(&b.rel));
        dropped.sort_by(|a, b| a.name.cmp(&b.name));
        Collected { images, dropped }
    }
}

/// Descends while the folder holds exactly one non-junk entry and that
/// entry is a real folder (not a symlink).
pub fn flatten(root: &Path) -> Result<PathBuf, PrepareError> {
    let mut root = root.to_owned();
    loop {
        let entries: Vec<_> = sorted_entries(&root)?
            .into_iter()
            .filter(|(name, _)| !is_junk(name))
            .collect();
        match entries.as_slice() {
            [(_, only)] if fs::symlink_metadata(only).is_ok_and(|m| m.is_dir()) => {
                root = only.clone();
            }
            _ => return Ok(root),
        }
    }
}

pub fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, PrepareError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(PrepareError::io(dir))? {
        let entry = entry.map_err(PrepareError::io(dir))?;
        let path = entry.path();
        entries.push((file_name(&path), path));
    }
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `("photo.v2", "png")` for `photo.v2.png`; no dot → empty extension.
pub fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) if dot > 0 => (&name[..dot], &name[dot + 1..]),
        _ => (name, ""),
    }
}

/// Reads a sidecar: at most [`MAX_CAPTION_BYTES`], UTF-8 (a BOM is
/// dropped), normalised to one line.
fn read_caption(path: &Path) -> Result<String, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_CAPTION_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CAPTION_BYTES {
        return Err(format!("caption is larger than {MAX_CAPTION_BYTES} bytes"));
    }
    let text = String::from_utf8(bytes).map_err(|_| "caption is not valid utf-8".to_owned())?;
    Ok(normalize_caption(text.trim_start_matches('\u{feff}')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junk_names() {
        for junk in ["__MACOSX", ".DS_Store", "._a.png", "Thumbs.db", ".hidden"] {
            assert!(is_junk(junk), "{junk}");
        }
        assert!(!is_junk("a.png"));
    }

    #[test]
    fn split_ext_keeps_inner_dots() {
        assert_eq!(split_ext("a.v2.PNG"), ("a.v2", "PNG"));
        assert_eq!(split_ext("noext"), ("noext", ""));
    }
}
