//! `ty-bench captions [--images 64] [--latency-ms 50]`: captioning
//! throughput of the `openai` backend against the OpenAI-compatible
//! stand-in (`trainyard_tests::openai`) answering every request after a
//! fixed latency, at concurrency 1, 4 and 16 (images/s), and the cost per
//! image of the caption cache's hit path (hash the file, read the cached
//! answer from the store, tidy), with the stand-in never called.
//!
//! In one process: the backend, the stand-in and a local-folder store. The
//! images are 256×256 noise PNGs (~190 KiB, so base64 and the request body
//! cost what a real photo's thumbnail would).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trainyard_captioner::caption::select::CaptionSetup;
use trainyard_captioner::caption::{CaptionJob, CaptionPolicy, ImageInfo, Media, caption_all};
use trainyard_core::config::CaptionConfig;
use trainyard_core::store::ArtifactStore;
use trainyard_proto::TenantId;
use trainyard_proto::v1::{CaptionSettings, Secrets};
use trainyard_tests::openai::FakeOpenAi;

fn noise_png(path: &Path, seed: u32) {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let img = image::RgbImage::from_fn(256, 256, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [a, b, c, _] = state.to_le_bytes();
        image::Rgb([a, b, c])
    });
    img.save(path).expect("png");
}

fn jobs(paths: &[PathBuf]) -> Vec<CaptionJob> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            CaptionJob {
                image: ImageInfo {
                    path: p.clone(),
                    source_name: name.clone(),
                    stem: name.trim_end_matches(".png").to_owned(),
                    file_name: name,
                    index: i + 1,
                    width: 256,
                    height: 256,
                    trigger_word: "tyzx".into(),
                    media: Media::Image,
                },
                sidecar: None,
            }
        })
        .collect()
}

pub async fn main(images: u32, latency_ms: u32) -> anyhow::Result<()> {
    let server = FakeOpenAi::start().await;
    server.set_latency(Duration::from_millis(u64::from(latency_ms)));
    let dir = tempfile::tempdir()?;
    let paths: Vec<PathBuf> = (0..images)
        .map(|i| {
            let path = dir.path().join(format!("img_{i:04}.png"));
            noise_png(&path, i);
            path
        })
        .collect();
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let jobs = jobs(&paths);
    let mut config = CaptionConfig::default();
    config.openai.endpoint = server.endpoint();
    config.openai.model = "fancyfeast/llama-joycaption-beta-one-hf-llava".into();
    let tenant = TenantId::parse("acme")?;
    let policy = CaptionPolicy {
        trigger_word: "tyzx".into(),
        ..CaptionPolicy::default()
    };
    let secrets = Secrets::default();
    println!(
        "openai backend → stand-in answering after {latency_ms} ms, {images} images of {} KiB on average",
        bytes / u64::from(images.max(1)) / 1024
    );
    println!("  {:<12} {:>10} {:>10}", "concurrency", "images/s", "wall");
    for concurrency in [1u32, 4, 16] {
        let setup = CaptionSetup::new(&config, None)?;
        let settings = CaptionSettings {
            backend: "openai".into(),
            concurrency,
            ..Default::default()
        };
        let backend = setup
            .backend(&tenant, &settings, Some(&secrets))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        caption_all(&jobs, &*backend, &policy)
            .await
            .map_err(|f| anyhow::anyhow!("{}: {}", f.file, f.error))?;
        let wall = started.elapsed();
        println!(
            "  {:<12} {:>10.1} {:>8.2} s",
            concurrency,
            f64::from(images) / wall.as_secs_f64(),
            wall.as_secs_f64()
        );
    }

    // The cache: a first run fills it, later runs are all hits.
    let store = ArtifactStore::open(&dir.path().join("store").display().to_string())?;
    let setup = CaptionSetup::new(&config, Some(store))?;
    println!("cache hit path (stand-in not called), per image");
    for concurrency in [1u32, 16] {
        let settings = CaptionSettings {
            backend: "openai".into(),
            concurrency,
            ..Default::default()
        };
        let backend = setup
            .backend(&tenant, &settings, Some(&secrets))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        caption_all(&jobs, &*backend, &policy)
            .await
            .map_err(|f| anyhow::anyhow!("{}: {}", f.file, f.error))?;
        let calls = server.calls();
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            caption_all(&jobs, &*backend, &policy)
                .await
                .map_err(|f| anyhow::anyhow!("{}: {}", f.file, f.error))?;
            best = best.min(started.elapsed());
        }
        anyhow::ensure!(server.calls() == calls, "a cache hit called the server");
        println!(
            "  concurrency {:<3} {:>8.0} µs/image ({:.0} images/s)",
            concurrency,
            best.as_secs_f64() * 1e6 / f64::from(images),
            f64::from(images) / best.as_secs_f64()
        );
    }
    Ok(())
}
