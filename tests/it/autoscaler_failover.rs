//! What a leader learns outlives it: two autoscaler replicas on one bus,
//! with the `runpod` provider against its stand-in. The first leader
//! learns seconds per step from a finished training and avoids the data
//! centre a spot pod was taken back in; once its lease is over, the
//! second takes it, weighs the backlog with the seconds per step learnt
//! (the finished training gone from the stream by then) and starts its
//! pod away from the avoided data centre. Passes are driven one by one,
//! each at a chosen time, so the lease changes hands without waiting.

use prost::Message as _;
use std::sync::Arc;
use std::time::Duration;
use trainyard_autoscaler::backlog::StepCosts;
use trainyard_autoscaler::lease::{AVOID_KEY, AvoidedHosts, LEARNT_KEY};
use trainyard_autoscaler::provider::Provider;
use trainyard_autoscaler::provider::runpod::{RetrySettings, RunpodProvider};
use trainyard_autoscaler::record::PoolRecord;
use trainyard_autoscaler::service::{Autoscaler, Buckets};
use trainyard_core::config::{AutoscalerConfig, PoolPolicy};
use trainyard_core::topology::{
    AUTOSCALER_BUCKET, FLEET_BUCKET, TASKS_STREAM, WORKERS_BUCKET, subject,
};
use trainyard_proto::v1::{DeliverTask, JobSpec, Stage, TrainSummary, TrainTask, TrainingSettings};
use trainyard_tests::runpod::{FakeGpuType, FakeRunpod};
use trainyard_tests::{Fleet, Services};

const KEY: &str = "rpa_5e0c2b7FAILOVERKEY91d";
const POOL: &str = "train.flux";
const GPU: &str = "NVIDIA L40S";
const LEASE_MS: u64 = 1_000;

fn config(fake: &FakeRunpod, key_file: std::path::PathBuf) -> AutoscalerConfig {
    let mut config = AutoscalerConfig {
        provider: "runpod".into(),
        fleet_name: "fo".into(),
        lease_ms: LEASE_MS,
        // Pods of the stand-in never register: they stay `starting`.
        vanished_after_ms: 3_600_000,
        avoid_host_secs: 3_600,
        default_seconds_per_step: 0.5,
        ..AutoscalerConfig::default()
    };
    config.runpod.graphql_url = fake.graphql_url();
    config.runpod.api_key_file = Some(key_file);
    config.runpod.image = "ghcr.io/trainyard/worker:test".into();
    config.runpod.data_center_ids = vec!["EU-RO-1".into(), "US-TX-3".into()];
    config.pools.insert(
        POOL.into(),
        PoolPolicy {
            min_workers: 0,
            max_workers: 1,
            gpu_types: vec![GPU.into()],
            gpu_count: 1,
            scale_up_cooldown_secs: 0,
            ..PoolPolicy::default()
        },
    );
    config
}

async fn replica(
    fleet: &Fleet,
    config: &AutoscalerConfig,
    holder: &str,
) -> (Autoscaler, Arc<RunpodProvider>) {
    let nats = fleet.nats_client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let buckets = Buckets {
        nats,
        workers: js.get_key_value(WORKERS_BUCKET).await.expect("ty_workers"),
        state: js.get_key_value(AUTOSCALER_BUCKET).await.expect("state"),
        fleet: js.get_key_value(FLEET_BUCKET).await.expect("ty_fleet"),
        js,
    };
    let settings = RetrySettings {
        request_timeout: Duration::from_secs(2),
        attempts: 2,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_retry_after: Duration::from_secs(1),
    };
    let provider = Arc::new(RunpodProvider::with_settings(config, settings).expect("provider"));
    let scaler = Autoscaler::new(config.clone(), provider.clone(), buckets, holder.into());
    (scaler, provider)
}

/// The data centre each pod create asked for, in order.
fn placed(fake: &FakeRunpod) -> Vec<String> {
    fake.calls_of("podFindAndDeployOnDemand")
        .iter()
        .filter(|c| c.error.is_none())
        .map(|c| {
            c.variables["input"]["dataCenterId"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_the_step_costs_and_hosts_the_last_one_learnt() {
    let fleet = Fleet::start_with(Services::NONE, |_| {}).await;
    let fake = FakeRunpod::start(KEY).await;
    fake.add_gpu_type(FakeGpuType::new(GPU, 0.86, 0.4, 8));
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("runpod.key");
    std::fs::write(&key_file, KEY).expect("key file");
    let config = config(&fake, key_file);
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    // The streams and buckets, as the coordinator makes them.
    trainyard_core::topology::ensure(&js, &fleet.config.nats)
        .await
        .expect("topology");

    // A finished kohya training (4 s a step) waits for delivery, and a
    // kohya training of 1,000 steps for a worker.
    let summary = TrainSummary {
        steps: 100,
        seconds: 400.0,
        backend: "kohya".into(),
        ..Default::default()
    };
    let deliver = DeliverTask {
        job_id: "0193c0de-0000-7000-8000-00000000000a".into(),
        summary: Some(summary),
        ..Default::default()
    };
    let delivered = js
        .publish(
            subject::task(Stage::Deliver, ""),
            deliver.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence;
    let train = TrainTask {
        job_id: "0193c0de-0000-7000-8000-00000000000b".into(),
        spec: Some(JobSpec {
            training: Some(TrainingSettings {
                backend: "kohya".into(),
                steps: 1_000,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    js.publish(
        subject::task(Stage::Train, "flux"),
        train.encode_to_vec().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let (mut first, provider) = replica(&fleet, &config, "first").await;
    let (mut second, _) = replica(&fleet, &config, "second").await;
    let t0 = trainyard_core::now_ms();
    first.pass(t0).await;
    second.pass(t0 + 10).await; // the lease is the first's: no act
    assert_eq!(placed(&fake), ["EU-RO-1"], "one pod, in the first place");
    let state = js.get_key_value(AUTOSCALER_BUCKET).await.expect("state");
    let learnt: StepCosts =
        serde_json::from_slice(&state.get(LEARNT_KEY).await.unwrap().expect("learnt kept"))
            .expect("learnt");
    assert_eq!(learnt.seconds_per_step(&config, "kohya"), 4.0);

    // The spot market takes the pod back: its data centre is avoided, the
    // pod released, a replacement placed elsewhere.
    let pod = fake.pods()[0].id.clone();
    fake.preempt(&pod);
    first.pass(t0 + 200).await;
    let avoided: AvoidedHosts =
        serde_json::from_slice(&state.get(AVOID_KEY).await.unwrap().expect("avoid kept"))
            .expect("avoid");
    assert_eq!(
        avoided.hosts.keys().collect::<Vec<_>>(),
        ["EU-RO-1"],
        "{avoided:?}"
    );

    // The first leader stops (its lease left to run out); its pods go,
    // and so does the finished training (delivered): the second leader
    // can learn neither again.
    drop(first);
    for machine in provider.list().await.expect("list") {
        provider.release(&machine).await.expect("release");
    }
    let creates_before = placed(&fake).len();
    js.get_stream(TASKS_STREAM)
        .await
        .expect("TY_TASKS")
        .delete_message(delivered)
        .await
        .expect("delivered");
    let t1 = t0 + 200 + LEASE_MS as i64 + 1;
    second.pass(t1).await;

    let after = placed(&fake);
    assert_eq!(
        after[creates_before..],
        ["US-TX-3"],
        "the new leader starts its pod away from the avoided data centre: {after:?}"
    );
    // The next pass lists the new pod among the pool's machines.
    second.pass(t1 + 200).await;
    assert_eq!(placed(&fake).len(), creates_before + 1, "no second pod");
    let fleet_kv = js.get_key_value(FLEET_BUCKET).await.expect("ty_fleet");
    let record: PoolRecord =
        serde_json::from_slice(&fleet_kv.get(POOL).await.unwrap().expect("pool record"))
            .expect("record");
    let last = record
        .decisions
        .iter()
        .find(|d| d.at_ms == t1)
        .expect("the new leader's first decision");
    assert_eq!(
        last.work_secs, 4_000.0,
        "1,000 steps at the 4 s learnt, not the 0.5 s prior: {last:?}"
    );
    assert_eq!(last.launch.len(), 1, "{last:?}");
    let machine = record
        .machines
        .iter()
        .find(|m| m.activity == "starting")
        .expect("the new pod");
    assert_eq!(
        (
            machine.gpu_type.as_str(),
            machine.gpu_count,
            machine.host.as_str()
        ),
        (GPU, 1, "US-TX-3"),
        "{machine:?}"
    );
    drop(second);
    fleet.stop().await;
}
