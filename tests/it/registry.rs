//! The worker registry on a real nats-server: an entry that follows the
//! model cache and the runs holding models, deleted on a clean stop; and a
//! running worker registered with its pool and installed backends.

use std::path::Path;
use std::time::Duration;
use trainyard_core::store::ArtifactStore;
use trainyard_core::topology::{self, WORKER_HEARTBEAT, worker_key};
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_proto::v1::ModelRef;
use trainyard_tests::hub::FakeHub;
use trainyard_tests::{Fleet, Services, wait_for};
use trainyard_worker::models::Models;
use trainyard_worker::registry::{self, Heartbeat, Identity, WorkerEntry};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn entry(kv: &async_nats::jetstream::kv::Store, worker: &str) -> Option<WorkerEntry> {
    let value = kv.get(worker_key(worker)).await.expect("kv get")?;
    Some(serde_json::from_slice(&value).expect("entry json"))
}

#[tokio::test]
async fn the_entry_follows_the_cache_and_goes_on_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root");
    let nats = NatsServer::start(
        &find_nats_server(root).expect("nats-server"),
        &dir.path().join("nats"),
    )
    .expect("nats-server starts");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let topo = topology::ensure(&js, &Default::default())
        .await
        .expect("topology");
    let status = topo.workers.status().await.expect("bucket status");
    assert_eq!(status.max_age(), WORKER_HEARTBEAT * 3);

    let hub = FakeHub::start("t").await;
    hub.add_file("org/m", "w.safetensors", vec![7u8; 1000], true);
    let store = ArtifactStore::open(&dir.path().join("store").display().to_string()).unwrap();
    let models = Models::new(
        store,
        dir.path().join("cache"),
        "/nonexistent".into(),
        &hub.endpoint(),
        0,
    )
    .expect("models");
    let identity = Identity {
        worker_id: "train-test1".into(),
        pool: "a100".into(),
        backends: vec!["reference".into()],
        slots: 2,
        cache_max_bytes: 0,
        occupancy: Default::default(),
    };
    let heartbeat = Heartbeat::start(
        topo.workers.clone(),
        identity,
        models.clone(),
        Duration::from_millis(20),
    );
    let first = wait_for("the first entry", TIMEOUT, || {
        entry(&topo.workers, "train-test1")
    })
    .await;
    assert_eq!(first.pool, "a100");
    assert_eq!(first.backends, vec!["reference".to_string()]);
    assert_eq!((first.slots, first.busy_slots), (2, 0));
    assert!(first.models.is_empty());

    let uri = "hf://org/m@main/w.safetensors";
    let (_, lease) = models
        .resolve(
            &ModelRef {
                uri: uri.into(),
                family: "flux".into(),
            },
            &["file"],
            512,
            None,
        )
        .await
        .expect("resolved");
    let busy = wait_for("a busy entry holding the model", TIMEOUT, || async {
        entry(&topo.workers, "train-test1")
            .await
            .filter(|e| e.busy_slots == 1 && !e.models.is_empty())
    })
    .await;
    assert_eq!(busy.models[0].reference, uri);
    assert_eq!(busy.models[0].parts, vec!["file".to_string()]);
    assert_eq!(busy.models[0].bytes, 1000);
    assert_eq!(busy.cache_bytes, 1000);
    assert!(busy.updated_at >= first.updated_at && busy.started_at == first.started_at);
    drop(lease);
    wait_for("an idle entry", TIMEOUT, || async {
        entry(&topo.workers, "train-test1")
            .await
            .filter(|e| e.busy_slots == 0)
    })
    .await;

    heartbeat.stop().await;
    assert_eq!(entry(&topo.workers, "train-test1").await, None);
    assert!(registry::entries(&topo.workers).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_running_worker_is_registered() {
    let fleet = Fleet::start_with(
        Services {
            coordinator: false,
            captioner: false,
            worker: true,
            uploader: false,
        },
        |config| config.worker.pool = "gpu-x".into(),
    )
    .await;
    let client = fleet.nats_client().await;
    let js = async_nats::jetstream::new(client);
    let kv = topology::ensure(&js, &fleet.config.nats)
        .await
        .expect("topology")
        .workers;
    let found = wait_for("the worker's entry", TIMEOUT, || async {
        registry::entries(&kv)
            .await
            .ok()
            .and_then(|entries| entries.into_iter().next())
    })
    .await;
    assert_eq!(found.pool, "gpu-x");
    assert!(found.worker_id.starts_with("train-"));
    assert!(found.backends.contains(&"reference".to_string()));
    assert_eq!((found.slots, found.busy_slots), (1, 0));
    fleet.stop().await;
}
