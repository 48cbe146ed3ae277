//! Attempt fencing against a real nats-server: a stage runtime frozen past
//! `ack_wait` (its whole runtime thread blocked, as SIGSTOP would freeze the
//! process) loses its training task to another runtime. When it wakes, its
//! late result is dropped and its message left alone; a result carrying its
//! old claim is rejected by the coordinator; the job records exactly one
//! completion, the live runtime's. A runtime (and the real worker) whose
//! claim is taken over cancels its handler (kills its trainer) and leaves
//! the message alone, so the task comes back once the other lease ends.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use trainyard_core::claim::Claims;
use trainyard_core::config::NatsConfig;
use trainyard_core::runtime::{RunnerConfig, StageError, StageHandler, TaskContext, run_stage};
use trainyard_core::topology::{self, RESULTS_CONSUMER, RESULTS_STREAM, TASKS_STREAM, subject};
use trainyard_proto::v1::{
    Artifact, JobState, Stage, StageResult, TaskClaim, TrainOutput, TrainTask,
    stage_result::Outcome,
};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::*;

/// How a test trainer waits before it reports `Trained` with one artifact
/// named after it.
enum Hold {
    /// Blocks its thread until told to go on: with a current-thread runtime
    /// the whole runtime (heartbeat, NATS connection) is frozen meanwhile.
    Freeze(Mutex<std::sync::mpsc::Receiver<()>>),
    /// Waits for the gate, or for the runtime to cancel it.
    Gate(Arc<Notify>),
}

struct TestTrainer {
    name: &'static str,
    started: mpsc::UnboundedSender<String>,
    cancelled: mpsc::UnboundedSender<&'static str>,
    hold: Hold,
}

impl StageHandler for TestTrainer {
    type Task = TrainTask;

    async fn handle(&self, _task: TrainTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        let _ = self.started.send(ctx.worker_id.clone());
        match &self.hold {
            Hold::Freeze(wake) => {
                let _ = wake.lock().expect("wake lock").recv();
            }
            Hold::Gate(gate) => {
                tokio::select! {
                    _ = gate.notified() => {}
                    _ = ctx.cancel.cancelled() => {
                        let _ = self.cancelled.send(self.name);
                        return Err(StageError::Cancelled);
                    }
                }
            }
        }
        Ok(trained(self.name))
    }
}

fn trained(name: &str) -> Outcome {
    Outcome::Trained(TrainOutput {
        artifacts: vec![Artifact {
            name: name.into(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn runner(nats: &NatsConfig, worker_id: &str) -> RunnerConfig {
    let mut config = RunnerConfig::new(Stage::Train, nats);
    config.worker_id = worker_id.into();
    config.drain_grace = Duration::from_secs(10);
    config
}

async fn consumer_info(js: &jetstream::Context, stream: &str, name: &str) -> consumer::Info {
    let stream = js.get_stream(stream).await.expect("stream");
    let mut consumer: consumer::PullConsumer = stream.get_consumer(name).await.expect("consumer");
    consumer.info().await.expect("consumer info").clone()
}

async fn stored_claim(fleet: &Fleet, tenant: &TenantId, job: &JobId) -> Option<TaskClaim> {
    let client = fleet.nats_client().await;
    let kv = jetstream::new(client)
        .get_key_value(topology::CLAIMS_BUCKET)
        .await
        .expect("claims bucket");
    Claims::stored(&kv, tenant, job, Stage::Train)
        .await
        .expect("claims readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_runtime_past_ack_wait_commits_nothing_and_the_job_completes_once() {
    let services = Services {
        coordinator: true,
        captioner: true,
        worker: false,
        uploader: false,
    };
    let fleet = Fleet::start_with(services, |config| config.nats.ack_wait_secs = 1).await;
    let nats = fleet.config.nats.clone();
    let client = fleet.nats_client().await;
    let js = jetstream::new(client.clone());
    let mut results = client
        .subscribe(subject::all_results())
        .await
        .expect("subscribe results");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();

    // The zombie: its own thread and current-thread runtime.
    let (wake, wake_rx) = std::sync::mpsc::channel();
    let zombie_stop = CancellationToken::new();
    let zombie = {
        let handler = TestTrainer {
            name: "zombie",
            started: started_tx.clone(),
            cancelled: cancelled_tx.clone(),
            hold: Hold::Freeze(Mutex::new(wake_rx)),
        };
        let (nats, stop) = (nats.clone(), zombie_stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("zombie runtime");
            rt.block_on(async move {
                let client = async_nats::connect(&nats.url).await.expect("connect");
                let topo = topology::ensure(&jetstream::new(client.clone()), &nats)
                    .await
                    .expect("topology");
                run_stage(
                    client,
                    topo,
                    runner(&nats, "w-zombie"),
                    Arc::new(handler),
                    stop,
                )
                .await
                .expect("zombie runtime");
            });
        })
    };

    let mut api = fleet.client(TOKEN).await;
    let job = submit(&mut api, spec(&fleet.sample_uri().await, 20)).await;
    let (tenant, job_id) = (
        TenantId::parse(&job.tenant).expect("tenant"),
        JobId::parse(&job.job_id).expect("job id"),
    );
    let first = tokio::time::timeout(Duration::from_secs(60), started.recv())
        .await
        .expect("the zombie gets the train task")
        .expect("started");
    assert_eq!(first, "w-zombie");
    let zombie_claim = stored_claim(&fleet, &tenant, &job_id)
        .await
        .expect("the zombie's claim is stored");
    assert_eq!(zombie_claim.worker_id, "w-zombie");

    // The live runtime takes the task over once the zombie's lease is gone.
    let gate = Arc::new(Notify::new());
    let live_stop = CancellationToken::new();
    let live = {
        let handler = TestTrainer {
            name: "live",
            started: started_tx.clone(),
            cancelled: cancelled_tx.clone(),
            hold: Hold::Gate(gate.clone()),
        };
        let client = fleet.nats_client().await;
        let topo = topology::ensure(&jetstream::new(client.clone()), &nats)
            .await
            .expect("topology");
        let (config, stop) = (runner(&nats, "w-live"), live_stop.clone());
        tokio::spawn(async move {
            run_stage(client, topo, config, Arc::new(handler), stop)
                .await
                .expect("live runtime")
        })
    };
    let second = tokio::time::timeout(Duration::from_secs(30), started.recv())
        .await
        .expect("the task is redelivered past ack_wait")
        .expect("started");
    assert_eq!(second, "w-live");
    let live_claim = stored_claim(&fleet, &tenant, &job_id)
        .await
        .expect("the live claim is stored");
    assert_eq!(live_claim.worker_id, "w-live");
    assert_ne!(live_claim.token, zombie_claim.token);

    // A result under the zombie's claim, and one under no claim at all,
    // reach the coordinator: neither counts while the live claim holds.
    for (n, claim) in [Some(zombie_claim.clone()), None].into_iter().enumerate() {
        let forged = StageResult {
            job_id: job.job_id.clone(),
            tenant: job.tenant.clone(),
            stage: Stage::Train as i32,
            attempt: get(&mut api, &job.job_id).await.attempt,
            worker_id: "w-zombie".into(),
            claim,
            outcome: Some(trained("forged")),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("forged-{n}-{}", job.job_id).as_str());
        js.publish_with_headers(
            subject::result(Stage::Train),
            headers,
            forged.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    wait_for(
        "the coordinator to take every result",
        Duration::from_secs(20),
        || {
            let js = js.clone();
            async move {
                let info = consumer_info(&js, RESULTS_STREAM, RESULTS_CONSUMER).await;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            }
        },
    )
    .await;
    let record = get(&mut api, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Training,
        "a fenced result was applied"
    );
    assert!(record.artifacts.is_empty());

    // The zombie wakes (SIGCONT) with its result ready, then stops.
    wake.send(()).expect("wake the zombie");
    zombie_stop.cancel();
    wait_for("the zombie to stop", Duration::from_secs(30), || {
        let done = zombie.is_finished();
        async move { done.then_some(()) }
    })
    .await;
    zombie.join().expect("zombie thread");
    // It neither acked the message the live runtime holds nor moved the claim.
    let train_consumer = topology::consumer_name(Stage::Train, "default");
    let info = consumer_info(&js, TASKS_STREAM, &train_consumer).await;
    assert_eq!(
        info.num_ack_pending, 1,
        "the zombie settled the taken-over message"
    );
    assert_eq!(
        stored_claim(&fleet, &tenant, &job_id)
            .await
            .map(|c| c.token),
        Some(live_claim.token.clone())
    );
    assert_eq!(get(&mut api, &job.job_id).await.state(), JobState::Training);

    // The live runtime finishes: that is the one completion.
    gate.notify_one();
    let record = wait_for(
        "the live result to be applied",
        Duration::from_secs(30),
        || {
            let mut api = api.clone();
            let job_id = job.job_id.clone();
            async move {
                let record = get(&mut api, &job_id).await;
                (record.state() == JobState::Delivering).then_some(record)
            }
        },
    )
    .await;
    let names: Vec<_> = record.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["live"]);
    assert!(
        cancelled.try_recv().is_err(),
        "the live handler was cancelled"
    );

    // Every result published, up to the live one: none from the zombie's run.
    let mut trained_by = Vec::new();
    while !trained_by.contains(&"live".to_string()) {
        let message = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("the live result was published")
            .expect("subscription open");
        let result = StageResult::decode(message.payload).expect("a stage result");
        if let Some(Outcome::Trained(out)) = result.outcome {
            trained_by.extend(out.artifacts.into_iter().map(|a| a.name));
        }
    }
    trained_by.sort();
    assert_eq!(trained_by, ["forged", "forged", "live"]);
    wait_for(
        "the live runtime to ack its task",
        Duration::from_secs(10),
        || {
            let (js, name) = (js.clone(), train_consumer.clone());
            async move {
                let info = consumer_info(&js, TASKS_STREAM, &name).await;
                (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
            }
        },
    )
    .await;

    live_stop.cancel();
    live.await.expect("live runtime ends");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_loses_its_claim_cancels_its_handler_and_leaves_the_task_to_the_holder() {
    let services = Services {
        coordinator: true,
        captioner: true,
        worker: false,
        uploader: false,
    };
    let fleet = Fleet::start_with(services, |config| config.nats.ack_wait_secs = 1).await;
    let nats = fleet.config.nats.clone();
    let js = jetstream::new(fleet.nats_client().await);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();
    let gate = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let runtime = {
        let handler = TestTrainer {
            name: "runner",
            started: started_tx,
            cancelled: cancelled_tx,
            hold: Hold::Gate(gate.clone()),
        };
        let client = fleet.nats_client().await;
        let topo = topology::ensure(&jetstream::new(client.clone()), &nats)
            .await
            .expect("topology");
        let (config, stop) = (runner(&nats, "w-runner"), stop.clone());
        tokio::spawn(async move {
            run_stage(client, topo, config, Arc::new(handler), stop)
                .await
                .expect("runtime")
        })
    };
    let mut api = fleet.client(TOKEN).await;
    let job = submit(&mut api, spec(&fleet.sample_uri().await, 20)).await;
    tokio::time::timeout(Duration::from_secs(60), started.recv())
        .await
        .expect("the runtime gets the train task")
        .expect("started");

    // Another holder takes the claim over (as a runtime would once the
    // lease looked expired to it), with a lease of a few seconds.
    let kv = js
        .get_key_value(topology::CLAIMS_BUCKET)
        .await
        .expect("claims bucket");
    let key = topology::claim_key(
        &TenantId::parse(&job.tenant).expect("tenant"),
        &JobId::parse(&job.job_id).expect("job"),
        Stage::Train,
    );
    let entry = kv.entry(key.clone()).await.expect("kv").expect("claim");
    let mut thief = TaskClaim::decode(entry.value).expect("claim");
    thief.worker_id = "w-thief".into();
    thief.token = "thief".into();
    thief.lease_until_ms = trainyard_core::now_ms() + 3_000;
    kv.update(&key, thief.encode_to_vec().into(), entry.revision)
        .await
        .expect("take the claim over");

    // The runtime notices at its next renewal and cancels its handler...
    let who = tokio::time::timeout(Duration::from_secs(10), cancelled.recv())
        .await
        .expect("the handler is cancelled once the claim is lost")
        .expect("cancelled");
    assert_eq!(who, "runner");
    // ...without terming the task or reporting: the job is still training
    // and, once the other lease runs out, the task comes back to be run.
    assert_eq!(get(&mut api, &job.job_id).await.state(), JobState::Training);
    tokio::time::timeout(Duration::from_secs(30), started.recv())
        .await
        .expect("the task is delivered again after the other lease")
        .expect("started");
    let stored = Claims::stored(
        &kv,
        &TenantId::parse(&job.tenant).expect("tenant"),
        &JobId::parse(&job.job_id).expect("job"),
        Stage::Train,
    )
    .await
    .expect("claims")
    .expect("claim");
    assert_eq!(stored.worker_id, "w-runner");
    assert!(
        trainyard_core::now_ms() >= thief.lease_until_ms,
        "the task ran again under a live claim of another holder"
    );
    gate.notify_one();
    let record = wait_for("the job to leave training", Duration::from_secs(30), || {
        let mut api = api.clone();
        let job_id = job.job_id.clone();
        async move {
            let record = get(&mut api, &job_id).await;
            (record.state() != JobState::Training).then_some(record)
        }
    })
    .await;
    assert_eq!(record.state(), JobState::Delivering);
    assert_eq!(record.artifacts.len(), 1);
    stop.cancel();
    runtime.await.expect("runtime ends");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_loses_its_claim_kills_its_trainer_and_keeps_the_task_alive() {
    let fleet = Fleet::start_with(Services::ALL, |config| config.nats.ack_wait_secs = 3).await;
    let js = jetstream::new(fleet.nats_client().await);
    let mut api = fleet.client(TOKEN).await;
    let job = submit(&mut api, spec(&fleet.sample_uri().await, 100_000)).await;
    let (tenant, job_id) = (
        TenantId::parse(&job.tenant).expect("tenant"),
        JobId::parse(&job.job_id).expect("job"),
    );
    wait_for("the trainer to run", Duration::from_secs(120), || {
        let running = !processes_mentioning(&job.job_id).is_empty();
        async move { running.then_some(()) }
    })
    .await;

    // Another holder takes the claim over for a few seconds.
    let kv = js
        .get_key_value(topology::CLAIMS_BUCKET)
        .await
        .expect("claims bucket");
    let key = topology::claim_key(&tenant, &job_id, Stage::Train);
    let entry = kv.entry(key.clone()).await.expect("kv").expect("claim");
    let mut thief = TaskClaim::decode(entry.value).expect("claim");
    let worker = thief.worker_id.clone();
    thief.worker_id = "w-thief".into();
    thief.token = "thief".into();
    thief.lease_until_ms = trainyard_core::now_ms() + 6_000;
    kv.update(&key, thief.encode_to_vec().into(), entry.revision)
        .await
        .expect("take the claim over");

    // The worker kills its trainer well before the other lease ends.
    wait_for("the trainer to be killed", Duration::from_secs(5), || {
        let gone = processes_mentioning(&job.job_id).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    assert!(
        trainyard_core::now_ms() < thief.lease_until_ms,
        "the trainer outlived the lost claim"
    );
    assert_eq!(get(&mut api, &job.job_id).await.state(), JobState::Training);
    // The task was neither termed nor acked: once the other lease ends it
    // comes back, and the worker claims and trains it again.
    wait_for("the trainer to run again", Duration::from_secs(60), || {
        let running = !processes_mentioning(&job.job_id).is_empty();
        async move { running.then_some(()) }
    })
    .await;
    let claim = Claims::stored(&kv, &tenant, &job_id, Stage::Train)
        .await
        .expect("claims")
        .expect("claim");
    assert_eq!(claim.worker_id, worker);
    assert_ne!(claim.token, "thief");

    api.cancel(trainyard_proto::v1::CancelRequest {
        job_id: job.job_id.clone(),
        reason: "test over".into(),
    })
    .await
    .expect("cancel");
    wait_for("the trainer to exit", Duration::from_secs(20), || {
        let gone = processes_mentioning(&job.job_id).is_empty();
        async move { gone.then_some(()) }
    })
    .await;
    fleet.stop().await;
}
