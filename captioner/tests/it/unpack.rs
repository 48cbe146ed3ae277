//! The guarded zip reader against hostile archives.

use crate::common;

use std::fs;

use common::{tree, write_zip, zip_bytes, zip_bytes_with};
use trainyard_captioner::unpack::{
    SkipKind, UnpackBudget, UnpackLimits, eocd, unpack_zip, unpack_zip_blocking,
};
use trainyard_captioner::{
    LocalInput, PrepareError, PrepareSettings, TemplateCaptioner, UnpackError, prepare_local,
};
use zip::CompressionMethod;

fn limits() -> UnpackLimits {
    UnpackLimits::default()
}

#[tokio::test]
async fn parent_dir_entry_is_refused_and_nothing_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("evil.zip");
    write_zip(
        &archive,
        &[
            ("ok.png", b"fine"),
            ("../evil", b"pwned"),
            ("sub/../../evil2", b"pwned"),
        ],
    );
    let dest = tmp.path().join("dest");
    let err = unpack_zip(&archive, &dest, limits()).await.unwrap_err();
    match &err {
        UnpackError::UnsafePath { entry } => assert_eq!(entry, "../evil"),
        other => panic!("expected UnsafePath, got {other:?}"),
    }
    assert!(err.to_string().contains("../evil"));
    assert!(!err.is_retryable());
    assert_eq!(tree(tmp.path()), ["dest", "dest/ok.png", "evil.zip"]);
}

#[tokio::test]
async fn absolute_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["/tmp/trainyard-abs-evil", "\\windows\\evil", "C:/evil"] {
        let archive = tmp.path().join("abs.zip");
        write_zip(&archive, &[(name, b"pwned")]);
        let dest = tmp.path().join("dest");
        let err = unpack_zip(&archive, &dest, limits()).await.unwrap_err();
        assert!(
            matches!(&err, UnpackError::UnsafePath { entry } if entry == name),
            "{name}: {err:?}"
        );
        assert!(tree(&dest).is_empty(), "{name} wrote {:?}", tree(&dest));
    }
    assert!(!std::path::Path::new("/tmp/trainyard-abs-evil").exists());
}

#[tokio::test]
async fn total_size_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("bomb.zip");
    let zeros = vec![0u8; 3 * 1024 * 1024];
    write_zip(
        &archive,
        &[("a.bin", &zeros[..1024 * 1024]), ("b.bin", &zeros)],
    );
    assert!(
        fs::metadata(&archive).unwrap().len() < 64 * 1024,
        "compresses well"
    );
    let small = UnpackLimits {
        max_total_bytes: 2 * 1024 * 1024,
        ..limits()
    };
    let err = unpack_zip(&archive, &tmp.path().join("dest"), small)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UnpackError::TooLarge { entry, .. } if entry == "b.bin"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

/// A header that under-states the uncompressed size must not let more bytes
/// through than the limit: the reader counts what it writes.
#[tokio::test]
async fn lying_size_header_does_not_bypass_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let zeros = vec![0u8; 1024 * 1024];
    let mut bytes = zip_bytes(&[("liar.bin", &zeros)]);
    // Local header: uncompressed size at offset 22.
    bytes[22..26].copy_from_slice(&10u32.to_le_bytes());
    // Central directory header: uncompressed size at offset 24 from its signature.
    let cd = bytes.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    bytes[cd + 24..cd + 28].copy_from_slice(&10u32.to_le_bytes());
    let archive = tmp.path().join("liar.zip");
    fs::write(&archive, bytes).unwrap();
    let dest = tmp.path().join("dest");
    let small = UnpackLimits {
        max_total_bytes: 64 * 1024,
        ..limits()
    };
    let result = unpack_zip(&archive, &dest, small).await;
    assert!(result.is_err(), "{result:?}");
    let written: u64 = tree(&dest)
        .iter()
        .map(|p| fs::metadata(dest.join(p)).unwrap().len())
        .sum();
    assert!(written <= 64 * 1024, "wrote {written} bytes");
}

#[tokio::test]
async fn file_count_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("many.zip");
    let entries: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}.txt"), b"x".to_vec()))
        .collect();
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_zip(&archive, &refs);
    let few = UnpackLimits {
        max_files: 5,
        ..limits()
    };
    let dest = tmp.path().join("dest");
    let err = unpack_zip(&archive, &dest, few).await.unwrap_err();
    // Refused from the end record's count, before anything is unpacked.
    assert!(
        matches!(
            err,
            UnpackError::TooManyDeclared {
                declared: 6,
                limit: 5
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(!dest.exists());
}

/// An archive declaring millions of entries (only its end records, no
/// entries at all) is refused from those records, before the zip crate
/// would allocate a record per declared entry.
#[tokio::test]
async fn millions_of_declared_entries_are_refused_before_the_directory_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("bomb.zip");
    fs::write(
        &archive,
        eocd::forged_zip64_end(50_000_000, 46 * 50_000_000),
    )
    .unwrap();
    let err = unpack_zip(&archive, &tmp.path().join("dest"), limits())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::TooManyDeclared {
                declared: 50_000_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // A plain end record at its largest count, within the budget's entries
    // but with a central directory far past what they may take.
    fs::write(&archive, eocd::forged_end(1000, u32::MAX)).unwrap();
    let err = unpack_zip(&archive, &tmp.path().join("dest"), limits())
        .await
        .unwrap_err();
    assert!(
        matches!(err, UnpackError::DirectoryTooLarge { .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

/// The count is charged against what a shared budget has left: a nested
/// zip cannot declare past the dataset's remaining entries.
#[tokio::test]
async fn the_declared_count_is_checked_against_the_budget_left() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("three.zip");
    write_zip(
        &archive,
        &[
            ("a.txt", &b"a"[..]),
            ("b.txt", &b"b"[..]),
            ("c.txt", &b"c"[..]),
        ],
    );
    let mut budget = UnpackBudget::new(UnpackLimits {
        max_files: 5,
        ..limits()
    });
    unpack_zip_blocking(&archive, &tmp.path().join("one"), &mut budget).unwrap();
    let err = unpack_zip_blocking(&archive, &tmp.path().join("two"), &mut budget).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooManyDeclared { declared: 3, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn budget_is_shared_across_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.zip");
    write_zip(&archive, &[("a.bin", &[1u8; 600][..])]);
    let mut budget = UnpackBudget::new(UnpackLimits {
        max_total_bytes: 1000,
        ..limits()
    });
    unpack_zip_blocking(&archive, &tmp.path().join("one"), &mut budget).unwrap();
    let err = unpack_zip_blocking(&archive, &tmp.path().join("two"), &mut budget).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err:?}");
}

#[tokio::test]
async fn symlinks_are_skipped_never_created() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    zip.add_symlink("link", "/etc/passwd", options).unwrap();
    zip.start_file("real.txt", options).unwrap();
    zip.write_all(b"hello").unwrap();
    let archive = tmp.path().join("links.zip");
    fs::write(&archive, zip.finish().unwrap().into_inner()).unwrap();
    let dest = tmp.path().join("dest");
    let report = unpack_zip(&archive, &dest, limits()).await.unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].name, "link");
    assert_eq!(report.skipped[0].kind, SkipKind::Symlink);
    assert_eq!(tree(&dest), ["real.txt"]);
    assert_eq!(report.bytes, 5);
}

#[tokio::test]
async fn garbage_is_not_a_zip() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("junk.zip");
    fs::write(&archive, b"definitely not a zip file").unwrap();
    let err = unpack_zip(&archive, &tmp.path().join("dest"), limits())
        .await
        .unwrap_err();
    assert!(matches!(err, UnpackError::NotAZip { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn stored_entries_and_directories_unpack() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ok.zip");
    let bytes = zip_bytes_with(
        &[
            ("top/", b""),
            ("top/a.txt", b"aa"),
            ("top/deep/b.txt", b"bbb"),
        ],
        CompressionMethod::Stored,
    );
    fs::write(&archive, bytes).unwrap();
    let dest = tmp.path().join("dest");
    let report = unpack_zip(&archive, &dest, limits()).await.unwrap();
    assert_eq!(report.bytes, 5);
    assert_eq!(
        tree(&dest),
        ["top", "top/a.txt", "top/deep", "top/deep/b.txt"]
    );
}

/// Through the whole pipeline: the error names the archive and the entry,
/// and the work dir holds nothing outside its scratch space.
#[tokio::test]
async fn prepare_refuses_traversal_with_a_named_error() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("upload.zip");
    write_zip(&archive, &[("../../evil.png", b"x")]);
    let work = tmp.path().join("work");
    let settings = PrepareSettings::default();
    let err = prepare_local(
        LocalInput::Zip(archive),
        &work,
        &settings,
        &TemplateCaptioner::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, PrepareError::Unpack { archive, error: UnpackError::UnsafePath { entry } }
            if archive == "upload.zip" && entry == "../../evil.png"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains("upload.zip") && message.contains("../../evil.png"),
        "{message}"
    );
    assert!(!tmp.path().join("evil.png").exists());
    assert!(
        tree(tmp.path())
            .iter()
            .all(|p| p == "upload.zip" || p.starts_with("work"))
    );
}
