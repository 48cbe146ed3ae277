//! The bundled sample dataset: deterministic, and prepares cleanly.

use crate::common;

use common::{tree, within};
use trainyard_captioner::sample::{
    SAMPLE_IMAGE_COUNT, SAMPLE_SIZE, SAMPLE_TRIGGER_WORD, write_sample_dataset, write_sample_zip,
};
use trainyard_captioner::{
    CaptionSource, LocalInput, PrepareSettings, TemplateCaptioner, prepare_local,
};

#[test]
fn sample_dataset_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let one = write_sample_dataset(&tmp.path().join("one")).unwrap();
    let two = write_sample_dataset(&tmp.path().join("two")).unwrap();
    assert_eq!(one.len(), SAMPLE_IMAGE_COUNT + SAMPLE_IMAGE_COUNT / 2);
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.file_name(), b.file_name());
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{}",
            a.display()
        );
    }
    let pngs: Vec<_> = one
        .iter()
        .filter(|p| p.extension().unwrap() == "png")
        .collect();
    assert_eq!(pngs.len(), SAMPLE_IMAGE_COUNT);
    // Distinct images, all 64x64.
    let mut hashes = std::collections::HashSet::new();
    for png in pngs {
        let bytes = std::fs::read(png).unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (SAMPLE_SIZE, SAMPLE_SIZE));
        assert!(hashes.insert(bytes));
    }

    write_sample_zip(&tmp.path().join("a.zip")).unwrap();
    write_sample_zip(&tmp.path().join("b.zip")).unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("a.zip")).unwrap(),
        std::fs::read(tmp.path().join("b.zip")).unwrap()
    );
}

#[tokio::test]
async fn sample_zip_and_folder_prepare_cleanly() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("sample.zip");
        write_sample_zip(&archive).unwrap();
        let settings = PrepareSettings {
            trigger_word: SAMPLE_TRIGGER_WORD.into(),
            ..PrepareSettings::default()
        };
        let captioner = TemplateCaptioner::default();
        let from_zip = prepare_local(
            LocalInput::Zip(archive),
            &tmp.path().join("w1"),
            &settings,
            &captioner,
        )
        .await
        .unwrap();
        let m = &from_zip.manifest;
        assert_eq!(m.images.len(), SAMPLE_IMAGE_COUNT);
        assert!(
            m.dropped.is_empty(),
            "junk is dropped silently: {:?}",
            m.dropped
        );
        let sidecars = m
            .images
            .iter()
            .filter(|e| e.caption_source == CaptionSource::Sidecar)
            .count();
        assert_eq!(sidecars, SAMPLE_IMAGE_COUNT / 2);
        for entry in &m.images {
            assert!(entry.caption.contains(SAMPLE_TRIGGER_WORD), "{entry:?}");
            assert!(!entry.caption.contains("[trigger]") && !entry.caption.contains('\n'));
            assert_eq!((entry.width, entry.height), (SAMPLE_SIZE, SAMPLE_SIZE));
        }
        let by_file = |f: &str| {
            m.images
                .iter()
                .find(|e| e.file == f)
                .unwrap()
                .caption
                .clone()
        };
        assert_eq!(
            by_file("tyzx_01.png"),
            "tyzx, an orange emblem centred on a navy background"
        );
        assert_eq!(
            by_file("tyzx_03.png"),
            "a small tyzx emblem on a pale grey background"
        );
        assert_eq!(
            by_file("tyzx_05.png"),
            "tyzx, a tiny orange coin with a white zigzag, on purple"
        );
        assert_eq!(by_file("tyzx_02.png"), "a photo of tyzx");
        assert_eq!(tree(&from_zip.dir).len(), 2 * SAMPLE_IMAGE_COUNT + 1);

        // The same dataset as a folder gives the same manifest.
        let dir = tmp.path().join("folder");
        write_sample_dataset(&dir).unwrap();
        let from_dir = prepare_local(
            LocalInput::Dir(dir),
            &tmp.path().join("w2"),
            &settings,
            &captioner,
        )
        .await
        .unwrap();
        assert_eq!(from_dir.manifest, from_zip.manifest);
    })
    .await
}
