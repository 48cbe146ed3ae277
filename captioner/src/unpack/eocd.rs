//! What a zip declares about its central directory, read from its end
//! before the zip crate sees it: `ZipArchive::new` reads the whole central
//! directory into memory, one record per declared entry, so an archive
//! declaring tens of millions of (empty) entries would exhaust memory
//! before any per-entry limit is checked.
//!
//! Every end-of-central-directory signature in the archive's tail is
//! looked at (a comment may hold a fake one, and a reader might pick
//! either), each with the zip64 record its locator points to; the largest
//! entry count and directory size declared by any of them is what counts.

use std::io::{self, Read, Seek, SeekFrom};

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_EOCD_LEN: usize = 56;
/// The end record and the longest comment it may carry.
const TAIL: u64 = (EOCD_LEN + u16::MAX as usize) as u64;

/// The largest claims of an archive's end records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Declared {
    /// Entries in the central directory.
    pub entries: u64,
    /// Bytes of the central directory.
    pub directory_bytes: u64,
    /// Whether any end record was found at all.
    pub found: bool,
}

fn u16_at(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(
        b[at..at + 4].try_into().expect("4 bytes"),
    ))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the end records of `file` (its tail, and each zip64 record a
/// locator points to: a few kilobytes however large the archive).
pub fn declared<R: Read + Seek>(file: &mut R) -> io::Result<Declared> {
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.by_ref().take(TAIL).read_to_end(&mut tail)?;

    let mut out = Declared::default();
    let Some(last) = tail.len().checked_sub(EOCD_LEN) else {
        return Ok(out);
    };
    for at in (0..=last).rev() {
        if u32_at(&tail, at) != u64::from(EOCD_SIG) {
            continue;
        }
        out.found = true;
        let record = &tail[at..at + EOCD_LEN];
        // Entries on this disk and in total, both counted: a reader may use either.
        let mut entries = u16_at(record, 8).max(u16_at(record, 10));
        let mut directory = u32_at(record, 12);
        // A zip64 locator right before this record points to the zip64 end record.
        let zip64 = match at.checked_sub(ZIP64_LOCATOR_LEN) {
            Some(locator_at) if u32_at(&tail, locator_at) == u64::from(ZIP64_LOCATOR_SIG) => {
                zip64_record(file, u64_at(&tail, locator_at + 8))?
            }
            Some(_) => None,
            None => zip64_before(file, start + at as u64)?,
        };
        if let Some((z_entries, z_directory)) = zip64 {
            // All-ones fields mean "see the zip64 record".
            entries = match entries {
                0xFFFF => z_entries,
                plain => plain.max(z_entries),
            };
            directory = match directory {
                0xFFFF_FFFF => z_directory,
                plain => plain.max(z_directory),
            };
        }
        out.entries = out.entries.max(entries);
        out.directory_bytes = out.directory_bytes.max(directory);
    }
    Ok(out)
}

/// A locator just before `record_offset`, outside the tail read.
fn zip64_before<R: Read + Seek>(
    file: &mut R,
    record_offset: u64,
) -> io::Result<Option<(u64, u64)>> {
    let Some(locator_offset) = record_offset.checked_sub(ZIP64_LOCATOR_LEN as u64) else {
        return Ok(None);
    };
    let mut locator = [0u8; ZIP64_LOCATOR_LEN];
    file.seek(SeekFrom::Start(locator_offset))?;
    file.read_exact(&mut locator)?;
    if u32_at(&locator, 0) != u64::from(ZIP64_LOCATOR_SIG) {
        return Ok(None);
    }
    zip64_record(file, u64_at(&locator, 8))
}

/// The entry count and directory size of the zip64 end record at `offset`,
/// if one is there.
fn zip64_record<R: Read + Seek>(file: &mut R, offset: u64) -> io::Result<Option<(u64, u64)>> {
    let mut record = [0u8; ZIP64_EOCD_LEN];
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return Ok(None);
    }
    match file.read_exact(&mut record) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if u32_at(&record, 0) != u64::from(ZIP64_EOCD_SIG) {
        return Ok(None);
    }
    let entries = u64_at(&record, 24).max(u64_at(&record, 32));
    Ok(Some((entries, u64_at(&record, 40))))
}

/// An end-of-central-directory record declaring `entries` entries in
/// `directory_bytes` bytes, with nothing before it: a zip that claims
/// millions of entries without holding them (for tests).
pub fn forged_end(entries: u16, directory_bytes: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(EOCD_LEN);
    b.extend_from_slice(&EOCD_SIG.to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&entries.to_le_bytes());
    b.extend_from_slice(&entries.to_le_bytes());
    b.extend_from_slice(&directory_bytes.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b
}

/// A zip64 end record, its locator and a plain end record deferring to
/// them, declaring `entries` entries in `directory_bytes` bytes (for tests).
pub fn forged_zip64_end(entries: u64, directory_bytes: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
    b.extend_from_slice(&((ZIP64_EOCD_LEN - 12) as u64).to_le_bytes());
    b.extend_from_slice(&45u16.to_le_bytes());
    b.extend_from_slice(&45u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&entries.to_le_bytes());
    b.extend_from_slice(&entries.to_le_bytes());
    b.extend_from_slice(&directory_bytes.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    // The locator: the zip64 record is at offset 0.
    b.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&forged_end(u16::MAX, u32::MAX));
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn a_plain_end_record_is_read() {
        let d = declared(&mut Cursor::new(forged_end(60_000, 123))).unwrap();
        assert_eq!(
            d,
            Declared {
                entries: 60_000,
                directory_bytes: 123,
                found: true
            }
        );
    }

    #[test]
    fn a_zip64_end_record_is_followed() {
        let d = declared(&mut Cursor::new(forged_zip64_end(50_000_000, 1 << 32))).unwrap();
        assert_eq!(d.entries, 50_000_000);
        assert_eq!(d.directory_bytes, 1 << 32);
        // The plain record's "see zip64" fields are not counts.
        let d = declared(&mut Cursor::new(forged_zip64_end(3, 200))).unwrap();
        assert_eq!((d.entries, d.directory_bytes), (3, 200));
    }

    #[test]
    fn a_fake_record_in_the_comment_counts_too() {
        let forged = forged_end(65_000, 10);
        let mut real = forged_end(1, 10);
        let n = real.len();
        real[n - 2..].copy_from_slice(&(forged.len() as u16).to_le_bytes());
        real.extend_from_slice(&forged);
        let d = declared(&mut Cursor::new(real)).unwrap();
        assert_eq!(d.entries, 65_000);
    }

    #[test]
    fn no_end_record_is_said() {
        let d = declared(&mut Cursor::new(vec![0u8; 100])).unwrap();
        assert!(!d.found);
        assert!(!declared(&mut Cursor::new(Vec::new())).unwrap().found);
    }

    #[test]
    fn a_real_zip_declares_its_entries() {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for i in 0..7 {
            w.start_file(format!("{i}.txt"), zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(b"x").unwrap();
        }
        let bytes = w.finish().unwrap().into_inner();
        let d = declared(&mut Cursor::new(bytes)).unwrap();
        assert_eq!(d.entries, 7);
        assert!(d.directory_bytes > 7 * 46);
    }
}
