//! The autoscaler with its `runpod` provider end to end: a secured fleet,
//! an autoscaler replica pointed at the RunPod stand-in
//! (`trainyard_tests::runpod`), whose pods run for real —
//! `deploy/runpod/entrypoint.sh ty-worker` with the pod's env, credentials
//! only as `{{ RUNPOD_SECRET_<name> }}` resolved by the stand-in at boot.
//!
//! One scenario, in order: an orphan pod of the fleet is terminated; the
//! account's spend limit stops scale-up (the stop flag set, no further
//! create with a backlog waiting) until it is cleared as `yard fleet
//! resume` does; the create whose reply is lost makes one pod; that spot
//! pod is preempted after its first checkpoint upload, the autoscaler
//! replaces it, and the job resumes from the checkpoint and succeeds.

use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trainyard_autoscaler::lease::{STOP_SPEND_LIMIT, clear_stop, read_stop};
use trainyard_autoscaler::record::PoolRecord;
use trainyard_autoscaler::service::SPEND_STOP_REASON;
use trainyard_core::config::PoolPolicy;
use trainyard_core::topology::permissions::Role;
use trainyard_core::topology::{AUTOSCALER_BUCKET, FLEET_BUCKET};
use trainyard_proto::v1::{JobEvent, JobState, Stage, WatchRequest, job_event::Kind};
use trainyard_tests::autoscale::{POOL, Replica};
use trainyard_tests::chaos::procs::bin_dir;
use trainyard_tests::runpod::{FakeGpuType, FakeRunpod, PodRunner};
use trainyard_tests::{Fleet, Services, TOKEN, get, spec, submit, wait_for};

const WAIT: Duration = Duration::from_secs(40);
const KEY: &str = "rpa_e2e0TESTKEY";
const FLEET: &str = "it";
const A4090: &str = "NVIDIA GeForce RTX 4090";
const STEPS: u32 = 100;
const SAVE_EVERY: u32 = 10;
const CREATE: &str = "podRentInterruptable";

/// Every event of a job, collected in the background.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<JobEvent>>>);

impl Events {
    async fn watch(client: &trainyard_tests::Client, job: &str) -> Events {
        let events = Events::default();
        let stream = client
            .clone()
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

    fn select(&self, pick: impl Fn(&JobEvent) -> Option<u32>) -> Vec<u32> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(pick)
            .collect()
    }

    /// Training steps reported before (`before`) or at and after `ms`.
    fn steps(&self, ms: i64, before: bool) -> Vec<u32> {
        self.select(|e| match &e.kind {
            Some(Kind::Progress(p))
                if p.stage() == Stage::Train && p.step > 0 && (e.at_ms < ms) == before =>
            {
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
}

/// Creates the stand-in was sent for pod `name`.
fn creates_named(fake: &FakeRunpod, name: &str) -> usize {
    fake.calls_of(CREATE)
        .iter()
        .filter(|c| c.variables["input"]["name"] == name)
        .count()
}

/// The fleet's pods (not the orphan) whose container runs.
fn running_pods(fake: &FakeRunpod) -> Vec<(String, String)> {
    fake.pods()
        .into_iter()
        .filter(|p| p.name.starts_with("it-train-default-") && fake.pod_running(&p.id))
        .map(|p| (p.id, p.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runpod_pods_run_workers_stop_at_the_spend_limit_and_survive_preemption() {
    let fleet = Fleet::start_secured(
        Services {
            worker: false,
            ..Services::ALL
        },
        |c| {
            c.captioner.concurrency = 4;
            c.nats.ack_wait_secs = 3;
        },
    )
    .await;
    let files = fleet.secured.clone().expect("a secured fleet");
    let dir = fleet.dir.path();

    // The image's config: no credentials in it, they come from the pod's
    // secrets through the entrypoint.
    let mut image_config = fleet.worker_config();
    image_config.nats.nkey_seed_file = None;
    image_config.nats.tls_ca_file = None;
    image_config.secrets.key_file = None;
    let image_config_file = dir.join("image-worker.toml");
    std::fs::write(&image_config_file, image_config.to_toml()).expect("image config");

    let fake = FakeRunpod::start(KEY).await;
    fake.add_gpu_type(FakeGpuType::new(A4090, 0.7, 0.35, 8));
    fake.set_spend_limit(0.0);
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("fleet file");
    let worker_role = Role::Worker {
        pool: "default".into(),
    };
    fake.set_secret(
        "ty_worker_default_nk",
        read(&files.seed_file(&worker_role)).trim(),
    );
    fake.set_secret("ty_nats_ca_pem", &read(&files.ca()));
    fake.set_secret("ty_secrets_key", &read(&files.secrets_key()));
    fake.run_pods(PodRunner {
        entrypoint: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/runpod/entrypoint.sh"),
        command: vec!["ty-worker".into()],
        bin_dir: bin_dir(),
        image_env: [(
            "TY_CONFIG".to_string(),
            image_config_file.display().to_string(),
        )]
        .into(),
        dir: dir.join("pods"),
    });
    // A pod of this fleet that no configured pool wants, with no worker.
    let orphan = fake.add_pod(
        "it-train-gone-0",
        &[
            ("TY_AUTOSCALER_FLEET", FLEET),
            ("TY_AUTOSCALER_POOL", "train.gone"),
        ],
    );

    let key_file = dir.join("runpod.key");
    std::fs::write(&key_file, KEY).expect("key file");
    let mut config = fleet.config_as(&Role::Autoscaler);
    let scaler = &mut config.autoscaler;
    scaler.provider = "runpod".into();
    scaler.interval_ms = 200;
    scaler.lease_ms = 1_500;
    scaler.vanished_after_ms = 8_000;
    scaler.fleet_name = FLEET.into();
    scaler.default_seconds_per_step = 0.05;
    scaler.runpod.graphql_url = fake.graphql_url();
    scaler.runpod.api_key_file = Some(key_file);
    scaler.runpod.image = "ghcr.io/trainyard/worker:test".into();
    scaler.runpod.env = [
        ("TY_NATS__URL", fleet.config.nats.url.as_str()),
        ("TY_NATS_CA_PEM", "{{ RUNPOD_SECRET_ty_nats_ca_pem }}"),
        ("TY_SECRETS_KEY", "{{ RUNPOD_SECRET_ty_secrets_key }}"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    scaler.pools = [(
        POOL.to_string(),
        PoolPolicy {
            max_workers: 1,
            target_drain_secs: 1,
            scale_up_step: 1,
            scale_up_cooldown_secs: 1,
            scale_down_cooldown_secs: 1,
            idle_secs: 30,
            gpu_types: vec![A4090.into()],
            interruptible: true,
            env: [(
                "TY_NKEY_SEED".to_string(),
                "{{ RUNPOD_SECRET_ty_worker_default_nk }}".to_string(),
            )]
            .into(),
            ..Default::default()
        },
    )]
    .into();
    config
        .autoscaler
        .validate()
        .expect("secrets only by reference");

    let js = async_nats::jetstream::new(fleet.nats_client_as(&Role::Autoscaler).await);
    let replica = Replica::start(&config);
    let state = wait_for("the autoscaler's bucket", WAIT, || async {
        js.get_key_value(AUTOSCALER_BUCKET).await.ok()
    })
    .await;
    let fleet_kv = js.get_key_value(FLEET_BUCKET).await.expect("ty_fleet");

    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    let mut job_spec = spec(&dataset, STEPS);
    let training = job_spec.training.as_mut().expect("training");
    training.save_every = SAVE_EVERY;
    // Large enough images that steps land between checkpoints.
    training.resolution = 64;
    let job = submit(&mut client, job_spec).await.job_id;
    let events = Events::watch(&client, &job).await;

    // The orphan goes; the spend limit sets the stop flag.
    wait_for("the orphan terminated", WAIT, || async {
        (!fake.pods().iter().any(|p| p.id == orphan)).then_some(())
    })
    .await;
    let flag = wait_for("the stop flag", WAIT, || async {
        read_stop(&state).await.ok().flatten()
    })
    .await;
    assert_eq!(
        (flag.reason.as_str(), flag.pool.as_str()),
        (STOP_SPEND_LIMIT, POOL)
    );
    // Several passes later, with the job waiting: still no other create.
    let listed = fake.calls_of("myself").len();
    wait_for("passes while stopped", WAIT, || async {
        let record: PoolRecord = serde_json::from_slice(&fleet_kv.get(POOL).await.ok()??).ok()?;
        let last = record.decisions.back()?;
        (fake.calls_of("myself").len() >= listed + 5 && last.reason == SPEND_STOP_REASON)
            .then_some(())
    })
    .await;
    assert_eq!(fake.calls_of(CREATE).len(), 1, "one create, refused");
    assert!(running_pods(&fake).is_empty());

    // The operator raises the limit and resumes; the reply to the next
    // create is lost, and the pod it made is found, not made twice.
    fake.set_spend_limit(80.0);
    fake.drop_next_create_reply();
    assert!(clear_stop(&state).await.expect("resume").is_some());
    let (first_id, first_name) = wait_for("a pod running", WAIT, || async {
        running_pods(&fake).into_iter().next()
    })
    .await;
    assert_eq!(creates_named(&fake, &first_name), 1, "{:?}", fake.calls());
    assert_eq!(
        fake.pods().iter().filter(|p| p.name == first_name).count(),
        1
    );
    // Its worker joined the secured bus: its credentials came from the
    // secrets, through the entrypoint, into files only its user reads.
    let workers = js
        .get_key_value(trainyard_core::topology::WORKERS_BUCKET)
        .await
        .expect("ty_workers");
    wait_for("the pod's worker registered", WAIT, || async {
        let key = trainyard_core::topology::worker_key(&first_name);
        workers.get(key).await.ok()?.map(|_| ())
    })
    .await;
    let seed = dir.join("pods").join(&first_id).join("run/nkey.seed");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&seed)
            .expect("the seed file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Preempted after its first checkpoint upload.
    wait_for("a first checkpoint", WAIT, || async {
        (!events.checkpoints_until(i64::MAX).is_empty()).then_some(())
    })
    .await;
    let preempted_at = Instant::now();
    fake.preempt(&first_id);
    let exit = wait_for("the preempted worker gone", WAIT, || async {
        fake.pod_exit(&first_id)
    })
    .await;
    let gone_ms = trainyard_core::now_ms();
    let notice = preempted_at.elapsed();
    let (_, second_name) = wait_for("a replacement pod", WAIT, || async {
        running_pods(&fake)
            .into_iter()
            .find(|(id, _)| *id != first_id)
    })
    .await;
    let resumed_at = wait_for("training resumed", WAIT, || async {
        events.steps(gone_ms, false).first().copied()
    })
    .await;
    let last_step = events
        .steps(gone_ms, true)
        .into_iter()
        .max()
        .expect("steps");
    let last_checkpoint = events
        .checkpoints_until(gone_ms)
        .into_iter()
        .max()
        .expect("checkpoint");
    let redone = last_step.saturating_sub(resumed_at - 1);
    println!(
        "preempted at step {last_step} (checkpoint {last_checkpoint}); worker gone after \
         {notice:?} ({exit:?}); resumed on {second_name} at step {resumed_at}: {redone} steps redone"
    );
    assert!(
        resumed_at > last_checkpoint,
        "resumed at step {resumed_at}, the latest checkpoint was {last_checkpoint}"
    );
    assert!(redone <= SAVE_EVERY, "{redone} steps redone");
    let state_now = wait_for("the job final", WAIT, || {
        let mut client = client.clone();
        let job = job.clone();
        async move {
            let state = get(&mut client, &job).await.state();
            matches!(
                state,
                JobState::Succeeded | JobState::Failed | JobState::Cancelled
            )
            .then_some(state)
        }
    })
    .await;
    assert_eq!(
        state_now,
        JobState::Succeeded,
        "{}",
        fake.pod_log(&first_id)
    );
    // The preempted pod was terminated; two pods made in all.
    assert!(!fake.pods().iter().any(|p| p.id == first_id));
    assert_eq!(
        fake.calls_of(CREATE).len(),
        3,
        "refused, lost reply, replacement"
    );

    replica.stop().await;
    drop(fake); // its pods' processes go before the fleet's folder
    fleet.stop().await;
}
