//! The fault suite: the services run as child processes of the real
//! binaries and are killed, stopped and restarted while jobs run; after
//! every case [`checks::global`] verifies that each job ended exactly once,
//! by legal transitions, with its artifacts intact and nothing left behind.
//!
//! Needs `cargo build --workspace --bins` first (the binaries beside the
//! test executable).

use futures::StreamExt;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trainyard_proto::v1::{
    CancelRequest, JobEvent, JobSpec, JobState, Stage, Stuck, WatchRequest, job_event::Kind,
};
use trainyard_tests::chaos::{Chaos, Service, checks};
use trainyard_tests::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(240);

/// Every event of a job, collected in the background.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<JobEvent>>>);

impl Events {
    async fn watch(chaos: &Chaos, job: &str) -> Events {
        let events = Events::default();
        let mut client = chaos.client().await;
        let stream = client
            .watch(WatchRequest { job_id: job.into() })
            .await
            .expect("watch")
            .into_inner();
        let sink = events.0.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            while let Some(Ok(event)) = stream.next().await {
                sink.lock().expect("events").push(event);
            }
        });
        events
    }

    fn train_steps(&self) -> Vec<u32> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 => Some(p.step),
                _ => None,
            })
            .collect()
    }

    /// Training steps reported at or after `ms`.
    fn steps_since(&self, ms: i64) -> Vec<u32> {
        self.select(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 && e.at_ms >= ms => {
                Some(p.step)
            }
            _ => None,
        })
    }

    /// Training steps reported before `ms`.
    fn steps_until(&self, ms: i64) -> Vec<u32> {
        self.select(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.stage() == Stage::Train && p.step > 0 && e.at_ms < ms => {
                Some(p.step)
            }
            _ => None,
        })
    }

    /// Checkpoints recorded before `ms`.
    fn checkpoints_until(&self, ms: i64) -> Vec<u32> {
        self.select(|e| match &e.kind {
            Some(Kind::Checkpoint(c)) if e.at_ms < ms => Some(c.step),
            _ => None,
        })
    }

    fn select(&self, pick: impl Fn(&JobEvent) -> Option<u32>) -> Vec<u32> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(pick)
            .collect()
    }

    /// The `stuck` events, in order, with when each was stamped.
    fn stuck(&self) -> Vec<(i64, Stuck)> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Stuck(s)) => Some((e.at_ms, s.clone())),
                _ => None,
            })
            .collect()
    }

    /// The notes (progress messages) of `stage`.
    fn notes(&self, stage: Stage) -> Vec<String> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Progress(p)) if p.stage() == stage && !p.message.is_empty() => {
                    Some(p.message.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn checkpoints(&self) -> Vec<u32> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Checkpoint(c)) => Some(c.step),
                _ => None,
            })
            .collect()
    }
}

/// The job's state; `Unspecified` while the coordinator cannot answer (a
/// cluster electing a leader, a partition).
async fn state_of(chaos: &Chaos, job: &str) -> JobState {
    let mut client = chaos.client().await;
    match client
        .get(trainyard_proto::v1::GetRequest { job_id: job.into() })
        .await
    {
        Ok(reply) => reply
            .into_inner()
            .job
            .map_or(JobState::Unspecified, |r| r.state()),
        Err(_) => JobState::Unspecified,
    }
}

async fn wait_state(chaos: &Chaos, job: &str, state: JobState) {
    wait_for(&format!("{job} {state:?}"), JOB_TIMEOUT, || async {
        (state_of(chaos, job).await == state).then_some(())
    })
    .await;
}

async fn wait_final(chaos: &Chaos, job: &str) -> JobState {
    wait_for(&format!("{job} final"), JOB_TIMEOUT, || async {
        let state = state_of(chaos, job).await;
        state.is_final().then_some(state)
    })
    .await
}

fn quick_spec(chaos: &Chaos, dataset: &str, steps: u32) -> JobSpec {
    let mut spec = with_destination(spec(dataset, steps), &chaos.outputs_dir());
    if let Some(training) = spec.training.as_mut() {
        training.save_every = 10;
    }
    spec
}

fn adapter_sha(record: &trainyard_proto::v1::JobRecord) -> String {
    record
        .artifacts
        .iter()
        .find(|a| a.name.ends_with(".safetensors"))
        .map(|a| a.sha256.clone())
        .expect("adapter artifact")
}

/// Case 1: many concurrent jobs, nothing injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_all_finish_once() {
    const JOBS: usize = 50;
    let chaos = Chaos::start(2, |c| c.worker.concurrency = 2).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let started = Instant::now();
    let mut jobs = BTreeMap::new();
    for _ in 0..JOBS {
        let job = submit(&mut client, quick_spec(&chaos, &sample, 5)).await;
        jobs.insert(job.job_id, JobState::Succeeded);
    }
    for job in jobs.keys() {
        wait_final(&chaos, job).await;
    }
    eprintln!("{JOBS} jobs in {:?}", started.elapsed());
    checks::global(&chaos, &jobs, 0).await;
    chaos.stop().await;
}

/// Case 2: SIGKILL the captioner, then a worker, then the uploader, each
/// while it holds the job's task; a fresh process takes the redelivered
/// task and the job finishes once. The uploader dies right after the first
/// delivered file appears (case 6 has it die at an exact point instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_survives_a_sigkill_mid_task() {
    let mut chaos = Chaos::start(1, |_| {}).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let job = submit(&mut client, quick_spec(&chaos, &sample, 40))
        .await
        .job_id;
    let events = Events::watch(&chaos, &job).await;

    // The captioner, as soon as it said it started.
    wait_for("prepare started", JOB_TIMEOUT, || async {
        (!matches!(
            state_of(&chaos, &job).await,
            JobState::Queued | JobState::Unspecified
        ))
        .then_some(())
    })
    .await;
    let captioner = chaos.running(Service::Captioner).remove(0);
    chaos.proc(&captioner).kill();
    chaos.spawn(Service::Captioner);

    // The worker, a few steps in.
    wait_for("training progress", JOB_TIMEOUT, || async {
        (events.train_steps().iter().any(|s| *s >= 12)).then_some(())
    })
    .await;
    let worker = chaos.worker_running(&job).expect("a worker trains the job");
    chaos.proc(&worker).kill();
    chaos.spawn(Service::Worker);

    // The uploader, once a delivered file shows.
    let uploader = chaos.running(Service::Uploader).remove(0);
    let delivered = chaos.outputs_dir().join(&job);
    wait_for("a delivered file", JOB_TIMEOUT, || async {
        std::fs::read_dir(&delivered)
            .ok()?
            .next()
            .is_some()
            .then_some(())
    })
    .await;
    chaos.proc(&uploader).kill();
    chaos.spawn(Service::Uploader);

    assert_eq!(wait_final(&chaos, &job).await, JobState::Succeeded);
    let jobs = BTreeMap::from([(job.clone(), JobState::Succeeded)]);
    let records = checks::global(&chaos, &jobs, 0).await;
    assert!(!records[&job].delivered.is_empty());
    chaos.stop().await;
}

/// Cases 3 and 4: a worker dies mid-training (SIGKILL, or SIGTERM then
/// SIGKILL after 5 s); another worker resumes from the latest checkpoint,
/// redoing at most one checkpoint interval, and the adapter is byte for
/// byte the one an uninterrupted run of the same seed makes.
async fn worker_dies_mid_training(graceful: bool) {
    const STEPS: u32 = 100;
    const SAVE_EVERY: u32 = 10;
    let mut chaos = Chaos::start(2, |_| {}).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    // Larger images make steps slow enough for a kill to land between
    // checkpoints rather than in an upload.
    let mut spec = quick_spec(&chaos, &sample, STEPS);
    spec.training.as_mut().expect("training").resolution = 64;
    let reference = submit(&mut client, spec.clone()).await.job_id;
    assert_eq!(wait_final(&chaos, &reference).await, JobState::Succeeded);

    let job = submit(&mut client, spec).await.job_id;
    let events = Events::watch(&chaos, &job).await;
    wait_for("a checkpoint past step 20", JOB_TIMEOUT, || async {
        events
            .checkpoints()
            .iter()
            .any(|s| *s >= 2 * SAVE_EVERY)
            .then_some(())
    })
    .await;
    let worker = chaos.worker_running(&job).expect("a worker trains the job");
    let killed_at = Instant::now();
    if graceful {
        chaos.proc(&worker).signal(Signal::SIGTERM);
        let exited = tokio::time::timeout(
            Duration::from_secs(5),
            chaos.proc(&worker).wait_exit(Duration::from_secs(10)),
        )
        .await;
        if exited.is_err() {
            chaos.proc(&worker).kill();
        }
    } else {
        chaos.proc(&worker).kill();
    }
    let gone_ms = trainyard_core::now_ms();
    // Every event stamped after the worker was gone comes from another one.
    let resumed_at = wait_for("training resumed elsewhere", JOB_TIMEOUT, || async {
        events.steps_since(gone_ms).first().copied()
    })
    .await;
    let detect = killed_at.elapsed();
    let last_step = events
        .steps_until(gone_ms)
        .into_iter()
        .max()
        .expect("steps");
    let last_checkpoint = events
        .checkpoints_until(gone_ms)
        .into_iter()
        .max()
        .expect("checkpoint");
    let redone = last_step.saturating_sub(resumed_at - 1);
    eprintln!(
        "{}: last step {last_step}, latest checkpoint {last_checkpoint}; resumed at step \
         {resumed_at} {detect:?} after the kill, {redone} steps redone",
        if graceful { "SIGTERM" } else { "SIGKILL" }
    );
    assert!(
        resumed_at > last_checkpoint,
        "resumed at step {resumed_at}, the latest checkpoint was {last_checkpoint}"
    );
    assert!(redone <= SAVE_EVERY, "{redone} steps redone");
    assert_eq!(wait_final(&chaos, &job).await, JobState::Succeeded);
    assert_eq!(wait_final(&chaos, &job).await, JobState::Succeeded);
    let jobs = BTreeMap::from([
        (reference.clone(), JobState::Succeeded),
        (job.clone(), JobState::Succeeded),
    ]);
    let records = checks::global(&chaos, &jobs, 0).await;
    assert_eq!(
        adapter_sha(&records[&job]),
        adapter_sha(&records[&reference]),
        "the resumed run's adapter equals the uninterrupted one"
    );
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_resumes_from_checkpoint_on_another() {
    worker_dies_mid_training(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigtermed_worker_hands_its_job_to_another() {
    worker_dies_mid_training(true).await;
}

/// Case 10: an undecodable task and a config the backend rejects are each
/// termed on first delivery with one DLQ record; the job fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_tasks_are_dead_lettered_once() {
    let chaos = Chaos::start(1, |_| {}).await;
    let js = chaos.js().await;
    js.publish(
        trainyard_core::topology::subject::task(Stage::Train, "default"),
        bytes::Bytes::from_static(b"\xff\xff not protobuf"),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let mut rejected = quick_spec(&chaos, &sample, 20);
    rejected.training.as_mut().expect("training").extras.insert(
        "fault_crash_at_step".into(),
        trainyard_proto::v1::ExtraValue {
            kind: Some(trainyard_proto::v1::extra_value::Kind::Int(0)),
        },
    );
    let job = submit(&mut client, rejected).await.job_id;
    assert_eq!(wait_final(&chaos, &job).await, JobState::Failed);
    let record = get(&mut client, &job).await;
    let error = record.error.expect("error");
    assert_eq!(error.stage(), Stage::Train);
    assert_eq!(
        error.kind(),
        trainyard_proto::v1::ErrorKind::InvalidSpec,
        "{}",
        error.message
    );
    assert!(error.message.contains("fault steps"), "{}", error.message);
    // Two dead letters, each termed on its first delivery: the undecodable
    // task, and the rejected config with its job, reason and kind.
    let jobs = BTreeMap::from([(job.clone(), JobState::Failed)]);
    checks::global(&chaos, &jobs, 2).await;
    let letters = checks::dead_letters(&js).await;
    assert!(letters.iter().all(|l| l.deliveries == 1), "first delivery");
    let kinds: Vec<_> = letters
        .iter()
        .map(|l| (l.job_id == job, l.kind()))
        .collect();
    use trainyard_proto::v1::ErrorKind::{InvalidSpec, Poison};
    assert!(kinds.contains(&(false, Poison)) && kinds.contains(&(true, InvalidSpec)));
    chaos.stop().await;
}

/// Case 14: cancel while queued, preparing (the captioner downloading a
/// dataset that never ends), training and delivering → CANCELLED, nothing
/// delivered, the task termed, no download or trainer left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_each_stage_is_final() {
    let mut chaos = Chaos::start(1, |_| {}).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let cancel_client = client.clone();
    let cancel = |job: String| {
        let mut client = cancel_client.clone();
        async move {
            let record = client
                .cancel(CancelRequest {
                    job_id: job,
                    reason: "test".into(),
                })
                .await
                .expect("cancel")
                .into_inner()
                .job
                .expect("job");
            assert_eq!(record.state(), JobState::Cancelled);
        }
    };
    let mut jobs = BTreeMap::new();

    // Queued: the captioner is stopped.
    let captioner = chaos.running(Service::Captioner).remove(0);
    chaos.proc(&captioner).signal(Signal::SIGSTOP);
    let queued = submit(&mut client, quick_spec(&chaos, &sample, 20))
        .await
        .job_id;
    cancel(queued.clone()).await;
    chaos.proc(&captioner).signal(Signal::SIGCONT);
    jobs.insert(queued, JobState::Cancelled);

    // Preparing: the captioner is downloading a dataset that never ends.
    let (url, mut download) = held_dataset().await;
    let mut spec = quick_spec(&chaos, "file:///unused", 5);
    spec.dataset = Some(trainyard_proto::v1::DatasetSource {
        source: Some(trainyard_proto::v1::dataset_source::Source::ZipUrl(url)),
    });
    let preparing = submit(&mut client, spec).await.job_id;
    assert_eq!(next(&mut download, JOB_TIMEOUT).await, Download::Started);
    wait_state(&chaos, &preparing, JobState::Preparing).await;
    cancel(preparing.clone()).await;
    // Promptly, the captioner drops the download, terms the task and
    // clears its work dir.
    assert_eq!(
        next(&mut download, Duration::from_secs(10)).await,
        Download::HungUp
    );
    chaos
        .wait_log(
            &captioner,
            "cancel received for a running task",
            Duration::from_secs(10),
        )
        .await;
    let work = chaos.proc(&captioner).config.captioner.work_dir.clone();
    wait_for("the captioner's work dir cleared", JOB_TIMEOUT, || async {
        let left = std::fs::read_dir(&work)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&preparing))
            })
            .unwrap_or(false);
        (!left).then_some(())
    })
    .await;
    wait_for("the prepare task termed", JOB_TIMEOUT, || async {
        let js = chaos.js().await;
        let stream = js
            .get_stream(trainyard_core::topology::TASKS_STREAM)
            .await
            .ok()?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(&trainyard_core::topology::consumer_name(Stage::Prepare, ""))
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
    jobs.insert(preparing, JobState::Cancelled);

    // Training: the trainer runs.
    let training = submit(&mut client, quick_spec(&chaos, &sample, 100_000))
        .await
        .job_id;
    let events = Events::watch(&chaos, &training).await;
    wait_for("training progress", JOB_TIMEOUT, || async {
        (!events.train_steps().is_empty()).then_some(())
    })
    .await;
    cancel(training.clone()).await;
    jobs.insert(training, JobState::Cancelled);

    // Delivering: the uploader is stopped.
    let uploader = chaos.running(Service::Uploader).remove(0);
    chaos.proc(&uploader).signal(Signal::SIGSTOP);
    let delivering = submit(&mut client, quick_spec(&chaos, &sample, 5))
        .await
        .job_id;
    wait_state(&chaos, &delivering, JobState::Delivering).await;
    cancel(delivering.clone()).await;
    chaos.proc(&uploader).signal(Signal::SIGCONT);
    jobs.insert(delivering.clone(), JobState::Cancelled);

    checks::global(&chaos, &jobs, 0).await;
    for job in jobs.keys() {
        assert!(
            !chaos.outputs_dir().join(job).exists(),
            "{job}: nothing delivered"
        );
    }
    chaos.stop().await;
}

/// Case 7: the coordinator dies between writing a job's record and
/// publishing its first task; the next coordinator's reconciler publishes
/// it and the job finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_without_task_is_finished_by_the_next_coordinator() {
    use trainyard_coordinator::{job, repo::JobRepo};
    let mut chaos = Chaos::start(1, |_| {}).await;
    let coordinator = chaos.running(Service::Coordinator).remove(0);
    chaos.proc(&coordinator).kill();
    // What the dead coordinator left behind: a record and no task.
    let js = chaos.js().await;
    let topo = trainyard_core::topology::ensure(&js, &chaos.config.nats)
        .await
        .expect("topology");
    let repo = JobRepo::new(topo.jobs.clone(), js.clone());
    let sample = chaos.sample_uri().await;
    let spec = trainyard_coordinator::validate::normalise(quick_spec(&chaos, &sample, 20))
        .expect("valid spec");
    let id = trainyard_proto::JobId::generate().to_string();
    let (record, _never_published) = job::submitted(
        trainyard_proto::v1::JobRecord {
            job_id: id.clone(),
            tenant: "acme".into(),
            spec: Some(spec),
            ..Default::default()
        },
        trainyard_core::now_ms(),
    );
    repo.create(&record).await.expect("record");
    let mut tasks = js
        .get_stream(trainyard_core::topology::TASKS_STREAM)
        .await
        .expect("tasks");
    assert_eq!(tasks.info().await.expect("info").state.messages, 0);

    chaos.restart(&coordinator);
    assert_eq!(wait_final(&chaos, &id).await, JobState::Succeeded);
    // The queued state was written by the dead coordinator, not announced:
    // the events start at Preparing, so check the record, then the rest.
    let records = checks::global_without_events(
        &chaos,
        &BTreeMap::from([(id.clone(), JobState::Succeeded)]),
        0,
    )
    .await;
    assert!(!records[&id].delivered.is_empty());
    chaos.stop().await;
}

/// Case 13: every service is SIGKILLed and NATS restarted while jobs run;
/// when all come back every job finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_everything_mid_run_loses_nothing() {
    let mut chaos = Chaos::start(2, |_| {}).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let mut spec = quick_spec(&chaos, &sample, 60);
    spec.training.as_mut().expect("training").resolution = 64;
    let mut jobs = BTreeMap::new();
    let mut first = None;
    for _ in 0..6 {
        let job = submit(&mut client, spec.clone()).await.job_id;
        first.get_or_insert(job.clone());
        jobs.insert(job, JobState::Succeeded);
    }
    let first = first.expect("a job");
    let events = Events::watch(&chaos, &first).await;
    wait_for("training progress", JOB_TIMEOUT, || async {
        (events.train_steps().iter().any(|s| *s >= 15)).then_some(())
    })
    .await;
    for proc in &mut chaos.procs {
        proc.kill();
    }
    chaos.restart_nats().await;
    let names: Vec<String> = chaos.procs.iter().map(|p| p.name.clone()).collect();
    for name in names {
        chaos.restart(&name);
    }
    chaos.wait_ready().await;
    for job in jobs.keys() {
        wait_final(&chaos, job).await;
    }
    checks::global(&chaos, &jobs, 0).await;
    chaos.stop().await;
}

/// Case 11: on a three-node cluster, the task stream's leader is SIGKILLed
/// while jobs run; every job finishes once, and the node, started again,
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_the_stream_leader_dying() {
    const JOBS: usize = 20;
    let mut chaos = Chaos::start_cluster(2, |c| c.worker.concurrency = 2).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let mut jobs = BTreeMap::new();
    for _ in 0..JOBS {
        let job = submit(&mut client, quick_spec(&chaos, &sample, 30))
            .await
            .job_id;
        jobs.insert(job, JobState::Succeeded);
    }
    let js = chaos.js().await;
    let cluster = chaos.cluster.as_mut().expect("cluster");
    let leader = cluster
        .leader_of(&js, trainyard_core::topology::TASKS_STREAM)
        .await;
    // Mid-run: some job has finished, most have not.
    let first = jobs.keys().next().cloned().expect("a job");
    wait_for("a job past its first stage", JOB_TIMEOUT, || async {
        (!matches!(
            state_of(&chaos, &first).await,
            JobState::Queued | JobState::Unspecified
        ))
        .then_some(())
    })
    .await;
    chaos.cluster.as_mut().expect("cluster").kill(leader);
    let killed = Instant::now();
    let new_leader = chaos
        .cluster
        .as_ref()
        .expect("cluster")
        .leader_of(&js, trainyard_core::topology::TASKS_STREAM)
        .await;
    assert_ne!(new_leader, leader);
    eprintln!("new task stream leader after {:?}", killed.elapsed());
    for job in jobs.keys() {
        wait_final(&chaos, job).await;
    }
    // An intermediate state event published while the leader died may be
    // lost; every job still ends once, moving forward, with one final event.
    checks::global_with_event_gaps(&chaos, &jobs, 0).await;
    let cluster = chaos.cluster.as_mut().expect("cluster");
    cluster.restart(leader);
    cluster.wait_ready().await;
    for stream in [
        trainyard_core::topology::TASKS_STREAM,
        trainyard_core::topology::RESULTS_STREAM,
        "KV_ty_jobs",
    ] {
        cluster.wait_caught_up(&js, stream).await;
    }
    chaos.stop().await;
}

/// Case 12: the node the coordinator is connected to is cut off from the
/// others while jobs run (results pile up on the majority side), then
/// healed; no job is lost or done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_coordinator_node_heals_without_loss() {
    let dir_urls = |chaos: &Chaos, nodes: &[usize]| -> String {
        let cluster = chaos.cluster.as_ref().expect("cluster");
        nodes
            .iter()
            .map(|n| cluster.nodes[*n].url())
            .collect::<Vec<_>>()
            .join(",")
    };
    // Start with every service on nodes 1 and 2, then a coordinator on node 0 only.
    let mut chaos = Chaos::start_cluster(2, |_| {}).await;
    let majority = dir_urls(&chaos, &[1, 2]);
    let minority = dir_urls(&chaos, &[0]);
    for proc in &mut chaos.procs {
        proc.kill();
    }
    let names: Vec<(Service, String)> = chaos
        .procs
        .iter()
        .map(|p| (p.service, p.name.clone()))
        .collect();
    chaos.procs.clear();
    for (service, _) in names {
        let url = if service == Service::Coordinator {
            minority.clone()
        } else {
            majority.clone()
        };
        chaos.spawn_with(service, |c| c.nats.url = url);
    }
    chaos.wait_ready().await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let mut jobs = BTreeMap::new();
    for _ in 0..6 {
        let mut spec = quick_spec(&chaos, &sample, 60);
        spec.training.as_mut().expect("training").resolution = 64;
        let job = submit(&mut client, spec).await.job_id;
        jobs.insert(job, JobState::Succeeded);
    }
    let first = jobs.keys().next().cloned().expect("a job");
    wait_state(&chaos, &first, JobState::Training).await;

    chaos.cluster.as_ref().expect("cluster").partition(0);
    // The majority keeps working: results the coordinator cannot take yet
    // pile up in its consumer.
    let side = async_nats::jetstream::new(
        async_nats::connect(trainyard_core::nats::server_addrs(&majority).expect("urls"))
            .await
            .expect("majority"),
    );
    wait_for(
        "results waiting for the coordinator",
        JOB_TIMEOUT,
        || async {
            let stream = side
                .get_stream(trainyard_core::topology::RESULTS_STREAM)
                .await
                .ok()?;
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer(trainyard_core::topology::RESULTS_CONSUMER)
                .await
                .ok()?;
            (consumer.info().await.ok()?.num_pending > 0).then_some(())
        },
    )
    .await;
    chaos.cluster.as_ref().expect("cluster").heal(0);
    for job in jobs.keys() {
        wait_final(&chaos, job).await;
    }
    // The coordinator's intermediate state events during the partition may
    // be lost; every job still ends once, moving forward, with one final event.
    checks::global_with_event_gaps(&chaos, &jobs, 0).await;
    chaos.stop().await;
}

/// Case 5: a worker SIGSTOPped past `ack_wait` loses its task to another
/// worker; after SIGCONT its late result is rejected, its trainer is gone,
/// and the job completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_woken_late_commits_nothing() {
    let mut chaos = Chaos::start(2, |_| {}).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let mut spec = quick_spec(&chaos, &sample, 80);
    spec.training.as_mut().expect("training").resolution = 64;
    let job = submit(&mut client, spec).await.job_id;
    let events = Events::watch(&chaos, &job).await;
    wait_for("training progress", JOB_TIMEOUT, || async {
        (events.train_steps().iter().any(|s| *s >= 5)).then_some(())
    })
    .await;
    let frozen = chaos.worker_running(&job).expect("a worker trains the job");
    // Freeze the worker and its trainer, as a stalled machine would.
    let trainers = processes_mentioning(
        &chaos
            .proc(&frozen)
            .config
            .worker
            .work_dir
            .display()
            .to_string(),
    );
    chaos.proc(&frozen).signal(Signal::SIGSTOP);
    for pid in &trainers {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGSTOP);
    }
    let stopped_ms = trainyard_core::now_ms();
    wait_for("another worker trains the job", JOB_TIMEOUT, || async {
        (!events.steps_since(stopped_ms).is_empty()).then_some(())
    })
    .await;
    for pid in &trainers {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGCONT);
    }
    chaos.proc(&frozen).signal(Signal::SIGCONT);
    assert_eq!(wait_final(&chaos, &job).await, JobState::Succeeded);
    let jobs = BTreeMap::from([(job.clone(), JobState::Succeeded)]);
    checks::global(&chaos, &jobs, 0).await;
    assert!(
        chaos.proc(&frozen).is_running(),
        "the woken worker keeps serving"
    );
    chaos.stop().await;
}

/// What the held dataset server saw.
#[derive(Debug, PartialEq)]
enum Download {
    /// A client asked for the dataset.
    Started,
    /// A client hung up before the body was complete.
    HungUp,
}

/// The next thing the held dataset server saw, within `timeout`.
async fn next(
    download: &mut tokio::sync::mpsc::UnboundedReceiver<Download>,
    timeout: Duration,
) -> Download {
    tokio::time::timeout(timeout, download.recv())
        .await
        .expect("the dataset server heard from the captioner in time")
        .expect("dataset server running")
}

/// A dataset URL whose download never finishes: the server sends the
/// headers and the first bytes of an 8 MiB body, then holds the connection
/// until the client hangs up. Each request and each hang-up is reported.
async fn held_dataset() -> (String, tokio::sync::mpsc::UnboundedReceiver<Download>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(Download::Started);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n\
                            Content-Length: 8388608\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err()
                    || socket.write_all(&[0u8; 64 * 1024]).await.is_err()
                {
                    let _ = tx.send(Download::HungUp);
                    return;
                }
                // Nothing more is sent: wait for the client to give up.
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send(Download::HungUp);
            });
        }
    });
    (format!("http://{addr}/data.zip"), rx)
}

/// An HTTP server whose `/data.zip` answers 503 for the first `failures`
/// requests, then 200 with `zip`.
async fn flaky_dataset(failures: usize, zip: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(Mutex::new(0usize));
    let zip = Arc::new(zip);
    let app = axum::Router::new().route(
        "/data.zip",
        axum::routing::get(move || {
            let (count, zip) = (count.clone(), zip.clone());
            async move {
                let n = {
                    let mut count = count.lock().expect("count");
                    *count += 1;
                    *count
                };
                if n <= failures {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, Vec::new())
                } else {
                    (axum::http::StatusCode::OK, zip.as_ref().clone())
                }
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/data.zip")
}

/// Case 9: a dataset URL answering 503 twice then 200 succeeds; one that
/// always answers 503 fails after the retry cap with one dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_dataset_urls_retry_then_succeed_or_fail_at_the_cap() {
    use trainyard_proto::v1::{DatasetSource, RetryPolicy, dataset_source::Source};
    let chaos = Chaos::start(1, |_| {}).await;
    let local = chaos.dir.path().join("zip-sample");
    let files = trainyard_captioner::sample::write_sample_dataset(&local).expect("sample");
    let entries: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(p).expect("read"))
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let zip = make_zip(&refs);
    let policy = RetryPolicy {
        stages: vec![Stage::Prepare as i32],
        initial_delay_ms: 200,
        multiplier: 2.0,
        max_delay_ms: 2_000,
        max_attempts: 3,
        jitter: Some(0.0),
        non_retryable: Vec::new(),
    };
    let url_spec = |url: String| {
        let mut spec = quick_spec(&chaos, "file:///unused", 10);
        spec.dataset = Some(DatasetSource {
            source: Some(Source::ZipUrl(url)),
        });
        spec.retry = Some(policy.clone());
        spec
    };
    let mut client = chaos.client().await;
    let recovers = submit(&mut client, url_spec(flaky_dataset(2, zip).await))
        .await
        .job_id;
    let never = submit(
        &mut client,
        url_spec(flaky_dataset(usize::MAX, Vec::new()).await),
    )
    .await
    .job_id;
    wait_final(&chaos, &recovers).await;
    wait_final(&chaos, &never).await;
    let jobs = BTreeMap::from([
        (recovers, JobState::Succeeded),
        (never.clone(), JobState::Failed),
    ]);
    let records = checks::global(&chaos, &jobs, 1).await;
    let error = records[&never].error.clone().expect("error");
    assert_eq!(error.kind(), trainyard_proto::v1::ErrorKind::Fetch);
    let letters = checks::dead_letters(&chaos.js().await).await;
    assert_eq!(letters[0].job_id, never);
    assert_eq!(letters[0].deliveries, 3);
    chaos.stop().await;
}

/// Metadata that changes when a file is written again: inode (the stores
/// write a staging file and rename it) and modification time.
fn file_identities(dir: &std::path::Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    Some((name, (meta.ino(), meta.modified().ok()?)))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Case 6: the uploader dies right after its uploads, before the result is
/// published or the task acked (the uploader's `deliver.uploaded` fault
/// hook); the redelivered task goes to another uploader, which finds every
/// file in place, verifies its sha256 instead of copying it again, and
/// finishes the job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_upload_before_ack_is_verified_not_redone() {
    use trainyard_uploader::fault;
    let mut chaos = Chaos::start(1, |_| {}).await;
    let plain = chaos.running(Service::Uploader).remove(0);
    chaos.proc(&plain).kill();
    let doomed = chaos.spawn_env(
        Service::Uploader,
        &[(fault::EXIT_AFTER_ENV, fault::DELIVER_UPLOADED)],
    );
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let job = submit(&mut client, quick_spec(&chaos, &sample, 10))
        .await
        .job_id;
    let events = Events::watch(&chaos, &job).await;

    let status = chaos.proc(&doomed).wait_exit(JOB_TIMEOUT).await;
    assert_eq!(
        status.code(),
        Some(fault::EXIT_CODE),
        "the uploader died at the hook: {status:?}"
    );
    assert_eq!(
        state_of(&chaos, &job).await,
        JobState::Delivering,
        "no result was published"
    );
    let delivered_dir = chaos.outputs_dir().join(&job);
    let mut left = file_identities(&delivered_dir);
    // The manifest carries the delivery time: it is written again.
    left.remove("manifest.json");
    assert!(
        left.keys().any(|n| n.ends_with(".safetensors")),
        "the dead uploader delivered the adapter: {left:?}"
    );

    let again = chaos.spawn(Service::Uploader);
    assert_eq!(wait_final(&chaos, &job).await, JobState::Succeeded);
    let jobs = BTreeMap::from([(job.clone(), JobState::Succeeded)]);
    let records = checks::global(&chaos, &jobs, 0).await;
    let record = &records[&job];

    // Every file the record lists in the destination is one the dead
    // uploader wrote, untouched, and was found and verified.
    let mut now = file_identities(&delivered_dir);
    now.remove("manifest.json");
    assert_eq!(now, left, "the delivered files were not written again");
    let notes = events.notes(Stage::Deliver);
    let local: Vec<&str> = record
        .delivered
        .iter()
        .filter(|d| {
            d.uri
                .starts_with(&format!("file://{}/", delivered_dir.display()))
        })
        .map(|d| d.uri.rsplit('/').next().expect("name"))
        .collect();
    assert_eq!(local.len(), left.len(), "{:?}", record.delivered);
    for name in local {
        assert!(
            left.contains_key(name),
            "{name} delivered by the dead uploader"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with(&format!("{name} already in "))
                    && n.ends_with("sha256 verified; not copied again")),
            "{name}: no verified-in-place note in {notes:?}"
        );
    }
    chaos
        .wait_log(
            &again,
            "sha256 verified; not copied again",
            Duration::from_secs(5),
        )
        .await;
    chaos.stop().await;
}

/// Case 8: a trainer that stops making steps is killed by the worker's
/// stuck watchdog, which emits a `stuck` event and hands the task back. A
/// trainer that hangs once is retried from its checkpoint and succeeds; one
/// that hangs on every attempt fails the job at the retry cap, with the
/// reason and one dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_trainers_are_killed_then_retried_or_failed_at_the_cap() {
    use std::os::unix::fs::PermissionsExt;
    use trainyard_proto::v1::{ErrorKind, ExtraValue, RetryPolicy, extra_value};
    const HANG_AT: u32 = 12;
    const STUCK_AFTER_SECS: u64 = 4;
    // A wrapper around the real trainer: a fresh run (nothing to resume)
    // hangs after step 12; a resumed run trains normally.
    let wrap = tempfile::tempdir().expect("tempdir");
    let real = trainyard_tests::chaos::bin_dir().join("ty-reference-trainer");
    assert!(real.is_file(), "{} not built", real.display());
    let script = wrap.path().join("hang-when-fresh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = train ] && [ \"$2\" = --config ] && grep -q '\"resume_from\": null' \"$3\"; then\n\
             \x20 sed 's/\"fault\": null/\"fault\": {{\"hang_at_step\": {HANG_AT}}}/' \"$3\" > \"$3.hang\" || exit 1\n\
             \x20 exec '{real}' train --config \"$3.hang\"\n\
             fi\n\
             exec '{real}' \"$@\"\n",
            real = real.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let chaos = Chaos::start(2, |c| {
        c.worker.reference_trainer = Some(script.clone());
        c.worker.stuck.stuck_after_secs = STUCK_AFTER_SECS;
        c.worker.stuck.first_step_secs = 60;
        c.worker.stuck.silent_secs = 0;
    })
    .await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let policy = |max_attempts| RetryPolicy {
        stages: vec![Stage::Train as i32],
        initial_delay_ms: 200,
        multiplier: 1.0,
        max_delay_ms: 1_000,
        max_attempts,
        jitter: Some(0.0),
        non_retryable: Vec::new(),
    };
    let mut once = quick_spec(&chaos, &sample, 40);
    once.retry = Some(policy(3));
    let mut always = quick_spec(&chaos, &sample, 40);
    always.retry = Some(policy(2));
    always.training.as_mut().expect("training").extras.insert(
        "fault_hang_at_step".into(),
        ExtraValue {
            kind: Some(extra_value::Kind::Int(HANG_AT.into())),
        },
    );
    let once = submit(&mut client, once).await.job_id;
    let always = submit(&mut client, always).await.job_id;
    let (once_events, always_events) = (
        Events::watch(&chaos, &once).await,
        Events::watch(&chaos, &always).await,
    );
    let started = Instant::now();
    assert_eq!(wait_final(&chaos, &once).await, JobState::Succeeded);
    assert_eq!(wait_final(&chaos, &always).await, JobState::Failed);
    eprintln!("both hung jobs final after {:?}", started.elapsed());
    let jobs = BTreeMap::from([
        (once.clone(), JobState::Succeeded),
        (always.clone(), JobState::Failed),
    ]);
    let records = checks::global(&chaos, &jobs, 1).await;

    // Hung once: one stuck event at the hanging step, then a retry that
    // resumed past the checkpoint stored before the hang.
    let stuck = once_events.stuck();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    let (stuck_ms, first) = &stuck[0];
    assert_eq!((first.step, first.cause.as_str()), (HANG_AT, "no_step"));
    assert!(first.seconds >= STUCK_AFTER_SECS as f64, "{first:?}");
    assert!(once_events.checkpoints().contains(&10));
    let resumed = once_events.steps_since(*stuck_ms);
    assert!(
        resumed.first().is_some_and(|s| *s > 10),
        "the retry resumed from the checkpoint: {resumed:?}"
    );
    assert!(resumed.contains(&40), "{resumed:?}");
    assert!(!records[&once].delivered.is_empty());

    // Hung every time: one stuck event per attempt, FAILED with the reason
    // at the cap, one dead letter.
    let stuck = always_events.stuck();
    assert_eq!(stuck.len(), 2, "{stuck:?}");
    for (_, s) in &stuck {
        assert_eq!((s.step, s.cause.as_str()), (HANG_AT, "no_step"), "{s:?}");
    }
    let error = records[&always].error.clone().expect("error");
    assert_eq!(error.stage(), Stage::Train);
    assert_eq!(error.kind(), ErrorKind::Trainer, "{}", error.message);
    assert!(
        error.message.contains("stuck") && error.message.contains("2 deliveries"),
        "{}",
        error.message
    );
    let letters = checks::dead_letters(&chaos.js().await).await;
    assert_eq!(letters[0].job_id, always);
    assert_eq!(letters[0].stage(), Stage::Train);
    assert_eq!(letters[0].deliveries, 2);
    assert!(letters[0].reason.contains("stuck"), "{}", letters[0].reason);
    chaos.stop().await;
}
