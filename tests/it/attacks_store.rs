//! The store's tenant boundary, attacked on a real fleet: tenant globex
//! names tenant acme's objects (a dataset folder, a job's LoRA, a
//! checkpoint), `<root>/tenants` or the store's root as its dataset or base
//! model; acme's job names globex's upload past the coordinator; a planted
//! checkpoint waits in a job's own prefix; globex asks for acme's outputs;
//! uploads try to leave their folder or pass the caps. Each must fail
//! clearly, and nothing of another tenant is read.

use futures::StreamExt;
use std::time::Duration;
use trainyard_core::store::{CheckpointManifest, keys};
use trainyard_core::topology::{EVENTS_STREAM, EventKind, subject};
use trainyard_proto::v1::{
    Artifact, DownloadRequest, JobEvent, JobState, ModelRef, SubmitRequest, UploadChunk,
    ValidateReply, ValidateRequest, WatchRequest, job_event::Kind,
};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::*;

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn coordinator_only() -> Services {
    Services {
        coordinator: true,
        ..Services::NONE
    }
}

/// `Validate` past the coordinator's own checks; a refusal there needs no
/// captioner.
async fn validate(client: &mut Client, spec: &trainyard_proto::v1::JobSpec) -> ValidateReply {
    client
        .validate(ValidateRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect("validate answers")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_objects_and_the_root_are_refused_at_submit_and_validate() {
    let fleet = Fleet::start_secured(coordinator_only(), |_| {}).await;
    let (acme, job) = (tenant("acme"), JobId::generate());
    // What acme has in the store: an upload, a prepared dataset, a LoRA
    // and a checkpoint.
    let dataset_upload = fleet.sample_uri().await;
    let weights = bytes::Bytes::from_static(b"acme's weights");
    for key in [
        format!("{}/manifest.json", keys::dataset(&acme, &job)),
        keys::output_file(&acme, &job, "lora.safetensors"),
        keys::checkpoint_file(&keys::checkpoint(&acme, &job, 10), "model.safetensors"),
    ] {
        fleet.store.put_bytes(&key, weights.clone()).await.unwrap();
    }
    let root = fleet.store.root().to_string();
    let datasets = [
        dataset_upload.clone(),
        fleet.store.uri(&keys::dataset(&acme, &job)),
        fleet.store.uri(&keys::output(&acme, &job)),
        fleet.store.uri(&keys::checkpoint(&acme, &job, 10)),
        format!("{root}/tenants"),
        format!("{root}/tenants/acme"),
        root.clone(),
        format!("{root}/"),
        format!("{root}/tenants/globex/uploads/x/../../../acme/uploads/sample"),
        format!("{root}/tenants/globex/uploads/x%2f..%2f..%2facme"),
        "file:///etc".to_string(),
    ];
    let models = [
        fleet
            .store
            .uri(&keys::output_file(&acme, &job, "lora.safetensors")),
        fleet.store.uri(&keys::checkpoint_file(
            &keys::checkpoint(&acme, &job, 10),
            "model.safetensors",
        )),
        format!("{root}/models/reference-denoiser-v1-r32/model.safetensors"),
    ];
    let mut globex = fleet.client(OTHER_TOKEN).await;
    let own = fleet.upload_uri("globex", "mine");
    let mut tried = Vec::new();
    for uri in &datasets {
        tried.push((spec(uri, 10), "dataset.artifact_uri"));
    }
    for uri in &models {
        let mut spec = spec(&own, 10);
        spec.base_model = Some(ModelRef {
            uri: uri.clone(),
            family: "reference".into(),
        });
        tried.push((spec, "base_model.uri"));
    }
    for (spec, field) in tried {
        let shown = format!("{:?}", (&spec.dataset, &spec.base_model));
        let status = globex
            .submit(SubmitRequest {
                spec: Some(spec.clone()),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{shown}");
        assert!(status.message().starts_with(field), "{shown}: {status}");
        let reply = validate(&mut globex, &spec).await;
        assert!(!reply.ok, "{shown}");
        assert_eq!(
            reply
                .problems
                .iter()
                .map(|p| p.check.as_str())
                .collect::<Vec<_>>(),
            [field],
            "{shown}"
        );
        assert!(reply.estimate.is_none(), "nothing was fetched: {shown}");
    }
    // globex's own upload passes the same checks (the job stays queued:
    // no captioner runs).
    let mine = globex
        .submit(SubmitRequest {
            spec: Some(spec(&own, 10)),
        })
        .await;
    assert!(mine.is_ok(), "{mine:?}");
    fleet.stop().await;
}

/// Watches a job to its end; its events.
async fn until_final(client: &mut Client, job_id: &str) -> Vec<JobEvent> {
    watch_all(client, job_id, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_naming_another_tenants_upload_fails_in_the_captioner_without_a_read() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            uploader: false,
            ..Services::ALL
        },
        |_| {},
    )
    .await;
    // Past a coordinator that did not check (as a forged record would be).
    let theirs = fleet.sample_uri_for("globex").await;
    let parts = fleet.coordinator_parts().await;
    let (job, record) = store_queued(&parts.repo, spec(&theirs, 10)).await;
    let task = trainyard_coordinator::job::current_task(&record).expect("a task");
    parts
        .reconciler
        .effects
        .publish_task(&tenant("acme"), &job, task)
        .await
        .expect("published");
    let mut client = fleet.client(TOKEN).await;
    until_final(&mut client, job.as_str()).await;
    let record = get(&mut client, job.as_str()).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.expect("a cause");
    assert_eq!(error.kind(), trainyard_proto::v1::ErrorKind::InvalidSpec);
    assert!(
        error.message.contains("dataset.artifact_uri") && error.message.contains("tenants/acme/"),
        "{}",
        error.message
    );
    // Nothing of globex's was read into acme's job.
    assert_eq!(
        fleet
            .store
            .list(&keys::job(&tenant("acme"), &job))
            .await
            .unwrap(),
        []
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_over_the_caps_is_refused_before_it_is_fetched() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            uploader: false,
            ..Services::ALL
        },
        |config| config.captioner.max_files = 3,
    )
    .await;
    let mut client = fleet.client(TOKEN).await;
    let sample = fleet.sample_uri().await; // more than 3 files
    let reply = wait_for("a captioner to answer", Duration::from_secs(60), || {
        let mut client = client.clone();
        let sample = sample.clone();
        async move {
            match client
                .validate(ValidateRequest {
                    spec: Some(spec(&sample, 10)),
                })
                .await
            {
                Ok(reply) => Some(reply.into_inner()),
                Err(status) if status.code() == tonic::Code::Unavailable => None,
                Err(status) => panic!("{status}"),
            }
        }
    })
    .await;
    assert!(!reply.ok);
    assert!(
        reply
            .problems
            .iter()
            .any(|p| p.message.contains("holds more than 3 files")),
        "{:#?}",
        reply.problems
    );
    let job = submit(&mut client, spec(&sample, 10)).await;
    until_final(&mut client, &job.job_id).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let message = record.error.expect("cause").message;
    assert!(message.contains("holds more than 3 files"), "{message}");
    fleet.stop().await;
}

/// The newest `checkpoint` event of a job.
async fn last_checkpoint(fleet: &Fleet, job: &JobId) -> trainyard_proto::v1::Checkpoint {
    use prost::Message;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let message = js
        .get_stream(EVENTS_STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&subject::event(
            &tenant("acme"),
            job,
            EventKind::Checkpoint,
        ))
        .await
        .expect("a checkpoint event");
    match JobEvent::decode(message.payload).unwrap().kind {
        Some(Kind::Checkpoint(checkpoint)) => checkpoint,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_checkpoint_is_not_restored() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            ..Services::ALL
        },
        |_| {},
    )
    .await;
    let (stop, worker) = fleet.start_worker();
    let mut client = fleet.client(TOKEN).await;
    let mut long = spec(&fleet.sample_uri().await, 100_000);
    long.training.as_mut().unwrap().save_every = 5;
    let job = submit(&mut client, long).await;
    let job_id = JobId::parse(&job.job_id).unwrap();
    let mut events = client
        .watch(WatchRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(Ok(event)) = events.next().await {
            if matches!(event.kind, Some(Kind::Checkpoint(_))) {
                return;
            }
        }
        panic!("watch ended before a checkpoint");
    })
    .await
    .expect("a checkpoint in time");
    drop(events);
    stop.cancel();
    worker.await.expect("worker stops");

    // Plant: the newest checkpoint's files and manifest, rewritten to agree
    // with each other (what someone with the store's keys could do).
    let stored = last_checkpoint(&fleet, &job_id).await;
    let prefix = fleet.store.key_of(&stored.uri).expect("in the store");
    let manifest_key = keys::checkpoint_manifest(&prefix);
    let mut manifest: CheckpointManifest =
        serde_json::from_slice(&fleet.store.get_bytes(&manifest_key).await.unwrap()).unwrap();
    for file in &mut manifest.files {
        let planted = fleet
            .store
            .put_bytes(
                &keys::checkpoint_file(&prefix, &file.path),
                bytes::Bytes::from_static(b"planted"),
            )
            .await
            .unwrap();
        (file.size, file.sha256) = (planted.size, planted.sha256);
    }
    fleet
        .store
        .put_bytes(&manifest_key, serde_json::to_vec(&manifest).unwrap().into())
        .await
        .unwrap();

    let (stop, worker) = fleet.start_worker();
    let refused = format!("checkpoint of step {} not restored", stored.step);
    let resumed = format!("resuming from step {}", stored.step);
    // The job's notes from its start: the restart refuses the planted
    // checkpoint and never resumes from it.
    let mut events = client
        .watch(WatchRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let notes = tokio::time::timeout(Duration::from_secs(120), async {
        let mut notes = Vec::new();
        while let Some(Ok(event)) = events.next().await {
            if let Some(Kind::Progress(p)) = event.kind
                && !p.message.is_empty()
            {
                let done = p.message.starts_with(&refused) || p.message == resumed;
                notes.push(p.message);
                if done {
                    return notes;
                }
            }
        }
        panic!("watch ended before the restart: {notes:#?}");
    })
    .await
    .expect("the restart's notes in time");
    drop(events);
    assert!(
        notes.last().is_some_and(|n| n.starts_with(&refused)),
        "{notes:#?}"
    );
    assert!(!notes.contains(&resumed), "{notes:#?}");
    client
        .cancel(trainyard_proto::v1::CancelRequest {
            job_id: job.job_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    until_final(&mut client, &job.job_id).await;
    stop.cancel();
    worker.await.expect("worker stops");
    fleet.stop().await;
}

/// Sets the artifacts of tenant acme's `job` in its record.
async fn set_artifacts(
    repo: &trainyard_coordinator::repo::JobRepo,
    job: &JobId,
    artifacts: Vec<Artifact>,
) {
    repo.update(&tenant("acme"), job, |mut record| {
        let artifacts = artifacts.clone();
        async move {
            record.artifacts = artifacts;
            (Some(record), ())
        }
    })
    .await
    .expect("record updated");
}

fn chunk(path: &str, data: &[u8]) -> UploadChunk {
    UploadChunk {
        path: path.into(),
        data: data.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_land_in_the_callers_tenant_and_keep_to_their_caps() {
    let fleet = Fleet::start_secured(coordinator_only(), |config| {
        config.store.max_upload_bytes = 1000;
        config.store.max_upload_files = 2;
    })
    .await;
    let mut globex = fleet.client(OTHER_TOKEN).await;
    let reply = globex
        .upload(futures::stream::iter(vec![
            chunk("a.png", b"png"),
            chunk("sub/a.txt", b"cap"),
            chunk("", b"tion"),
        ]))
        .await
        .expect("uploaded")
        .into_inner();
    let key = fleet.store.key_of(&reply.uri).expect("in the store");
    assert!(key.starts_with("tenants/globex/uploads/"), "{key}");
    assert_eq!((reply.files, reply.bytes), (2, 10));
    assert_eq!(
        fleet
            .store
            .get_bytes(&format!("{key}/sub/a.txt"))
            .await
            .unwrap(),
        "caption".as_bytes()
    );

    for (chunks, code) in [
        (
            vec![chunk("../../acme/uploads/x", b"x")],
            tonic::Code::InvalidArgument,
        ),
        (vec![chunk("/etc/x", b"x")], tonic::Code::InvalidArgument),
        (vec![chunk("", b"no name")], tonic::Code::InvalidArgument),
        (
            vec![chunk("a", b"1"), chunk("b", b"2"), chunk("c", b"3")],
            tonic::Code::ResourceExhausted,
        ),
        (
            vec![chunk("big", &[0u8; 600]), chunk("", &[0u8; 600])],
            tonic::Code::ResourceExhausted,
        ),
    ] {
        let status = globex
            .upload(futures::stream::iter(chunks))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{status}");
    }
    // A refused upload leaves nothing behind: only the first one is there.
    let stored: Vec<String> = fleet
        .store
        .list("tenants")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(stored, [format!("{key}/a.png"), format!("{key}/sub/a.txt")]);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_downloads_a_jobs_outputs() {
    let fleet = Fleet::start_secured(coordinator_only(), |_| {}).await;
    let parts = fleet.coordinator_parts().await;
    let acme = tenant("acme");
    let (job, _) = store_queued(&parts.repo, spec(&fleet.upload_uri("acme", "x"), 10)).await;
    let lora = fleet
        .store
        .put_bytes(
            &keys::output_file(&acme, &job, "lora.safetensors"),
            bytes::Bytes::from_static(b"acme's lora"),
        )
        .await
        .unwrap();
    set_artifacts(&parts.repo, &job, vec![lora]).await;

    let mut acme_client = fleet.client(TOKEN).await;
    let chunks: Vec<_> = acme_client
        .download(DownloadRequest {
            job_id: job.to_string(),
            name: String::new(),
        })
        .await
        .expect("own outputs")
        .into_inner()
        .collect()
        .await;
    let chunks: Vec<_> = chunks.into_iter().map(|c| c.expect("chunk")).collect();
    assert_eq!(chunks[0].name, "lora.safetensors");
    let body: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
    assert_eq!(body, b"acme's lora");

    let mut globex = fleet.client(OTHER_TOKEN).await;
    let status = globex
        .download(DownloadRequest {
            job_id: job.to_string(),
            name: String::new(),
        })
        .await
        .expect_err("not globex's job");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // A record naming an object outside the job's folder is not read.
    let (other, _) = store_queued(&parts.repo, spec(&fleet.upload_uri("acme", "x"), 10)).await;
    let stolen = Artifact {
        name: "stolen".into(),
        uri: fleet.upload_uri("globex", "secret"),
        ..Default::default()
    };
    set_artifacts(&parts.repo, &other, vec![stolen]).await;
    let status = acme_client
        .download(DownloadRequest {
            job_id: other.to_string(),
            name: String::new(),
        })
        .await
        .expect_err("outside the job");
    assert_eq!(status.code(), tonic::Code::Internal);
    fleet.stop().await;
}
