//! Every trainer backend through the whole fleet, against its stand-in
//! (`tests/standins/<tool>/`, a program that prints the tool's exact output,
//! writes its checkpoint layout and honours its resume arguments), with base
//! models from a loopback Hub: the job is submitted over gRPC, prepared,
//! trained by the worker as a real child process group, which the test kills
//! with SIGKILL after the first stored checkpoint; the retried attempt must
//! continue from that checkpoint (never from step 0) and the job must end
//! with its adapter delivered.

use std::path::PathBuf;
use std::time::Duration;
use trainyard_proto::v1::{
    ExtraValue, JobState, ModelRef, Secrets, Stage, extra_value, job_event::Kind,
};
use trainyard_tests::hub::FakeHub;
use trainyard_tests::*;

const HF_TOKEN: &str = "hf_test_token_backends";

struct Case {
    backend: &'static str,
    model: &'static str,
    /// The adapter file name the worker stores.
    adapter: &'static str,
    /// Backend options the case needs.
    extras: &'static [(&'static str, f64)],
}

/// Pids of processes of a job's trainer: its argv or its working folder
/// names the job (every run lives in the worker's `<work>/<job>/` folder).
fn trainer_processes(job: &str) -> Vec<u32> {
    let mut pids = processes_mentioning(job);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for pid in entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            if cwd.to_string_lossy().contains(job) && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Real trainers want images of at least their training resolution.
const RESOLUTION: u32 = 256;

/// The bundled sample, scaled up to the training resolution, in the store.
async fn dataset_uri(fleet: &Fleet) -> String {
    let local = fleet.dir.path().join("sample-256");
    trainyard_captioner::sample::write_sample_dataset(&local).expect("sample");
    for entry in std::fs::read_dir(&local).expect("sample dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "png") {
            let img = image::open(&path).expect("sample image");
            img.resize_exact(RESOLUTION, RESOLUTION, image::imageops::FilterType::Nearest)
                .save(&path)
                .expect("scaled image");
        }
    }
    fleet
        .store
        .put_dir(&local, &upload_key("acme", "sample-256"), &[])
        .await
        .expect("upload");
    fleet.store.uri(&upload_key("acme", "sample-256"))
}

fn standins() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("standins")
}

async fn fleet_for(hub: &FakeHub, services: Services) -> Fleet {
    let root = standins();
    Fleet::start_with(services, |c| {
        c.worker.hf_endpoint = hub.endpoint();
        c.worker.checkpoint_scan_ms = 100;
        let t = &mut c.worker.trainers;
        // The TRL stand-in libraries first on PYTHONPATH; plain python3 otherwise.
        t.python = root.join("trl/python3");
        t.accelerate = root.join("bin/accelerate");
        t.deepspeed = root.join("bin/deepspeed");
        t.kohya_dir = root.join("kohya");
        t.diffusion_pipe_dir = root.join("diffusion-pipe");
        t.simpletuner_dir = root.join("simpletuner");
        t.ai_toolkit_dir = root.join("ai-toolkit");
        // The diffusion-pipe stand-in binds its rendezvous port on a
        // loopback address standing for the machine: one per fleet, so
        // fleets of tests running in one process never share ports.
        let n = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), &c.store.uri);
        let loopback = format!(
            "127.{}.{}.{}",
            128 + n % 128,
            (n >> 8) & 255,
            (n >> 16) & 255
        );
        t.env = [
            ("STANDIN_STEP_SECONDS".to_string(), "0.1".to_string()),
            ("STANDIN_LOOPBACK".to_string(), loopback),
        ]
        .into();
    })
    .await
}

fn job_spec(case: &Case, dataset: &str, outputs: &std::path::Path) -> trainyard_proto::v1::JobSpec {
    let mut spec = with_destination(spec(dataset, 30), outputs);
    let training = spec.training.as_mut().unwrap();
    training.backend = case.backend.into();
    training.resolution = RESOLUTION;
    for (key, value) in case.extras {
        training.extras.insert(
            key.to_string(),
            ExtraValue {
                kind: Some(extra_value::Kind::Float(*value)),
            },
        );
    }
    training.save_every = 5;
    training.batch_size = 1;
    spec.base_model = Some(ModelRef {
        uri: case.model.into(),
        ..Default::default()
    });
    spec.secrets = Some(Secrets {
        hf_token: HF_TOKEN.into(),
        ..Default::default()
    });
    spec
}

/// A small SFT dataset in the store: prompt/completion rows.
async fn jsonl_uri(fleet: &Fleet) -> String {
    let rows: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("What is {i} plus {i}?"),
                "completion": format!("{}", i + i),
            })
            .to_string()
        })
        .collect();
    let key = &format!("{}/train.jsonl", upload_key("acme", "sft"));
    fleet
        .store
        .put_bytes(key, (rows.join("\n") + "\n").into_bytes().into())
        .await
        .expect("upload jsonl");
    fleet.store.uri(key)
}

async fn train_kill_and_resume(case: Case) {
    let hub = FakeHub::start(HF_TOKEN).await;
    hub.add_presets(&[case.model]);
    let fleet = fleet_for(&hub, Services::ALL).await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let dataset = if case.backend == "trl" {
        jsonl_uri(&fleet).await
    } else {
        dataset_uri(&fleet).await
    };
    let spec = job_spec(&case, &dataset, &outputs);
    let job = submit(&mut client, spec).await;

    // Follow the job; kill the trainer once a checkpoint is stored.
    let mut stream = client
        .watch(trainyard_proto::v1::WatchRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    let mut killed_after = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{} job did not finish in time: {events:#?}", case.backend))
            .expect("watch stream");
        let Some(event) = event else { break };
        if let Some(Kind::Checkpoint(c)) = &event.kind
            && killed_after.is_none()
        {
            let pids = trainer_processes(&job.job_id);
            assert!(!pids.is_empty(), "the trainer of {} runs", job.job_id);
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            killed_after = Some(c.step);
        }
        events.push(event);
    }
    let checkpoint = killed_after.unwrap_or_else(|| {
        panic!(
            "{}: no checkpoint was stored before the kill: {events:#?}",
            case.backend
        )
    });

    let record = get(&mut client, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{}: {:?}\n{events:#?}",
        case.backend,
        record.error
    );
    // The second attempt restored the checkpoint and its first step
    // continued from it.
    let resumed_at = events
        .iter()
        .position(|e| {
            matches!(&e.kind, Some(Kind::Progress(p)) if p.message.starts_with("resuming from step"))
        })
        .unwrap_or_else(|| panic!("{}: no resume after the kill: {events:#?}", case.backend));
    let first_step = events[resumed_at..]
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 => Some(p.step),
            _ => None,
        })
        .expect("progress after the resume");
    assert!(
        first_step >= checkpoint,
        "{}: resumed run started at step {first_step}, checkpoint was {checkpoint}",
        case.backend
    );
    let last_step = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Train => Some(p.step),
            _ => None,
        })
        .max();
    assert_eq!(last_step, Some(30), "{}: trained to the end", case.backend);
    let delivered = outputs.join(&job.job_id).join(case.adapter);
    assert!(
        delivered.is_file(),
        "{}: {} delivered",
        case.backend,
        delivered.display()
    );
    let summary = record.summary.expect("summary");
    assert_eq!(summary.backend, case.backend);
    // Nothing of the trainer is left running.
    assert!(trainer_processes(&job.job_id).is_empty());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kohya_flux_resumes_after_a_kill() {
    train_kill_and_resume(Case {
        backend: "kohya",
        model: "flux1-dev",
        adapter: "lora.safetensors",
        extras: &[],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kohya_sdxl_resumes_after_a_kill() {
    train_kill_and_resume(Case {
        backend: "kohya",
        model: "sdxl-base-1.0",
        adapter: "lora.safetensors",
        extras: &[],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffusion_pipe_qwen_image_resumes_after_a_kill() {
    train_kill_and_resume(Case {
        backend: "diffusion-pipe",
        model: "qwen-image",
        adapter: "adapter_model.safetensors",
        // Training-state checkpoints by time only: every 0.6 s here.
        extras: &[("checkpoint_every_n_minutes", 0.01)],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simpletuner_flux_resumes_after_a_kill() {
    train_kill_and_resume(Case {
        backend: "simpletuner",
        model: "flux1-dev",
        adapter: "pytorch_lora_weights.safetensors",
        extras: &[],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_toolkit_flux_resumes_after_a_kill() {
    train_kill_and_resume(Case {
        backend: "ai-toolkit",
        model: "flux1-dev",
        adapter: "lora.safetensors",
        extras: &[],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trl_sft_resumes_after_a_kill() {
    train_kill_and_resume(Case {
        backend: "trl",
        model: "qwen2.5-0.5b-instruct",
        adapter: "adapter_model.safetensors",
        extras: &[],
    })
    .await;
}

/// A worker told to stop asks diffusion-pipe to save through its
/// `save_quit` file, stores that checkpoint and hands the task back; the next
/// worker continues from it. No periodic checkpoint exists, so the only way
/// to resume past step 0 is the state saved on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_saves_diffusion_pipe_state_and_the_next_one_resumes() {
    let hub = FakeHub::start(HF_TOKEN).await;
    let case = Case {
        backend: "diffusion-pipe",
        model: "qwen-image",
        adapter: "adapter_model.safetensors",
        extras: &[],
    };
    hub.add_presets(&[case.model]);
    let services = Services {
        worker: false,
        ..Services::ALL
    };
    let fleet = fleet_for(&hub, services).await;
    let (first, first_done) = fleet.start_worker();
    let mut first_done = Some(first_done);
    let mut second = None;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let job = submit(
        &mut client,
        job_spec(&case, &dataset_uri(&fleet).await, &outputs),
    )
    .await;
    let mut stream = client
        .watch(trainyard_proto::v1::WatchRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut events = Vec::new();
    let mut stopped_at = None;
    let mut saved = None;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("job did not finish in time: {events:#?}"))
            .expect("watch stream");
        let Some(event) = event else { break };
        match &event.kind {
            Some(Kind::Progress(p))
                if p.stage() == Stage::Train && p.step >= 8 && stopped_at.is_none() =>
            {
                stopped_at = Some(p.step);
                first.cancel();
            }
            Some(Kind::Checkpoint(c)) if saved.is_none() => {
                saved = Some(c.step);
                // The first worker is gone (its task handed back): start another.
                let done = first_done.take().expect("first worker");
                tokio::time::timeout(Duration::from_secs(60), done)
                    .await
                    .expect("first worker stopped in time")
                    .expect("first worker");
                second = Some(fleet.start_worker());
                events.push(event);
                continue;
            }
            _ => {}
        }
        events.push(event);
        if saved.is_some()
            && matches!(&events.last().unwrap().kind, Some(Kind::State(s)) if s.state() == JobState::Succeeded)
        {
            break;
        }
    }
    assert!(second.is_some(), "a second worker took over");
    let stopped_at = stopped_at.expect("training ran before the stop");
    let saved = saved.expect("the stopped worker stored the state saved on request");
    assert!(
        saved >= stopped_at,
        "saved at step {saved}, the run was at {stopped_at} when stopped"
    );
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    let resumed = events
        .iter()
        .any(|e| matches!(&e.kind, Some(Kind::Progress(p)) if p.message == format!("resuming from step {saved}")));
    assert!(
        resumed,
        "the second worker resumed from step {saved}: {events:#?}"
    );
    assert!(outputs.join(&job.job_id).join(case.adapter).is_file());
    fleet.stop().await;
}
