//! A run that ends early still leaves its trainer's output in the store:
//! a worker that stops mid-run stores it before handing the task back, and
//! a cancelled run's output is kept too.

use std::time::Duration;
use trainyard_core::store::keys;
use trainyard_proto::JobId;
use trainyard_proto::v1::{CancelRequest, Stage, WatchRequest, job_event};
use trainyard_tests::*;

/// Watches a job until its trainer reports `step`.
async fn until_step(client: &mut Client, job_id: &str, step: u32) {
    let mut events = client
        .watch(WatchRequest {
            job_id: job_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), async {
        use futures::StreamExt;
        while let Some(Ok(event)) = events.next().await {
            if let Some(job_event::Kind::Progress(p)) = event.kind
                && p.stage() == Stage::Train
                && p.step >= step
            {
                return;
            }
        }
        panic!("watch ended before training progressed");
    })
    .await
    .expect("training progressed in time");
    // The watch is dropped here: left open on an unfinished job it would
    // hold the coordinator at shutdown.
}

/// A worker that stops mid-run stores the trainer's output of the
/// interrupted run too, before it hands the task back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_keeps_its_trainer_log() {
    let fleet = Fleet::start_with(
        Services {
            worker: false,
            ..Services::ALL
        },
        |_| {},
    )
    .await;
    let (stop, worker) = fleet.start_worker();
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&fleet.sample_uri().await, 100_000)).await;
    until_step(&mut client, &job.job_id, 3).await;

    stop.cancel();
    worker.await.expect("worker stops");
    let key = keys::train_log(
        &trainyard_proto::TenantId::parse("acme").unwrap(),
        &JobId::parse(&job.job_id).unwrap(),
        1,
        1,
    );
    let text =
        String::from_utf8(fleet.store.get_bytes(&key).await.expect("the log").to_vec()).unwrap();
    assert!(text.contains("ty-progress step=3 "), "{text}");
    assert!(
        text.contains("ty-interrupted"),
        "the trainer's last words: {text}"
    );
    fleet.stop().await;
}

/// A cancelled run's output is kept too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_keeps_its_trainer_log() {
    let fleet = Fleet::start().await;
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&fleet.sample_uri().await, 100_000)).await;
    let key = keys::train_log(
        &trainyard_proto::TenantId::parse("acme").unwrap(),
        &JobId::parse(&job.job_id).unwrap(),
        1,
        1,
    );
    until_step(&mut client, &job.job_id, 3).await;
    client
        .cancel(CancelRequest {
            job_id: job.job_id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let text = wait_for(
        "the cancelled run's log",
        Duration::from_secs(30),
        || async {
            let bytes = fleet.store.get_bytes(&key).await.ok()?;
            Some(String::from_utf8(bytes.to_vec()).unwrap())
        },
    )
    .await;
    assert!(text.contains("ty-progress step=3 "), "{text}");
    fleet.stop().await;
}
