//! Preflight on real prepared datasets: each failing check reports its own
//! problem naming the files, a passing dataset gets the step estimate, and
//! the access checks find missing models and unwritable destinations.

use crate::common;

use std::path::Path;

use common::{png, settings, within};
use trainyard_captioner::preflight::{AccessChecks, Report, check, images};
use trainyard_captioner::{
    LocalInput, PrepareSettings, PreparedDataset, TemplateCaptioner, prepare_local,
};
use trainyard_core::destination::Destinations;
use trainyard_core::store::ArtifactStore;
use trainyard_models::hub::HubClient;
use trainyard_proto::v1::{
    CaptionSettings, Destination, ErrorKind, JobSpec, ModelRef, TrainingSettings,
};

fn spec(trigger: &str, resolution: u32, repeats: u32, batch_size: u32, steps: u32) -> JobSpec {
    JobSpec {
        caption: Some(CaptionSettings {
            trigger_word: trigger.into(),
            ..Default::default()
        }),
        training: Some(TrainingSettings {
            backend: "reference".into(),
            steps,
            resolution,
            repeats,
            batch_size,
            ..Default::default()
        }),
        base_model: Some(ModelRef {
            uri: "reference-denoiser-v1".into(),
            family: "reference".into(),
        }),
        ..Default::default()
    }
}

/// Prepares `files` (name, width, height, optional sidecar) like the stage does.
async fn prepared(
    root: &Path,
    files: &[(&str, u32, u32, Option<&str>)],
    s: PrepareSettings,
    template: &str,
) -> PreparedDataset {
    let input = root.join("in");
    std::fs::create_dir_all(&input).unwrap();
    for (i, (name, w, h, sidecar)) in files.iter().enumerate() {
        std::fs::write(input.join(name), png(*w, *h, [i as u8 * 40, 90, 200])).unwrap();
        if let Some(text) = sidecar {
            let stem = name.rsplit_once('.').unwrap().0;
            std::fs::write(input.join(format!("{stem}.txt")), text).unwrap();
        }
    }
    prepare_local(
        LocalInput::Dir(input),
        &root.join("work"),
        &s,
        &TemplateCaptioner::new(template),
    )
    .await
    .unwrap()
}

fn checks(report: &Report) -> Vec<&str> {
    report.problems.iter().map(|p| p.check.as_str()).collect()
}

fn message<'a>(report: &'a Report, name: &str) -> &'a str {
    &report
        .problems
        .iter()
        .find(|p| p.check == name)
        .unwrap_or_else(|| panic!("no {name} problem in {report:#?}"))
        .message
}

#[tokio::test]
async fn a_passing_dataset_gets_the_step_estimate() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let files = [
            ("a.png", 64, 64, Some("a coin")),
            ("b.png", 64, 80, None),
            ("c.png", 96, 64, None),
        ];
        let ds = prepared(tmp.path(), &files, settings("tyzx"), "a photo of {trigger}").await;
        let report = images::check(&spec("tyzx", 32, 10, 4, 20), &ds).await;
        assert!(report.passed(), "{report:#?}");
        let e = report.estimate.clone().expect("estimate");
        assert_eq!(
            (
                e.images,
                e.repeats,
                e.batch_size,
                e.steps_per_epoch,
                e.total_steps
            ),
            (3, 10, 4, 8, 20),
            "ceil(3 × 10 ÷ 4) = 8 steps per epoch"
        );
        assert!((e.epochs - 2.5).abs() < 1e-9, "{}", e.epochs);
        // The same from the folder alone.
        let again = images::check_dir(&spec("tyzx", 32, 10, 4, 20), &ds.dir).await;
        assert_eq!(again, report);
    })
    .await
}

#[tokio::test]
async fn images_smaller_than_the_resolution_are_named() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let files = [("big.png", 256, 200, None), ("small.png", 300, 100, None)];
        let ds = prepared(tmp.path(), &files, settings(""), "a photo").await;
        let report = images::check(&spec("", 128, 1, 1, 10), &ds).await;
        assert_eq!(checks(&report), [check::RESOLUTION]);
        let text = message(&report, check::RESOLUTION);
        assert!(
            text.starts_with("1 image is smaller than training.resolution 128"),
            "{text}"
        );
        assert!(text.contains("small.png (300×100)"), "{text}");
        assert!(!text.contains("big.png"), "{text}");
        assert_eq!(report.problems[0].kind, ErrorKind::BadDataset);
    })
    .await
}

#[tokio::test]
async fn images_without_a_caption_are_named() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        // A template that renders nothing without a trigger word.
        let files = [
            ("a.png", 64, 64, Some("a red coin")),
            ("b.png", 64, 64, None),
            ("c.png", 64, 64, None),
        ];
        let ds = prepared(tmp.path(), &files, settings(""), "{trigger}").await;
        let report = images::check(&spec("", 32, 1, 1, 10), &ds).await;
        assert_eq!(checks(&report), [check::CAPTIONS]);
        let text = message(&report, check::CAPTIONS);
        assert!(
            text.starts_with("2 images have no caption or an empty one: b.png, c.png;"),
            "{text}"
        );
        assert!(text.contains("diffusion-pipe skips"), "{text}");
    })
    .await
}

#[tokio::test]
async fn captions_without_the_trigger_word_are_named() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let files = [
            ("a.png", 64, 64, Some("tyzx, a coin")),
            ("b.png", 64, 64, None),
        ];
        let ds = prepared(tmp.path(), &files, settings("tyzx"), "a photo of {trigger}").await;
        // The captions were written for another trigger word.
        std::fs::write(ds.dir.join("b.txt"), "ohwx, a photo").unwrap();
        let report = images::check(&spec("tyzx", 32, 1, 1, 10), &ds).await;
        assert_eq!(checks(&report), [check::TRIGGER_WORD]);
        let text = message(&report, check::TRIGGER_WORD);
        assert_eq!(
            text,
            "1 caption lacks the trigger word \"tyzx\": b.png (\"ohwx, a photo\")"
        );

        // A trigger word with a double space: the template's caption is one
        // line with single spaces, so it no longer holds the trigger word.
        let tmp = tempfile::tempdir().unwrap();
        let ds = prepared(
            tmp.path(),
            &files,
            settings("tyzx  coin"),
            "a photo of {trigger}",
        )
        .await;
        let report = images::check(&spec("tyzx  coin", 32, 1, 1, 10), &ds).await;
        let text = message(&report, check::TRIGGER_WORD);
        assert!(text.contains("b.png (\"a photo of tyzx coin\")"), "{text}");
        assert!(!text.contains("a.png"), "{text}");
        assert!(
            text.ends_with("appears as \"tyzx coin\": use that as caption.trigger_word"),
            "{text}"
        );
    })
    .await
}

#[tokio::test]
async fn too_few_images_for_a_batch_says_how_many_and_why() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let files = [("a.png", 64, 64, None), ("b.png", 64, 64, None)];
        let ds = prepared(tmp.path(), &files, settings(""), "a photo").await;
        let mut s = spec("", 32, 1, 4, 10);
        s.training.as_mut().unwrap().backend = "diffusion-pipe".into();
        let report = images::check(&s, &ds).await;
        assert_eq!(checks(&report), [check::IMAGES]);
        let text = message(&report, check::IMAGES);
        assert!(
            text.starts_with(
                "the dataset has 2 usable images; at least 4 are needed: diffusion-pipe drops"
            ),
            "{text}"
        );
        // Every trainer needs one image.
        assert!(
            images::too_few_images(&spec("", 32, 1, 1, 1), 0, None)
                .unwrap()
                .ends_with("at least 1 is needed: reference needs at least one image to train on")
        );
    })
    .await
}

#[tokio::test]
async fn every_problem_is_reported_together() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let files = [("a.png", 16, 16, None), ("b.png", 16, 16, Some("a coin"))];
        let ds = prepared(tmp.path(), &files, settings("tyzx"), "{stem}").await;
        std::fs::write(ds.dir.join("a.txt"), "").unwrap();
        std::fs::write(ds.dir.join("b.txt"), "a coin").unwrap();
        let report = images::check(&spec("tyzx", 64, 1, 1, 10), &ds).await;
        assert_eq!(
            checks(&report),
            [check::RESOLUTION, check::CAPTIONS, check::TRIGGER_WORD]
        );
    })
    .await
}

#[tokio::test]
async fn missing_models_and_unwritable_destinations_are_problems() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(tmp.path().join("store").to_str().unwrap()).unwrap();
        store
            .put_bytes(
                "tenants/acme/uploads/m/here.safetensors",
                bytes::Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        let allowed = tmp.path().join("outputs");
        // No Hub model here: nothing listens on the endpoint.
        let access = AccessChecks::new(
            store.clone(),
            HubClient::new("http://127.0.0.1:9").unwrap(),
            Destinations::new(vec![allowed.clone()], store.root(), Default::default()),
        );
        let file = allowed.join("a-file");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(&file, b"x").unwrap();

        let mut s = spec("", 32, 1, 1, 10);
        s.base_model = Some(ModelRef {
            uri: store.uri("tenants/acme/uploads/m/gone.safetensors"),
            family: "reference".into(),
        });
        s.destinations = vec![
            Destination {
                uri: format!("file://{}/ok/sub", allowed.display()),
                ..Default::default()
            },
            Destination {
                uri: format!("file://{}/sub", file.display()),
                ..Default::default()
            },
            Destination {
                uri: "/srv/elsewhere".into(),
                ..Default::default()
            },
        ];
        let report = access.run("acme", &s).await;
        assert_eq!(
            checks(&report),
            [check::BASE_MODEL, check::DESTINATIONS, check::DESTINATIONS],
            "{report:#?}"
        );
        assert_eq!(
            report.problems[0].message,
            format!(
                "{} does not exist in the artifact store",
                store.uri("tenants/acme/uploads/m/gone.safetensors")
            )
        );
        assert_eq!(report.problems[0].kind, ErrorKind::Model);
        assert!(
            report.problems[1].message.contains("a-file is a file, so"),
            "{:?}",
            report.problems[1]
        );
        assert!(
            report.problems[2]
                .message
                .contains("/srv/elsewhere is not inside an allowed destination root"),
            "{:?}",
            report.problems[2]
        );
        assert!(!allowed.join("ok").exists(), "probing creates no folder");

        s.base_model.as_mut().unwrap().uri = store.uri("tenants/acme/uploads/m/here.safetensors");
        s.destinations.truncate(1);
        assert!(access.run("acme", &s).await.passed());
        // Another tenant may not name it; past the size cap nobody may.
        let report = access.run("globex", &s).await;
        assert_eq!(report.problems[0].kind, ErrorKind::InvalidSpec);
        assert!(
            report.problems[0]
                .message
                .contains("outside tenants/globex/"),
            "{report:#?}"
        );
        let capped = access.clone().with_model_cap(0);
        let report = capped.run("acme", &s).await;
        assert!(
            report.problems[0]
                .message
                .contains("holds more than 0 bytes"),
            "{report:#?}"
        );
        s.base_model.as_mut().unwrap().uri = "file:///elsewhere/model.safetensors".into();
        let report = access.run("acme", &s).await;
        assert!(
            report.problems[0]
                .message
                .contains("is not in the artifact store"),
            "{report:#?}"
        );
        // A URI's credentials and query never reach a message.
        for uri in [
            "s3://AKIA:SECRET@bucket/model.safetensors?X-Amz-Signature=SECRET",
            "https://user:SECRET@models.example/m.safetensors?token=SECRET",
        ] {
            s.base_model.as_mut().unwrap().uri = uri.into();
            let report = access.run("acme", &s).await;
            assert_eq!(checks(&report), [check::BASE_MODEL], "{report:#?}");
            assert!(!format!("{report:?}").contains("SECRET"), "{report:#?}");
        }
    })
    .await
}
