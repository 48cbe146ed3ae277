//! Attacks on the bus of a fleet with identities (`yard fleet init`'s files,
//! nats-server with TLS and one nkey user per role): the whole pipeline
//! works with each service's least privilege, and everything outside a
//! role's permissions fails — connecting without an identity or without
//! TLS, reading the job records, the tasks or other roles' replies,
//! forging tasks, results, cancels, drain requests and state events, a worker taking
//! another pool's tasks — and a service refuses an open bus.

use async_nats::jetstream;
use futures::{FutureExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use trainyard_core::topology::permissions::Role;
use trainyard_core::topology::{self, subject};
use trainyard_proto::v1::{JobState, Stage};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::*;

const TIMEOUT: Duration = Duration::from_secs(30);
/// How long an attacker's JetStream call waits for the reply a denied
/// request never gets.
const DENIED_WAIT: Duration = Duration::from_secs(2);

fn worker() -> Role {
    Role::Worker {
        pool: "default".into(),
    }
}

fn other_worker() -> Role {
    Role::Worker {
        pool: OTHER_POOL.into(),
    }
}

/// A JetStream context of `role` that gives up on a denied request soon.
async fn js_as(fleet: &Fleet, role: &Role) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(DENIED_WAIT)
        .build(fleet.nats_client_as(role).await)
}

/// Waits until the server's log shows it refused `role` a `kind`
/// (`Publish`, `Subscription`) on `subject`.
async fn refused(fleet: &Fleet, kind: &str, subject: &str) {
    let log = fleet.nats.log_path().to_owned();
    let (kind, quoted) = (
        format!("{kind} Violation"),
        format!("Subject \"{subject}\""),
    );
    wait_for(
        &format!("the server to refuse {kind} on {subject}"),
        TIMEOUT,
        || {
            let (log, kind, quoted) = (log.clone(), kind.clone(), quoted.clone());
            async move {
                std::fs::read_to_string(&log)
                    .ok()?
                    .lines()
                    .any(|line| line.contains(&kind) && line.contains(&quoted))
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_succeeds_on_a_fleet_whose_services_have_least_privilege() {
    let fleet = Fleet::start_secured(Services::ALL, |_| {}).await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let spec = with_destination(spec(&fleet.sample_uri().await, 20), &outputs);
    let job = submit(&mut client, spec).await;
    let record = wait_for("the job to end", Duration::from_secs(180), || {
        let mut client = client.clone();
        let id = job.job_id.clone();
        async move {
            let record = get(&mut client, &id).await;
            record.state().is_final().then_some(record)
        }
    })
    .await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{:?}\nserver log:\n{}",
        record.error,
        fleet.nats.log_tail()
    );
    let log = std::fs::read_to_string(fleet.nats.log_path()).unwrap_or_default();
    assert!(
        !log.contains("Violation"),
        "a service was refused something it needs:\n{log}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_or_no_tls_gets_onto_the_bus() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    let files = fleet.secured.clone().expect("secured");
    trainyard_core::nats::install_tls_provider();
    // TLS with the right CA but no identity.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(files.ca())
        .require_tls(true)
        .connect(fleet.config.nats.url.as_str())
        .await;
    assert!(anonymous.is_err(), "connected without credentials");
    // A real identity over plaintext: the server answers only TLS.
    let seed = std::fs::read_to_string(files.seed_file(&Role::Coordinator)).unwrap();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", fleet.nats.port()))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let info = lines.next_line().await.unwrap().unwrap_or_default();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    assert!(info.contains("\"auth_required\":true"), "{info}");
    let public = nkeys::KeyPair::from_seed(seed.trim()).unwrap().public_key();
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"nkey\":\"{public}\"}}\r\nPING\r\n"
    );
    let _ = write.write_all(connect.as_bytes()).await;
    let answer = tokio::time::timeout(TIMEOUT, lines.next_line())
        .await
        .expect("the server answers or closes")
        .ok()
        .flatten()
        .unwrap_or_default();
    assert_ne!(answer, "PONG", "a plaintext connection was served");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_refuses_a_bus_without_authentication() {
    let fleet = Fleet::start_with(Services::NONE, |_| {}).await;
    let mut config = fleet.config.clone();
    config.nats.insecure_dev = false;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refused = tokio::time::timeout(
        TIMEOUT,
        trainyard_core::service::connect(&config, &Role::Captioner, &shutdown),
    )
    .await
    .expect("answers in time")
    .err()
    .expect("a service on an open bus refuses to start");
    assert!(
        refused
            .to_string()
            .contains("does not require authentication"),
        "{refused}"
    );
    // The same with insecure_dev (what dev fleets and tests set) starts.
    config.nats.insecure_dev = true;
    let started = trainyard_core::service::connect(&config, &Role::Captioner, &shutdown).await;
    assert!(matches!(started, Ok(Some(_))), "insecure_dev starts");
    fleet.stop().await;
}

/// A job record, a prepare task and a task of the other pool, as the
/// coordinator leaves them; returns the job's record key.
async fn a_queued_job(fleet: &Fleet) -> (TenantId, JobId, String) {
    let js = jetstream::new(fleet.nats_client_as(&Role::Coordinator).await);
    let topo = topology::ensure(&js, &fleet.config.nats).await.unwrap();
    let tenant = TenantId::parse("acme").unwrap();
    let job = JobId::generate();
    let key = topology::job_key(&tenant, &job);
    topo.jobs.put(&key, "secret record".into()).await.unwrap();
    for task in [
        subject::task(Stage::Prepare, ""),
        subject::task(Stage::Train, OTHER_POOL),
    ] {
        js.publish(task, "task".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    (tenant, job, key)
}

async fn messages(fleet: &Fleet, stream: &str) -> u64 {
    let js = jetstream::new(fleet.nats_client_as(&Role::Coordinator).await);
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_roles_cannot_read_the_records_or_tasks() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    let (_, _, key) = a_queued_job(&fleet).await;

    let client = js_as(&fleet, &Role::Client).await;
    for bucket in [
        topology::JOBS_BUCKET,
        topology::IDEM_BUCKET,
        topology::WEBHOOK_SECRETS_BUCKET,
    ] {
        assert!(
            client.get_key_value(bucket).await.is_err(),
            "client binds {bucket}"
        );
    }
    assert!(client.get_stream(topology::TASKS_STREAM).await.is_err());

    let worker = js_as(&fleet, &worker()).await;
    for bucket in [topology::IDEM_BUCKET, topology::WEBHOOK_SECRETS_BUCKET] {
        assert!(
            worker.get_key_value(bucket).await.is_err(),
            "worker binds {bucket}"
        );
    }
    // A stage reads a record by key (admission) but cannot list or watch
    // the bucket, nor read the stream behind it.
    let jobs = worker.get_key_value(topology::JOBS_BUCKET).await.unwrap();
    let listed = match jobs.keys().await {
        Ok(mut keys) => keys.next().await.map(|k| k.is_ok()).unwrap_or(false),
        Err(_) => false,
    };
    assert!(!listed, "a worker listed the job records");
    assert!(
        jobs.watch_all().await.is_err(),
        "a worker watched the job records"
    );
    let kv_stream = worker
        .get_stream(format!("KV_{}", topology::JOBS_BUCKET))
        .await
        .unwrap();
    assert!(
        kv_stream.get_raw_message(1).await.is_err(),
        "a worker read a record by sequence"
    );
    assert!(
        kv_stream.direct_get(1).await.is_err(),
        "a worker read a record by sequence"
    );
    // Nor read tasks except through its own pool's consumer.
    let tasks = worker.get_stream(topology::TASKS_STREAM).await.unwrap();
    assert!(
        tasks.get_raw_message(1).await.is_err(),
        "a worker read a task by sequence"
    );
    assert!(
        tasks
            .direct_get_last_for_subject(subject::task(Stage::Prepare, ""))
            .await
            .is_err(),
        "a worker read the prepare task"
    );
    assert!(!key.is_empty());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_roles_cannot_forge_records_tasks_results_or_state_events() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    let (tenant, job, key) = a_queued_job(&fleet).await;
    let coordinator = jetstream::new(fleet.nats_client_as(&Role::Coordinator).await);
    let jobs = coordinator
        .get_key_value(topology::JOBS_BUCKET)
        .await
        .unwrap();
    let revision = jobs.entry(&key).await.unwrap().unwrap().revision;
    let before = [
        messages(&fleet, topology::TASKS_STREAM).await,
        messages(&fleet, topology::RESULTS_STREAM).await,
        messages(&fleet, topology::EVENTS_STREAM).await,
    ];

    let state_event = subject::event(&tenant, &job, topology::EventKind::State);
    // Only the autoscaler asks a service to drain.
    let drain = subject::drain(Stage::Train, "default", "w-1").expect("drain subject");
    let forged: [(Role, Vec<String>); 2] = [
        (
            worker(),
            vec![
                format!("$KV.{}.{key}", topology::JOBS_BUCKET),
                subject::task(Stage::Prepare, ""),
                subject::task(Stage::Train, "default"),
                subject::task(Stage::Deliver, ""),
                subject::result(Stage::Deliver),
                subject::result(Stage::Prepare),
                state_event.clone(),
                drain.clone(),
            ],
        ),
        (
            Role::Client,
            vec![
                format!("$KV.{}.{key}", topology::JOBS_BUCKET),
                subject::task(Stage::Deliver, ""),
                subject::result(Stage::Train),
                state_event.clone(),
                drain.clone(),
            ],
        ),
    ];
    for (role, subjects) in forged {
        let js = js_as(&fleet, &role).await;
        for subject in subjects {
            let acked = match js.publish(subject.clone(), "forged".into()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            assert!(!acked, "{} published to {subject}", role.name());
            refused(&fleet, "Publish", &subject).await;
        }
    }
    assert_eq!(jobs.entry(&key).await.unwrap().unwrap().revision, revision);
    let after = [
        messages(&fleet, topology::TASKS_STREAM).await,
        messages(&fleet, topology::RESULTS_STREAM).await,
        messages(&fleet, topology::EVENTS_STREAM).await,
    ];
    assert_eq!(before, after, "tasks, results, events");

    // A cancel is plain NATS: the coordinator's own cancel is the first
    // the stages hear.
    let stage = fleet.nats_client_as(&Role::Captioner).await;
    let mut cancels = stage.subscribe(subject::all_cancels()).await.unwrap();
    stage.flush().await.unwrap();
    let attacker = fleet.nats_client_as(&worker()).await;
    let forged_cancel = subject::cancel(&job);
    attacker
        .publish(forged_cancel.clone(), "forged".into())
        .await
        .unwrap();
    attacker.flush().await.unwrap();
    refused(&fleet, "Publish", &forged_cancel).await;
    let real = subject::cancel(&JobId::generate());
    let coordinator_client = fleet.nats_client_as(&Role::Coordinator).await;
    coordinator_client
        .publish(real.clone(), "real".into())
        .await
        .unwrap();
    coordinator_client.flush().await.unwrap();
    let first = tokio::time::timeout(TIMEOUT, cancels.next())
        .await
        .expect("a cancel arrives")
        .expect("subscription open");
    assert_eq!(
        first.subject.as_str(),
        real,
        "the forged cancel got through"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_but_the_coordinator_hears_api_requests_or_other_replies() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    for role in [worker(), Role::Client, Role::Captioner, Role::Uploader] {
        let attacker = fleet.nats_client_as(&role).await;
        let mut subs = Vec::new();
        for subject in ["ty.api.>", "_INBOX.>", "_INBOX_coordinator.>", ">"] {
            subs.push(attacker.subscribe(subject).await.unwrap());
        }
        attacker.flush().await.unwrap();
        for subject in ["ty.api.>", "_INBOX.>", "_INBOX_coordinator.>"] {
            refused(&fleet, "Subscription", subject).await;
        }
        // A client's request with its bearer token reaches no one here.
        let client = fleet.nats_client_as(&Role::Client).await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(topology::AUTH_HEADER, "Bearer token-acme");
        client
            .publish_with_headers(subject::api(topology::ApiOp::Get), headers, "req".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        attacker.flush().await.unwrap();
        for sub in &mut subs {
            assert!(
                sub.next().now_or_never().flatten().is_none(),
                "{} heard a request",
                role.name()
            );
        }
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_take_another_pools_tasks() {
    let fleet = Fleet::start_secured(Services::NONE, |_| {}).await;
    a_queued_job(&fleet).await;
    // The other pool's worker has made its consumer.
    let other = js_as(&fleet, &other_worker()).await;
    topology::task_consumer(&other, Stage::Train, OTHER_POOL, &fleet.config.nats)
        .await
        .expect("a worker makes its own pool's consumer");

    let js = js_as(&fleet, &worker()).await;
    let tasks = js.get_stream(topology::TASKS_STREAM).await.unwrap();
    // Its own consumer name with the other pool's filter, or the other's.
    let stolen = jetstream::consumer::pull::Config {
        durable_name: Some(topology::consumer_name(Stage::Train, "default")),
        filter_subject: subject::task(Stage::Train, OTHER_POOL),
        ..Default::default()
    };
    assert!(tasks.create_consumer(stolen).await.is_err());
    assert!(
        tasks
            .get_consumer::<jetstream::consumer::pull::Config>(&topology::consumer_name(
                Stage::Train,
                OTHER_POOL
            ))
            .await
            .is_err()
    );
    // Pulling from the other pool's consumer by its API subject.
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        topology::TASKS_STREAM,
        topology::consumer_name(Stage::Train, OTHER_POOL)
    );
    let attacker = fleet.nats_client_as(&worker()).await;
    let pulled = tokio::time::timeout(
        DENIED_WAIT,
        attacker.request(next.clone(), "{\"batch\":1,\"no_wait\":true}".into()),
    )
    .await;
    assert!(!matches!(pulled, Ok(Ok(_))), "pulled the other pool's task");
    refused(&fleet, "Publish", &next).await;
    // The task still waits for its own pool.
    assert_eq!(messages(&fleet, topology::TASKS_STREAM).await, 2);
    fleet.stop().await;
}
