//! `prepare_local` end to end on real files: normalisation, validation,
//! the manifest.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{
    captions, dropped, encode, jpeg, png, settings, tree, truncated_png, within, write_zip,
    zip_bytes,
};
use image::ImageFormat;
use sha2::{Digest, Sha256};
use trainyard_captioner::manifest::sha256_file;
use trainyard_captioner::{
    CaptionSource, DatasetManifest, DropReason, LocalInput, PrepareError, PrepareSettings,
    TemplateCaptioner, UnpackLimits, prepare_local,
};
/// A messy Finder-style upload: wrapper folder, junk, sub-folder with a
/// name collision, a nested zip inside its own wrapper folder, an orphan
/// caption and a stray non-image.
fn messy_zip(path: &Path) {
    let inner = zip_bytes(&[
        ("wrap/", b""),
        ("wrap/f.png", &png(16, 16, [9, 9, 9])),
        ("wrap/f.txt", b"a nested [trigger]"),
    ]);
    write_zip(
        path,
        &[
            ("top/", b""),
            ("top/a.png", &png(16, 16, [200, 0, 0])),
            ("top/a.txt", b"[trigger] on a table"),
            ("top/b.png", &png(16, 12, [0, 200, 0])),
            ("top/b.txt", b"tyzx, a green square"),
            ("top/c.PNG", &png(12, 16, [0, 0, 200])),
            ("top/c.txt", b"a blue square\r\n\nwith lines  "),
            ("top/d_photo-1.png", &png(20, 20, [1, 2, 3])),
            ("top/sub/a.png", &png(10, 10, [5, 5, 5])),
            ("top/sub/e.jpg", &jpeg(24, 24, [50, 60, 70])),
            ("top/sub/.hidden.png", &png(16, 16, [0, 0, 0])),
            ("top/.DS_Store", b"junk"),
            ("top/Thumbs.db", b"junk"),
            ("top/notes.md", b"# readme"),
            ("top/orphan.txt", b"no image for me"),
            ("top/inner.zip", &inner),
            ("__MACOSX/", b""),
            ("__MACOSX/top/._a.png", b"appledouble"),
        ],
    );
}

#[tokio::test]
async fn messy_zip_is_normalised_and_captioned() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("upload.zip");
        messy_zip(&archive);
        let s = PrepareSettings {
            template: "{stem}".to_owned(),
            ..settings("tyzx")
        };
        let prepared = prepare_local(
            LocalInput::Zip(archive),
            &tmp.path().join("work"),
            &s,
            &s.template_captioner(),
        )
        .await
        .unwrap();

        let sidecar = CaptionSource::Sidecar;
        let template = CaptionSource::Backend("template".into());
        let expected: BTreeMap<String, (String, CaptionSource)> = [
            ("a.png", "tyzx on a table", &sidecar),
            ("a_2.png", "tyzx, a", &template),
            ("b.png", "tyzx, a green square", &sidecar),
            ("c.png", "tyzx, a blue square with lines", &sidecar),
            ("d_photo-1.png", "tyzx, d photo 1", &template),
            ("e.jpg", "tyzx, e", &template),
            ("f.png", "a nested tyzx", &sidecar),
        ]
        .into_iter()
        .map(|(f, c, s)| (f.to_owned(), (c.to_owned(), s.clone())))
        .collect();
        assert_eq!(captions(&prepared), expected);

        assert_eq!(
            dropped(&prepared),
            [
                ("notes.md".to_owned(), DropReason::UnsupportedType),
                ("orphan.txt".to_owned(), DropReason::OrphanCaption),
            ]
        );
        let mut files: Vec<String> = expected
            .keys()
            .flat_map(|f| [f.clone(), f.rsplit_once('.').unwrap().0.to_owned() + ".txt"])
            .collect();
        files.push("manifest.json".into());
        files.sort();
        assert_eq!(tree(&prepared.dir), files);
        // Caption files hold exactly the manifest's captions, on one line.
        for entry in &prepared.manifest.images {
            let text = std::fs::read_to_string(prepared.dir.join(&entry.caption_file)).unwrap();
            assert_eq!(text, entry.caption);
        }
        // The manifest is listed last, and scratch space is gone.
        assert!(prepared.files().last().unwrap().ends_with("manifest.json"));
        assert_eq!(prepared.files().len(), 2 * 7 + 1);
        assert!(!tmp.path().join("work/scratch").exists());
    })
    .await
}

#[tokio::test]
async fn only_broken_images_fail_naming_each() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("broken.zip");
        write_zip(
            &archive,
            &[
                ("set/", b""),
                ("set/truncated.png", &truncated_png()),
                ("set/text.jpg", b"this is not a jpeg"),
                ("set/deep/tiny.png", &png(4, 40, [0, 0, 0])),
                ("set/readme.txt", b"hello"),
            ],
        );
        let err = prepare_local(
            LocalInput::Zip(archive),
            &tmp.path().join("work"),
            &settings("t"),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        match &err {
            PrepareError::NoUsableImages { bad } => {
                assert_eq!(bad, &["deep/tiny.png", "text.jpg", "truncated.png"]);
            }
            other => panic!("expected NoUsableImages, got {other:?}"),
        }
        assert!(!err.is_retryable());
        let message = err.to_string();
        for name in ["deep/tiny.png", "text.jpg", "truncated.png"] {
            assert!(message.contains(name), "{message}");
        }
    })
    .await
}

#[tokio::test]
async fn an_empty_dataset_has_no_usable_images() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("empty");
        std::fs::create_dir_all(dir.join("__MACOSX")).unwrap();
        std::fs::write(dir.join("notes.md"), "nothing").unwrap();
        let err = prepare_local(
            LocalInput::Dir(dir),
            &tmp.path().join("work"),
            &settings(""),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, PrepareError::NoUsableImages { bad } if bad.is_empty()),
            "{err:?}"
        );
    })
    .await
}

#[tokio::test]
async fn mixed_images_keep_the_good_and_list_the_bad() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("good.png"), png(16, 16, [1, 2, 3])).unwrap();
        std::fs::write(
            dir.join("good2.webp"),
            encode(9, 9, [4, 5, 6], ImageFormat::WebP),
        )
        .unwrap();
        std::fs::write(
            dir.join("old.BMP"),
            encode(10, 8, [7, 8, 9], ImageFormat::Bmp),
        )
        .unwrap();
        std::fs::write(
            dir.join("anim.gif"),
            encode(12, 12, [9, 9, 9], ImageFormat::Gif),
        )
        .unwrap();
        std::fs::write(dir.join("bad.png"), truncated_png()).unwrap();
        std::fs::write(dir.join("bad.txt"), "caption of a bad image").unwrap();
        std::fs::write(dir.join("tiny.jpg"), jpeg(7, 7, [0, 0, 0])).unwrap();
        let p = prepare_local(
            LocalInput::Dir(dir),
            &tmp.path().join("work"),
            &settings("tyzx"),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        let files: Vec<&str> = p.manifest.images.iter().map(|e| e.file.as_str()).collect();
        // bmp and gif are re-encoded to PNG; the rest are copied as is.
        assert_eq!(files, ["anim.png", "good.png", "good2.webp", "old.png"]);
        assert_eq!(
            dropped(&p),
            [
                ("bad.png".to_owned(), DropReason::Undecodable),
                ("tiny.jpg".to_owned(), DropReason::TooSmall)
            ]
        );
        let old = p
            .manifest
            .images
            .iter()
            .find(|e| e.file == "old.png")
            .unwrap();
        assert_eq!((old.width, old.height), (10, 8));
        let bytes = std::fs::read(p.dir.join("old.png")).unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), ImageFormat::Png);
    })
    .await
}

#[tokio::test]
async fn manifest_sizes_and_hashes_match_the_files() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("upload.zip");
        messy_zip(&archive);
        let p = prepare_local(
            LocalInput::Zip(archive),
            &tmp.path().join("work"),
            &settings("tyzx"),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert_eq!(p.manifest.version, 1);
        for entry in &p.manifest.images {
            let bytes = std::fs::read(p.dir.join(&entry.file)).unwrap();
            assert_eq!(entry.size, bytes.len() as u64, "{}", entry.file);
            assert_eq!(
                entry.sha256,
                hex::encode(Sha256::digest(&bytes)),
                "{}",
                entry.file
            );
            assert_eq!(
                sha256_file(&p.dir.join(&entry.file)).await.unwrap(),
                (entry.sha256.clone(), entry.size)
            );
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!(
                (decoded.width(), decoded.height()),
                (entry.width, entry.height)
            );
        }
        // Copied byte for byte: a.png is the zip's top/a.png.
        assert_eq!(
            std::fs::read(p.dir.join("a.png")).unwrap(),
            png(16, 16, [200, 0, 0])
        );
        let on_disk = DatasetManifest::read_from_file(&p.manifest_path())
            .await
            .unwrap();
        assert_eq!(on_disk, p.manifest);
    })
    .await
}

#[tokio::test]
async fn nested_zips_beyond_the_depth_limit_are_dropped() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("upload.zip");
        messy_zip(&archive);
        let s = PrepareSettings {
            limits: UnpackLimits {
                max_nested_depth: 0,
                ..UnpackLimits::default()
            },
            ..settings("tyzx")
        };
        let p = prepare_local(
            LocalInput::Zip(archive.clone()),
            &tmp.path().join("work"),
            &s,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert!(dropped(&p).contains(&("inner.zip".to_owned(), DropReason::NestedTooDeep)));
        assert!(!captions(&p).contains_key("f.png"));

        // Running again in the same work dir starts clean.
        let again = prepare_local(
            LocalInput::Zip(archive),
            &tmp.path().join("work"),
            &s,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert_eq!(again.manifest, p.manifest);
    })
    .await
}

#[tokio::test]
async fn min_images_and_missing_input_are_fatal() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let one = tmp.path().join("one.png");
        std::fs::write(&one, png(16, 16, [1, 1, 1])).unwrap();
        let s = PrepareSettings {
            min_images: 2,
            ..settings("")
        };
        let err = prepare_local(
            LocalInput::Files(vec![one]),
            &tmp.path().join("w"),
            &s,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                PrepareError::TooFewImages {
                    found: 1,
                    required: 2
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());

        let missing = tmp.path().join("nope.zip");
        let err = prepare_local(
            LocalInput::Zip(missing),
            &tmp.path().join("w"),
            &s,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PrepareError::InputNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.zip"));

        let bad = PrepareSettings {
            caption_concurrency: 0,
            ..settings("")
        };
        let err = prepare_local(
            LocalInput::Dir(tmp.path().into()),
            &tmp.path().join("w"),
            &bad,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                PrepareError::InvalidSettings {
                    field: "caption_concurrency",
                    ..
                }
            ),
            "{err:?}"
        );
    })
    .await
}

#[test]
fn prepare_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let settings = PrepareSettings::default();
    let captioner = TemplateCaptioner::default();
    let fut = prepare_local(
        LocalInput::Dir("x".into()),
        Path::new("w"),
        &settings,
        &captioner,
    );
    assert_send(&fut);
}

#[tokio::test]
async fn nested_archives_broken_or_hostile() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let good = png(16, 16, [3, 3, 3]);
        let broken = tmp.path().join("broken.zip");
        write_zip(&broken, &[("a.png", &good), ("inner.zip", b"PK\x03\x04 not really")]);
        let p = prepare_local(LocalInput::Zip(broken), &tmp.path().join("w1"), &settings(""), &TemplateCaptioner::default())
            .await
            .unwrap();
        assert_eq!(dropped(&p), [("inner.zip".to_owned(), DropReason::BadArchive)]);

        let evil_inner = zip_bytes(&[("../../../escape.png", &good)]);
        let hostile = tmp.path().join("hostile.zip");
        write_zip(&hostile, &[("set/a.png", &good), ("set/more/inner.zip", &evil_inner)]);
        let err = prepare_local(LocalInput::Zip(hostile), &tmp.path().join("w2"), &settings(""), &TemplateCaptioner::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PrepareError::Unpack { archive, error: trainyard_captioner::UnpackError::UnsafePath { entry } }
                if archive == "more/inner.zip" && entry == "../../../escape.png"),
            "{err:?}"
        );
        assert!(!tmp.path().join("escape.png").exists());
        assert!(!tmp.path().join("w2/escape.png").exists());
    })
    .await
}

#[tokio::test]
async fn very_deep_folders_are_dropped() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let good = png(16, 16, [3, 3, 3]);
        let deep: String = (0..40).map(|i| format!("d{i}/")).collect::<String>() + "deep.png";
        let archive = tmp.path().join("deep.zip");
        write_zip(
            &archive,
            &[("a.png", &good), ("d0/ok.png", &good), (&deep, &good)],
        );
        let p = prepare_local(
            LocalInput::Zip(archive),
            &tmp.path().join("w"),
            &settings(""),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        let files: Vec<&str> = p.manifest.images.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(files, ["a.png", "ok.png"]);
        assert_eq!(p.manifest.dropped.len(), 1);
        assert_eq!(p.manifest.dropped[0].reason, DropReason::NestedTooDeep);
    })
    .await
}
