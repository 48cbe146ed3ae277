//! Attacks on job destinations, against a real fleet (nats-server, gRPC on
//! loopback, a local artifact store, moto for S3): a tenant must not make
//! the fleet write into a folder the operator did not allow, learn which
//! folders exist, or reach a bucket with the fleet's own keys.
//!
//! The test fleet allows local destinations only under its outputs folder
//! (`Fleet::outputs_dir`).

use prost::Message;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_core::config::DestinationCredential;
use trainyard_core::events::EventSink;
use trainyard_core::runtime::{StageError, StageHandler, TaskContext, TaskMeta};
use trainyard_core::store::{ArtifactStore, keys};
use trainyard_core::topology::subject;
use trainyard_proto::v1::{
    Artifact, DeliverTask, Destination, ErrorKind, JobSpec, JobState, PreflightRequest, Stage,
    ValidateRequest,
};
use trainyard_proto::{Attempt, JobId, TenantId};
use trainyard_tests::*;

/// The answer to a submission that must be refused.
async fn refused(client: &mut Client, spec: JobSpec) -> tonic::Status {
    client
        .submit(trainyard_proto::v1::SubmitRequest { spec: Some(spec) })
        .await
        .expect_err("the submission is refused")
}

fn destination(uri: impl Into<String>) -> Destination {
    Destination {
        uri: uri.into(),
        ..Default::default()
    }
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// The keys in `bucket`, sorted.
async fn keys_in(bucket: &ArtifactStore) -> Vec<String> {
    let mut found: Vec<String> = bucket
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    found.sort();
    found
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A deliver stage's context for `job` of tenant acme.
fn context(js: &async_nats::jetstream::Context, job: &JobId) -> TaskContext {
    let tenant = TenantId::parse("acme").unwrap();
    TaskContext {
        meta: TaskMeta {
            tenant: tenant.clone(),
            job: job.clone(),
            attempt: Attempt(1),
        },
        stage: Stage::Deliver,
        delivered: 1,
        worker_id: "test".into(),
        record: Default::default(),
        events: EventSink::new(js.clone(), tenant, job.clone()),
        cancel: CancellationToken::new(),
        stop: CancellationToken::new(),
        log_bytes: Default::default(),
    }
}

/// A deliver task of tenant acme for an adapter already in the store.
async fn deliver_task(fleet: &Fleet, spec: JobSpec) -> (JobId, DeliverTask) {
    let job = JobId::generate();
    let adapter = fleet
        .store
        .put_bytes(
            &keys::output_file(
                &trainyard_proto::TenantId::parse("acme").unwrap(),
                &job,
                "lora.safetensors",
            ),
            vec![7u8; 1024].into(),
        )
        .await
        .unwrap();
    let task = DeliverTask {
        job_id: job.to_string(),
        tenant: "acme".into(),
        attempt: 1,
        spec: Some(spec),
        artifacts: vec![Artifact {
            name: "lora.safetensors".into(),
            ..adapter
        }],
        ..Default::default()
    };
    (job, task)
}

/// Runs the uploader's deliver stage on `task` as the stage runtime would.
async fn deliver(
    fleet: &Fleet,
    job: &JobId,
    task: DeliverTask,
) -> Result<trainyard_proto::v1::stage_result::Outcome, StageError> {
    let parts = fleet.coordinator_parts().await;
    let stage = trainyard_uploader::deliver::DeliverStage::new(&fleet.config).unwrap();
    stage.handle(task, context(&parts.js, job)).await
}

fn failure_kind(result: Result<impl std::fmt::Debug, StageError>) -> (ErrorKind, String) {
    match result {
        Err(StageError::Fail(e)) => (e.kind(), e.message),
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_outside_the_allowed_roots_is_refused_and_nothing_is_written() {
    let fleet = Fleet::start_secured(Services::ALL, |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let sample = fleet.sample_uri().await;
    let outside = tempfile::tempdir().unwrap();
    let target = std::fs::canonicalize(outside.path()).unwrap();
    // A symlink inside the allowed root that points out of it.
    std::fs::create_dir_all(fleet.outputs_dir()).unwrap();
    let escape = fleet.outputs_dir().join("escape");
    std::os::unix::fs::symlink(&target, &escape).unwrap();

    for uri in [
        file_uri(&target),
        target.join("new/folder").display().to_string(),
        file_uri(&escape),
        file_uri(&escape.join("sub")),
        format!("{}/../escape-by-dots", fleet.outputs_dir().display()),
    ] {
        let mut attack = spec(&sample, 10);
        attack.destinations = vec![destination(uri.clone())];
        let status = refused(&mut client, attack).await;
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{uri}: {status:?}"
        );
        assert!(
            status.message().starts_with("destinations[0].uri: "),
            "{uri}: {}",
            status.message()
        );
    }
    // The plain answer says only that the folder is not allowed.
    let mut plain = spec(&sample, 10);
    plain.destinations = vec![destination(file_uri(&target))];
    assert_eq!(
        refused(&mut client, plain).await.message(),
        "destinations[0].uri: is not inside an allowed destination root ([uploader] allowed_local_roots)"
    );

    // An allowed destination still works, beside the refused ones.
    let allowed = fleet.outputs_dir().join("ok");
    let job = submit(&mut client, with_destination(spec(&sample, 10), &allowed)).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    assert!(allowed.join(&job.job_id).join("lora.safetensors").is_file());

    assert_eq!(
        entries(&target),
        Vec::<String>::new(),
        "nothing written outside"
    );
    assert!(!fleet.dir.path().join("escape-by-dots").exists());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_after_submission_is_refused_at_write_time() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    let outside = tempfile::tempdir().unwrap();
    let target = std::fs::canonicalize(outside.path()).unwrap();
    let late = fleet.outputs_dir().join("late");
    let mut spec = spec("unused", 10);
    spec.destinations = vec![destination(file_uri(&late.join("sub")))];
    let (job, task) = deliver_task(&fleet, spec).await;
    // Between submission and delivery the folder became a way out.
    std::fs::create_dir_all(fleet.outputs_dir()).unwrap();
    std::os::unix::fs::symlink(&target, &late).unwrap();

    let (kind, message) = failure_kind(deliver(&fleet, &job, task).await);
    assert_eq!(kind, ErrorKind::InvalidSpec);
    assert!(
        message.contains("is not inside an allowed destination root"),
        "{message}"
    );
    assert_eq!(
        entries(&target),
        Vec::<String>::new(),
        "nothing written outside"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_answers_alike_for_existing_and_missing_folders_outside_the_roots() {
    let fleet = Fleet::start_secured(
        Services {
            coordinator: true,
            captioner: true,
            ..Services::NONE
        },
        |_| {},
    )
    .await;
    let mut client = fleet.client(TOKEN).await;
    let sample = fleet.sample_uri().await;
    let outside = tempfile::tempdir().unwrap();
    let existing = std::fs::canonicalize(outside.path()).unwrap();
    let a_file = existing.join("a-file");
    std::fs::write(&a_file, b"x").unwrap();
    let missing = existing.join("no/such/folder");

    let mut answers = Vec::new();
    for path in [&existing, &a_file, &missing, Path::new("/etc")] {
        let mut spec = spec(&sample, 10);
        spec.destinations = vec![destination(file_uri(path))];
        let reply = client
            .validate(ValidateRequest { spec: Some(spec) })
            .await
            .expect("validate")
            .into_inner();
        assert!(!reply.ok);
        answers.push(reply.problems);
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:#?}");
    assert_eq!(answers[0].len(), 1, "{answers:#?}");
    assert_eq!(answers[0][0].check, "destinations[0].uri");

    // A preflight request straight to the captioners (past the
    // coordinator's checks) answers alike too, and probes nothing there.
    let nats = fleet.nats_client().await;
    let mut messages = Vec::new();
    for path in [&existing, &a_file, &missing] {
        let mut spec = spec(&sample, 10);
        spec.destinations = vec![destination(path.display().to_string())];
        let request = PreflightRequest {
            tenant: "acme".into(),
            spec: Some(spec),
        };
        // The captioner may not listen yet: ask until one answers.
        let payload: bytes::Bytes = request.encode_to_vec().into();
        let reply = wait_for("a captioner answers", Duration::from_secs(30), || {
            let (nats, payload) = (nats.clone(), payload.clone());
            async move { nats.request(subject::preflight(), payload).await.ok() }
        })
        .await;
        let reply = trainyard_proto::v1::ValidateReply::decode(reply.payload).expect("reply");
        let problems: Vec<String> = reply
            .problems
            .iter()
            .filter(|p| p.check == "destinations")
            .map(|p| p.message.replace(&path.display().to_string(), "<uri>"))
            .collect();
        messages.push(problems);
    }
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:#?}");
    assert_eq!(
        messages[0],
        ["<uri> is not inside an allowed destination root"]
    );
    assert_eq!(entries(&existing), ["a-file"], "no probe file was made");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_destination_into_the_store_bucket_is_refused() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet").await;
    let options = s3.options();
    let fleet = Fleet::start_secured(Services::NONE, |config| {
        config.store.uri = "s3://fleet/store".into();
        config.store.s3 = options;
    })
    .await;
    let mut fleet = fleet;
    fleet.start_coordinator().await;
    let mut client = fleet.client(TOKEN).await;
    for uri in [
        "s3://fleet/store",
        "s3://fleet/store/jobs",
        "s3://fleet/other",
        "s3://fleet",
    ] {
        let mut spec = spec("s3://fleet/store/tenants/acme/uploads/x/x.zip", 10);
        spec.destinations = vec![destination(uri)];
        spec.secrets = Some(s3.job_secrets());
        let status = refused(&mut client, spec).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{uri}");
        assert!(
            status
                .message()
                .contains("overlaps the fleet's artifact store"),
            "{uri}: {}",
            status.message()
        );
    }
    // The uploader refuses it too, should a task get past the coordinator.
    let mut spec = spec("unused", 10);
    spec.destinations = vec![destination("s3://fleet/other")];
    spec.secrets = Some(s3.job_secrets());
    let (job, task) = deliver_task(&fleet, spec).await;
    let (kind, message) = failure_kind(deliver(&fleet, &job, task).await);
    assert_eq!(kind, ErrorKind::InvalidSpec);
    assert!(message.contains("overlaps"), "{message}");
    let bucket = ArtifactStore::open_with("s3://fleet/other", &s3.options()).unwrap();
    assert_eq!(keys_in(&bucket).await, Vec::<String>::new());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_destination_without_job_credentials_never_uses_the_store_keys() {
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let options = s3.options();
    // The fleet's `[store.s3]` reaches the bucket: a destination must not
    // borrow those keys.
    let fleet = Fleet::start_secured(Services::NONE, |config| config.store.s3 = options).await;
    let mut fleet = fleet;
    fleet.start_coordinator().await;
    let mut client = fleet.client(TOKEN).await;
    let sample = fleet.sample_uri().await;
    let mut spec = spec(&sample, 10);
    spec.destinations = vec![destination("s3://deliveries/out")];
    let status = refused(&mut client, spec.clone()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("destinations[0].uri: s3://deliveries/out needs credentials"),
        "{}",
        status.message()
    );

    // The uploader, given such a task anyway, fails it and writes nothing.
    let (job, task) = deliver_task(&fleet, spec).await;
    let (kind, message) = failure_kind(deliver(&fleet, &job, task).await);
    assert_eq!(kind, ErrorKind::InvalidSpec);
    assert!(message.contains("needs credentials"), "{message}");
    let bucket = ArtifactStore::open_with("s3://deliveries", &s3.options()).unwrap();
    assert_eq!(keys_in(&bucket).await, Vec::<String>::new());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_endpoint_on_a_private_address_is_refused() {
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let mut fleet = Fleet::start_secured(Services::NONE, |config| {
        config.destinations.allow_private_endpoints = false;
    })
    .await;
    fleet.start_coordinator().await;
    let mut client = fleet.client(TOKEN).await;
    // A literal private address: refused at submission.
    let mut spec = spec(&fleet.sample_uri().await, 10);
    spec.destinations = vec![destination("s3://deliveries/out")];
    spec.secrets = Some(s3.job_secrets());
    let status = refused(&mut client, spec.clone()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("is not a public address"),
        "{}",
        status.message()
    );

    // A name that resolves to one: refused when the uploader connects.
    let mut by_name = s3.job_secrets();
    by_name.values.insert(
        "AWS_ENDPOINT_URL".into(),
        s3.endpoint.replace("127.0.0.1", "localhost"),
    );
    spec.secrets = Some(by_name);
    let (job, task) = deliver_task(&fleet, spec).await;
    let (kind, message) = failure_kind(deliver(&fleet, &job, task).await);
    assert_eq!(kind, ErrorKind::InvalidSpec);
    assert!(message.contains("is not a public address"), "{message}");
    let bucket = ArtifactStore::open_with("s3://deliveries", &s3.options()).unwrap();
    assert_eq!(keys_in(&bucket).await, Vec::<String>::new());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_credentials_deliver_to_an_s3_destination() {
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    // The fleet has no S3 keys at all: the job brings its own.
    let fleet = Fleet::start_secured(Services::ALL, |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    spec.destinations = vec![destination("s3://deliveries/out")];
    spec.secrets = Some(s3.job_secrets());
    let job = submit(&mut client, spec).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    let bucket = ArtifactStore::open_with("s3://deliveries", &s3.options()).unwrap();
    assert_eq!(
        keys_in(&bucket).await,
        [
            format!("out/{}/lora.safetensors", job.job_id),
            format!("out/{}/manifest.json", job.job_id)
        ]
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_credential_serves_only_the_tenants_it_lists() {
    let s3 = S3Server::start();
    s3.create_bucket("shared").await;
    let credential = DestinationCredential {
        tenants: vec!["acme".into()],
        access_key_id: "fleet-deliveries".into(),
        secret_access_key: "fleet-deliveries-secret".into(),
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        ..Default::default()
    };
    let mut fleet = Fleet::start_secured(Services::NONE, |config| {
        config
            .destinations
            .credentials
            .insert("deliveries".into(), credential);
    })
    .await;
    fleet.start_coordinator().await;
    let sample = fleet.sample_uri().await;
    let uri = "s3://shared/out?credential=deliveries";
    let mut spec = spec(&sample, 10);
    spec.destinations = vec![destination(uri)];

    // Another tenant, or an unknown name: the same refusal.
    let mut globex = fleet.client(OTHER_TOKEN).await;
    let status = refused(&mut globex, spec.clone()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let mut unknown = spec.clone();
    unknown.destinations = vec![destination("s3://shared/out?credential=nope")];
    let other = refused(&mut globex, unknown).await;
    assert_eq!(
        status.message().replace("deliveries", "<name>"),
        other.message().replace("nope", "<name>")
    );

    // The tenant it lists delivers with it.
    let mut acme = fleet.client(TOKEN).await;
    let validated = acme
        .validate(ValidateRequest {
            spec: Some(spec.clone()),
        })
        .await;
    // No captioner runs: past the submission checks, Validate is unavailable.
    assert_eq!(validated.unwrap_err().code(), tonic::Code::Unavailable);
    let (job, task) = deliver_task(&fleet, spec).await;
    deliver(&fleet, &job, task).await.expect("delivered");
    let bucket = ArtifactStore::open_with("s3://shared", &s3.options()).unwrap();
    assert_eq!(
        keys_in(&bucket).await,
        [
            format!("out/{job}/lora.safetensors"),
            format!("out/{job}/manifest.json")
        ]
    );
    fleet.stop().await;
}
