//! The autoscaler with its `local` provider on a real fleet: a training
//! pool at zero workers grows with its backlog and shrinks back to zero,
//! without stopping a busy worker; a second replica takes over from a
//! crashed leader without starting a machine twice; a worker SIGKILLed
//! mid-job (its job named in `ty_fleet`) is replaced and its job resumes. Workers are real `ty-worker`
//! processes (`TY_TEST_BIN_DIR`, or `cargo build --workspace --bins`).

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::time::{Duration, Instant};
use trainyard_autoscaler::record::PoolRecord;
use trainyard_core::config::PoolPolicy;
use trainyard_proto::v1::JobState;
use trainyard_tests::autoscale::{POOL, Replica, autoscaler_config, leader};
use trainyard_tests::{Fleet, Services, TOKEN, get, spec, submit, wait_for};

const WAIT: Duration = Duration::from_secs(50);

/// The fleet without workers, on a secured bus (each service, the
/// autoscaler and the workers it starts with their own identities): the
/// autoscaler starts the workers.
async fn fleet() -> Fleet {
    Fleet::start_secured(
        Services {
            worker: false,
            ..Services::ALL
        },
        |c| {
            c.captioner.concurrency = 4;
            // A worker's running task counts as busy at once: a short
            // drain grace is enough for what a test SIGTERMs.
            c.nats.ack_wait_secs = 3;
        },
    )
    .await
}

fn policy(max_workers: u32, idle_secs: u64) -> PoolPolicy {
    PoolPolicy {
        min_workers: 0,
        max_workers,
        target_drain_secs: 1,
        scale_up_step: max_workers,
        scale_up_cooldown_secs: 1,
        scale_down_cooldown_secs: 1,
        idle_secs,
        hysteresis: 0.2,
        ..Default::default()
    }
}

/// Waits until every job is final and returns the jobs not SUCCEEDED.
async fn wait_all_final(
    client: &trainyard_tests::Client,
    jobs: &[String],
    timeout: Duration,
) -> Vec<(String, JobState)> {
    let states = wait_for("every job final", timeout, || {
        let mut client = client.clone();
        async move {
            let mut states = Vec::new();
            for job in jobs {
                let state = get(&mut client, job).await.state();
                if !matches!(
                    state,
                    JobState::Succeeded | JobState::Failed | JobState::Cancelled
                ) {
                    return None;
                }
                states.push((job.clone(), state));
            }
            Some(states)
        }
    })
    .await;
    states
        .into_iter()
        .filter(|(_, s)| *s != JobState::Succeeded)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_at_zero_grows_with_its_backlog_and_returns_to_zero() {
    let fleet = fleet().await;
    let (config, machines) = autoscaler_config(&fleet, policy(3, 2));
    let replica = Replica::start(&config);
    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    let started = Instant::now();
    let mut jobs = Vec::new();
    for _ in 0..30 {
        jobs.push(submit(&mut client, spec(&dataset, 4)).await.job_id);
    }
    wait_for("a first worker", WAIT, || async {
        (!machines.launched().is_empty()).then_some(())
    })
    .await;
    let first_worker = started.elapsed();
    let failed = wait_all_final(&client, &jobs, Duration::from_secs(120)).await;
    let last_job_done = Instant::now();
    assert!(failed.is_empty(), "jobs not succeeded: {failed:?}");
    wait_for("the pool back at zero", WAIT, || async {
        machines.current().is_empty().then_some(())
    })
    .await;
    let to_zero = last_job_done.elapsed();
    let launched = machines.launched();
    assert!(
        !launched.is_empty() && launched.len() <= 6,
        "machines launched: {launched:?}"
    );
    // No busy worker was stopped: none handed a running task back.
    let logs = machines.logs();
    assert!(
        !logs.contains("handing running tasks back"),
        "a busy worker was stopped"
    );
    println!(
        "backlog -> first new worker: {:.1}s; last job -> zero: {:.1}s; jobs lost: {}; machines launched: {}",
        first_worker.as_secs_f64(),
        to_zero.as_secs_f64(),
        failed.len(),
        launched.len()
    );
    replica.stop().await;
    drop(machines); // its workers go before the fleet's folder
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_replica_takes_over_without_starting_a_machine_twice() {
    let fleet = fleet().await;
    let (config, machines) = autoscaler_config(&fleet, policy(2, 30));
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let first = Replica::start(&config);
    let first_holder = wait_for("a leader", WAIT, || leader(&js)).await;
    let second = Replica::start(&config);
    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    let mut jobs = Vec::new();
    // Long enough that the work wants both workers.
    for _ in 0..4 {
        jobs.push(submit(&mut client, spec(&dataset, 400)).await.job_id);
    }
    wait_for("two workers", WAIT, || async {
        (machines.launched().len() == 2).then_some(())
    })
    .await;
    first.crash();
    let second_holder = wait_for("the other replica leading", WAIT, || async {
        leader(&js).await.filter(|h| *h != first_holder)
    })
    .await;
    assert_ne!(first_holder, second_holder);
    let failed = wait_all_final(&client, &jobs, Duration::from_secs(90)).await;
    assert!(failed.is_empty(), "jobs not succeeded: {failed:?}");
    // The machines the first leader started were adopted, none started again.
    assert_eq!(machines.launched().len(), 2, "{:?}", machines.launched());
    assert_eq!(
        machines.current().len(),
        2,
        "the idle workers stay until idle_secs"
    );
    second.stop().await;
    drop(machines); // its workers go before the fleet's folder
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_job_is_replaced_and_its_job_succeeds() {
    let fleet = fleet().await;
    let (config, machines) = autoscaler_config(&fleet, policy(1, 30));
    let replica = Replica::start(&config);
    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    let job = submit(&mut client, spec(&dataset, 400)).await.job_id;
    wait_for("the job training", WAIT, || {
        let mut client = client.clone();
        let job = job.clone();
        async move { (get(&mut client, &job).await.state() == JobState::Training).then_some(()) }
    })
    .await;
    // The job may reach TRAINING before the autoscaler's next pass.
    let (victim, pid) = wait_for("a worker started", WAIT, || async {
        machines.current().into_iter().next()
    })
    .await;
    // Killed while it runs the task, as its registry entry says.
    let workers = async_nats::jetstream::new(fleet.nats_client().await)
        .get_key_value(trainyard_core::topology::WORKERS_BUCKET)
        .await
        .expect("registry");
    wait_for("the worker busy", WAIT, || async {
        let value = workers.get(&victim).await.ok()??;
        let entry: trainyard_core::registry::Entry = serde_json::from_slice(&value).ok()?;
        (entry.busy_slots > 0).then_some(())
    })
    .await;
    // `yard fleet`'s record names the job the busy machine runs.
    let fleet_kv = async_nats::jetstream::new(fleet.nats_client().await)
        .get_key_value(trainyard_core::topology::FLEET_BUCKET)
        .await
        .expect("ty_fleet");
    wait_for("the machine's job in ty_fleet", WAIT, || async {
        let value = fleet_kv.get(POOL).await.ok()??;
        let record: PoolRecord = serde_json::from_slice(&value).ok()?;
        record
            .machines
            .iter()
            .any(|m| m.name == victim && m.activity == "busy" && m.jobs == [job.clone()])
            .then_some(())
    })
    .await;
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
    wait_for("a replacement", WAIT, || async {
        machines
            .current()
            .iter()
            .any(|(name, _)| *name != victim)
            .then_some(())
    })
    .await;
    let failed = wait_all_final(&client, std::slice::from_ref(&job), Duration::from_secs(90)).await;
    assert!(failed.is_empty(), "job not succeeded: {failed:?}");
    let current: Vec<String> = machines.current().into_iter().map(|(n, _)| n).collect();
    assert!(
        !current.contains(&victim),
        "the dead worker was released: {current:?}"
    );
    assert_eq!(machines.launched().len(), 2, "{:?}", machines.launched());
    replica.stop().await;
    drop(machines); // its workers go before the fleet's folder
    fleet.stop().await;
}
