//! A drain request to a stage runtime, against a real nats-server: the
//! runtime stops pulling, hands its running task back the way shutdown
//! does (the task's stop token; its claim released, the message delivered
//! again to another runtime, never acked),
//! says `draining` in its registry entry, answers every request alike, and
//! stays up taking nothing until it is stopped.

use async_nats::jetstream;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trainyard_core::claim::Claims;
use trainyard_core::registry::{Entry, Heartbeat};
use trainyard_core::runtime::{
    DrainReply, RunnerConfig, StageError, StageHandler, TaskContext, run_stage,
};
use trainyard_core::topology::{self, subject};
use trainyard_proto::v1::{
    Artifact, JobState, Stage, TrainOutput, TrainTask, stage_result::Outcome,
};
use trainyard_tests::*;

const WAIT: Duration = Duration::from_secs(30);
const DRAINED: &str = "w-drained";
const OTHER: &str = "w-other";

/// Holds its task until the runtime asks for it back ([`DRAINED`]), or
/// trains at once ([`OTHER`]); reports who started it, on which delivery.
struct Trainer {
    started: mpsc::UnboundedSender<(String, u32)>,
}

impl StageHandler for Trainer {
    type Task = TrainTask;

    async fn handle(&self, _task: TrainTask, ctx: TaskContext) -> Result<Outcome, StageError> {
        let _ = self.started.send((ctx.worker_id.clone(), ctx.delivered));
        if ctx.worker_id == DRAINED {
            tokio::select! {
                _ = ctx.stop.cancelled() => return Err(StageError::Interrupted),
                _ = ctx.cancel.cancelled() => return Err(StageError::Cancelled),
            }
        }
        Ok(Outcome::Trained(TrainOutput {
            artifacts: vec![Artifact {
                name: ctx.worker_id.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }
}

/// A runtime of `worker_id` with its registry heartbeat, until `stop`.
async fn runtime(
    fleet: &Fleet,
    worker_id: &str,
    started: mpsc::UnboundedSender<(String, u32)>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let client = fleet.nats_client().await;
    let topo = topology::ensure(&jetstream::new(client.clone()), &fleet.config.nats)
        .await
        .expect("topology");
    let mut config = RunnerConfig::new(Stage::Train, &fleet.config.nats);
    config.worker_id = worker_id.into();
    config.drain_grace = Duration::from_millis(200);
    tokio::spawn(async move {
        let heartbeat = Heartbeat::for_runner(topo.workers.clone(), &config);
        run_stage(client, topo, config, Arc::new(Trainer { started }), stop)
            .await
            .expect("runtime");
        heartbeat.stop().await;
    })
}

async fn ask_to_drain(client: &async_nats::Client) -> DrainReply {
    let drain = subject::drain(Stage::Train, "default", DRAINED).expect("a drain subject");
    let reply = tokio::time::timeout(WAIT, client.request(drain, "".into()))
        .await
        .expect("answered in time")
        .expect("answered");
    serde_json::from_slice(&reply.payload).expect("a drain reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_request_stops_pulling_and_hands_the_running_task_back() {
    let services = Services {
        coordinator: true,
        captioner: true,
        worker: false,
        uploader: false,
    };
    let fleet = Fleet::start_with(services, |_| {}).await;
    let client = fleet.nats_client().await;
    let js = jetstream::new(client.clone());
    let workers = js
        .get_key_value(topology::WORKERS_BUCKET)
        .await
        .expect("registry");
    let claims = js
        .get_key_value(topology::CLAIMS_BUCKET)
        .await
        .expect("claims");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let drained_stop = CancellationToken::new();
    let drained = runtime(&fleet, DRAINED, started_tx.clone(), drained_stop.clone()).await;

    let mut api = fleet.client(TOKEN).await;
    let job = submit(&mut api, spec(&fleet.sample_uri().await, 20)).await;
    let first = tokio::time::timeout(Duration::from_secs(60), started.recv())
        .await
        .expect("the train task starts")
        .expect("started");
    assert_eq!(first, (DRAINED.to_string(), 1));

    let reply = ask_to_drain(&client).await;
    assert_eq!((reply.worker_id.as_str(), reply.draining), (DRAINED, true));
    // Its entry says draining, and once the task is handed back, idle.
    wait_for("the entry drained", WAIT, || async {
        let value = workers.get(DRAINED).await.ok()??;
        let entry: Entry = serde_json::from_slice(&value).ok()?;
        (entry.draining && entry.busy_slots == 0).then_some(())
    })
    .await;
    // Handed back: its claim released (another runtime may take it at
    // once), the message not acked (shown below: it is delivered again).
    let (tenant, job_id) = (
        trainyard_proto::TenantId::parse(&job.tenant).expect("tenant"),
        trainyard_proto::JobId::parse(&job.job_id).expect("job id"),
    );
    wait_for("the claim released", WAIT, || async {
        Claims::stored(&claims, &tenant, &job_id, Stage::Train)
            .await
            .ok()?
            .filter(|c| c.worker_id == DRAINED && c.released)
    })
    .await;
    let again = ask_to_drain(&client).await;
    assert_eq!(
        again,
        DrainReply {
            worker_id: DRAINED.into(),
            draining: true,
            busy_slots: 0,
        },
        "a second request changes nothing"
    );

    // Another runtime gets it, as its second delivery, and finishes it.
    let other_stop = CancellationToken::new();
    let other = runtime(&fleet, OTHER, started_tx, other_stop.clone()).await;
    let second = tokio::time::timeout(WAIT, started.recv())
        .await
        .expect("the task is redelivered")
        .expect("started");
    assert_eq!(second, (OTHER.to_string(), 2));
    wait_for("the other runtime's result applied", WAIT, || {
        let (mut api, job) = (api.clone(), job.job_id.clone());
        async move {
            let record = get(&mut api, &job).await;
            (record.state() == JobState::Delivering).then_some(())
        }
    })
    .await;
    assert!(
        started.try_recv().is_err(),
        "the drained runtime took a task"
    );
    // Drained, it is still up, its entry kept, until it is stopped.
    assert!(!drained.is_finished(), "a drained runtime stays up");
    let entry: Entry =
        serde_json::from_slice(&workers.get(DRAINED).await.unwrap().unwrap()).unwrap();
    assert!(entry.draining);
    drained_stop.cancel();
    tokio::time::timeout(WAIT, drained)
        .await
        .expect("a drained runtime stops at once")
        .expect("runtime task");
    assert!(
        workers.get(DRAINED).await.unwrap().is_none(),
        "entry deleted"
    );
    other_stop.cancel();
    other.await.expect("other runtime");
    fleet.stop().await;
}
