//! The coordinator dies between writing a record and publishing its task:
//! the reconciler finds the job with no task in flight and publishes it
//! again, once. A final state whose event never reached the events stream:
//! Watch still ends with it, and the reconciler publishes it, once.

use futures::StreamExt;
use std::time::Duration;
use trainyard_coordinator::api::JobApi;
use trainyard_coordinator::job;
use trainyard_coordinator::reconcile::Pass;
use trainyard_core::topology::{self, TASKS_STREAM};
use trainyard_proto::v1::JobState;
use trainyard_proto::v1::job_event::Kind;
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::chaos::checks::state_events;
use trainyard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_task_was_never_published_is_finished_after_reconcile() {
    // Only the stages run at first: the "crashed" coordinator left a record behind.
    let stages = Services {
        coordinator: false,
        ..Services::ALL
    };
    let mut fleet = Fleet::start_with(stages, |_| {}).await;
    let CoordinatorParts {
        nats: _,
        js,
        topo: _,
        repo,
        reconciler,
    } = fleet.coordinator_parts().await;
    let sample = fleet.sample_uri().await;
    let (job, _) = store_queued(&repo, spec(&sample, 30)).await;
    let mut tasks = js.get_stream(TASKS_STREAM).await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0);

    assert_eq!(reconciler.pass(0).await.unwrap().republished, 1);

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
    // A second pass finds nothing to do: no task lost, no final event missing.
    assert_eq!(reconciler.pass(0).await.unwrap(), Pass::default());
    fleet.stop().await;
}

/// The state events of `job` stored in `TY_EVENTS`.
async fn stored_states(js: &async_nats::jetstream::Context, job: &JobId) -> Vec<JobState> {
    state_events(js)
        .await
        .remove(job.as_str())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_final_state_event_still_ends_watch_and_is_published_again_once() {
    // No services: the test is the coordinator, and no background
    // reconciler races its passes.
    let none = Services::NONE;
    let fleet = Fleet::start_with(none, |_| {}).await;
    let CoordinatorParts {
        nats,
        js,
        topo: _,
        repo,
        reconciler,
    } = fleet.coordinator_parts().await;
    let effects = reconciler.effects.clone();
    let api = JobApi {
        repo: repo.clone(),
        idem: reconciler.idem.clone(),
        js: js.clone(),
        effects: effects.clone(),
        client: nats,
        validate_timeout: Duration::from_secs(5),
        webhooks: Default::default(),
        captions: Default::default(),
        webhook_secrets: None,
        destinations: Default::default(),
        secrets: None,
        max_spec_bytes: trainyard_core::config::CoordinatorConfig::default().max_spec_bytes,
        store_root: fleet.store.root().to_string(),
        download_urls: None,
        store: fleet.store.clone(),
    };
    let tenant = TenantId::parse("acme").unwrap();
    let sample = fleet.sample_uri().await;
    let submitted = |api: JobApi, tenant: TenantId, sample: String| async move {
        let record = api
            .submit(&tenant, Some(spec(&sample, 20)))
            .await
            .unwrap()
            .job
            .unwrap();
        JobId::parse(&record.job_id).unwrap()
    };
    // The coordinator stores FAILED, and the event is lost on the way.
    let fail_silently = |job: JobId| {
        let (repo, tenant) = (repo.clone(), tenant.clone());
        async move {
            let (stored, ()) = repo
                .update(&tenant, &job, |mut record| async move {
                    record.state = JobState::Failed as i32;
                    record.updated_at_ms = trainyard_core::now_ms();
                    (Some(record), ())
                })
                .await
                .unwrap();
            stored.unwrap()
        }
    };

    // A client watches a running job whose final event never comes.
    let lost = submitted(api.clone(), tenant.clone(), sample.clone()).await;
    let watch = api.watch(&tenant, lost.as_str()).await.unwrap();
    let watched = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(60), watch.collect::<Vec<_>>()).await
    });
    let failed = fail_silently(lost.clone()).await;
    assert!(!failed.final_event_stored);
    let watched: Vec<JobState> = watched
        .await
        .unwrap()
        .expect("watch ends although the final event was lost")
        .into_iter()
        .filter_map(|e| match e.unwrap().kind {
            Some(Kind::State(s)) => Some(s.state()),
            _ => None,
        })
        .collect();
    assert_eq!(watched, [JobState::Queued, JobState::Failed]);
    assert_eq!(stored_states(&js, &lost).await, [JobState::Queued]);

    // A final event stored whose mark was lost (the ack never came back).
    let unmarked = submitted(api.clone(), tenant.clone(), sample).await;
    let record = fail_silently(unmarked.clone()).await;
    effects
        .emit_state(&tenant, &unmarked, job::state_changed(&record))
        .await
        .unwrap();

    // One pass publishes the lost event, marks both records and publishes
    // nothing twice.
    let pass = reconciler.pass(0).await.unwrap();
    assert_eq!(pass.announced, 1, "{pass:?}");
    for job in [&lost, &unmarked] {
        assert_eq!(
            stored_states(&js, job).await,
            [JobState::Queued, JobState::Failed]
        );
        assert!(
            repo.get(&tenant, job)
                .await
                .unwrap()
                .record
                .final_event_stored
        );
    }
    assert_eq!(reconciler.pass(0).await.unwrap(), Pass::default());
    // A watch now replays the stored final event, and only it.
    let replay: Vec<_> = api
        .watch(&tenant, lost.as_str())
        .await
        .unwrap()
        .collect()
        .await;
    let finals = replay
        .iter()
        .filter(
            |e| matches!(&e.as_ref().unwrap().kind, Some(Kind::State(s)) if s.state().is_final()),
        )
        .count();
    assert_eq!(finals, 1);
    fleet.stop().await;
}

/// A job whose result waits in `TY_RESULTS` (the coordinator has not
/// applied it yet) has its task answered: the reconciler neither publishes
/// it again nor raises its attempt, whether the result carries a claim or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_result_waiting_is_not_republished() {
    let none = Services::NONE;
    let fleet = Fleet::start_with(none, |_| {}).await;
    let CoordinatorParts {
        nats: _,
        js,
        topo: _,
        repo,
        reconciler,
    } = fleet.coordinator_parts().await;
    let tenant = TenantId::parse("acme").unwrap();
    let sample = fleet.sample_uri().await;
    for token in ["claim-token", ""] {
        let (job, _) = store_queued(&repo, spec(&sample, 20)).await;
        // The task was taken and answered; the answer is not applied yet.
        let id = topology::result_msg_id(
            &tenant,
            &job,
            trainyard_proto::v1::Stage::Prepare,
            trainyard_proto::Attempt(1),
            token,
        );
        trainyard_core::nats::publish_durable(
            &js,
            topology::subject::result(trainyard_proto::v1::Stage::Prepare),
            &id,
            None,
            bytes::Bytes::from_static(b"a result"),
        )
        .await
        .unwrap();
        assert_eq!(reconciler.pass(0).await.unwrap(), Pass::default(), "{id}");
        assert_eq!(repo.get(&tenant, &job).await.unwrap().record.attempt, 1);
    }
    let mut tasks = js.get_stream(TASKS_STREAM).await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0);
    fleet.stop().await;
}
