//! Preflight end to end: `Validate` over gRPC (the coordinator's checks,
//! then a captioner's over NATS), each failing check with its own message,
//! a passing one with the step estimate, and a job that fails preflight
//! failing at once with every problem and no training task ever taken.

use futures::StreamExt;
use std::time::Duration;
use trainyard_core::store::keys;
use trainyard_core::topology::{TASKS_STREAM, consumer_name};
use trainyard_proto::JobId;
use trainyard_proto::v1::{
    CaptionSettings, Destination, ErrorKind, JobEvent, JobSpec, JobState, ModelRef, Secrets, Stage,
    ValidateReply, ValidateRequest, WatchRequest, job_event::Kind,
};
use trainyard_tests::hub::FakeHub;
use trainyard_tests::*;

fn prepare_fleet() -> Services {
    Services {
        coordinator: true,
        captioner: true,
        worker: false,
        uploader: false,
    }
}

/// `Validate`, once a captioner answers (it subscribes a moment after the
/// coordinator is up).
async fn validate(client: &mut Client, spec: &JobSpec) -> ValidateReply {
    wait_for(
        "a captioner to answer Validate",
        Duration::from_secs(60),
        || {
            let mut client = client.clone();
            let spec = spec.clone();
            async move {
                match client.validate(ValidateRequest { spec: Some(spec) }).await {
                    Ok(reply) => Some(reply.into_inner()),
                    Err(status) if status.code() == tonic::Code::Unavailable => None,
                    Err(status) => panic!("validate failed: {status}"),
                }
            }
        },
    )
    .await
}

/// The problems as `check: message` lines.
fn lines(reply: &ValidateReply) -> Vec<String> {
    reply
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.check, p.message))
        .collect()
}

/// The one problem of a reply, which must be from `check`.
fn only_problem<'a>(reply: &'a ValidateReply, check: &str) -> &'a str {
    assert!(!reply.ok);
    assert_eq!(reply.problems.len(), 1, "{:#?}", lines(reply));
    assert_eq!(reply.problems[0].check, check, "{:#?}", lines(reply));
    &reply.problems[0].message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_validate_shows_the_step_estimate() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let spec = with_destination(spec(&fleet.sample_uri().await, 120), &outputs);
    let reply = validate(&mut client, &spec).await;
    assert!(reply.ok, "{:#?}", lines(&reply));
    let e = reply.estimate.expect("estimate");
    assert_eq!(
        (
            e.images,
            e.repeats,
            e.batch_size,
            e.steps_per_epoch,
            e.total_steps
        ),
        (8, 1, 2, 4, 120),
        "8 images × 1 repeat ÷ batch 2"
    );
    assert!((e.epochs - 30.0).abs() < 1e-9, "{}", e.epochs);
    assert_eq!(e.unit, "images");
    assert!(
        reply.warnings.iter().any(|w| w
            .starts_with("4 of 8 images have no sidecar caption; the template backend gives each one a caption, e.g. \"a photo of tyzx\"")),
        "{:?}",
        reply.warnings
    );
    assert!(!outputs.exists(), "validate creates no destination folder");
    let list = client
        .list(trainyard_proto::v1::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.jobs.is_empty(), "validate creates no job");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_images() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let zip = fleet
        .zip_uri(
            "broken",
            &[
                ("set/broken.png", b"not a png at all".to_vec()),
                ("set/notes.md", b"# my dataset".to_vec()),
            ],
        )
        .await;
    let reply = validate(&mut client, &spec(&zip, 10)).await;
    assert_eq!(
        only_problem(&reply, "dataset.images"),
        "the dataset has 0 usable images (unreadable, too small or over the clip limits: broken.png); \
         at least 1 is needed: reference needs at least one image to train on"
    );
    assert!(reply.estimate.is_none());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_smaller_than_the_resolution() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    spec.training.as_mut().unwrap().resolution = 128;
    let reply = validate(&mut client, &spec).await;
    let message = only_problem(&reply, "dataset.resolution");
    assert!(
        message.starts_with(
            "8 images are smaller than training.resolution 128 on the short side, so the \
             trainer would upscale them: tyzx_01.png (64×64), tyzx_02.png (64×64)"
        ),
        "{message}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_without_captions() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    // No trigger word, and a template that is only the trigger word: the
    // images without a sidecar would train with empty captions.
    spec.caption = Some(CaptionSettings {
        template: "{trigger}".into(),
        ..Default::default()
    });
    let reply = validate(&mut client, &spec).await;
    let message = only_problem(&reply, "dataset.captions");
    assert!(
        message.starts_with("4 images have no caption or an empty one: tyzx_02.png, tyzx_04.png"),
        "{message}"
    );
    assert!(
        message.contains("diffusion-pipe skips such images"),
        "{message}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_without_the_trigger_word() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    // Captions are one line with single spaces: the template's captions
    // end up with "tyzx coin", not the trigger word as given.
    spec.caption.as_mut().unwrap().trigger_word = "tyzx  coin".into();
    let reply = validate(&mut client, &spec).await;
    let message = only_problem(&reply, "dataset.trigger_word");
    assert!(
        message.starts_with(
            "4 captions lack the trigger word \"tyzx  coin\": tyzx_02.png (\"a photo of tyzx coin\")"
        ),
        "{message}"
    );
    assert!(
        message.ends_with("appears as \"tyzx coin\": use that as caption.trigger_word"),
        "{message}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_model_that_does_not_exist() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    let missing = fleet.store.uri(&format!(
        "{}/nobody-uploaded-this.safetensors",
        upload_key("acme", "models")
    ));
    spec.base_model = Some(ModelRef {
        uri: missing.clone(),
        family: "reference".into(),
    });
    let reply = validate(&mut client, &spec).await;
    assert_eq!(
        only_problem(&reply, "base_model"),
        format!("{missing} does not exist in the artifact store")
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_that_cannot_be_written() {
    let roots = tempfile::tempdir().unwrap();
    let allowed = roots.path().join("deliveries");
    std::fs::create_dir_all(&allowed).unwrap();
    let a_file = allowed.join("README");
    std::fs::write(&a_file, b"not a folder").unwrap();
    let root = allowed.clone();
    let fleet = Fleet::start_with(prepare_fleet(), move |config| {
        config.uploader.allowed_local_roots = vec![root];
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    let outside = roots.path().join("elsewhere");
    spec.destinations = vec![
        Destination {
            uri: format!("file://{}", allowed.join("ok").display()),
            ..Default::default()
        },
        Destination {
            uri: format!("file://{}", outside.display()),
            ..Default::default()
        },
        Destination {
            uri: format!("file://{}", a_file.join("out").display()),
            ..Default::default()
        },
    ];
    // Outside the roots: refused by the submission checks.
    let reply = validate(&mut client, &spec).await;
    assert_eq!(
        lines(&reply),
        [
            "destinations[1].uri: is not inside an allowed destination root ([uploader] allowed_local_roots)"
        ]
    );
    spec.destinations.remove(1);
    let reply = validate(&mut client, &spec).await;
    assert_eq!(
        lines(&reply),
        [format!(
            "destinations: destination file://{} is not writable: {} is a file, so {} cannot be created",
            a_file.join("out").display(),
            a_file.display(),
            a_file.join("out").display()
        ),]
    );
    assert!(!outside.exists() && !allowed.join("ok").exists());
    fleet.stop().await;
}

#[tokio::test]
async fn spec_problems_are_answered_without_a_captioner() {
    let fleet = Fleet::start_with(
        Services {
            captioner: false,
            ..prepare_fleet()
        },
        |_| {},
    )
    .await;
    let mut client = fleet.client(TOKEN).await;
    let mut bad = spec(&fleet.upload_uri("acme", "set.zip"), 0);
    bad.training.as_mut().unwrap().rank = 0;
    let reply = client
        .validate(ValidateRequest {
            spec: Some(bad.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.ok);
    assert_eq!(
        lines(&reply),
        [
            "training.steps: must be at least 1",
            "training.rank: must be at least 1"
        ]
    );
    // A valid spec needs a captioner to look at the dataset.
    let status = client
        .validate(ValidateRequest {
            spec: Some(spec(&fleet.upload_uri("acme", "set.zip"), 10)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().starts_with("no captioner is running"),
        "{}",
        status.message()
    );
    let status = fleet
        .client("wrong-token")
        .await
        .validate(ValidateRequest { spec: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    fleet.stop().await;
}

/// Every event of a job so far, until `done` says enough.
async fn events_until(
    client: &mut Client,
    job: &str,
    done: impl Fn(&JobEvent) -> bool,
) -> Vec<JobEvent> {
    let mut stream = client
        .watch(WatchRequest { job_id: job.into() })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = stream.next().await {
            let event = event.expect("watch event");
            let stop = done(&event);
            events.push(event);
            if stop {
                return;
            }
        }
    })
    .await
    .expect("the awaited event came in time");
    events
}

/// Train tasks the workers' consumer has been given or has waiting.
async fn train_tasks(fleet: &Fleet) -> u64 {
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let stream = js.get_stream(TASKS_STREAM).await.expect("tasks stream");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&consumer_name(Stage::Train, "default"))
        .await
        .expect("the worker's consumer");
    let info = consumer.info().await.expect("consumer info");
    info.delivered.consumer_sequence + info.num_pending
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_preflight_fails_at_once_with_every_problem() {
    let roots = tempfile::tempdir().unwrap();
    let allowed = roots.path().join("deliveries");
    let root = allowed.clone();
    let fleet = Fleet::start_with(Services::ALL, move |config| {
        config.uploader.allowed_local_roots = vec![root];
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    spec.training.as_mut().unwrap().resolution = 128;
    let missing = fleet.store.uri(&format!(
        "{}/missing.safetensors",
        upload_key("acme", "models")
    ));
    spec.base_model = Some(ModelRef {
        uri: missing.clone(),
        family: "reference".into(),
    });
    // Allowed, but not a folder the uploader could write to.
    std::fs::create_dir_all(&allowed).unwrap();
    let a_file = allowed.join("README");
    std::fs::write(&a_file, b"not a folder").unwrap();
    let outside = a_file.join("out");
    spec.destinations = vec![Destination {
        uri: outside.display().to_string(),
        ..Default::default()
    }];
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;

    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    assert_eq!(
        record.stage(),
        Stage::Prepare,
        "it never left the prepare stage"
    );
    assert_eq!(record.attempt, 1, "no retries");
    let error = record.error.expect("error");
    assert_eq!(
        error.kind(),
        ErrorKind::BadDataset,
        "the first problem's kind"
    );
    assert!(!error.retryable);
    let lines: Vec<&str> = error.message.lines().collect();
    assert_eq!(lines[0], "preflight found 3 problems:");
    assert!(
        lines[1].starts_with("dataset.resolution: 8 images are smaller"),
        "{lines:?}"
    );
    assert_eq!(
        lines[2],
        format!("base_model: {missing} does not exist in the artifact store")
    );
    assert!(
        lines[3].starts_with(&format!(
            "destinations: destination {} is not writable: {} is a file",
            outside.display(),
            a_file.display()
        )),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 4);

    // No training ever started: no training event, no train task published.
    assert!(
        !events.iter().any(|e| match &e.kind {
            Some(Kind::Progress(p)) => p.stage() == Stage::Train,
            Some(Kind::State(s)) => s.state() == JobState::Training,
            Some(Kind::Log(l)) => l.stage() == Stage::Train,
            _ => false,
        }),
        "training events: {events:#?}"
    );
    assert_eq!(train_tasks(&fleet).await, 0, "a train task was published");
    assert!(!outside.exists());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_passing_preflight_notes_the_estimate() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    spec.training.as_mut().unwrap().repeats = 3;
    let job = submit(&mut client, spec).await;
    let note =
        "preflight ok: 8 images × 3 repeats ÷ batch 2 = 12 steps per epoch; 20 steps ≈ 1.7 epochs";
    let events = events_until(
        &mut client,
        &job.job_id,
        |e| matches!(&e.kind, Some(Kind::State(s)) if s.state() == JobState::Training),
    )
    .await;
    let notes: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Prepare => Some(p.message.as_str()),
            _ => None,
        })
        .collect();
    assert!(notes.contains(&note), "{notes:?}");
    let stored = notes
        .iter()
        .position(|n| n.starts_with("storing "))
        .expect("storing note");
    assert!(
        notes.iter().position(|n| *n == note) < Some(stored),
        "preflight runs before the dataset is stored: {notes:?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_destination_without_its_bucket() {
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let options = s3.options();
    let fleet = Fleet::start_with(prepare_fleet(), |config| config.store.s3 = options).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    spec.destinations = vec![
        Destination {
            uri: "s3://deliveries/out".into(),
            ..Default::default()
        },
        Destination {
            uri: "s3://no-such-bucket/out".into(),
            ..Default::default()
        },
    ];
    spec.secrets = Some(s3.job_secrets());
    let reply = validate(&mut client, &spec).await;
    let message = only_problem(&reply, "destinations");
    assert_eq!(
        message,
        "destination s3://no-such-bucket/out is not writable: the bucket does not exist or \
         cannot hold objects (the server answered 404 Not Found)"
    );
    // The probe of the good bucket left nothing behind.
    let bucket = trainyard_core::store::ArtifactStore::open_with("s3://deliveries", &s3.options())
        .expect("bucket");
    assert_eq!(bucket.list("").await.expect("list"), []);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_dataset_is_checked_row_by_row() {
    let fleet = Fleet::start_with(prepare_fleet(), |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let model = fleet
        .store
        .put_bytes(
            &format!("{}/tiny-llm.safetensors", upload_key("acme", "models")),
            bytes::Bytes::from_static(b"weights"),
        )
        .await
        .expect("model")
        .uri;
    let text_spec = |dataset: &str| {
        let mut spec = spec(dataset, 30);
        let training = spec.training.as_mut().unwrap();
        training.backend = "trl".into();
        training.batch_size = 2;
        spec.base_model = Some(ModelRef {
            uri: model.clone(),
            family: "llm".into(),
        });
        spec.caption = None;
        spec
    };
    let rows = "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n".repeat(5);
    let good = fleet
        .store
        .put_bytes(
            &format!("{}/train.jsonl", upload_key("acme", "good")),
            rows.clone().into(),
        )
        .await
        .expect("dataset")
        .uri;
    let reply = validate(&mut client, &text_spec(&good)).await;
    assert!(reply.ok, "{:#?}", lines(&reply));
    let e = reply.estimate.expect("estimate");
    assert_eq!(
        (
            e.images,
            e.batch_size,
            e.steps_per_epoch,
            e.total_steps,
            e.unit.as_str()
        ),
        (5, 2, 3, 30, "examples")
    );

    let broken = fleet
        .zip_uri(
            "broken-text",
            &[(
                "chat/train.jsonl",
                format!("{rows}{{\"prompt\": \"3+3?\"\n").into_bytes(),
            )],
        )
        .await;
    let reply = validate(&mut client, &text_spec(&broken)).await;
    let message = only_problem(&reply, "dataset.jsonl");
    assert!(
        message.starts_with("train.jsonl for sft: line 6: not valid JSON"),
        "{message}"
    );

    // As a job: stored with its sha256 in the manifest, which the worker checks.
    let job = submit(&mut client, text_spec(&good)).await;
    let events = events_until(
        &mut client,
        &job.job_id,
        |e| matches!(&e.kind, Some(Kind::State(s)) if s.state() == JobState::Training),
    )
    .await;
    assert!(
        events.iter().any(|e| matches!(&e.kind, Some(Kind::Progress(p))
            if p.message == "preflight ok: 5 examples ÷ batch 2 = 3 steps per epoch; 30 steps ≈ 10.0 epochs")),
        "{events:#?}"
    );
    let prefix = keys::dataset(
        &trainyard_proto::TenantId::parse("acme").unwrap(),
        &JobId::parse(&job.job_id).unwrap(),
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &fleet
            .store
            .get_bytes(&format!("{prefix}/manifest.json"))
            .await
            .expect("manifest"),
    )
    .expect("json");
    let stored = fleet
        .store
        .get_bytes(&format!("{prefix}/train.jsonl"))
        .await
        .expect("train.jsonl");
    assert_eq!(stored, rows.as_bytes());
    assert_eq!(manifest["texts"][0]["file"], "train.jsonl");
    assert_eq!(
        manifest["texts"][0]["sha256"].as_str(),
        Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(rows.as_bytes())).as_str())
    );
    fleet.stop().await;
}

/// A fleet that fetches base models from a loopback Hub holding
/// llama-3.2-1b-instruct (gated, readable with `HF_TOKEN`), and a
/// `train.jsonl` for it.
async fn hub_fleet() -> (Fleet, FakeHub, String) {
    let hub = FakeHub::start(HF_TOKEN).await;
    hub.add_presets(&["llama-3.2-1b-instruct"]);
    let endpoint = hub.endpoint();
    let fleet = Fleet::start_with(prepare_fleet(), move |config| {
        config.worker.hf_endpoint = endpoint;
    })
    .await;
    let rows = "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n".repeat(4);
    let dataset = fleet
        .store
        .put_bytes(
            &format!("{}/train.jsonl", upload_key("acme", "chat")),
            rows.into(),
        )
        .await
        .expect("dataset")
        .uri;
    (fleet, hub, dataset)
}

const HF_TOKEN: &str = "hf_preflight_test";

fn llm_spec(dataset: &str, model: &str, token: Option<&str>) -> JobSpec {
    let mut spec = spec(dataset, 10);
    spec.training.as_mut().unwrap().backend = "trl".into();
    spec.caption = None;
    spec.base_model = Some(ModelRef {
        uri: model.into(),
        family: "llm".into(),
    });
    spec.secrets = token.map(|t| Secrets {
        hf_token: t.into(),
        ..Default::default()
    });
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_preset_needs_a_token_that_may_read_it() {
    let (fleet, _hub, dataset) = hub_fleet().await;
    let mut client = fleet.client(TOKEN).await;
    let model = "llama-3.2-1b-instruct";

    let reply = validate(&mut client, &llm_spec(&dataset, model, None)).await;
    assert_eq!(
        only_problem(&reply, "base_model"),
        "hf://meta-llama/Llama-3.2-1B-Instruct@main cannot be read: meta-llama/Llama-3.2-1B-Instruct \
         is a gated repository and no token was given; set secrets.hf_token to a token of an \
         account that has accepted the model's licence"
    );

    let reply = validate(
        &mut client,
        &llm_spec(&dataset, model, Some("hf_someone_else")),
    )
    .await;
    let message = only_problem(&reply, "base_model");
    assert!(
        message.contains("the token has not been granted access to it; use a token of an account"),
        "{message}"
    );

    let reply = validate(&mut client, &llm_spec(&dataset, model, Some(HF_TOKEN))).await;
    assert!(reply.ok, "{:#?}", lines(&reply));
    assert_eq!(reply.estimate.expect("estimate").unit, "examples");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hf_reference_that_does_not_exist() {
    let (fleet, _hub, dataset) = hub_fleet().await;
    let mut client = fleet.client(TOKEN).await;
    let spec = llm_spec(&dataset, "hf://nobody/no-such-model@main", None);
    let reply = validate(&mut client, &spec).await;
    assert_eq!(
        only_problem(&reply, "base_model"),
        "hf://nobody/no-such-model@main cannot be read: repository nobody/no-such-model not found"
    );
    let spec = llm_spec(
        &dataset,
        "hf://meta-llama/Llama-3.2-1B-Instruct@main/no-such-file.safetensors",
        Some(HF_TOKEN),
    );
    let reply = validate(&mut client, &spec).await;
    assert_eq!(
        only_problem(&reply, "base_model"),
        "hf://meta-llama/Llama-3.2-1B-Instruct@main/no-such-file.safetensors cannot be read: \
         no-such-file.safetensors not found in meta-llama/Llama-3.2-1B-Instruct@main"
    );
    fleet.stop().await;
}
