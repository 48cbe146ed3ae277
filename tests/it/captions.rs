//! Caption backends against their loopback stand-ins (`tests/src/openai.rs`,
//! `tests/src/gemini.rs`, `tests/standins/captioner/caption`): what goes on
//! the wire (data: URLs only, the family's prompt, which key to which
//! server), retries (429 after its Retry-After, 5xx), timeouts, the
//! fallback and `on_error`, the address guard on a tenant's endpoint, the
//! cache; and one job through the real fleet captioned by the OpenAI
//! stand-in, resubmitted without a single call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trainyard_captioner::caption::select::{CaptionSetup, SetupError};
use trainyard_captioner::caption::{
    CaptionBackend, CaptionError, CaptionJob, CaptionPolicy, FinalCaption, ImageInfo, Media,
    VideoInfo, caption_all,
};
use trainyard_captioner::{CaptionSource, DatasetManifest};
use trainyard_core::config::{CaptionCommand, CaptionConfig};
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_proto::v1::{CaptionSettings, JobState, Secrets};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::gemini::{FakeGemini, SeenPart};
use trainyard_tests::openai::{FakeOpenAi, Reply, default_answer};
use trainyard_tests::*;

const JOY: &str = "fancyfeast/llama-joycaption-beta-one-hf-llava";

fn acme() -> TenantId {
    TenantId::parse("acme").unwrap()
}

/// `n` small PNGs of different colours in `dir`.
fn images(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("img_{i}.png"));
            let img = image::RgbImage::from_pixel(16, 16, image::Rgb([i as u8 * 40, 80, 200]));
            img.save(&path).unwrap();
            path
        })
        .collect()
}

fn job(path: &Path, index: usize, media: Media) -> CaptionJob {
    let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
    let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
    CaptionJob {
        image: ImageInfo {
            path: path.to_owned(),
            source_name: file_name.clone(),
            file_name,
            stem,
            index,
            width: 16,
            height: 16,
            trigger_word: "tyzx".into(),
            media,
        },
        sidecar: None,
    }
}

fn jobs(paths: &[PathBuf]) -> Vec<CaptionJob> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| job(p, i + 1, Media::Image))
        .collect()
}

fn policy() -> CaptionPolicy {
    CaptionPolicy {
        trigger_word: "tyzx".into(),
        ..CaptionPolicy::default()
    }
}

/// The fleet's caption section with its own OpenAI server at `endpoint`
/// and fast retries.
fn fleet(endpoint: &str) -> CaptionConfig {
    let mut c = CaptionConfig::default();
    c.openai.endpoint = endpoint.into();
    c.openai.model = JOY.into();
    c.retry_delay_ms = 10;
    c
}

fn openai() -> CaptionSettings {
    CaptionSettings {
        backend: "openai".into(),
        trigger_word: "tyzx".into(),
        ..Default::default()
    }
}

fn no_secrets() -> Secrets {
    Secrets::default()
}

fn backend(
    config: &CaptionConfig,
    store: Option<ArtifactStore>,
    settings: &CaptionSettings,
    secrets: &Secrets,
) -> Result<Box<dyn CaptionBackend>, SetupError> {
    CaptionSetup::new(config, store)
        .unwrap()
        .backend(&acme(), settings, Some(secrets))
}

async fn caption(
    backend: &dyn CaptionBackend,
    jobs: &[CaptionJob],
) -> Result<Vec<FinalCaption>, CaptionError> {
    caption_all(jobs, backend, &policy())
        .await
        .map_err(|f| f.error)
}

#[tokio::test]
async fn openai_sends_data_urls_with_the_family_prompt_and_the_fleet_key_to_the_fleet_server() {
    let server = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai.key");
    std::fs::write(&key_file, "fleet-key\n").unwrap();
    let mut config = fleet(&server.endpoint());
    config.openai.api_key_file = Some(key_file);
    let paths = images(dir.path(), 3);
    let b = backend(&config, None, &openai(), &no_secrets()).unwrap();
    let captions = caption(&*b, &jobs(&paths)).await.unwrap();

    let seen = server.requests();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        assert_eq!(request.model, JOY);
        assert_eq!(
            request.system.as_deref(),
            Some("You are a helpful image captioner.")
        );
        assert_eq!(
            request.prompt,
            "Write a descriptive caption for this image in a formal tone."
        );
        assert_eq!(request.image_urls.len(), 1);
        assert!(request.image_urls[0].starts_with("data:image/png;base64,"));
        assert_eq!(request.authorization.as_deref(), Some("Bearer fleet-key"));
    }
    for (caption, path) in captions.iter().zip(&paths) {
        let url = format!(
            "data:image/png;base64,{}",
            base64_of(&std::fs::read(path).unwrap())
        );
        let answer = default_answer(&url);
        let tidied = answer.trim_start_matches("The image shows ");
        assert_eq!(caption.text, format!("tyzx, {tidied}"));
        assert_eq!(
            caption.source,
            CaptionSource::Backend(format!("openai:{JOY}"))
        );
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn a_429_waits_for_its_retry_after_and_5xx_retries_end_in_the_fallback() {
    let server = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path(), 1);
    let b = backend(&fleet(&server.endpoint()), None, &openai(), &no_secrets()).unwrap();

    // 429 with Retry-After: 1 (the backoff alone would wait 10 ms).
    server.script([Reply::RateLimited(1)]);
    let captions = caption(&*b, &jobs(&paths)).await.unwrap();
    let seen = server.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(1),
        "retried after {:?}",
        seen[1].at - seen[0].at
    );
    assert!(captions[0].text.starts_with("tyzx, picture "));

    // 500 on every try (max_attempts = 3): the template fallback captions.
    server.script([Reply::ServerError, Reply::ServerError, Reply::ServerError]);
    let settings = CaptionSettings {
        fallback: "template".into(),
        template: "a photo of {trigger}".into(),
        ..openai()
    };
    let b = backend(&fleet(&server.endpoint()), None, &settings, &no_secrets()).unwrap();
    let captions = caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(server.calls(), 2 + 3);
    assert_eq!(captions[0].text, "a photo of tyzx");
    assert_eq!(
        captions[0].source,
        CaptionSource::Backend("template".into())
    );

    // Without a fallback the job fails, naming a retryable error.
    server.script([Reply::ServerError, Reply::ServerError, Reply::ServerError]);
    let b = backend(&fleet(&server.endpoint()), None, &openai(), &no_secrets()).unwrap();
    let error = caption(&*b, &jobs(&paths)).await.unwrap_err();
    assert!(
        matches!(error, CaptionError::Unavailable { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_slow_server_times_out_and_on_error_template_captions_the_file() {
    let server = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path(), 1);
    let mut config = fleet(&server.endpoint());
    config.max_attempts = 2;
    let settings = CaptionSettings {
        timeout_secs: 1,
        ..openai()
    };
    server.script([
        Reply::Slow(Duration::from_secs(30)),
        Reply::Slow(Duration::from_secs(30)),
    ]);
    let b = backend(&config, None, &settings, &no_secrets()).unwrap();
    let error = caption(&*b, &jobs(&paths)).await.unwrap_err();
    assert!(matches!(error, CaptionError::Timeout), "{error:?}");
    assert_eq!(server.calls(), 2, "the timeout is retried");

    server.script([Reply::Slow(Duration::from_secs(30))]);
    config.max_attempts = 1;
    let settings = CaptionSettings {
        on_error: "template".into(),
        ..settings
    };
    let b = backend(&config, None, &settings, &no_secrets()).unwrap();
    let captions = caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(captions[0].text, "a photo of tyzx");
    assert_eq!(
        captions[0].source,
        CaptionSource::Backend("template".into())
    );
}

#[tokio::test]
async fn a_tenant_endpoint_passes_the_address_guard_and_never_gets_the_fleet_key() {
    let server = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai.key");
    std::fs::write(&key_file, "fleet-key").unwrap();
    let paths = images(dir.path(), 1);
    // The fleet's own server is elsewhere; the job names the stand-in.
    let mut config = fleet("http://10.0.0.1:8000/v1");
    config.openai.api_key_file = Some(key_file);
    let settings = CaptionSettings {
        endpoint: server.endpoint(),
        ..openai()
    };
    // A literal loopback address is refused when the job's backend is built…
    let error = backend(&config, None, &settings, &no_secrets())
        .err()
        .unwrap();
    assert_eq!(error.field, "caption.endpoint");
    // …a name that resolves to one when the guarded resolver sees it.
    let by_name = CaptionSettings {
        endpoint: server.endpoint().replace("127.0.0.1", "localhost"),
        ..openai()
    };
    let b = backend(&config, None, &by_name, &no_secrets()).unwrap();
    let error = caption(&*b, &jobs(&paths)).await.unwrap_err();
    assert!(matches!(error, CaptionError::Rejected { .. }), "{error:?}");
    assert_eq!(server.calls(), 0, "a loopback endpoint is refused unsent");

    config.allow_private_endpoints = true;
    let b = backend(&config, None, &settings, &no_secrets()).unwrap();
    caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(server.requests()[0].authorization, None, "no fleet key");

    let secrets = Secrets {
        values: [("openai_api_key".to_string(), "job-key".to_string())].into(),
        ..Default::default()
    };
    let b = backend(&config, None, &settings, &secrets).unwrap();
    caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(
        server.requests()[1].authorization.as_deref(),
        Some("Bearer job-key")
    );

    // A named secret the job does not hold is the job's mistake.
    let named = CaptionSettings {
        api_key_secret: "my_key".into(),
        ..settings
    };
    let error = backend(&config, None, &named, &secrets).err().unwrap();
    assert_eq!(error.field, "caption.api_key_secret");
}

#[tokio::test]
async fn the_cache_answers_a_second_run_without_a_call_and_a_new_prompt_misses() {
    let server = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path(), 4);
    let store = ArtifactStore::open(&dir.path().join("store").display().to_string()).unwrap();
    let config = fleet(&server.endpoint());
    let b = backend(&config, Some(store.clone()), &openai(), &no_secrets()).unwrap();
    let first = caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(server.calls(), 4);
    let b = backend(&config, Some(store.clone()), &openai(), &no_secrets()).unwrap();
    let second = caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(server.calls(), 4, "every caption from the cache");
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.text, b.text);
        assert_eq!(
            b.source,
            CaptionSource::Backend(format!("cache:openai:{JOY}"))
        );
    }
    let other = CaptionSettings {
        prompt: "Describe it briefly.".into(),
        ..openai()
    };
    let b = backend(&config, Some(store), &other, &no_secrets()).unwrap();
    caption(&*b, &jobs(&paths)).await.unwrap();
    assert_eq!(server.calls(), 8, "another prompt is another recipe");
    assert_eq!(server.requests()[7].prompt, "Describe it briefly.");
}

/// A one-second 64×64 clip made by ffmpeg.
fn clip(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
        .arg("testsrc=size=64x64:rate=8")
        .args(["-t", "1", "-pix_fmt", "yuv420p"])
        .arg(&path)
        .status()
        .expect("ffmpeg (scripts/install-ffmpeg)");
    assert!(status.success());
    path
}

fn video() -> Media {
    Media::Video(VideoInfo {
        duration_ms: 1000,
        fps_milli: 8000,
        frames: 8,
        codec: "h264".into(),
    })
}

#[tokio::test]
async fn openai_captions_a_video_from_frames_sent_as_data_urls() {
    let server = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = clip(dir.path(), "clip.mp4");
    let settings = CaptionSettings {
        video_frames: 3,
        ..openai()
    };
    let b = backend(&fleet(&server.endpoint()), None, &settings, &no_secrets()).unwrap();
    let captions = caption(&*b, &[job(&path, 1, video())]).await.unwrap();
    let seen = server.requests();
    assert_eq!(seen.len(), 1, "one message for the clip");
    assert_eq!(seen[0].image_urls.len(), 3);
    assert!(
        seen[0]
            .image_urls
            .iter()
            .all(|u| u.starts_with("data:image/jpeg;base64,"))
    );
    assert!(seen[0].prompt.contains("frames of one video clip"));
    assert!(captions[0].text.starts_with("tyzx, picture "));
}

#[tokio::test]
async fn gemini_sends_small_files_inline_and_uploads_large_ones() {
    let server = FakeGemini::start("gem-key").await;
    let dir = tempfile::tempdir().unwrap();
    let path = clip(dir.path(), "clip.mp4");
    let size = std::fs::metadata(&path).unwrap().len();
    let mut config = CaptionConfig::default();
    config.gemini.base_url = server.base_url();
    let settings = CaptionSettings {
        backend: "gemini".into(),
        trigger_word: "tyzx".into(),
        ..Default::default()
    };
    let missing = backend(&config, None, &settings, &no_secrets())
        .err()
        .unwrap();
    assert_eq!(missing.field, "secrets.values.gemini_api_key");
    let secrets = Secrets {
        values: [("gemini_api_key".to_string(), "gem-key".to_string())].into(),
        ..Default::default()
    };
    let b = backend(&config, None, &settings, &secrets).unwrap();
    let captions = caption(&*b, &[job(&path, 1, video())]).await.unwrap();
    assert_eq!(
        captions[0].text,
        "tyzx, a inline video/mp4 clip of a red ball"
    );
    assert_eq!(
        captions[0].source,
        CaptionSource::Backend("gemini:gemini-2.5-flash".into())
    );
    let generate = &server.generates()[0];
    assert_eq!(generate.model, "gemini-2.5-flash");
    assert!(
        matches!(&generate.parts[0], SeenPart::Inline { mime_type, bytes }
            if mime_type == "video/mp4" && bytes.abs_diff(size as usize) < 3),
        "{:?}",
        generate.parts
    );

    // Over the inline limit: uploaded, polled to ACTIVE, named by uri.
    config.gemini.inline_max_bytes = 1024;
    let b = backend(&config, None, &settings, &secrets).unwrap();
    let captions = caption(&*b, &[job(&path, 1, video())]).await.unwrap();
    assert_eq!(
        captions[0].text,
        "tyzx, a uploaded video/mp4 clip of a red ball"
    );
    assert_eq!(server.uploads(), [("video/mp4".to_string(), size as usize)]);
    assert!(server.polls() >= 1, "waited for ACTIVE");
    assert_eq!(server.stored_files(), 0, "the upload was deleted after use");
    let parts = &server.generates()[1].parts;
    assert!(
        matches!(&parts[0], SeenPart::File { mime_type, uri } if mime_type == "video/mp4" && uri.ends_with("/v1beta/files/f1"))
    );
}

fn standin_command() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("standins/captioner/caption")
}

#[tokio::test]
async fn a_command_captions_by_its_contract_and_its_failures_are_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CaptionConfig {
        max_attempts: 1,
        ..CaptionConfig::default()
    };
    config.commands.insert(
        "stub".into(),
        CaptionCommand {
            argv: vec![standin_command().display().to_string()],
            model: "microsoft/Florence-2-large".into(),
            ..Default::default()
        },
    );
    let settings = CaptionSettings {
        backend: "command".into(),
        command: "stub".into(),
        trigger_word: "tyzx".into(),
        timeout_secs: 2,
        ..Default::default()
    };
    let unknown = CaptionSettings {
        command: "/bin/sh".into(),
        ..settings.clone()
    };
    let error = backend(&config, None, &unknown, &no_secrets())
        .err()
        .unwrap();
    assert_eq!(error.field, "caption.command");

    let b = backend(&config, None, &settings, &no_secrets()).unwrap();
    let ok = images(dir.path(), 1);
    let captions = caption(&*b, &jobs(&ok)).await.unwrap();
    assert_eq!(
        captions[0].text,
        "tyzx, a image named img_0 for <DETAILED_CAPTION>"
    );
    assert_eq!(
        captions[0].source,
        CaptionSource::Backend("command:stub".into())
    );

    let named = |name: &str| {
        let path = dir.path().join(name);
        std::fs::copy(&ok[0], &path).unwrap();
        vec![job(&path, 1, Media::Image)]
    };
    let refused = caption(&*b, &named("refuse.png")).await.unwrap_err();
    assert!(
        matches!(refused, CaptionError::Rejected { .. }),
        "{refused:?}"
    );
    let crashed = caption(&*b, &named("crash.png")).await.unwrap_err();
    match crashed {
        CaptionError::Unavailable { message, .. } => {
            assert!(message.contains("CUDA out of memory"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let hang = format!("hang-{}.png", std::process::id());
    let hung = caption(&*b, &named(&hang)).await.unwrap_err();
    assert!(matches!(hung, CaptionError::Timeout), "{hung:?}");
    wait_for(
        "the hung program's group is killed",
        Duration::from_secs(10),
        || {
            let hang = hang.clone();
            async move { processes_mentioning(&hang).is_empty().then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_captioned_by_the_openai_backend_trains_and_a_resubmission_calls_it_zero_times() {
    let server = FakeOpenAi::start().await;
    let endpoint = server.endpoint();
    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.captioner.caption.openai.endpoint = endpoint;
        c.captioner.caption.openai.model = JOY.into();
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    let mut job_spec = spec(&dataset, 10);
    job_spec.caption = Some(CaptionSettings {
        backend: "openai".into(),
        ..job_spec.caption.unwrap()
    });

    let manifest_of = async |job_id: &str| {
        let key = format!(
            "{}/manifest.json",
            keys::dataset(&acme(), &JobId::parse(job_id).unwrap())
        );
        let bytes = fleet.store.get_bytes(&key).await.unwrap();
        serde_json::from_slice::<DatasetManifest>(&bytes).unwrap()
    };
    let first = submit(&mut client, job_spec.clone()).await;
    watch_all(&mut client, &first.job_id, Duration::from_secs(60)).await;
    assert_eq!(
        get(&mut client, &first.job_id).await.state(),
        JobState::Succeeded
    );
    let calls = server.calls();
    let manifest = manifest_of(&first.job_id).await;
    let captioned: Vec<_> = manifest
        .images
        .iter()
        .filter(|i| i.caption_source != CaptionSource::Sidecar)
        .collect();
    assert_eq!(calls, captioned.len(), "one call per uncaptioned image");
    assert!(calls > 0);
    for image in &captioned {
        assert_eq!(
            image.caption_source,
            CaptionSource::Backend(format!("openai:{JOY}"))
        );
        assert!(
            image.caption.starts_with("tyzx, picture "),
            "{}",
            image.caption
        );
        let file = format!(
            "{}/{}",
            keys::dataset(&acme(), &JobId::parse(&first.job_id).unwrap()),
            image.caption_file
        );
        let text = fleet.store.get_bytes(&file).await.unwrap();
        assert_eq!(text, image.caption.as_bytes(), "the trainer's caption file");
    }
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.image_urls[0].starts_with("data:")),
        "data: urls only"
    );

    job_spec.name = "again".into();
    let second = submit(&mut client, job_spec).await;
    watch_all(&mut client, &second.job_id, Duration::from_secs(60)).await;
    assert_eq!(
        get(&mut client, &second.job_id).await.state(),
        JobState::Succeeded
    );
    assert_eq!(
        server.calls(),
        calls,
        "the resubmission called the server zero times"
    );
    let again = manifest_of(&second.job_id).await;
    for (a, b) in manifest.images.iter().zip(&again.images) {
        assert_eq!(a.caption, b.caption);
        if a.caption_source != CaptionSource::Sidecar {
            assert_eq!(
                b.caption_source,
                CaptionSource::Backend(format!("cache:openai:{JOY}"))
            );
        }
    }
    fleet.stop().await;
}
