//! End to end: a job submitted over gRPC flows through the captioner, the
//! worker (a real reference-trainer child process) and the uploader, and
//! ends as a real LoRA file.

use std::time::Duration;
use trainyard_proto::v1::{CancelRequest, JobState, Stage, job_event::Kind};
use trainyard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_job_trains_a_lora_and_delivers_it() {
    let fleet = Fleet::start().await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let spec = with_destination(spec(&fleet.sample_uri().await, 120), &outputs);
    let job = submit(&mut client, spec).await;
    assert_eq!(job.state(), JobState::Queued);

    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let states: Vec<JobState> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::State(s)) => Some(s.state()),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Preparing,
            JobState::Training,
            JobState::Delivering,
            JobState::Succeeded
        ],
        "states seen by Watch"
    );
    let steps: Vec<u32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 => Some(p.step),
            _ => None,
        })
        .collect();
    assert!(steps.len() >= 10, "training progress events: {steps:?}");
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "steps rise: {steps:?}"
    );
    assert_eq!(*steps.last().unwrap(), 120);
    let checkpoints = events
        .iter()
        .filter(|e| matches!(e.kind, Some(Kind::Checkpoint(_))))
        .count();
    assert_eq!(checkpoints, 2, "checkpoints at steps 50 and 100");

    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded);
    let summary = record.summary.clone().expect("train summary");
    assert!(
        summary.loss_last < summary.loss_first,
        "loss fell: {} -> {}",
        summary.loss_first,
        summary.loss_last
    );
    assert_eq!(record.image_count, 8);

    // The delivered adapter: kohya keys, shapes, rank and metadata.
    let adapter = outputs.join(&job.job_id).join("lora.safetensors");
    let bytes = std::fs::read(&adapter).expect("delivered adapter");
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let meta = metadata.metadata().clone().expect("metadata");
    assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("4"));
    assert_eq!(
        meta.get("ss_network_alpha")
            .map(|a| a.parse::<f64>().unwrap()),
        Some(4.0)
    );
    assert_eq!(meta.get("ss_steps").map(String::as_str), Some("120"));
    assert_eq!(
        meta.get("ss_base_model_version").map(String::as_str),
        Some("reference-denoiser-v1")
    );
    assert_eq!(
        meta.get("modelspec.trigger_phrase").map(String::as_str),
        Some("tyzx")
    );
    let names = tensors.names();
    let downs: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.ends_with(".lora_down.weight"))
        .collect();
    assert!(!downs.is_empty());
    for down in downs {
        assert!(down.starts_with("lora_unet_"), "{down}");
        let module = down.trim_end_matches(".lora_down.weight");
        let d = tensors.tensor(down).unwrap();
        let u = tensors
            .tensor(&format!("{module}.lora_up.weight"))
            .expect("lora_up");
        assert_eq!(d.shape()[0], 4, "lora_down is [rank, in]");
        assert_eq!(u.shape()[1], 4, "lora_up is [out, rank]");
        assert!(
            tensors.tensor(&format!("{module}.alpha")).is_ok(),
            "alpha of {module}"
        );
    }

    // The manifest's sha256 values match the delivered files.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(outputs.join(&job.job_id).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["sha256"].as_str().unwrap(), sha256_hex(&adapter));
    assert_eq!(files[0]["size"].as_u64().unwrap(), bytes.len() as u64);
    assert!(
        record
            .delivered
            .iter()
            .any(|d| d.sha256 == sha256_hex(&adapter))
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_training_kills_the_trainer_and_skips_delivery() {
    let fleet = Fleet::start().await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let spec = with_destination(spec(&fleet.sample_uri().await, 100_000), &outputs);
    let job = submit(&mut client, spec).await;
    let mut events = client
        .watch(trainyard_proto::v1::WatchRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Wait until the trainer has made a few steps.
    tokio::time::timeout(Duration::from_secs(120), async {
        use futures::StreamExt;
        while let Some(Ok(event)) = events.next().await {
            if let Some(Kind::Progress(p)) = event.kind
                && p.stage() == Stage::Train
                && p.step >= 3
            {
                return;
            }
        }
        panic!("watch ended before training progressed");
    })
    .await
    .expect("training started in time");
    assert!(
        !processes_mentioning(&job.job_id).is_empty(),
        "trainer is running"
    );

    let cancelled = client
        .cancel(CancelRequest {
            job_id: job.job_id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    wait_for(
        "trainer process to exit",
        Duration::from_secs(20),
        || async { processes_mentioning(&job.job_id).is_empty().then_some(()) },
    )
    .await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Cancelled);
    assert!(record.delivered.is_empty());
    assert!(!outputs.join(&job.job_id).exists(), "nothing delivered");
    fleet.stop().await;
}
