//! The one guarded zip reader for user archives.
//!
//! `ZipArchive::extract` has had path-traversal and symlink advisories, and a
//! user archive is hostile input, so this module never calls it. Instead it
//! walks entries one by one and:
//! - refuses (with an error naming the entry) any name that is absolute, has
//!   a drive prefix, or climbs out of the destination — checked on the raw
//!   name *and* through `enclosed_name()`, because `enclosed_name()` quietly
//!   turns `/etc/x` into `etc/x`;
//! - skips symlinks and other non-regular entries (reported, never created),
//!   so nothing it writes can redirect a later write;
//! - bounds the entry count and the total uncompressed bytes, counting the
//!   bytes actually decompressed rather than trusting the header;
//! - creates files with `create_new`, so a duplicate entry cannot overwrite;
//! - before any of that, reads the archive's end records itself
//!   ([`eocd`]) and refuses an archive that declares more entries than the
//!   budget has left, or a central directory over
//!   [`DIRECTORY_BYTES_PER_ENTRY`] per allowed entry: the zip crate reads
//!   the whole central directory into memory first.
//!
//! A [`UnpackBudget`] can be shared across several archives (nested zips) so
//! the limits hold for the whole dataset, not per archive. The work is
//! blocking; [`unpack_zip`] runs it on the blocking pool.

pub mod eocd;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

/// Central-directory bytes allowed per entry `max_files` allows (an entry's
/// record is 46 bytes plus its name, extra field and comment); at least
/// [`MIN_DIRECTORY_BYTES`] in all.
pub const DIRECTORY_BYTES_PER_ENTRY: u64 = 1024;
pub const MIN_DIRECTORY_BYTES: u64 = 1 << 20;

/// Bounds for everything unpacked for one dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total uncompressed bytes written, across nested archives.
    pub max_total_bytes: u64,
    /// Total archive entries (files, directories, skipped links) and, for
    /// folder inputs, files walked.
    pub max_files: usize,
    /// How deep zips inside zips are expanded; 0 leaves inner zips alone.
    pub max_nested_depth: usize,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_total_bytes: 4 * 1024 * 1024 * 1024,
            max_files: 20_000,
            max_nested_depth: 2,
        }
    }
}

/// What is left of the limits; shared across nested archives.
#[derive(Debug, Clone)]
pub struct UnpackBudget {
    limits: UnpackLimits,
    bytes_used: u64,
    entries_used: usize,
}

impl UnpackBudget {
    pub fn new(limits: UnpackLimits) -> Self {
        Self {
            limits,
            bytes_used: 0,
            entries_used: 0,
        }
    }

    pub fn limits(&self) -> &UnpackLimits {
        &self.limits
    }

    /// Archive entries and walked files counted so far.
    pub fn entries_used(&self) -> usize {
        self.entries_used
    }

    /// Bytes unpacked from archives so far.
    pub fn bytes_used(&self) -> u64 {
        self.bytes_used
    }

    /// Counts one more entry (archive entry or walked file).
    pub fn take_entry(&mut self) -> Result<(), UnpackError> {
        self.entries_used += 1;
        if self.entries_used > self.limits.max_files {
            return Err(UnpackError::TooManyFiles {
                limit: self.limits.max_files,
            });
        }
        Ok(())
    }

    fn bytes_left(&self) -> u64 {
        self.limits.max_total_bytes.saturating_sub(self.bytes_used)
    }
}

/// Why an entry was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    Symlink,
    /// FIFO, device, socket or another non-regular type.
    Special,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    pub name: String,
    pub kind: SkipKind,
}

/// The result of one archive.
#[derive(Debug, Clone, Default)]
pub struct UnpackReport {
    /// Regular files written, relative to the destination.
    pub files: Vec<PathBuf>,
    pub skipped: Vec<SkippedEntry>,
    /// Uncompressed bytes written from this archive.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive entry {entry:?} would be written outside the destination")]
    UnsafePath { entry: String },
    #[error("archive entry {entry:?} is encrypted")]
    Encrypted { entry: String },
    #[error("archive entry {entry:?} appears twice")]
    DuplicateEntry { entry: String },
    #[error("archive expands to more than {limit} bytes (at entry {entry:?})")]
    TooLarge { entry: String, limit: u64 },
    #[error("archive has more than {limit} entries")]
    TooManyFiles { limit: usize },
    #[error("archive declares {declared} entries, more than the {limit} allowed")]
    TooManyDeclared { declared: u64, limit: usize },
    #[error("archive's central directory is {size} bytes, more than the {limit} allowed")]
    DirectoryTooLarge { size: u64, limit: u64 },
    #[error("file is not a readable zip archive")]
    NotAZip {
        #[source]
        source: zip::result::ZipError,
    },
    /// Truncated data, bad CRC or an unsupported compression method.
    #[error("archive entry {entry:?} cannot be read")]
    Corrupt {
        entry: String,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("could not write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unpacking was interrupted")]
    Interrupted,
}

impl UnpackError {
    /// Only local disk trouble and interruption are worth retrying; every
    /// other error is a property of the archive.
    pub fn is_retryable(&self) -> bool {
        matches!(self, UnpackError::Io { .. } | UnpackError::Interrupted)
    }
}

/// Unpacks `archive` into `dest` (created if missing) on the blocking pool,
/// with a fresh budget from `limits`.
pub async fn unpack_zip(
    archive: &Path,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<UnpackReport, UnpackError> {
    let (archive, dest) = (archive.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut budget = UnpackBudget::new(limits);
        unpack_zip_blocking(&archive, &dest, &mut budget)
    })
    .await
    .map_err(|_| UnpackError::Interrupted)?
}

/// Blocking core of [`unpack_zip`], charging `budget`. On error the
/// destination may hold some files; callers discard it.
pub fn unpack_zip_blocking(
    archive: &Path,
    dest: &Path,
    budget: &mut UnpackBudget,
) -> Result<UnpackReport, UnpackError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| UnpackError::Io { path, source }
    };
    let whole = |source| UnpackError::NotAZip { source };
    let mut file = File::open(archive).map_err(io_err(archive))?;
    check_declared(&mut file, budget).map_err(|e| match e {
        Declared::Io(source) => UnpackError::Io {
            path: archive.to_owned(),
            source,
        },
        Declared::Refused(e) => e,
    })?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file)).map_err(whole)?;
    fs::create_dir_all(dest).map_err(io_err(dest))?;

    let names: Vec<String> = zip
        .file_names_raw()
        .map(|raw| String::from_utf8_lossy(raw).into_owned())
        .collect();
    let mut report = UnpackReport::default();
    for (index, raw_name) in names.into_iter().enumerate() {
        budget.take_entry()?;
        let mut entry = match zip.by_index(index) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::UnsupportedArchive(msg))
                if msg == zip::result::ZipError::PASSWORD_REQUIRED =>
            {
                return Err(UnpackError::Encrypted { entry: raw_name });
            }
            Err(source) => {
                return Err(UnpackError::Corrupt {
                    entry: raw_name,
                    source,
                });
            }
        };
        let rel = safe_relative_path(&raw_name, entry.enclosed_name()).ok_or_else(|| {
            UnpackError::UnsafePath {
                entry: raw_name.clone(),
            }
        })?;
        if entry.is_symlink() {
            report.skipped.push(SkippedEntry {
                name: raw_name,
                kind: SkipKind::Symlink,
            });
            continue;
        }
        if entry.is_dir() {
            if !rel.as_os_str().is_empty() {
                let path = dest.join(&rel);
                fs::create_dir_all(&path).map_err(io_err(&path))?;
            }
            continue;
        }
        if !is_regular(entry.unix_mode()) {
            report.skipped.push(SkippedEntry {
                name: raw_name,
                kind: SkipKind::Special,
            });
            continue;
        }
        if rel.as_os_str().is_empty() {
            return Err(UnpackError::UnsafePath { entry: raw_name });
        }
        // Cheap early refusal on the header's claim; the real bound is below.
        if entry.size() > budget.bytes_left() {
            return Err(UnpackError::TooLarge {
                entry: raw_name,
                limit: budget.limits.max_total_bytes,
            });
        }
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => UnpackError::DuplicateEntry {
                    entry: raw_name.clone(),
                },
                _ => UnpackError::Io {
                    path: path.clone(),
                    source,
                },
            })?;
        let written = copy_bounded(&mut entry, out, budget.bytes_left(), &path, &raw_name)
            .inspect_err(|_| {
                let _ = fs::remove_file(&path);
            })
            .map_err(|e| match e {
                UnpackError::TooLarge { entry, .. } => UnpackError::TooLarge {
                    entry,
                    limit: budget.limits.max_total_bytes,
                },
                other => other,
            })?;
        budget.bytes_used += written;
        report.bytes += written;
        report.files.push(rel);
    }
    tracing::debug!(archive = %archive.display(), files = report.files.len(), bytes = report.bytes, "unpacked");
    Ok(report)
}

enum Declared {
    Io(io::Error),
    Refused(UnpackError),
}

/// Refuses an archive whose end records declare more entries than `budget`
/// has left, or a larger central directory than those entries may take,
/// before the zip crate reads that directory; leaves `file` at its start.
fn check_declared(file: &mut File, budget: &UnpackBudget) -> Result<(), Declared> {
    let declared = eocd::declared(file).map_err(Declared::Io)?;
    let limit = budget.limits.max_files;
    let left = limit.saturating_sub(budget.entries_used) as u64;
    if declared.entries > left {
        return Err(Declared::Refused(UnpackError::TooManyDeclared {
            declared: declared.entries,
            limit,
        }));
    }
    let directory_limit = (limit as u64)
        .saturating_mul(DIRECTORY_BYTES_PER_ENTRY)
        .max(MIN_DIRECTORY_BYTES);
    if declared.directory_bytes > directory_limit {
        return Err(Declared::Refused(UnpackError::DirectoryTooLarge {
            size: declared.directory_bytes,
            limit: directory_limit,
        }));
    }
    file.seek(SeekFrom::Start(0)).map_err(Declared::Io)?;
    Ok(())
}

/// Copies at most `allowed` bytes; one byte more is an error. Read errors
/// (bad CRC, truncated data) mean a corrupt archive.
fn copy_bounded(
    reader: &mut impl Read,
    mut out: File,
    allowed: u64,
    path: &Path,
    entry: &str,
) -> Result<u64, UnpackError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(UnpackError::Corrupt {
                    entry: entry.to_owned(),
                    source: zip::result::ZipError::Io(e),
                });
            }
        };
        written += n as u64;
        if written > allowed {
            return Err(UnpackError::TooLarge {
                entry: entry.to_owned(),
                limit: allowed,
            });
        }
        out.write_all(&buf[..n]).map_err(|source| UnpackError::Io {
            path: path.to_owned(),
            source,
        })?;
    }
    out.sync_all().map_err(|source| UnpackError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(written)
}

/// The entry's path relative to the destination, or `None` when the raw
/// name is absolute, has a Windows drive or UNC prefix, or `enclosed_name`
/// rejects it. The result holds only normal components.
fn safe_relative_path(raw: &str, enclosed: Option<PathBuf>) -> Option<PathBuf> {
    let bytes = raw.as_bytes();
    let absolute = raw.starts_with(['/', '\\'])
        || (bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':');
    if absolute || raw.contains('\0') {
        return None;
    }
    let enclosed = enclosed?;
    enclosed
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(enclosed)
}

/// Regular file, or no Unix mode recorded (DOS/Windows archives).
fn is_regular(mode: Option<u32>) -> bool {
    const S_IFMT: u32 = 0o170000;
    const S_IFREG: u32 = 0o100000;
    match mode {
        None => true,
        Some(m) => m & S_IFMT == 0 || m & S_IFMT == S_IFREG,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_names_are_checked_before_enclosed_name() {
        let ok = |raw: &str, enclosed: &str| safe_relative_path(raw, Some(PathBuf::from(enclosed)));
        assert_eq!(ok("a/b.png", "a/b.png"), Some(PathBuf::from("a/b.png")));
        assert_eq!(ok("/etc/passwd", "etc/passwd"), None);
        assert_eq!(ok("\\evil", "evil"), None);
        assert_eq!(ok("C:evil", "evil"), None);
        assert_eq!(safe_relative_path("../evil", None), None);
    }

    #[test]
    fn only_regular_modes_pass() {
        assert!(is_regular(None));
        assert!(is_regular(Some(0o100644)));
        assert!(!is_regular(Some(0o010644))); // fifo
        assert!(!is_regular(Some(0o020644))); // char device
    }
}
