//! The autoscaler with its `kubernetes` provider, end to end: a secured
//! fleet without workers, an autoscaler replica in-process pointed at the
//! stand-in API server (`trainyard_tests::kube`), whose worker Deployment
//! runs its pods for real — each a `ty-worker` process whose worker id is
//! its pod's name, stopped with SIGTERM (SIGKILL after the pod's grace)
//! when its ReplicaSet deletes it. The Deployment starts at zero replicas,
//! grows with the backlog, every job succeeds, and it returns to zero; every
//! pod removed on the way down was idle, including while another pod of the
//! pool was still training.

use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trainyard_core::Config;
use trainyard_core::config::{KubernetesConfig, PoolPolicy};
use trainyard_core::registry::Entry;
use trainyard_core::topology::WORKERS_BUCKET;
use trainyard_core::topology::permissions::Role;
use trainyard_proto::v1::JobState;
use trainyard_tests::autoscale::{POOL, Replica};
use trainyard_tests::chaos::procs::bin_dir;
use trainyard_tests::kube::{DELETION_COST, FakeKube, PodExit, PodTemplate};
use trainyard_tests::{Fleet, Services, TOKEN, get, spec, submit, wait_for};

const KUBE_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.e2e-service-account-4b1d";
const NS: &str = "trainyard";
const DEPLOYMENT: &str = "ty-worker-default";
const MAX_PODS: u32 = 3;
/// A job that trains well past the short ones, so idle pods are released
/// while its pod is busy.
const LONG_STEPS: u32 = 600;
const SHORT_STEPS: u32 = 4;
const WAIT: Duration = Duration::from_secs(30);

/// A training worker's registry entry as it was written.
#[derive(Clone, Debug)]
struct Seen {
    worker: String,
    busy: bool,
    at_ms: i64,
}

/// Every write of a training worker's registry entry, from now on.
async fn watch_registry(fleet: &Fleet) -> (Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let workers = js.get_key_value(WORKERS_BUCKET).await.expect("registry");
    let mut watch = workers.watch_all().await.expect("watch the registry");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(update)) = watch.next().await {
            if update.operation != Operation::Put {
                continue;
            }
            let Ok(entry) = serde_json::from_slice::<Entry>(&update.value) else {
                continue;
            };
            if entry.stage == "train" {
                log.lock().unwrap().push(Seen {
                    worker: entry.worker_id,
                    busy: entry.busy_slots > 0,
                    at_ms: entry.updated_at,
                });
            }
        }
    });
    (seen, task)
}

/// Whether `worker`'s entry said busy at `at_ms` (its last write before).
fn busy_at(seen: &[Seen], worker: &str, at_ms: i64) -> bool {
    seen.iter()
        .filter(|s| s.worker == worker && s.at_ms <= at_ms)
        .max_by_key(|s| s.at_ms)
        .is_some_and(|s| s.busy)
}

/// Stores the reference trainer's base model at the jobs' resolution, as
/// a fleet that trained before has it, so pods starting together only
/// download it. (A worker makes it when it is missing; workers making it
/// at once on a local-folder store race, which is not this test's subject.)
async fn store_reference_model(fleet: &Fleet) {
    let out = fleet.dir.path().join("reference-base.safetensors");
    let made = tokio::process::Command::new(bin_dir().join("ty-reference-trainer"))
        .arg("make-base")
        .arg("--out")
        .arg(&out)
        .args(["--resolution", "32"])
        .status()
        .await
        .expect("ty-reference-trainer runs");
    assert!(made.success());
    fleet
        .store
        .put_file(&out, "models/reference-denoiser-v1-r32/model.safetensors")
        .await
        .expect("the base model stored");
}

/// The autoscaler's config: its own identity on the fleet, the
/// `kubernetes` provider at the stand-in, one pool from zero.
fn autoscaler_config(fleet: &Fleet, kube: &FakeKube, token_file: &Path) -> Config {
    let mut config = fleet.config_as(&Role::Autoscaler);
    let scaler = &mut config.autoscaler;
    scaler.provider = "kubernetes".into();
    scaler.interval_ms = 200;
    scaler.lease_ms = 1_500;
    scaler.vanished_after_ms = 15_000;
    scaler.fleet_name = "it".into();
    scaler.default_seconds_per_step = 0.05;
    scaler.pools = [(
        POOL.to_string(),
        PoolPolicy {
            min_workers: 0,
            max_workers: MAX_PODS,
            target_drain_secs: 1,
            scale_up_step: MAX_PODS,
            scale_up_cooldown_secs: 1,
            scale_down_cooldown_secs: 1,
            idle_secs: 1,
            hysteresis: 0.2,
            ..Default::default()
        },
    )]
    .into();
    scaler.kubernetes = KubernetesConfig {
        api_url: kube.url(),
        namespace: NS.into(),
        token_file: Some(token_file.to_owned()),
        ca_file: None,
        deployments: BTreeMap::from([(POOL.into(), DEPLOYMENT.into())]),
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_at_zero_grows_with_its_backlog_and_returns_to_zero_releasing_idle_pods() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            ..Services::ALL
        },
        |c| c.captioner.concurrency = 4,
    )
    .await;
    let kube = FakeKube::start(KUBE_TOKEN, NS).await;
    let token_file = fleet.dir.path().join("kube-token");
    std::fs::write(&token_file, KUBE_TOKEN).unwrap();
    // The worker Deployment's pod template: ty-worker as the pool's worker
    // role, its id from the pod's name, its work folder and model cache on
    // the pod's own disk (deploy/k8s/base/workers.yaml).
    let mut worker = fleet.worker_config();
    worker.worker.work_dir = "work".into();
    worker.worker.model_cache_dir = "cache".into();
    let worker_toml = fleet.dir.path().join("worker.toml");
    std::fs::write(&worker_toml, worker.to_toml()).unwrap();
    let logs = fleet.dir.path().join("pods");
    kube.add_deployment_running(
        DEPLOYMENT,
        0,
        PodTemplate {
            program: bin_dir().join("ty-worker"),
            args: vec!["--config".into(), worker_toml.display().to_string()],
            env: BTreeMap::new(),
            pod_name_env: vec!["TY_RUNTIME__WORKER_ID".into()],
            termination_grace: Duration::from_secs(10),
            pods_dir: logs.clone(),
        },
    );
    store_reference_model(&fleet).await;
    let (seen, watcher) = watch_registry(&fleet).await;
    let replica = Replica::start(&autoscaler_config(&fleet, &kube, &token_file));

    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    let mut jobs = vec![submit(&mut client, spec(&dataset, LONG_STEPS)).await.job_id];
    for _ in 0..3 {
        jobs.push(
            submit(&mut client, spec(&dataset, SHORT_STEPS))
                .await
                .job_id,
        );
    }
    wait_for("the Deployment scaled up", WAIT, || async {
        (kube.replicas(DEPLOYMENT) > 0).then_some(())
    })
    .await;
    let states = wait_for("every job final", WAIT, || {
        let mut client = client.clone();
        let jobs = jobs.clone();
        async move {
            let mut states = Vec::new();
            for job in &jobs {
                let state = get(&mut client, job).await.state();
                if !matches!(
                    state,
                    JobState::Succeeded | JobState::Failed | JobState::Cancelled
                ) {
                    return None;
                }
                states.push(state);
            }
            Some(states)
        }
    })
    .await;
    assert!(
        states.iter().all(|s| *s == JobState::Succeeded),
        "{states:?}"
    );
    wait_for("the Deployment back at zero", WAIT, || async {
        (kube.replicas(DEPLOYMENT) == 0 && kube.pods(DEPLOYMENT).is_empty()).then_some(())
    })
    .await;
    replica.stop().await;
    watcher.abort();

    // Scaled within the pool's bounds, by its Scale.
    let asked: Vec<i64> = kube
        .requests()
        .iter()
        .filter(|r| r.method == axum::http::Method::PUT)
        .filter_map(|r| r.json()["spec"]["replicas"].as_i64())
        .collect();
    assert!(asked.contains(&1), "{asked:?}");
    assert!(
        asked.iter().all(|n| (0..=i64::from(MAX_PODS)).contains(n)),
        "{asked:?}"
    );
    assert_eq!(asked.last(), Some(&0));
    // Every pod ran a worker registered under the pod's name, and went as
    // the autoscaler chose: marked first, idle, stopped within its grace.
    let seen = seen.lock().unwrap().clone();
    let removed = kube.removed();
    assert!(!removed.is_empty());
    let registered: BTreeSet<&str> = seen.iter().map(|s| s.worker.as_str()).collect();
    let mut while_another_trained = 0;
    for pod in &removed {
        assert!(
            pod.name.starts_with(&format!("{DEPLOYMENT}-")),
            "{}",
            pod.name
        );
        assert!(registered.contains(pod.name.as_str()), "{}", pod.name);
        assert_eq!(
            pod.deletion_cost,
            i64::from(i32::MIN),
            "{}: the controller removed a pod the autoscaler did not mark ({DELETION_COST})",
            pod.name
        );
        assert!(
            !busy_at(&seen, &pod.name, pod.deleted_at_ms),
            "{} was busy when it was removed",
            pod.name
        );
        assert!(
            matches!(pod.exit, Some(PodExit::Terminated(Some(0)))),
            "{}: {:?}",
            pod.name,
            pod.exit
        );
        if removed
            .iter()
            .filter(|other| other.name != pod.name)
            .any(|other| busy_at(&seen, &other.name, pod.deleted_at_ms))
        {
            while_another_trained += 1;
        }
    }
    assert!(
        while_another_trained > 0,
        "no idle pod was released while another trained: {removed:#?}"
    );
    let output: String = removed
        .iter()
        .map(|p| std::fs::read_to_string(logs.join(format!("{}.log", p.name))).unwrap())
        .collect();
    assert!(!output.contains("handing running tasks back"), "{output}");
    println!(
        "pods: {} started, {} removed while another trained; replicas asked: {asked:?}",
        removed.len(),
        while_another_trained
    );
    drop(kube); // no pod outlives the fleet's folder
    fleet.stop().await;
}
