//! Services that start before NATS can hold their streams keep trying
//! (with backoff, each failure logged) and come up once it can: a server
//! that starts after them, and a fresh three-node cluster that cannot place
//! R3 streams until its other nodes are there.
//!
//! Needs `cargo build --workspace --bins` first (the services run as the
//! real binaries).

use std::time::Duration;
use trainyard_core::topology::{JOBS_BUCKET, TASKS_STREAM, consumer_name};
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_proto::v1::{GetRequest, Stage};
use trainyard_tests::chaos::{Chaos, Cluster, Service, free_port};

fn nats_server() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    find_nats_server(root).expect("nats-server >= 2.12")
}

/// What a service logs each time it cannot set up the topology yet.
const RETRYING: &str = "cannot set up NATS streams and buckets yet; retrying";
const TIMEOUT: Duration = Duration::from_secs(90);

/// The coordinator answers a request for an unknown job with NOT_FOUND: it
/// is up and reads its bucket.
async fn coordinator_serves(chaos: &Chaos) {
    let mut client = chaos.client().await;
    let status = client
        .get(GetRequest {
            job_id: "j-00000000000000000000000000".into(),
        })
        .await
        .expect_err("no such job");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_started_before_their_nats_server_come_up_once_it_is_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let store = dir.path().join("nats");
    let mut chaos = Chaos::with_nats(dir, None, format!("nats://127.0.0.1:{port}"), |_| {});
    let coordinator = chaos.spawn(Service::Coordinator);
    let captioner = chaos.spawn(Service::Captioner);
    for name in [&coordinator, &captioner] {
        chaos.wait_log(name, RETRYING, TIMEOUT).await;
    }
    for name in [&coordinator, &captioner] {
        assert!(chaos.proc(name).is_running(), "{name} gave up");
    }

    let nats = tokio::task::spawn_blocking(move || {
        NatsServer::start_on_port(&nats_server(), &store, port).expect("nats-server starts")
    })
    .await
    .expect("nats start task");
    chaos.nats = Some(nats);

    coordinator_serves(&chaos).await;
    // The captioner is up too: its task consumer exists.
    let js = chaos.js().await;
    trainyard_tests::wait_for("the captioner's consumer", TIMEOUT, || async {
        let stream = js.get_stream(TASKS_STREAM).await.ok()?;
        stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&consumer_name(
                Stage::Prepare,
                "",
            ))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    for name in [&coordinator, &captioner] {
        assert!(chaos.proc(name).is_running(), "{name} exited");
    }
    chaos.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_a_cluster_missing_nodes_comes_up_when_they_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(&nats_server(), dir.path()).await;
    // No stream exists yet, and only one node of three is up: R3 streams
    // cannot be placed.
    cluster.kill(1);
    cluster.kill(2);
    let url = cluster.nodes[0].url();
    let mut chaos = Chaos::with_nats(dir, None, url, |c| c.nats.replicas = 3);
    let coordinator = chaos.spawn(Service::Coordinator);
    chaos.wait_log(&coordinator, RETRYING, TIMEOUT).await;
    assert!(chaos.proc(&coordinator).is_running(), "coordinator gave up");

    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_ready().await;
    chaos.cluster = Some(cluster);

    coordinator_serves(&chaos).await;
    let js = chaos.js().await;
    for name in [TASKS_STREAM.to_string(), format!("KV_{JOBS_BUCKET}")] {
        let mut stream = js.get_stream(&name).await.expect("stream");
        let info = stream.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
    assert!(chaos.proc(&coordinator).is_running(), "coordinator exited");
    chaos.stop().await;
}
