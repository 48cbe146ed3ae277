//! The worker's model cache against a loopback Hub: one download shared by
//! concurrent jobs, corrupt and interrupted downloads, eviction under a size
//! cap that spares models in use, gated repositories and the job's token,
//! folder parts, `hf://` references, and the reference model made once and
//! stored.

use std::path::Path;
use std::time::Duration;
use trainyard_core::runtime::StageError;
use trainyard_core::store::ArtifactStore;
use trainyard_proto::v1::{ErrorKind, ModelRef};
use trainyard_tests::hub::{FakeHub, Fault, commit_of};
use trainyard_tests::wait_for;
use trainyard_worker::models::{ModelLease, Models, find_trainer};

const TOKEN: &str = "hf_test_token";
const TIMEOUT: Duration = Duration::from_secs(30);

struct Setup {
    dir: tempfile::TempDir,
    hub: FakeHub,
}

impl Setup {
    async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            hub: FakeHub::start(TOKEN).await,
        }
    }

    fn models(&self, max_bytes: u64) -> Models {
        self.models_at("cache", max_bytes)
    }

    fn models_at(&self, cache: &str, max_bytes: u64) -> Models {
        let store_dir = self.dir.path().join("store");
        std::fs::create_dir_all(&store_dir).expect("store dir");
        let store = ArtifactStore::open(&store_dir.display().to_string()).expect("store");
        Models::new(
            store,
            self.dir.path().join(cache),
            find_trainer(None).unwrap_or_default(),
            &self.hub.endpoint(),
            max_bytes,
        )
        .expect("models")
    }
}

fn model(uri: &str, family: &str) -> ModelRef {
    ModelRef {
        uri: uri.into(),
        family: family.into(),
    }
}

/// Distinct content of `len` bytes.
fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn outcome(error: &StageError) -> (ErrorKind, bool, String) {
    match error {
        StageError::Fail(e) => (e.kind(), false, e.message.clone()),
        StageError::Retry { error, .. } => (error.kind(), true, error.message.clone()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn resolve_file(
    models: &Models,
    uri: &str,
) -> Result<(std::path::PathBuf, ModelLease), StageError> {
    let (files, lease) = models
        .resolve(&model(uri, "flux"), &["file"], 64, None)
        .await?;
    Ok((files.parts["file"].clone(), lease))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn concurrent_resolves_share_one_download() {
    let s = Setup::new().await;
    let data = blob(1, 300_000);
    s.hub
        .add_file("org/big", "model.safetensors", data.clone(), true);
    let models = s.models(0);
    let held = s.hub.hold_downloads();
    let uri = "hf://org/big@main/model.safetensors";
    let (results, ()) = tokio::join!(
        futures::future::join_all((0..3).map(|_| resolve_file(&models, uri))),
        async {
            // Every resolve has asked the hub, and one download has started.
            wait_for("three lookups and one download", TIMEOUT, || async {
                let seen = s.hub.requests("org/big", "model.safetensors");
                (seen.heads == 3 && seen.downloads == 1).then_some(())
            })
            .await;
            drop(held);
        }
    );
    let paths: Vec<_> = results
        .into_iter()
        .map(|r| r.expect("resolved").0)
        .collect();
    assert_eq!(s.hub.requests("org/big", "model.safetensors").downloads, 1);
    assert!(paths.iter().all(|p| *p == paths[0]));
    assert_eq!(read(&paths[0]), data);
}

#[tokio::test]
async fn a_corrupt_download_is_fetched_again() {
    let s = Setup::new().await;
    let data = blob(2, 50_000);
    s.hub.add_file("org/m", "a.safetensors", data.clone(), true);
    s.hub
        .add_file("org/m", "config.json", b"{\"a\":1}".to_vec(), false);
    s.hub.inject("org/m", "a.safetensors", Fault::CorruptOnce);
    s.hub.inject("org/m", "config.json", Fault::CorruptOnce);
    let models = s.models(0);

    let (path, _lease) = resolve_file(&models, "hf://org/m@main/a.safetensors")
        .await
        .expect("resolved after a second download");
    assert_eq!(read(&path), data);
    assert_eq!(s.hub.requests("org/m", "a.safetensors").downloads, 2);

    // A file kept in git is checked against its git blob id.
    let (path, _lease) = resolve_file(&models, "hf://org/m@main/config.json")
        .await
        .expect("resolved after a second download");
    assert_eq!(read(&path), b"{\"a\":1}");
    assert_eq!(s.hub.requests("org/m", "config.json").downloads, 2);

    // Corrupt every time: a retryable failure, nothing left in the cache.
    s.hub
        .add_file("org/m", "b.safetensors", blob(3, 10_000), true);
    s.hub.inject("org/m", "b.safetensors", Fault::CorruptAlways);
    let error = resolve_file(&models, "hf://org/m@main/b.safetensors")
        .await
        .err()
        .expect("a corrupt file fails");
    let (kind, retryable, _) = outcome(&error);
    assert_eq!((kind, retryable), (ErrorKind::Model, true));
    let sha = s.hub.file("org/m", "b.safetensors").unwrap().sha256();
    assert!(!models.cache_dir().join("blobs").join(&sha).exists());
}

#[tokio::test]
async fn a_dropped_download_resumes_with_a_range_request() {
    let s = Setup::new().await;
    let data = blob(4, 200_000);
    s.hub.add_file("org/m", "w.safetensors", data.clone(), true);
    s.hub
        .inject("org/m", "w.safetensors", Fault::DropMidBodyOnce);
    let models = s.models(0);
    let uri = "hf://org/m@main/w.safetensors";

    let error = resolve_file(&models, uri)
        .await
        .err()
        .expect("the dropped connection fails this attempt");
    let (_, retryable, _) = outcome(&error);
    assert!(retryable, "{error:?}");
    let sha = s.hub.file("org/m", "w.safetensors").unwrap().sha256();
    let partial = models
        .cache_dir()
        .join("blobs")
        .join(format!("{sha}.incomplete"));
    let kept = std::fs::metadata(&partial)
        .unwrap_or_else(|e| panic!("partial file kept ({e}) after {error:?}"))
        .len();
    assert!(kept > 0 && kept < data.len() as u64);

    let (path, _lease) = resolve_file(&models, uri).await.expect("resumed");
    assert_eq!(read(&path), data);
    let seen = s.hub.requests("org/m", "w.safetensors");
    assert_eq!(seen.downloads, 2);
    assert_eq!(seen.ranges, vec![format!("bytes={kept}-")]);
    assert!(!partial.exists());
}

#[tokio::test]
async fn eviction_keeps_the_cap_lru_first_and_spares_models_in_use() {
    let s = Setup::new().await;
    const SIZE: usize = 4096;
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        s.hub.add_file(
            "org/m",
            &format!("{name}.safetensors"),
            blob(i as u8, SIZE),
            true,
        );
    }
    let uri = |name: &str| format!("hf://org/m@main/{name}.safetensors");
    let cap = (SIZE * 2 + SIZE / 2) as u64; // room for two files
    let models = s.models(cap);
    let present = |name: &str| {
        let sha = s
            .hub
            .file("org/m", &format!("{name}.safetensors"))
            .unwrap()
            .sha256();
        models.cache_dir().join("blobs").join(sha).exists()
    };

    for name in ["a", "b", "a", "c"] {
        let (path, lease) = resolve_file(&models, &uri(name)).await.expect("resolved");
        assert!(path.exists());
        drop(lease);
        assert!(models.cache_bytes() <= cap);
    }
    // b was used least recently.
    assert!(present("a") && present("c") && !present("b"));

    // a and c in use: b comes in over the cap rather than failing.
    let (_, lease_a) = resolve_file(&models, &uri("a")).await.expect("a");
    let (_, lease_c) = resolve_file(&models, &uri("c")).await.expect("c");
    let (_, lease_b) = resolve_file(&models, &uri("b"))
        .await
        .expect("b over the cap");
    assert!(present("a") && present("b") && present("c"));
    assert!(models.cache_bytes() > cap);
    drop(lease_b);

    // d: only b is free to go, and a stays while its lease is held.
    drop(lease_c);
    let (_, lease_d) = resolve_file(&models, &uri("d")).await.expect("d");
    assert!(present("a") && present("d"));
    assert!(!present("b") && !present("c"));
    assert!(models.cache_bytes() <= cap);
    drop((lease_a, lease_d));
    assert_eq!(models.leases(), 0);

    // The index survives a restart: what is there, with sizes.
    let again = s.models(cap);
    let held: Vec<_> = again.holdings().into_iter().map(|h| h.reference).collect();
    assert_eq!(held, vec![uri("a"), uri("d")]);
    assert_eq!(again.cache_bytes(), 2 * SIZE as u64);
}

#[tokio::test]
async fn gated_presets_need_the_jobs_token() {
    let s = Setup::new().await;
    s.hub.add_presets(&["flux1-dev"]);
    let models = s.models(0);
    let flux = model("flux1-dev", "");
    let parts = ["transformer", "ae", "clip_l", "t5xxl"];

    let error = models
        .resolve(&flux, &parts, 512, None)
        .await
        .err()
        .expect("gated without a token");
    let (kind, retryable, message) = outcome(&error);
    assert_eq!((kind, retryable), (ErrorKind::Auth, false));
    assert!(message.contains("hf_token"), "{message}");

    let error = models
        .resolve(&flux, &parts, 512, Some("hf_wrong"))
        .await
        .err()
        .expect("gated with a token that has no access");
    let (kind, _, message) = outcome(&error);
    assert_eq!(kind, ErrorKind::Auth);
    assert!(message.contains("hf_token"), "{message}");
    assert_eq!(s.hub.total_downloads(), 0);

    let (files, _lease) = models
        .resolve(&flux, &parts, 512, Some(TOKEN))
        .await
        .expect("the right token");
    assert_eq!(files.family.name(), "flux");
    assert_eq!(
        files.parts.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["ae", "clip_l", "t5xxl", "transformer"]
    );
    let transformer = &files.parts["transformer"];
    assert!(transformer.ends_with("flux1-dev.safetensors"));
    let want = s
        .hub
        .file("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors")
        .unwrap();
    assert_eq!(read(transformer), want.data.to_vec());
    let clip_l = s
        .hub
        .file("comfyanonymous/flux_text_encoders", "clip_l.safetensors")
        .unwrap();
    assert_eq!(read(&files.parts["clip_l"]), clip_l.data.to_vec());
    // Only the asked parts were fetched: not the diffusers folder.
    assert_eq!(s.hub.total_downloads(), 4);
}

#[tokio::test]
async fn folder_parts_are_real_folders() {
    let s = Setup::new().await;
    s.hub
        .add_presets(&["sdxl-base-1.0", "qwen2.5-0.5b-instruct", "z-image-turbo"]);
    s.hub.add_file(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "vae/diffusion_pytorch_model.safetensors",
        blob(7, 100),
        true,
    );
    let models = s.models(0);

    let (files, _sdxl) = models
        .resolve(&model("sdxl-base-1.0", ""), &["diffusers"], 1024, None)
        .await
        .expect("sdxl diffusers");
    let dir = &files.parts["diffusers"];
    assert!(dir.is_dir());
    for file in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "tokenizer/vocab.json",
    ] {
        let want = s
            .hub
            .file("stabilityai/stable-diffusion-xl-base-1.0", file)
            .unwrap();
        assert_eq!(read(&dir.join(file)), want.data.to_vec(), "{file}");
    }
    // Not included by the preset: the full-precision copy and the single file.
    assert!(!dir.join("vae/diffusion_pytorch_model.safetensors").exists());
    assert!(!dir.join("sd_xl_base_1.0.safetensors").exists());

    let (files, _llm) = models
        .resolve(&model("qwen2.5-0.5b-instruct", ""), &["llm"], 0, None)
        .await
        .expect("llm folder");
    let dir = &files.parts["llm"];
    assert!(dir.join("config.json").is_file() && dir.join("model.safetensors").is_file());

    // Files deep in a repository link back to their blobs.
    let (files, _z) = models
        .resolve(
            &model("z-image-turbo", ""),
            &["transformer", "ae", "text_encoder"],
            1024,
            None,
        )
        .await
        .expect("z-image parts");
    let transformer = &files.parts["transformer"];
    assert!(transformer.ends_with("split_files/diffusion_models/z_image_turbo_bf16.safetensors"));
    let want = s
        .hub
        .file(
            "Comfy-Org/z_image_turbo",
            "split_files/diffusion_models/z_image_turbo_bf16.safetensors",
        )
        .unwrap();
    assert_eq!(read(transformer), want.data.to_vec());
    assert!(files.parts["ae"].is_file() && files.parts["text_encoder"].is_file());

    let holdings = models.holdings();
    let sdxl = holdings
        .iter()
        .find(|h| h.reference == "sdxl-base-1.0")
        .expect("sdxl held");
    assert_eq!(sdxl.parts, vec!["diffusers".to_string()]);
    assert!(sdxl.bytes > 0);
}

#[tokio::test]
async fn hf_references_resolve_and_unknown_ones_fail() {
    let s = Setup::new().await;
    let data = blob(9, 5000);
    s.hub
        .add_file("org/repo", "sub/model.safetensors", data.clone(), true);
    s.hub
        .add_file("org/repo", "model_index.json", b"{}".to_vec(), false);
    let commit = commit_of("org/repo");
    let models = s.models(0);

    let pinned = format!("hf://org/repo@{commit}/sub/model.safetensors");
    let (files, lease) = models
        .resolve(&model(&pinned, "flux"), &["transformer"], 512, None)
        .await
        .expect("pinned file");
    assert_eq!(read(&files.parts["file"]), data);
    assert_eq!(files.parts["transformer"], files.parts["file"]);
    assert!(
        files.parts["file"]
            .to_string_lossy()
            .contains(&format!("org--repo@{commit}/sub/model.safetensors"))
    );
    drop(lease);

    let (files, _lease) = models
        .resolve(
            &model("hf://org/repo", "qwen_image"),
            &["diffusers"],
            512,
            None,
        )
        .await
        .expect("snapshot");
    assert!(
        files.parts["diffusers"]
            .join("sub/model.safetensors")
            .is_file()
    );
    assert!(files.parts["diffusers"].join("model_index.json").is_file());

    // A pinned commit already cached needs no hub at all.
    let downloads = s.hub.total_downloads();
    drop(s.hub);
    let (files, _lease) = models
        .resolve(&model(&pinned, "flux"), &["file"], 512, None)
        .await
        .expect("from the cache alone");
    assert_eq!(read(&files.parts["file"]), data);
    assert_eq!(downloads, 2);
}

#[tokio::test]
async fn unknown_models_and_files_are_model_errors() {
    let s = Setup::new().await;
    s.hub
        .add_file("org/repo", "model.safetensors", blob(1, 100), true);
    let models = s.models(0);
    for (uri, parts) in [
        ("hf://org/repo@main/missing.safetensors", &["file"][..]),
        ("hf://org/nope@main/model.safetensors", &["file"][..]),
        ("hf://org/repo@v9/model.safetensors", &["file"][..]),
        ("hf://org/nope", &["diffusers"][..]),
        // A single file cannot give the parts of a FLUX setup.
        (
            "hf://org/repo@main/model.safetensors",
            &["transformer", "ae"][..],
        ),
        ("not-a-model", &["file"][..]),
    ] {
        let error = models
            .resolve(&model(uri, "flux"), parts, 512, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{uri} resolved"));
        let (kind, retryable, message) = outcome(&error);
        assert_eq!(
            (kind, retryable),
            (ErrorKind::Model, false),
            "{uri}: {message}"
        );
    }
    assert_eq!(s.hub.total_downloads(), 0);
}

#[tokio::test]
async fn the_reference_model_is_made_once_and_stored() {
    let s = Setup::new().await;
    if find_trainer(None).is_none() {
        panic!("ty-reference-trainer not built: run cargo build -p trainyard-reference-trainer");
    }
    let models = s.models(0);
    let reference = model("reference-denoiser-v1", "");
    let (files, lease) = models
        .resolve(&reference, &["file"], 32, None)
        .await
        .expect("reference model");
    let made = read(&files.parts["file"]);
    assert!(made.len() > 8);
    assert_eq!(files.family.name(), "reference");
    drop(lease);
    let stored = s
        .dir
        .path()
        .join("store/models/reference-denoiser-v1-r32/model.safetensors");
    assert_eq!(read(&stored), made);

    // Another worker downloads the stored one.
    let other = s.models_at("cache-2", 0);
    let (files, _lease) = other
        .resolve(&reference, &["file"], 32, None)
        .await
        .expect("from the store");
    assert_eq!(read(&files.parts["file"]), made);
    let holdings = other.holdings();
    assert_eq!(holdings.len(), 1);
    assert_eq!(holdings[0].reference, "reference-denoiser-v1-r32");
    assert_eq!(holdings[0].bytes, made.len() as u64);

    // A store URI outside the presets.
    let store = ArtifactStore::open(&s.dir.path().join("store").display().to_string()).unwrap();
    let uri = store.uri("models/reference-denoiser-v1-r32/model.safetensors");
    let (files, _lease) = other
        .resolve(&model(&uri, "reference"), &["file"], 32, None)
        .await
        .expect("store uri");
    assert_eq!(read(&files.parts["file"]), made);
}
