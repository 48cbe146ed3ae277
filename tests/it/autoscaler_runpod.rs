//! The `runpod` provider against a stand-in of RunPod's GraphQL API
//! (`trainyard_tests::runpod`): GPU type order, stock, price caps, bids,
//! the spend limit, retries (5xx, 429 with `Retry-After`, a lost create
//! reply), release, listing by the fleet's tag, the API key kept out of
//! errors and `Debug`, and the stand-in's pods booting as processes with
//! their secrets (`tests/it/autoscaler_runpod_e2e.rs` runs workers in them).

use std::time::Duration;
use trainyard_autoscaler::provider::runpod::{RetrySettings, RunpodProvider};
use trainyard_autoscaler::provider::{Launch, MachineState, Provider, ProviderError};
use trainyard_core::config::{AutoscalerConfig, PoolPolicy};
use trainyard_tests::runpod::{FakeGpuType, FakeRunpod, PodRunner};

const KEY: &str = "rpa_7c1d9e0TESTKEY4a2b";
const FLEET: &str = "yard";
const A4090: &str = "NVIDIA GeForce RTX 4090";
const A5000: &str = "NVIDIA RTX A5000";
const H100: &str = "NVIDIA H100 80GB HBM3";

struct Rig {
    fake: FakeRunpod,
    provider: RunpodProvider,
    _dir: tempfile::TempDir,
}

fn settings() -> RetrySettings {
    RetrySettings {
        request_timeout: Duration::from_millis(1_500),
        attempts: 4,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        max_retry_after: Duration::from_secs(5),
    }
}

async fn rig_with(key_in_file: &str, edit: impl FnOnce(&mut AutoscalerConfig)) -> Rig {
    let fake = FakeRunpod::start(KEY).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("runpod.key");
    std::fs::write(&key_file, format!("{key_in_file}\n")).expect("key file");
    let mut config = AutoscalerConfig {
        provider: "runpod".into(),
        fleet_name: FLEET.into(),
        ..AutoscalerConfig::default()
    };
    config.runpod.graphql_url = fake.graphql_url();
    config.runpod.api_key_file = Some(key_file);
    config.runpod.image = "ghcr.io/trainyard/worker:test".into();
    config.runpod.network_volume_id = "vol-models".into();
    config.runpod.env = [("TY_NATS_URL".to_string(), "nats://bus:4222".to_string())].into();
    config.pools.insert(
        "train.gpu".into(),
        PoolPolicy {
            env: [("TY_POOL_EXTRA".to_string(), "1".to_string())].into(),
            ..PoolPolicy::default()
        },
    );
    edit(&mut config);
    let provider = RunpodProvider::with_settings(&config, settings()).expect("provider");
    Rig {
        fake,
        provider,
        _dir: dir,
    }
}

async fn rig() -> Rig {
    rig_with(KEY, |_| {}).await
}

fn launch(name: &str, types: &[&str]) -> Launch {
    Launch {
        name: format!("{FLEET}-train.gpu-{name}"),
        pool: "train.gpu".into(),
        env: [(
            "TY_WORKER_ID".to_string(),
            format!("{FLEET}-train.gpu-{name}"),
        )]
        .into(),
        gpu_types: types.iter().map(|t| t.to_string()).collect(),
        gpu_count: 1,
        interruptible: false,
        bid_per_gpu: 0.0,
        max_price_per_gpu: 0.0,
        avoid_hosts: Vec::new(),
    }
}

fn created_types(fake: &FakeRunpod) -> Vec<String> {
    fake.calls()
        .into_iter()
        .filter(|c| c.op.starts_with("pod") && c.op != "podTerminate")
        .map(|c| {
            c.variables["input"]["gpuTypeId"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn out_of_stock_moves_to_the_next_gpu_type_in_order() {
    let r = rig().await;
    // Says High but has nothing: the create is refused.
    r.fake
        .add_gpu_type(FakeGpuType::new(H100, 2.5, 1.2, 0).advertising("High"));
    // Says None: not even tried.
    r.fake.add_gpu_type(FakeGpuType::new(A5000, 0.3, 0.15, 0));
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let m = r
        .provider
        .launch(&launch("a", &[H100, A5000, A4090]))
        .await
        .expect("launch");
    assert_eq!(m.gpu_type, A4090);
    assert_eq!(created_types(&r.fake), [H100, A4090]);
    let creates = r.fake.calls_of("podFindAndDeployOnDemand");
    assert!(
        creates[0]
            .error
            .as_deref()
            .unwrap()
            .contains("no longer any instances")
    );
    assert_eq!(r.fake.pods().len(), 1);

    // Nothing anywhere: out of stock, no pod.
    let err = r
        .provider
        .launch(&launch("b", &[H100, A5000]))
        .await
        .expect_err("nothing in stock");
    assert!(matches!(err, ProviderError::OutOfStock(_)), "{err:?}");
    assert_eq!(r.fake.pods().len(), 1);
}

#[tokio::test]
async fn a_price_cap_skips_a_dear_type() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(H100, 2.5, 1.2, 4));
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let mut l = launch("a", &[H100, A4090]);
    l.max_price_per_gpu = 1.0;
    let m = r.provider.launch(&l).await.expect("launch");
    assert_eq!(m.gpu_type, A4090);
    assert_eq!(
        created_types(&r.fake),
        [A4090],
        "the H100 is never asked for"
    );
    assert!((m.dollars_per_hour - 0.7).abs() < 1e-9);
}

#[tokio::test]
async fn spot_rents_interruptible_at_no_less_than_the_minimum_bid() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let mut l = launch("a", &[A4090]);
    l.interruptible = true;
    l.bid_per_gpu = 0.1;
    let m = r.provider.launch(&l).await.expect("launch");
    assert!(m.interruptible);
    let rent = r.fake.calls_of("podRentInterruptable");
    assert_eq!(rent.len(), 1);
    assert_eq!(rent[0].variables["input"]["bidPerGpu"].as_f64(), Some(0.35));
    assert!(r.fake.calls_of("podFindAndDeployOnDemand").is_empty());

    let mut l = launch("b", &[A4090]);
    l.interruptible = true;
    l.bid_per_gpu = 0.5;
    r.provider.launch(&l).await.expect("launch");
    let rent = r.fake.calls_of("podRentInterruptable");
    assert_eq!(rent[1].variables["input"]["bidPerGpu"].as_f64(), Some(0.5));
    let listed = r.provider.list().await.expect("list");
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|m| m.interruptible));
}

#[tokio::test]
async fn the_spend_limit_stops_the_launch_and_makes_no_pod() {
    let r = rig().await;
    r.fake.set_spend_limit(1.0);
    r.fake.add_gpu_type(FakeGpuType::new(H100, 2.5, 1.2, 4));
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let err = r
        .provider
        .launch(&launch("a", &[H100, A4090]))
        .await
        .expect_err("over the limit");
    assert!(matches!(err, ProviderError::SpendLimit(_)), "{err:?}");
    assert!(r.fake.pods().is_empty());
    assert_eq!(created_types(&r.fake), [H100], "no further type is tried");
}

#[tokio::test]
async fn a_5xx_is_retried_and_makes_exactly_one_pod() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    // The create meets two 503s, then goes through.
    r.fake
        .fail_next_of(Some("podFindAndDeployOnDemand"), 2, 503, None);
    let m = r
        .provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect("launch");
    assert_eq!(r.fake.pods().len(), 1);
    assert_eq!(r.fake.pods()[0].id, m.id);
    let creates: Vec<u16> = r
        .fake
        .calls_of("podFindAndDeployOnDemand")
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(creates, [503, 503, 200]);
    // Before each new try, the pods were listed for one of that name.
    let ops: Vec<String> = r.fake.calls().into_iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [
            "myself",
            "gpuTypes",
            "podFindAndDeployOnDemand",
            "myself",
            "podFindAndDeployOnDemand",
            "myself",
            "podFindAndDeployOnDemand"
        ]
    );

    // Unavailable after the tries run out, and still no second pod.
    r.fake.fail_next(10, 502, None);
    let err = r
        .provider
        .launch(&launch("b", &[A4090]))
        .await
        .expect_err("down");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    assert_eq!(r.fake.pods().len(), 1);
}

#[tokio::test]
async fn a_429_waits_at_least_its_retry_after() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    r.fake
        .fail_next_of(Some("podFindAndDeployOnDemand"), 1, 429, Some(1));
    r.provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect("launch");
    let calls = r.fake.calls();
    let refused = calls.iter().position(|c| c.status == 429).expect("a 429");
    let waited = calls[refused + 1].at - calls[refused].at;
    assert!(waited >= Duration::from_secs(1), "waited {waited:?}");
    assert_eq!(r.fake.pods().len(), 1);

    // A Retry-After beyond the bound is not slept through.
    r.fake.fail_next(1, 429, Some(3_600));
    let err = r
        .provider
        .launch(&launch("b", &[A4090]))
        .await
        .expect_err("told to wait an hour");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_create_whose_reply_is_lost_makes_one_pod() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    // The pod is made, the reply comes after the client gave up.
    r.fake.delay_next_create_reply(Duration::from_secs(4));
    let l = launch("a", &[A4090]);
    let m = r.provider.launch(&l).await.expect("launch");
    assert_eq!(m.name, l.name);
    assert_eq!(r.fake.pods().len(), 1);
    assert_eq!(r.fake.pods()[0].id, m.id);
    assert_eq!(
        r.fake.calls_of("podFindAndDeployOnDemand").len(),
        1,
        "the create is not sent again: the pod was found by name"
    );

    // And a launch repeated later (a second replica) starts nothing.
    let again = r.provider.launch(&l).await.expect("again");
    assert_eq!(again.id, m.id);
    assert_eq!(r.fake.pods().len(), 1);
    assert_eq!(r.fake.calls_of("podFindAndDeployOnDemand").len(), 1);
}

#[tokio::test]
async fn release_terminates_and_a_gone_pod_is_released() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let m = r
        .provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect("launch");
    r.provider.release(&m).await.expect("release");
    assert!(r.fake.pods().is_empty());
    assert_eq!(r.fake.calls_of("podTerminate").len(), 1);
    assert!(r.fake.calls().iter().all(|c| c.op != "unknown"));
    // Again: RunPod says not found; that is released.
    r.provider.release(&m).await.expect("release of a gone pod");
    let terminates = r.fake.calls_of("podTerminate");
    assert_eq!(terminates.len(), 2);
    assert!(terminates[1].error.is_some());
}

#[tokio::test]
async fn list_shows_only_this_fleets_pods_with_their_state() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let ours = r
        .provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect("launch");
    r.fake.add_pod("notebook", &[]);
    r.fake
        .add_pod("other-train.gpu-1", &[("TY_AUTOSCALER_FLEET", "other")]);
    // Same name prefix, another fleet (`yard-dev`).
    r.fake.add_pod(
        "yard-dev-train.gpu-1",
        &[("TY_AUTOSCALER_FLEET", "yard-dev")],
    );
    // Our prefix, no marker: made by hand, not ours to reap.
    r.fake.add_pod("yard-train.gpu-manual", &[]);
    let listed = r.provider.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let m = &listed[0];
    assert_eq!(m.id, ours.id);
    assert_eq!(m.pool, "train.gpu");
    assert_eq!(m.gpu_type, A4090);
    assert_eq!(m.state, MachineState::Running);
    assert_eq!(m.host, "EU-RO-1");
    assert!(!m.interruptible);
    assert_eq!(m.created_at_ms, ours.created_at_ms);

    // The pod got the merged env, the network volume and the image.
    let pod = &r.fake.pods()[0];
    assert_eq!(pod.env["TY_NATS_URL"], "nats://bus:4222");
    assert_eq!(pod.env["TY_POOL_EXTRA"], "1");
    assert_eq!(pod.env["TY_WORKER_ID"], ours.name);
    assert_eq!(pod.input["networkVolumeId"], "vol-models");
    assert_eq!(pod.input["volumeMountPath"], "/models");
    assert_eq!(pod.input["cloudType"], "SECURE");
    assert_eq!(pod.image, "ghcr.io/trainyard/worker:test");
}

#[tokio::test]
async fn a_pod_without_runtime_is_pending_and_a_preempted_one_exited() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    r.fake.set_new_pods_run(false);
    let mut l = launch("a", &[A4090]);
    l.interruptible = true;
    let m = r.provider.launch(&l).await.expect("launch");
    assert_eq!(m.state, MachineState::Pending);
    r.fake.preempt(&m.id);
    let listed = r.provider.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, MachineState::Exited);
    assert_eq!(listed[0].dollars_per_hour, 0.0);
}

#[tokio::test]
async fn data_centres_avoided_are_not_asked_for() {
    let r = rig_with(KEY, |c| {
        c.runpod.data_center_ids = vec!["EU-RO-1".into(), "US-TX-3".into()];
    })
    .await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let mut l = launch("a", &[A4090]);
    l.avoid_hosts = vec!["EU-RO-1".into()];
    let m = r.provider.launch(&l).await.expect("launch");
    assert_eq!(m.host, "US-TX-3");
    let creates = r.fake.calls_of("podFindAndDeployOnDemand");
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].variables["input"]["dataCenterId"], "US-TX-3");
}

#[tokio::test]
async fn the_api_key_never_shows_in_errors_or_debug() {
    // A wrong key: refused, and the server's echo of it is not passed on.
    let wrong = "rpa_WRONGKEY_do_not_print_0042";
    let r = rig_with(wrong, |_| {}).await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    let err = r
        .provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect_err("bad key");
    assert!(matches!(err, ProviderError::Refused(_)), "{err:?}");
    assert!(
        r.fake.calls().iter().all(|c| !c.authorized),
        "the stand-in saw the wrong key"
    );
    for shown in [
        format!("{err}"),
        format!("{err:?}"),
        format!("{:?}", r.provider),
    ] {
        assert!(!shown.contains(wrong), "{shown}");
    }
    assert!(format!("{err}").contains("<redacted>"), "{err}");

    // The right key: not in Debug, nor in an unavailable error.
    let r = rig().await;
    r.fake.fail_next(10, 500, None);
    let err = r.provider.list().await.expect_err("down");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    for shown in [
        format!("{err}"),
        format!("{err:?}"),
        format!("{:?}", r.provider),
    ] {
        assert!(!shown.contains(KEY), "{shown}");
    }
    assert_eq!(r.fake.calls().len(), settings().attempts as usize);
}

#[tokio::test]
async fn a_request_refused_on_every_type_is_refused_not_out_of_stock() {
    let r = rig().await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    r.fake.refuse_creates(Some("Invalid image name"));
    let err = r
        .provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect_err("bad request");
    assert!(matches!(err, ProviderError::Refused(_)), "{err:?}");
    assert!(r.fake.pods().is_empty());
}

/// The stand-in's pods as processes: the entrypoint runs with the pod's
/// env, secrets resolved (the value is written only to the pod's 0600
/// file); a pod naming a secret that does not exist never starts and stays
/// pending; a release sends SIGTERM and the container ends.
#[tokio::test]
async fn pods_boot_with_their_secrets_and_terminate_stops_them() {
    let r = rig_with(KEY, |c| {
        c.runpod.env.insert(
            "TY_NKEY_SEED".into(),
            "{{ RUNPOD_SECRET_ty_worker_gpu_nk }}".into(),
        );
    })
    .await;
    r.fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 4));
    r.fake.set_secret("ty_worker_gpu_nk", "SUSEEDVALUE");
    let pods = tempfile::tempdir().expect("tempdir");
    r.fake.run_pods(PodRunner {
        entrypoint: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/runpod/entrypoint.sh"),
        // The image's command: says what it was given, then waits.
        command: [
            "sh",
            "-c",
            "echo \"seed=$TY_NATS__NKEY_SEED_FILE raw=${TY_NKEY_SEED:-}\"; exec sleep 60",
        ]
        .map(String::from)
        .to_vec(),
        bin_dir: pods.path().join("bin"),
        image_env: Default::default(),
        dir: pods.path().to_owned(),
    });
    let m = r
        .provider
        .launch(&launch("a", &[A4090]))
        .await
        .expect("launch");
    let log = trainyard_tests::wait_for("the pod's output", Duration::from_secs(10), || async {
        let log = r.fake.pod_log(&m.id);
        log.contains("raw=").then_some(log)
    })
    .await;
    let seed_file = pods.path().join(&m.id).join("run/nkey.seed");
    assert!(
        log.contains(&format!("seed={} raw=\n", seed_file.display())),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&seed_file).unwrap(),
        "SUSEEDVALUE\n"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&seed_file).unwrap().permissions()
        ) & 0o777,
        0o600
    );
    assert!(r.fake.pod_running(&m.id));
    r.provider.release(&m).await.expect("release");
    let exit = trainyard_tests::wait_for("the pod stopped", Duration::from_secs(10), || async {
        r.fake.pod_exit(&m.id)
    })
    .await;
    assert!(!exit.killed, "sleep ends on SIGTERM: {exit:?}");

    // A secret that does not exist: the container never starts.
    r.fake.set_secret("ty_worker_gpu_nk", "unused");
    let mut missing = launch("b", &[A4090]);
    missing.env.insert(
        "TY_SECRETS_KEY".into(),
        "{{ RUNPOD_SECRET_nowhere }}".into(),
    );
    let b = r.provider.launch(&missing).await.expect("launch");
    assert!(
        r.fake
            .pod_boot_error(&b.id)
            .is_some_and(|e| e.contains("nowhere")),
        "{:?}",
        r.fake.pod_boot_error(&b.id)
    );
    assert!(!r.fake.pod_running(&b.id));
    let listed = r.provider.list().await.expect("list");
    assert_eq!(listed[0].state, MachineState::Pending);
}
