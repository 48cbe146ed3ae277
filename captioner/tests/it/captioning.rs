//! Captioning through `prepare_local`: sidecars, templates, the trigger
//! word, and backend retries and concurrency.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{captions, png, settings, tree, within};
use trainyard_captioner::{
    CaptionBackend, CaptionError, CaptionSource, ImageInfo, LocalInput, PrepareError,
    PrepareSettings, TemplateCaptioner, prepare_local,
};

#[tokio::test]
async fn trigger_template_sidecar_overwrite_and_empty_trigger() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("in");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("one.png"), png(16, 16, [1, 1, 1])).unwrap();
        std::fs::write(dir.join("one.txt"), "a cat").unwrap();
        std::fs::write(dir.join("two.png"), png(16, 16, [2, 2, 2])).unwrap();
        let before = tree(&dir);

        // Template placing the trigger itself: not prepended again.
        let s = settings("tyzx");
        let captioner = TemplateCaptioner::new("a photo of {trigger}");
        let p = prepare_local(
            LocalInput::Dir(dir.clone()),
            &tmp.path().join("w1"),
            &s,
            &captioner,
        )
        .await
        .unwrap();
        let c = captions(&p);
        assert_eq!(c["one.png"].0, "tyzx, a cat");
        assert_eq!(c["two.png"].0, "a photo of tyzx");
        assert_eq!(p.manifest.trigger_word, "tyzx");
        assert_eq!(p.manifest.caption_backend, "template");

        // overwrite_sidecar: the backend captions everything.
        let s = PrepareSettings {
            overwrite_sidecar: true,
            ..settings("tyzx")
        };
        let captioner = TemplateCaptioner::new("#{index} {stem}");
        let p = prepare_local(
            LocalInput::Dir(dir.clone()),
            &tmp.path().join("w2"),
            &s,
            &captioner,
        )
        .await
        .unwrap();
        let c = captions(&p);
        assert_eq!(
            c["one.png"],
            (
                "tyzx, #1 one".to_owned(),
                CaptionSource::Backend("template".into())
            )
        );
        assert_eq!(c["two.png"].0, "tyzx, #2 two");

        // Empty trigger word: captions unchanged.
        let p = prepare_local(
            LocalInput::Dir(dir.clone()),
            &tmp.path().join("w3"),
            &settings(""),
            &captioner,
        )
        .await
        .unwrap();
        let c = captions(&p);
        assert_eq!(c["one.png"].0, "a cat");
        assert_eq!(c["two.png"].0, "#2 two");

        // The input folder was only read.
        assert_eq!(tree(&dir), before);
    })
    .await
}

/// A backend that fails in a scripted way and records concurrency.
struct Scripted {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    fail_first: usize,
    error: CaptionError,
}

impl Scripted {
    fn new(fail_first: usize, error: CaptionError) -> Self {
        Self {
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            fail_first,
            error,
        }
    }
}

#[async_trait]
impl CaptionBackend for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn caption(&self, image: &ImageInfo) -> Result<String, CaptionError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.fail_first {
            return Err(self.error.clone());
        }
        Ok(format!("a picture\nof {}", image.stem))
    }
}

fn images_dir(root: &Path, n: usize) -> std::path::PathBuf {
    let dir = root.join("in");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        std::fs::write(
            dir.join(format!("img{i}.png")),
            png(16, 16, [i as u8, 0, 0]),
        )
        .unwrap();
    }
    dir
}

#[tokio::test]
async fn backend_retries_concurrency_and_fatal_errors() {
    within(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = images_dir(tmp.path(), 6);
        let unavailable = CaptionError::Unavailable {
            message: "503".into(),
            retry_after: Some(Duration::from_millis(1)),
        };

        // Two transient failures are retried; at most 2 calls in flight.
        let s = PrepareSettings {
            caption_concurrency: 2,
            ..settings("tyzx")
        };
        let backend = Scripted::new(2, unavailable.clone());
        let p = prepare_local(
            LocalInput::Dir(dir.clone()),
            &tmp.path().join("w1"),
            &s,
            &backend,
        )
        .await
        .unwrap();
        assert_eq!(backend.calls.load(Ordering::SeqCst), 8);
        assert!(backend.max_in_flight.load(Ordering::SeqCst) <= 2);
        assert_eq!(
            captions(&p)["img0.png"],
            (
                "tyzx, a picture of img0".to_owned(),
                CaptionSource::Backend("scripted".into())
            )
        );

        // A backend that stays down: retryable error naming the file, after exactly `caption_attempts` tries.
        let s = PrepareSettings {
            caption_concurrency: 1,
            caption_attempts: 3,
            ..settings("tyzx")
        };
        let backend = Scripted::new(usize::MAX, unavailable);
        let err = prepare_local(
            LocalInput::Dir(dir.clone()),
            &tmp.path().join("w2"),
            &s,
            &backend,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, PrepareError::Caption { file, .. } if file == "img0.png"),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1)));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);

        // A rejection is not retried and is fatal.
        let backend = Scripted::new(
            usize::MAX,
            CaptionError::Rejected {
                message: "nope".into(),
            },
        );
        let err = prepare_local(LocalInput::Dir(dir), &tmp.path().join("w3"), &s, &backend)
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        assert!(err.to_string().contains("img0.png"));
    })
    .await
}
