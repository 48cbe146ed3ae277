//! The autoscaler with its `local` provider on a real fleet: a training
//! pool at zero workers grows with its backlog and shrinks back to zero,
//! without stopping a busy worker; a second replica takes over from a
//! crashed leader without starting a machine twice; a worker SIGKILLed
//! mid-job (its job named in `ty_fleet`) is replaced and its job resumes;
//! a busy worker over a lowered cap is drained — its trainer stopped
//! gracefully, its task handed back and resumed elsewhere — and released
//! only then, never SIGKILLed. Workers are real `ty-worker` processes
//! (`TY_TEST_BIN_DIR`, or `cargo build --workspace --bins`).

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trainyard_autoscaler::provider::local::{SIGKILL_NOTE, SIGTERM_NOTE};
use trainyard_autoscaler::record::PoolRecord;
use trainyard_core::config::PoolPolicy;
use trainyard_core::registry::Entry;
use trainyard_proto::v1::{JobState, job_event::Kind};
use trainyard_tests::autoscale::{POOL, Replica, autoscaler_config, leader};
use trainyard_tests::{Fleet, Services, TOKEN, get, spec, submit, wait_for, watch_all};

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
    // Every release was the graceful one: SIGTERM, and the worker exited.
    assert!(logs.contains(SIGTERM_NOTE), "no machine was released");
    assert!(!logs.contains(SIGKILL_NOTE), "a worker was SIGKILLed");
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

/// Every write of the registry (`None`: deleted), by worker, in order.
type Writes = Arc<Mutex<Vec<(String, Option<Entry>)>>>;

/// Records every registry write from now on, until the returned task is aborted.
async fn record_registry(fleet: &Fleet) -> (Writes, tokio::task::JoinHandle<()>) {
    let workers = async_nats::jetstream::new(fleet.nats_client().await)
        .get_key_value(trainyard_core::topology::WORKERS_BUCKET)
        .await
        .expect("registry");
    let mut watch = workers.watch_all().await.expect("watch the registry");
    let writes: Writes = Arc::default();
    let into = writes.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            let value = match entry.operation {
                async_nats::jetstream::kv::Operation::Put => {
                    serde_json::from_slice(&entry.value).ok()
                }
                _ => None,
            };
            into.lock().unwrap().push((entry.key, value));
        }
    });
    (writes, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_worker_over_a_lowered_cap_is_drained_then_released() {
    let fleet = fleet().await;
    let (config, machines) = autoscaler_config(&fleet, policy(2, 30));
    let (writes, recorder) = record_registry(&fleet).await;
    let first = Replica::start(&config);
    let mut client = fleet.client(TOKEN).await;
    let dataset = fleet.sample_uri().await;
    // One job, then a second once the first trains (its base model is in
    // the workers' shared cache then): each trains on its own worker, each
    // with a checkpoint stored.
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let mut jobs = Vec::new();
    for n in 1..=2 {
        jobs.push(submit(&mut client, spec(&dataset, 600)).await);
        wait_for("every job training, with a checkpoint", WAIT, || {
            let (mut client, js, jobs) = (client.clone(), js.clone(), jobs.clone());
            async move {
                for job in &jobs {
                    if get(&mut client, &job.job_id).await.state() != JobState::Training {
                        return None;
                    }
                    let checkpoint = trainyard_core::topology::subject::event(
                        &trainyard_proto::TenantId::parse(&job.tenant).ok()?,
                        &trainyard_proto::JobId::parse(&job.job_id).ok()?,
                        trainyard_core::topology::EventKind::Checkpoint,
                    );
                    js.get_stream(trainyard_core::topology::EVENTS_STREAM)
                        .await
                        .ok()?
                        .get_last_raw_message_by_subject(&checkpoint)
                        .await
                        .ok()?;
                }
                Some(())
            }
        })
        .await;
        wait_for("a busy worker per job", WAIT, || async {
            let mut last = std::collections::BTreeMap::new();
            for (key, entry) in writes.lock().unwrap().iter() {
                last.insert(key.clone(), entry.clone());
            }
            let busy = last
                .values()
                .filter(|e| e.as_ref().is_some_and(|e| e.busy_slots > 0))
                .count();
            (busy == n).then_some(())
        })
        .await;
    }
    // The pool's cap drops to one: a replica with the new policy drains
    // the newest busy worker.
    first.stop().await;
    let mut lowered = config.clone();
    lowered.autoscaler.pools.insert(POOL.into(), policy(1, 30));
    let second = Replica::start(&lowered);
    let launched = machines.launched();
    assert_eq!(launched.len(), 2, "{launched:?}");
    let victim = wait_for("one worker released", WAIT, || async {
        let current = machines.current();
        (current.len() == 1)
            .then(|| launched.iter().find(|n| **n != current[0].0).cloned())
            .flatten()
    })
    .await;
    let ids: Vec<String> = jobs.iter().map(|j| j.job_id.clone()).collect();
    let failed = wait_all_final(&client, &ids, WAIT).await;
    assert!(failed.is_empty(), "jobs not succeeded: {failed:?}");

    // The victim drained through the graceful path, then was released:
    // SIGTERM after its task was handed back, and never SIGKILL.
    let log = std::fs::read_to_string(machines.log_dir.join(format!("{victim}.log")))
        .expect("the victim's log");
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the victim's log:\n{log}"))
    };
    let asked = at("drain requested");
    let saving = at("stopping: asking the trainer to save");
    let handed_back = at("trainer stopped; task handed back");
    let terminated = at(SIGTERM_NOTE);
    assert!(asked < saving && saving < handed_back && handed_back < terminated);
    assert!(
        !log.contains(SIGKILL_NOTE),
        "the drained worker was SIGKILLed"
    );
    assert!(
        log[terminated..].contains("stage runtime stopped"),
        "it exited by itself"
    );
    // Its entry said draining with no task before the release removed it.
    let history: Vec<Option<Entry>> = writes
        .lock()
        .unwrap()
        .iter()
        .filter(|(key, _)| *key == victim)
        .map(|(_, e)| e.clone())
        .collect();
    let gone = history
        .iter()
        .position(Option::is_none)
        .expect("the victim's entry deleted");
    let last = history[..gone].last().cloned().flatten().expect("an entry");
    assert!(last.draining && last.busy_slots == 0, "{last:?}");
    recorder.abort();
    // Its job resumed from its checkpoint elsewhere; the other's never stopped.
    let mut resumed = Vec::new();
    for job in &ids {
        let events = watch_all(&mut client, job, WAIT).await;
        resumed.extend(events.iter().filter_map(|e| match &e.kind {
            Some(Kind::Progress(p)) if p.message.starts_with("resuming from step") => {
                Some(p.message.clone())
            }
            _ => None,
        }));
    }
    assert_eq!(resumed.len(), 1, "one job resumed: {resumed:?}");
    assert_ne!(resumed[0], "resuming from step 0");
    // The decisions say so: drained, then released after it, with no timeout.
    let fleet_kv = js
        .get_key_value(trainyard_core::topology::FLEET_BUCKET)
        .await
        .expect("ty_fleet");
    let pool = trainyard_autoscaler::record::read_pool(&fleet_kv, POOL).await;
    let drained = pool
        .decisions
        .iter()
        .position(|d| d.drain == [victim.clone()])
        .unwrap_or_else(|| panic!("no drain decision: {:?}", pool.decisions));
    assert!(
        pool.decisions
            .iter()
            .skip(drained + 1)
            .any(|d| d.release.contains(&victim) && d.error.is_empty()),
        "{:?}",
        pool.decisions
    );
    second.stop().await;
    drop(machines); // its workers go before the fleet's folder
    fleet.stop().await;
}
