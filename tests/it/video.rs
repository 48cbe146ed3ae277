//! A Wan LoRA on video clips through the whole fleet, against the
//! diffusion-pipe stand-in: the captioner probes the clips with the real
//! `ffprobe` and drops a corrupt one by name, the worker carries the clips
//! through its checksum verification unchanged, the rendered dataset TOML
//! gets frame buckets that fit the clips, and the stand-in trains on every
//! clip. A dataset whose only clip is corrupt fails, naming it.
//!
//! Then the same clips beside a still through ai-toolkit (one dataset,
//! `num_frames` fitted to the shortest clip) and SimpleTuner (an image and
//! a video dataset, each on a folder of links the worker makes, the video
//! block fitted to Wan's 8n+1): each stand-in reads the clips the config
//! points at and trains every one at the frame count the config gives.

use std::path::Path;
use std::time::Duration;
use trainyard_core::store::keys;
use trainyard_proto::v1::{JobState, ModelRef, Secrets, job_event::Kind};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::hub::FakeHub;
use trainyard_tests::*;

const HF_TOKEN: &str = "hf_test_token_video";
const WAN: &str = "wan2.1-t2v-1.3b";

/// A test-pattern clip written by ffmpeg (`scripts/install-ffmpeg`).
fn clip(path: &Path, rate: u32, secs: f64) {
    let source = format!("testsrc=size=64x48:rate={rate}:duration={secs}");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", &source])
        .args(["-pix_fmt", "yuv420p"])
        .arg(path)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success());
}

fn wan_spec(dataset: &str, outputs: &Path) -> trainyard_proto::v1::JobSpec {
    backend_spec("diffusion-pipe", dataset, outputs)
}

fn backend_spec(backend: &str, dataset: &str, outputs: &Path) -> trainyard_proto::v1::JobSpec {
    let mut spec = with_destination(spec(dataset, 4), outputs);
    let training = spec.training.as_mut().unwrap();
    training.backend = backend.into();
    training.batch_size = 1;
    training.save_every = 0;
    spec.base_model = Some(ModelRef {
        uri: WAN.into(),
        ..Default::default()
    });
    spec.secrets = Some(Secrets {
        hf_token: HF_TOKEN.into(),
        ..Default::default()
    });
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wan_video_dataset_trains_with_diffusion_pipe_and_a_corrupt_clip_is_named() {
    let (_hub, fleet) = wan_fleet(|trainers, standins| {
        trainers.deepspeed = standins.join("bin/deepspeed");
        trainers.diffusion_pipe_dir = standins.join("diffusion-pipe");
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();

    // Two clips (16 and 40 frames), one with a sidecar caption, and a
    // corrupt one: random bytes named .mp4.
    let local = two_clips(&fleet);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(local.join("broken.mp4"), &noise).unwrap();
    let key = upload_key("acme", "clips");
    fleet.store.put_dir(&local, &key, &[]).await.unwrap();
    let job = submit(&mut client, wan_spec(&fleet.store.uri(&key), &outputs)).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{:?}\n{events:#?}",
        record.error
    );
    assert_eq!((record.image_count, record.video_count), (2, 2));

    // The prepared dataset: both clips as videos, the corrupt one dropped by name.
    let dataset = keys::dataset(
        &TenantId::parse("acme").unwrap(),
        &JobId::parse(&job.job_id).unwrap(),
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &fleet
            .store
            .get_bytes(&format!("{dataset}/manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    let clips: Vec<(&str, &str, u64)> = manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["file"].as_str().unwrap(),
                e["media"].as_str().unwrap(),
                e["video"]["frames"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(clips, [("run.mp4", "video", 40), ("walk.mp4", "video", 16)]);
    assert_eq!(manifest["dropped"][0]["name"], "broken.mp4");
    assert_eq!(manifest["dropped"][0]["reason"], "undecodable");

    // The trainer saw both clips in a frame bucket that fits the shorter
    // (16 frames → 13), as the rendered dataset.toml set it.
    let log: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Log(line)) => Some(line.line.as_str()),
            _ => None,
        })
        .collect();
    for expected in [
        "stand-in: video run.mp4 frames=40 bucket=13",
        "stand-in: video walk.mp4 frames=16 bucket=13",
        "caching latents: (1.0, 13)",
    ] {
        assert!(
            log.iter().any(|l| l.contains(expected)),
            "{expected} in {log:#?}"
        );
    }
    assert!(
        outputs
            .join(&job.job_id)
            .join("adapter_model.safetensors")
            .is_file()
    );

    // Only a corrupt clip: the job fails, naming it.
    let only = fleet.dir.path().join("broken-only");
    std::fs::create_dir_all(&only).unwrap();
    std::fs::write(only.join("broken.mp4"), &noise).unwrap();
    let key = upload_key("acme", "broken-only");
    fleet.store.put_dir(&only, &key, &[]).await.unwrap();
    let job = submit(&mut client, wan_spec(&fleet.store.uri(&key), &outputs)).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(30)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.expect("error");
    assert!(error.message.contains("broken.mp4"), "{}", error.message);
    fleet.stop().await;
}

/// A whole fleet whose Hub has the Wan preset and whose trainer paths
/// `trainer` points at the stand-ins (given their folder), stepping fast.
async fn wan_fleet(
    trainer: impl FnOnce(&mut trainyard_core::config::TrainerPaths, &Path),
) -> (FakeHub, Fleet) {
    let hub = FakeHub::start(HF_TOKEN).await;
    hub.add_presets(&[WAN]);
    let standins = Path::new(env!("CARGO_MANIFEST_DIR")).join("standins");
    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.worker.hf_endpoint = hub.endpoint();
        trainer(&mut c.worker.trainers, &standins);
        c.worker.trainers.env = [("STANDIN_STEP_SECONDS".to_string(), "0.02".to_string())].into();
    })
    .await;
    (hub, fleet)
}

/// A local folder `clips` with two clips (16 and 40 frames), the longer
/// with a sidecar caption.
fn two_clips(fleet: &Fleet) -> std::path::PathBuf {
    let local = fleet.dir.path().join("clips");
    std::fs::create_dir_all(&local).unwrap();
    clip(&local.join("walk.mp4"), 16, 1.0);
    clip(&local.join("run.mp4"), 20, 2.0);
    std::fs::write(local.join("run.txt"), "tyzx running in a test pattern").unwrap();
    local
}

/// The log lines of a job's events.
fn log_lines(events: &[trainyard_proto::v1::JobEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Log(line)) => Some(line.line.as_str()),
            _ => None,
        })
        .collect()
}

/// Two clips (16 and 40 frames) and a still through `backend` on Wan: the
/// job succeeds, the stand-in's log has every `expected` line, and the
/// adapter is delivered.
async fn clips_and_a_still_train_with(
    backend: &str,
    trainer: impl FnOnce(&mut trainyard_core::config::TrainerPaths, &Path),
    expected: &[&str],
    adapter: &str,
) {
    let (_hub, fleet) = wan_fleet(trainer).await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();

    let local = two_clips(&fleet);
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 40, 40]))
        .save(local.join("still.png"))
        .unwrap();
    let key = upload_key("acme", "clips");
    fleet.store.put_dir(&local, &key, &[]).await.unwrap();
    let job = submit(
        &mut client,
        backend_spec(backend, &fleet.store.uri(&key), &outputs),
    )
    .await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{backend}: {:?}\n{events:#?}",
        record.error
    );
    assert_eq!((record.image_count, record.video_count), (3, 2));
    let log = log_lines(&events);
    for line in expected {
        assert!(
            log.iter().any(|l| l.contains(line)),
            "{backend}: {line} in {log:#?}"
        );
    }
    assert!(
        outputs.join(&job.job_id).join(adapter).is_file(),
        "{backend}: {adapter} delivered"
    );
    fleet.stop().await;
}

/// ai-toolkit reads clips and the still from one folder: `num_frames` 13
/// (the 16-frame clip rounded down to 4n+1), nothing stretched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wan_dataset_of_clips_and_a_still_trains_with_ai_toolkit() {
    clips_and_a_still_train_with(
        "ai-toolkit",
        |t, standins| {
            t.python = "python3".into();
            t.ai_toolkit_dir = standins.join("ai-toolkit");
        },
        &[
            "stand-in: video run.mp4 frames=40 num_frames=13",
            "stand-in: video walk.mp4 frames=16 num_frames=13",
            "Found 2 videos and 1 images",
        ],
        "lora.safetensors",
    )
    .await;
}

/// SimpleTuner gets an image dataset and a video dataset on folders of
/// links (one file and two clips): `num_frames` 9 (the 16-frame clip
/// rounded down to Wan's 8n+1), the 40-frame clip trimmed to 33 and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wan_dataset_of_clips_and_a_still_trains_with_simpletuner() {
    clips_and_a_still_train_with(
        "simpletuner",
        |t, standins| {
            t.accelerate = standins.join("bin/accelerate");
            t.simpletuner_dir = standins.join("simpletuner");
        },
        &[
            "stand-in: video run.mp4 frames=40 num_frames=9",
            "stand-in: video walk.mp4 frames=16 num_frames=9",
            "media/images', 'files': 1}",
            "media/clips', 'files': 2}",
        ],
        "pytorch_lora_weights.safetensors",
    )
    .await;
}
