//! A job's lifetime around its work: a deadline (`timeout_secs`) failing it
//! with `DEADLINE_EXCEEDED`, a TTL (`ttl_secs`) removing a finished job but
//! never a running one, a lost task republished even inside the dedup
//! window, and task streams that never drop work while a publish failure
//! reaches the client as `UNAVAILABLE`.

use async_nats::jetstream::stream::DiscardPolicy;
use futures::StreamExt;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_coordinator::{job, repo::JobRepo};
use trainyard_core::store::keys;
use trainyard_core::topology::{self, TASKS_STREAM};
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_proto::v1::{
    CancelRequest, ErrorKind, ExtraValue, GetRequest, JobEvent, JobRecord, JobSpec, JobState,
    Stage, SubmitRequest, extra_value, job_event::Kind,
};
use trainyard_proto::{Attempt, JobId, TenantId};
use trainyard_tests::*;

fn finals(events: &[JobEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(&e.kind, Some(Kind::State(s)) if s.state().is_final()))
        .count()
}

fn hanging(mut spec: JobSpec, at_step: i64) -> JobSpec {
    spec.training.as_mut().unwrap().extras.insert(
        "fault_hang_at_step".into(),
        ExtraValue {
            kind: Some(extra_value::Kind::Int(at_step)),
        },
    );
    spec
}

async fn is_gone(client: &mut Client, job: &str) -> bool {
    matches!(
        client.get(GetRequest { job_id: job.into() }).await,
        Err(status) if status.code() == tonic::Code::NotFound
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_fails_with_deadline_exceeded_and_its_trainer_is_killed() {
    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.coordinator.reconcile_interval_secs = 1;
    })
    .await;
    let sample = fleet.sample_uri().await;
    let mut spec = hanging(spec(&sample, 40), 3);
    spec.timeout_secs = 10;
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(60)).await;

    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(error.stage(), Stage::Train, "{}", error.message);
    assert!(!error.retryable);
    let ran_ms = record.times.unwrap().finished_at_ms - record.created_at_ms;
    assert!((10_000..20_000).contains(&ran_ms), "{ran_ms} ms");
    assert_eq!(finals(&events), 1);
    // The cancel reached the worker: the hung trainer is gone.
    wait_for("the trainer to be killed", Duration::from_secs(15), || {
        let left = processes_mentioning(&job.job_id);
        async move { left.is_empty().then_some(()) }
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_removed_after_its_ttl_and_a_running_one_never() {
    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.coordinator.reconcile_interval_secs = 1;
        // One slot for the hung trainer, one for the job that finishes.
        c.worker.concurrency = 2;
    })
    .await;
    let sample = fleet.sample_uri().await;
    let mut client = fleet.client(TOKEN).await;
    // A job that keeps running (its trainer hangs), with a TTL of 1 s.
    let mut running = hanging(spec(&sample, 40), 3);
    running.ttl_secs = 1;
    let running = submit(&mut client, running).await;
    // A job that finishes, with the same TTL and an idempotency key.
    let mut done = spec(&sample, 20);
    done.ttl_secs = 1;
    done.idempotency_key = "ttl-once".into();
    let done = submit(&mut client, done).await;
    watch_all(&mut client, &done.job_id, Duration::from_secs(60)).await;
    assert_eq!(
        get(&mut client, &done.job_id).await.state(),
        JobState::Succeeded
    );
    let done_id = JobId::parse(&done.job_id).unwrap();
    assert!(
        !fleet
            .store
            .list(&keys::job(
                &trainyard_proto::TenantId::parse("acme").unwrap(),
                &done_id
            ))
            .await
            .unwrap()
            .is_empty()
    );

    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let events_filter = format!("ty.event.acme.{done_id}.>");
    let events_of = |js: async_nats::jetstream::Context| {
        let filter = events_filter.clone();
        async move {
            js.get_stream(topology::EVENTS_STREAM)
                .await
                .unwrap()
                .get_first_raw_message_by_subject(filter, 1)
                .await
                .is_ok()
        }
    };
    assert!(events_of(js.clone()).await);
    wait_for("the finished job removed", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = done.job_id.clone();
        async move { is_gone(&mut client, &id).await.then_some(()) }
    })
    .await;
    assert!(
        fleet
            .store
            .list(&keys::job(
                &trainyard_proto::TenantId::parse("acme").unwrap(),
                &done_id
            ))
            .await
            .unwrap()
            .is_empty()
    );
    topology::ensure(&js, &fleet.config.nats).await.unwrap();
    let tenant = TenantId::parse("acme").unwrap();
    let idem = trainyard_coordinator::api::idem_key(&tenant, "ttl-once");
    let idem_bucket = topology::idem_bucket(&js, &fleet.config.nats)
        .await
        .unwrap();
    assert!(idem_bucket.get(&idem).await.unwrap().is_none());
    assert!(
        !events_of(js.clone()).await,
        "events of the removed job are left"
    );

    // Passes have run past the running job's TTL: it is still there.
    let record = get(&mut client, &running.job_id).await;
    assert!(!record.state().is_final(), "{:?}", record.state());
    // Once cancelled it is finished, and its TTL applies.
    client
        .cancel(CancelRequest {
            job_id: running.job_id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    wait_for("the cancelled job removed", Duration::from_secs(30), || {
        let mut client = client.clone();
        let id = running.job_id.clone();
        async move { is_gone(&mut client, &id).await.then_some(()) }
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_lost_inside_the_dedup_window_is_republished_as_the_next_attempt() {
    let none = Services::NONE;
    let mut fleet = Fleet::start_with(none, |_| {}).await;
    let CoordinatorParts {
        js,
        repo,
        reconciler,
        ..
    } = fleet.coordinator_parts().await;
    let effects = &reconciler.effects;
    let sample = fleet.sample_uri().await;
    let tenant = TenantId::parse("acme").unwrap();
    let (job, record) = store_queued(&repo, spec(&sample, 20)).await;
    let task = job::current_task(&record).unwrap();
    effects.publish_task(&tenant, &job, task).await.unwrap();
    // A captioner takes the task and acks it, and its result is lost.
    let consumer = topology::task_consumer(&js, Stage::Prepare, "", &fleet.config.nats)
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let taken = batch.next().await.unwrap().unwrap();
    taken.double_ack().await.unwrap();
    let mut tasks = js.get_stream(TASKS_STREAM).await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0);

    // The same dedup id would be dropped: the reconciler raises the attempt.
    assert_eq!(reconciler.pass(0).await.unwrap().republished, 1);
    assert_eq!(repo.get(&tenant, &job).await.unwrap().record.attempt, 2);
    assert_eq!(tasks.info().await.unwrap().state.messages, 1);
    let stored = tasks
        .get_last_raw_message_by_subject("ty.task.prepare")
        .await;
    let id = stored
        .unwrap()
        .headers
        .get("Nats-Msg-Id")
        .unwrap()
        .to_string();
    assert_eq!(
        id,
        topology::task_msg_id(&tenant, &job, Stage::Prepare, Attempt(2))
    );
    // In flight now: another pass (or replica) does nothing.
    assert_eq!(reconciler.pass(0).await.unwrap().republished, 0);
    assert_eq!(tasks.info().await.unwrap().state.messages, 1);

    // The stages and a coordinator finish the job, once.
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    {
        let (c, s) = (fleet.config.clone(), stop.child_token());
        running.push(tokio::spawn(async move {
            trainyard_captioner::run(c, s).await.expect("captioner")
        }));
        let (c, s) = (fleet.config.clone(), stop.child_token());
        running.push(tokio::spawn(async move {
            trainyard_worker::run(c, s).await.expect("worker")
        }));
        let (c, s) = (fleet.config.clone(), stop.child_token());
        running.push(tokio::spawn(async move {
            trainyard_uploader::run(c, s).await.expect("uploader")
        }));
    }
    fleet.start_coordinator().await;
    let mut client = fleet.client(TOKEN).await;
    let events = watch_all(&mut client, job.as_str(), Duration::from_secs(120)).await;
    assert_eq!(finals(&events), 1);
    assert_eq!(
        get(&mut client, job.as_str()).await.state(),
        JobState::Succeeded
    );
    stop.cancel();
    for handle in running {
        handle.await.unwrap();
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_while_nats_is_down_is_unavailable_and_a_retry_with_the_key_queues_it_once() {
    let only_coordinator = Services {
        coordinator: true,
        captioner: false,
        worker: false,
        uploader: false,
    };
    let mut fleet = Fleet::start_with(only_coordinator, |_| {}).await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    // Task streams keep unconsumed work: no limit to discard it by (message
    // schedules, which delayed retries use, need the old-message discard
    // policy, which then never applies), never age it out, and deduplicate
    // longer than any publisher retry.
    let config = js
        .get_stream(TASKS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(config.discard, DiscardPolicy::Old);
    assert!(config.allow_message_schedules);
    assert_eq!((config.max_messages, config.max_bytes), (-1, -1));
    assert_eq!(config.max_messages_per_subject, -1);
    assert_eq!(config.max_age, Duration::ZERO);
    assert!(
        config.duplicate_window > Duration::from_secs(fleet.config.coordinator.stale_after_secs)
    );
    drop(js);

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let binary = find_nats_server(root).unwrap();
    let (port, store_dir) = (fleet.nats.port(), fleet.nats.store_dir().to_owned());
    let spare = tempfile::tempdir().unwrap();
    let spare_server = NatsServer::start(&binary, spare.path()).unwrap();
    std::mem::replace(&mut fleet.nats, spare_server).stop();

    let sample = fleet.store.uri(&upload_key("acme", "sample"));
    let mut spec = spec(&sample, 20);
    spec.idempotency_key = "while-down".into();
    let mut client = fleet.client(TOKEN).await;
    let status = client
        .submit(SubmitRequest {
            spec: Some(spec.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // NATS is back: the client retries with the same key until it is taken.
    let back = NatsServer::start_on_port(&binary, &store_dir, port).unwrap();
    std::mem::replace(&mut fleet.nats, back).stop();
    let first = wait_for("a submit to be accepted", Duration::from_secs(60), || {
        let mut client = client.clone();
        let spec = spec.clone();
        async move {
            client
                .submit(SubmitRequest { spec: Some(spec) })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    let again = client
        .submit(SubmitRequest {
            spec: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(
        again.job.unwrap().job_id,
        first.job.as_ref().unwrap().job_id
    );
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let mut tasks = js.get_stream(TASKS_STREAM).await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_submit_of_a_job_stored_but_not_queued_publishes_its_task_once() {
    let only_coordinator = Services {
        coordinator: true,
        captioner: false,
        worker: false,
        uploader: false,
    };
    let fleet = Fleet::start_with(only_coordinator, |_| {}).await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let topo = topology::ensure(&js, &fleet.config.nats).await.unwrap();
    let repo = JobRepo::new(topo.jobs.clone(), js.clone());
    let sample = fleet.store.uri(&upload_key("acme", "sample"));
    let mut submitted = spec(&sample, 20);
    submitted.idempotency_key = "stored-not-queued".into();
    // A first try stored its idempotency key and record, then its publish failed.
    let tenant = TenantId::parse("acme").unwrap();
    let job = JobId::generate();
    let key = trainyard_coordinator::api::idem_key(&tenant, "stored-not-queued");
    topology::idem_bucket(&js, &fleet.config.nats)
        .await
        .unwrap()
        .create(&key, job.to_string().into())
        .await
        .unwrap();
    let (record, _) = job::submitted(
        JobRecord {
            job_id: job.to_string(),
            tenant: tenant.to_string(),
            spec: Some(trainyard_coordinator::validate::normalise(submitted.clone()).unwrap()),
            ..Default::default()
        },
        trainyard_core::now_ms(),
    );
    repo.create(&record).await.unwrap();
    let mut tasks = js.get_stream(TASKS_STREAM).await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0);

    let mut client = fleet.client(TOKEN).await;
    for _ in 0..2 {
        let answer = client
            .submit(SubmitRequest {
                spec: Some(submitted.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.duplicate);
        assert_eq!(answer.job.unwrap().job_id, job.to_string());
        assert_eq!(tasks.info().await.unwrap().state.messages, 1);
    }
    fleet.stop().await;
}
