//! The coordinator dies between writing a record and publishing its task:
//! the reconciler finds the job with no task in flight and publishes it
//! again, once.

use std::time::Duration;
use trainyard_coordinator::{effects::Effects, job, reconcile::reconcile, repo::JobRepo};
use trainyard_core::topology::{self, TASKS_STREAM};
use trainyard_proto::JobId;
use trainyard_proto::v1::{JobRecord, JobState};
use trainyard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_task_was_never_published_is_finished_after_reconcile() {
    // Only the stages run at first: the "crashed" coordinator left a record behind.
    let stages = Services {
        coordinator: false,
        ..Services::ALL
    };
    let mut fleet = Fleet::start_with(stages, |_| {}).await;
    let nats = fleet.nats_client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let topo = topology::ensure(&js, &fleet.config.nats).await.unwrap();
    let repo = JobRepo::new(topo.jobs.clone(), js.clone());
    let effects = Effects {
        client: nats,
        js: js.clone(),
    };
    let sample = fleet.sample_uri().await;
    let spec = trainyard_coordinator::validate::normalise(spec(&sample, 30)).unwrap();
    let job = JobId::generate();
    let (record, _effects_never_run) = job::submitted(
        JobRecord {
            job_id: job.to_string(),
            tenant: "acme".into(),
            spec: Some(spec),
            ..Default::default()
        },
        trainyard_core::now_ms(),
    );
    repo.create(&record).await.unwrap();
    let mut tasks = js.get_stream(TASKS_STREAM).await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0);

    assert_eq!(reconcile(&js, &repo, &effects, 0).await.unwrap(), 1);

    // Now a coordinator applies the results; the job runs to the end, once.
    fleet.start_coordinator().await;
    let mut client = fleet.client(TOKEN).await;
    let events = watch_all(&mut client, job.as_str(), Duration::from_secs(120)).await;
    let finals = events
        .iter()
        .filter(|e| matches!(&e.kind, Some(trainyard_proto::v1::job_event::Kind::State(s)) if s.state().is_final()))
        .count();
    assert_eq!(finals, 1);
    assert_eq!(
        get(&mut client, job.as_str()).await.state(),
        JobState::Succeeded
    );
    // A second pass finds nothing to do.
    assert_eq!(reconcile(&js, &repo, &effects, 0).await.unwrap(), 0);
    fleet.stop().await;
}
