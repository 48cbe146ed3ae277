//! Video clips through `prepare_local`: generated with ffmpeg's test
//! source, probed by the real `ffprobe`, kept byte for byte or dropped by
//! name.

use crate::common::{self, clip, dropped, settings, within};

use trainyard_captioner::manifest::sha256_file;
use trainyard_captioner::preflight as check;
use trainyard_captioner::{
    CaptionSource, DropReason, LocalInput, MediaKind, PrepareError, TemplateCaptioner,
    prepare_local,
};
use trainyard_proto::v1::{ExtraValue, JobSpec, ModelRef, TrainingSettings, extra_value};

#[tokio::test]
async fn clips_beside_images_are_probed_and_captioned() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(data.join("more")).unwrap();
        clip(&data.join("walk.mp4"), "64x48", 16, 1.0);
        clip(&data.join("more/Spin.WEBM"), "48x64", 8, 1.0);
        clip(&data.join("turn.mov"), "32x32", 10, 1.0);
        std::fs::write(data.join("more/Spin.txt"), "a spinning top\n").unwrap();
        std::fs::write(data.join("still.png"), common::png(64, 64, [9, 9, 9])).unwrap();
        let prepared = prepare_local(
            LocalInput::Dir(data.clone()),
            &tmp.path().join("work"),
            &settings("tyzx"),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        let m = &prepared.manifest;
        assert!(m.dropped.is_empty(), "{:?}", m.dropped);
        let by_file = |name: &str| m.images.iter().find(|e| e.file == name).unwrap();
        let walk = by_file("walk.mp4");
        assert_eq!(walk.media, MediaKind::Video);
        assert_eq!((walk.width, walk.height), (64, 48));
        let facts = walk.video.as_ref().unwrap();
        assert_eq!(
            (
                facts.frames,
                facts.fps_milli,
                facts.duration_ms,
                facts.codec.as_str()
            ),
            (16, 16_000, 1000, "h264")
        );
        let spin = by_file("Spin.webm");
        assert_eq!(spin.video.as_ref().unwrap().codec, "vp9");
        assert_eq!(spin.video.as_ref().unwrap().frames, 8);
        assert_eq!(spin.caption, "tyzx, a spinning top");
        assert_eq!(spin.caption_source, CaptionSource::Sidecar);
        assert_eq!(by_file("turn.mov").media, MediaKind::Video);
        let still = by_file("still.png");
        assert_eq!((still.media, still.video.clone()), (MediaKind::Image, None));
        assert_eq!(m.videos().count(), 3);
        // Copied byte for byte: the manifest's hash is of the user's clip.
        let (original, _) = sha256_file(&data.join("walk.mp4")).await.unwrap();
        assert_eq!(walk.sha256, original);
        let (copied, _) = sha256_file(&prepared.dir.join("walk.mp4")).await.unwrap();
        assert_eq!(copied, original);
        assert_eq!(
            std::fs::read_to_string(prepared.dir.join("walk.txt")).unwrap(),
            "a photo of tyzx"
        );
    })
    .await
}

#[tokio::test]
async fn corrupt_and_over_limit_clips_are_dropped_by_name() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        clip(&data.join("good.mp4"), "64x48", 16, 1.0);
        clip(&data.join("long.mp4"), "64x48", 16, 2.0);
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(data.join("corrupt.mp4"), noise).unwrap();
        std::fs::write(data.join("corrupt.txt"), "never used").unwrap();
        damaged(&data.join("damaged.mp4"));
        let mut settings = settings("");
        settings.video.limits.max_seconds = 1.5;
        let prepared = prepare_local(
            LocalInput::Dir(data.clone()),
            &tmp.path().join("work"),
            &settings,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        let files: Vec<&str> = prepared
            .manifest
            .images
            .iter()
            .map(|e| e.file.as_str())
            .collect();
        assert_eq!(files, ["good.mp4"]);
        assert_eq!(
            dropped(&prepared),
            [
                ("corrupt.mp4".to_owned(), DropReason::Undecodable),
                ("damaged.mp4".to_owned(), DropReason::Undecodable),
                ("long.mp4".to_owned(), DropReason::OverLimit),
            ]
        );
        let detail = |i: usize| prepared.manifest.dropped[i].detail.clone().unwrap();
        assert!(
            detail(1).starts_with("ffmpeg cannot decode it: "),
            "{}",
            detail(1)
        );
        assert!(!detail(1).contains(" @ 0x"), "{}", detail(1));
        assert!(detail(2).contains("max_clip_seconds"), "{}", detail(2));

        // The header alone passes: it is the decode that catches it.
        settings.video.decode_within = None;
        let trusting = prepare_local(
            LocalInput::Dir(data),
            &tmp.path().join("work2"),
            &settings,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert!(
            trusting
                .manifest
                .images
                .iter()
                .any(|e| e.file == "damaged.mp4"),
            "{:?}",
            trusting.manifest.dropped
        );
    })
    .await
}

/// A clip whose container is sound and whose picture data is not: made by
/// ffmpeg, then the `mdat` box's payload past its first bytes overwritten.
fn damaged(path: &std::path::Path) {
    clip(path, "64x48", 16, 1.0);
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.windows(4).position(|w| w == b"mdat").unwrap();
    let size = u32::from_be_bytes(bytes[at - 4..at].try_into().unwrap()) as usize;
    let end = at - 4 + size;
    for (i, b) in bytes[at + 64..end].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1];
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_dataset_of_bad_clips_fails_naming_each() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("random.mp4"), [7u8; 2048]).unwrap();
        std::fs::write(data.join("notes.webm"), "this is text").unwrap();
        let err = prepare_local(
            LocalInput::Dir(data),
            &tmp.path().join("work"),
            &settings(""),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        match &err {
            PrepareError::NoUsableImages { bad } => assert_eq!(bad, &["notes.webm", "random.mp4"]),
            other => panic!("expected NoUsableImages, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("random.mp4") && message.contains("notes.webm"),
            "{message}"
        );
    })
    .await
}

#[tokio::test]
async fn a_missing_or_hanging_ffprobe_is_named() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        clip(&data.join("a.mp4"), "64x48", 16, 1.0);
        let mut missing = settings("");
        missing.video.ffprobe = tmp.path().join("no-such-ffprobe");
        let err = prepare_local(
            LocalInput::Dir(data.clone()),
            &tmp.path().join("work"),
            &missing,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PrepareError::NoProbe { .. }), "{err:?}");
        assert!(!err.is_retryable());

        // A probe that never answers is killed at the timeout and the clip
        // counted unreadable.
        let hang = tmp.path().join("hang.sh");
        std::fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").unwrap();
        let mut perms = std::fs::metadata(&hang).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&hang, perms).unwrap();
        let mut hanging = settings("");
        hanging.video.ffprobe = hang;
        hanging.video.timeout = std::time::Duration::from_millis(300);
        let err = prepare_local(
            LocalInput::Dir(data),
            &tmp.path().join("work"),
            &hanging,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, PrepareError::NoUsableImages { bad } if bad == &["a.mp4"]),
            "{err:?}"
        );
    })
    .await
}

fn video_spec(backend: &str, family: &str, extra: Option<(&str, extra_value::Kind)>) -> JobSpec {
    let mut training = TrainingSettings {
        backend: backend.into(),
        steps: 10,
        resolution: 32,
        repeats: 1,
        batch_size: 1,
        ..Default::default()
    };
    if let Some((key, kind)) = extra {
        training
            .extras
            .insert(key.into(), ExtraValue { kind: Some(kind) });
    }
    JobSpec {
        training: Some(training),
        base_model: Some(ModelRef {
            uri: "hf://some/model".into(),
            family: family.into(),
        }),
        ..Default::default()
    }
}

/// Clips against the trainer: an image-only backend or family is a problem
/// naming the clips; Wan takes them with diffusion-pipe, ai-toolkit and
/// SimpleTuner, whose derived frame counts fit every clip; a frame count
/// (bucket, `num_frames`) longer than a clip names the clip.
#[tokio::test]
async fn preflight_holds_clips_to_the_trainers_needs() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        clip(&data.join("short.mp4"), "64x48", 16, 1.0);
        clip(&data.join("long.mp4"), "64x48", 16, 2.5);
        let prepared = prepare_local(
            LocalInput::Dir(data),
            &tmp.path().join("work"),
            &settings(""),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        let problems = |spec: &JobSpec| {
            let report = check::video::check(spec, &prepared.manifest);
            report
                .problems
                .iter()
                .map(|p| (p.check.clone(), p.message.clone()))
                .collect::<Vec<_>>()
        };
        for (backend, family) in [
            ("kohya", "sdxl"),
            ("reference", "reference"),
            ("diffusion-pipe", "flux"),
            ("ai-toolkit", "flux"),
            ("simpletuner", "qwen_image"),
        ] {
            let found = problems(&video_spec(backend, family, None));
            assert_eq!(found.len(), 1, "{backend}: {found:?}");
            assert_eq!(found[0].0, "dataset.videos");
            assert!(found[0].1.contains("long.mp4, short.mp4"), "{}", found[0].1);
            assert!(found[0].1.contains("images only"), "{}", found[0].1);
            assert!(
                found[0]
                    .1
                    .contains("with diffusion-pipe, simpletuner, ai-toolkit"),
                "{}",
                found[0].1
            );
        }
        use extra_value::Kind::{Int, Text};
        for backend in ["diffusion-pipe", "ai-toolkit", "simpletuner"] {
            assert!(problems(&video_spec(backend, "wan", None)).is_empty());
        }
        assert!(
            problems(&video_spec(
                "diffusion-pipe",
                "wan",
                Some(("frame_buckets", Text("1, 13".into())))
            ))
            .is_empty()
        );
        assert!(
            problems(&video_spec(
                "ai-toolkit",
                "wan",
                Some(("num_frames", Int(16)))
            ))
            .is_empty()
        );
        // SimpleTuner rounds 23 down to 17 for Wan: still longer than 16.
        for (backend, key, kind, needs) in [
            (
                "diffusion-pipe",
                "frame_buckets",
                Text("1, 33".into()),
                "the smallest video frame bucket (33 frames)",
            ),
            (
                "ai-toolkit",
                "num_frames",
                Int(21),
                "num_frames (21 frames)",
            ),
            ("simpletuner", "num_frames", Int(23), "(17 frames)"),
        ] {
            let found = problems(&video_spec(backend, "wan", Some((key, kind))));
            assert_eq!(found.len(), 1, "{backend}: {found:?}");
            assert_eq!(found[0].0, "dataset.clip_frames");
            let message = &found[0].1;
            assert!(message.contains("short.mp4 (16 frames)"), "{message}");
            assert!(message.contains(needs), "{message}");
            assert!(
                message.contains(&format!("training.extras.{key}")),
                "{message}"
            );
            assert!(!message.contains("long.mp4"), "{message}");
        }
    })
    .await
}

/// An animated gif is a clip (converted to mp4) only for a job that trains
/// on video; a one-frame gif, and every gif otherwise, is a still.
#[tokio::test]
async fn an_animated_gif_is_a_clip_only_for_video_training() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        clip(&data.join("anim.gif"), "33x21", 8, 1.0);
        std::fs::write(
            data.join("still.gif"),
            common::encode(24, 24, [1, 2, 3], image::ImageFormat::Gif),
        )
        .unwrap();
        std::fs::write(data.join("anim.txt"), "a moving pattern").unwrap();
        let media = |prepared: &trainyard_captioner::PreparedDataset| {
            prepared
                .manifest
                .images
                .iter()
                .map(|e| (e.file.clone(), e.media, e.video.as_ref().map(|v| v.frames)))
                .collect::<Vec<_>>()
        };
        let stills = prepare_local(
            LocalInput::Dir(data.clone()),
            &tmp.path().join("work-a"),
            &settings(""),
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            media(&stills),
            [
                ("anim.png".to_owned(), MediaKind::Image, None),
                ("still.png".to_owned(), MediaKind::Image, None),
            ]
        );
        let mut video = settings("");
        video.video.gif_as_video = true;
        let clips = prepare_local(
            LocalInput::Dir(data),
            &tmp.path().join("work-b"),
            &video,
            &TemplateCaptioner::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            media(&clips),
            [
                ("anim.mp4".to_owned(), MediaKind::Video, Some(8)),
                ("still.png".to_owned(), MediaKind::Image, None),
            ]
        );
        let anim = &clips.manifest.images[0];
        assert_eq!(anim.caption, "a moving pattern");
        assert_eq!(anim.video.as_ref().unwrap().codec, "h264");
        // Even sides for H.264.
        assert_eq!((anim.width, anim.height), (32, 20));
        assert!(clips.dir.join("anim.mp4").is_file());
    })
    .await
}
