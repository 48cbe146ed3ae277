//! Bad datasets and poison messages: the job fails with a clear reason,
//! nothing escapes the job's folder, and the services keep serving.

use prost::Message;
use std::time::Duration;
use trainyard_core::topology::{DLQ_STREAM, subject};
use trainyard_proto::v1::{
    DeadLetter, ErrorKind, ExtraValue, JobState, Secrets, Stage, TrainTask, extra_value, job_event,
};
use trainyard_tests::*;

async fn run_to_end(fleet: &Fleet, dataset_uri: String) -> trainyard_proto::v1::JobRecord {
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&dataset_uri, 20)).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;
    get(&mut client, &job.job_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_of_broken_images_fails_naming_the_files() {
    let fleet = Fleet::start().await;
    let uri = fleet
        .zip_uri(
            "broken",
            &[
                ("cat.png", b"\x89PNG\r\n\x1a\nnot really".to_vec()),
                ("dog.jpg", vec![0xff, 0xd8, 0xff, 0x00, 0x01]),
            ],
        )
        .await;
    let record = run_to_end(&fleet, uri).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.kind(), trainyard_proto::v1::ErrorKind::BadDataset);
    assert!(
        error.message.contains("cat.png") && error.message.contains("dog.jpg"),
        "{}",
        error.message
    );
    assert_eq!(error.stage(), Stage::Prepare);
    // A fatal failure: one dead letter, with the job, reason and kind.
    let letters = dead_letters(&fleet).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].job_id, record.job_id);
    assert_eq!(letters[0].kind(), ErrorKind::BadDataset);
    assert_eq!(letters[0].deliveries, 1);
    fleet.stop().await;
}

/// Every dead letter in `TY_DLQ`, decoded.
async fn dead_letters(fleet: &Fleet) -> Vec<DeadLetter> {
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    trainyard_tests::chaos::checks::dead_letters(&js).await
}

/// A config the backend rejects (the worker checks it, after submission)
/// fails the job on the first delivery with the reason, and writes exactly
/// one dead letter, whose copy of the task holds none of the job's secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_backend_rejects_fails_at_once_with_one_dead_letter() {
    let fleet = Fleet::start().await;
    let mut spec = spec(&fleet.sample_uri().await, 20);
    spec.training.as_mut().unwrap().extras.insert(
        "fault_crash_at_step".into(),
        ExtraValue {
            kind: Some(extra_value::Kind::Int(0)),
        },
    );
    const SECRET: &str = "hf_dead_letter_secret_value";
    spec.secrets = Some(Secrets {
        hf_token: SECRET.into(),
        values: [("aws_secret_access_key".to_string(), SECRET.to_string())].into(),
    });
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.unwrap();
    assert_eq!(
        (error.stage(), error.kind()),
        (Stage::Train, ErrorKind::InvalidSpec)
    );
    assert!(error.message.contains("fault steps"), "{}", error.message);
    let finals = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(job_event::Kind::State(s)) if s.state().is_final()))
        .count();
    assert_eq!(finals, 1);
    // The DLQ copy is written before the failed result, so it is there now.
    let letters = dead_letters(&fleet).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(
        (letter.job_id.as_str(), letter.stage()),
        (job.job_id.as_str(), Stage::Train)
    );
    assert_eq!(
        (letter.kind(), letter.deliveries),
        (ErrorKind::InvalidSpec, 1)
    );
    assert_eq!(letter.reason, error.message);
    let task = TrainTask::decode(letter.payload.as_slice()).expect("the task, decodable");
    assert_eq!(task.job_id, job.job_id);
    // Tasks carry the secrets sealed only, and the dead letter not even that.
    let spec = task.spec.unwrap();
    assert!(
        spec.secrets.is_none() && spec.sealed_secrets.is_none(),
        "{spec:?}"
    );
    assert!(
        !String::from_utf8_lossy(&letter.encode_to_vec()).contains(SECRET),
        "a secret is in the dead letter"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_entry_escaping_the_folder_fails_and_writes_nothing_outside() {
    let fleet = Fleet::start().await;
    let png = {
        let mut bytes = Vec::new();
        let img = image_bytes();
        bytes.extend(img);
        bytes
    };
    let uri = fleet
        .zip_uri("evil", &[("ok.png", png), ("../evil", b"pwned".to_vec())])
        .await;
    let record = run_to_end(&fleet, uri).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.unwrap();
    assert!(error.message.contains("../evil"), "{}", error.message);
    // Nothing named evil anywhere under the fleet's folder.
    let mut stack = vec![fleet.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            assert_ne!(
                entry.file_name(),
                "evil",
                "escaped file at {}",
                entry.path().display()
            );
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    fleet.stop().await;
}

/// A small valid PNG (sample dataset's first image).
fn image_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let files = trainyard_captioner::sample::write_sample_dataset(dir.path()).unwrap();
    let png = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    std::fs::read(png).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_task_is_dead_lettered_and_the_service_keeps_serving() {
    let fleet = Fleet::start().await;
    let nats = fleet.nats_client().await;
    let js = async_nats::jetstream::new(nats);
    js.publish(
        subject::task(Stage::Prepare, "default"),
        bytes::Bytes::from_static(b"\xff\xff not protobuf"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // The DLQ gets one record for it.
    let mut dlq = js.get_stream(DLQ_STREAM).await.unwrap();
    wait_for("dead letter", Duration::from_secs(30), || {
        let mut dlq = dlq.clone();
        async move { (dlq.info().await.ok()?.state.messages == 1).then_some(()) }
    })
    .await;
    let first = dlq.info().await.unwrap().state.first_sequence;
    let letter = dlq.get_raw_message(first).await.unwrap();
    let letter = DeadLetter::decode(letter.payload).unwrap();
    assert_eq!(letter.stage(), Stage::Prepare);
    assert!(letter.reason.contains("not a valid"), "{}", letter.reason);
    // The task stream holds nothing: the poison was termed, not redelivered forever.
    wait_for("poison task removed", Duration::from_secs(10), || {
        let js = js.clone();
        async move {
            let mut tasks = js
                .get_stream(trainyard_core::topology::TASKS_STREAM)
                .await
                .ok()?;
            (tasks.info().await.ok()?.state.messages == 0).then_some(())
        }
    })
    .await;
    // And the captioner still prepares real work.
    let record = run_to_end(&fleet, fleet.sample_uri().await).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    fleet.stop().await;
}
