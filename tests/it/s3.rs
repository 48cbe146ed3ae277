//! S3 against a real S3-compatible server on loopback (moto): the artifact
//! store's operations, a job delivering to an `s3://` destination, and a
//! fleet whose whole artifact store is a bucket. Every S3 setting reaches
//! the services through `[store.s3]`, none through the environment.

use std::path::Path;
use std::time::Duration;
use trainyard_core::store::keys as store_keys;
use trainyard_core::store::{ArtifactStore, StoreError};
use trainyard_proto::v1::{Destination, JobRecord, JobState, job_event::Kind};
use trainyard_tests::*;

/// 17 MiB of varied bytes: three parts of a multipart upload (S3 refuses
/// parts under 5 MiB but the last).
fn write_big_file(path: &Path) -> Vec<u8> {
    let bytes: Vec<u8> = (0..17u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(path, &bytes).expect("write big file");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_artifact_store_works_on_s3() {
    let s3 = S3Server::start();
    s3.create_bucket("store-bucket").await;
    let store = ArtifactStore::open_with("s3://store-bucket/root/", &s3.options()).expect("open");
    assert_eq!(store.root(), "s3://store-bucket/root");
    let dir = tempfile::tempdir().unwrap();

    // One large file, uploaded in parts, read back whole and verified.
    let big = dir.path().join("big.bin");
    let bytes = write_big_file(&big);
    let artifact = store
        .put_file(&big, "blobs/big.bin")
        .await
        .expect("put_file");
    assert_eq!(artifact.size, bytes.len() as u64);
    assert_eq!(artifact.sha256, sha256_hex(&big));
    assert_eq!(artifact.uri, "s3://store-bucket/root/blobs/big.bin");
    assert_eq!(
        store.key_of(&artifact.uri).as_deref(),
        Some("blobs/big.bin")
    );
    let back = dir.path().join("back/big.bin");
    let (size, sha) = store
        .get_file("blobs/big.bin", &back, Some(&artifact.sha256))
        .await
        .expect("get_file");
    assert_eq!(
        (size, sha.as_str()),
        (artifact.size, artifact.sha256.as_str())
    );
    assert_eq!(std::fs::read(&back).unwrap(), bytes);
    let wrong = dir.path().join("back/wrong.bin");
    let err = store
        .get_file("blobs/big.bin", &wrong, Some("00"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Checksum { .. }), "{err}");
    assert!(!wrong.exists(), "a file failing its checksum is not kept");

    // A folder, manifest last, and back.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    std::fs::write(src.join("sub/b.txt"), b"beta").unwrap();
    std::fs::write(src.join("manifest.json"), b"{}").unwrap();
    let put = store
        .put_dir(&src, "jobs/j-1/dataset", &["manifest.json"])
        .await
        .expect("put_dir");
    assert_eq!(put.len(), 3);
    assert_eq!(put.last().unwrap().name, "manifest.json");
    let listed = store.list("jobs/j-1/dataset").await.expect("list");
    assert_eq!(
        listed,
        vec![
            ("jobs/j-1/dataset/a.txt".to_string(), 5),
            ("jobs/j-1/dataset/manifest.json".to_string(), 2),
            ("jobs/j-1/dataset/sub/b.txt".to_string(), 4),
        ]
    );
    let out = dir.path().join("out");
    let mut got = store
        .get_dir("jobs/j-1/dataset", &out)
        .await
        .expect("get_dir");
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a.txt".to_string(), 5),
            ("manifest.json".to_string(), 2),
            ("sub/b.txt".to_string(), 4)
        ]
    );
    assert_eq!(std::fs::read(out.join("sub/b.txt")).unwrap(), b"beta");

    // Everything lives below the store's prefix in the bucket.
    let bucket = ArtifactStore::open_with("s3://store-bucket", &s3.options()).expect("bucket");
    let whole: Vec<String> = bucket
        .list("")
        .await
        .expect("list bucket")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(whole.len(), 4, "{whole:?}");
    assert!(whole.iter().all(|k| k.starts_with("root/")), "{whole:?}");

    // Absent objects.
    assert!(
        store
            .exists("jobs/j-1/dataset/a.txt")
            .await
            .expect("exists")
    );
    assert!(!store.exists("jobs/j-1/dataset/nope").await.expect("exists"));
    assert!(matches!(
        store.get_bytes("nope").await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert!(matches!(
        store
            .get_file("nope", &dir.path().join("nope"), None)
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));

    store
        .delete_prefix("jobs/j-1")
        .await
        .expect("delete_prefix");
    assert!(store.list("jobs/j-1").await.expect("list").is_empty());
    assert_eq!(store.list("blobs").await.expect("list").len(), 1);
}

/// Runs `spec` on `fleet` to its end and returns the final record.
async fn run_job(fleet: &Fleet, spec: trainyard_proto::v1::JobSpec) -> JobRecord {
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "job ended {:?} ({:?}); events: {:?}",
        record.state(),
        record.error,
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::State(s)) => Some(format!("{:?} {:?}", s.state(), s.error)),
                Some(Kind::Log(l)) => Some(l.line.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    );
    record
}

/// Checks that the adapter and manifest.json of `record` are in `folder` of
/// `bucket` with the sha256 the record holds.
async fn assert_delivered(bucket: &ArtifactStore, folder: &str, record: &JobRecord, dir: &Path) {
    let job = &record.job_id;
    let adapter_key = format!("{folder}/lora.safetensors");
    let adapter_uri = bucket.uri(&adapter_key);
    let delivered = record
        .delivered
        .iter()
        .find(|d| d.uri == adapter_uri)
        .unwrap_or_else(|| panic!("{adapter_uri} among {:?}", record.delivered));
    let output = record
        .artifacts
        .iter()
        .find(|a| a.name == "lora.safetensors")
        .expect("adapter artifact");
    assert_eq!(delivered.sha256, output.sha256);
    let local = dir.join(format!("{job}.safetensors"));
    let (size, sha256) = bucket
        .get_file(&adapter_key, &local, Some(&delivered.sha256))
        .await
        .expect("delivered adapter in the bucket");
    assert_eq!(
        (size, sha256.as_str()),
        (delivered.size, delivered.sha256.as_str())
    );
    let bytes = std::fs::read(&local).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");

    let manifest: serde_json::Value = serde_json::from_slice(
        &bucket
            .get_bytes(&format!("{folder}/manifest.json"))
            .await
            .expect("manifest.json in the bucket"),
    )
    .expect("manifest is json");
    let files = manifest["files"].as_array().expect("files");
    assert_eq!(files.len(), 1, "{manifest}");
    assert_eq!(files[0]["sha256"].as_str(), Some(delivered.sha256.as_str()));
    assert_eq!(files[0]["size"].as_u64(), Some(delivered.size));
    assert!(
        files[0]["uris"]
            .as_array()
            .expect("uris")
            .iter()
            .any(|u| u.as_str() == Some(adapter_uri.as_str())),
        "{manifest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivers_to_an_s3_destination() {
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::ALL, |config| config.store.s3 = options).await;
    assert!(fleet.store.root().starts_with("file://"));
    let mut spec = spec(&fleet.sample_uri().await, 30);
    spec.destinations.push(Destination {
        uri: "s3://deliveries/out".into(),
        ..Default::default()
    });
    spec.secrets = Some(s3.job_secrets());
    let record = run_job(&fleet, spec).await;
    let bucket = ArtifactStore::open_with("s3://deliveries", &s3.options()).expect("bucket");
    let folder = format!("out/{}", record.job_id);
    assert_delivered(&bucket, &folder, &record, fleet.dir.path()).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_runs_with_its_artifact_store_on_s3() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config.store.uri = "s3://fleet/store".into();
        config.store.s3 = options;
    })
    .await;
    assert_eq!(fleet.store.root(), "s3://fleet/store");
    let sample = fleet.sample_uri().await;
    assert!(sample.starts_with("s3://fleet/store/"), "{sample}");
    let mut spec = spec(&sample, 60);
    spec.training.as_mut().expect("training").save_every = 25;
    let record = run_job(&fleet, spec).await;

    // Dataset, checkpoints, base model and output all went to the bucket.
    let keys: Vec<String> = fleet
        .store
        .list("")
        .await
        .expect("list store")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let job = &trainyard_proto::JobId::parse(&record.job_id).unwrap();
    let tenant = &trainyard_proto::TenantId::parse("acme").unwrap();
    for prefix in [
        format!("{}/", store_keys::dataset(tenant, job)),
        format!("{}/", store_keys::checkpoints(tenant, job)),
        format!("{}/", store_keys::output(tenant, job)),
        "models/".to_string(),
    ] {
        assert!(
            keys.iter().any(|k| k.starts_with(&prefix)),
            "no {prefix} in {keys:?}"
        );
    }
    assert!(
        record
            .artifacts
            .iter()
            .all(|a| a.uri.starts_with("s3://fleet/store/tenants/acme/jobs/")),
        "{:?}",
        record.artifacts
    );
    assert_delivered(
        &fleet.store,
        &store_keys::output(tenant, job),
        &record,
        fleet.dir.path(),
    )
    .await;
    fleet.stop().await;
}
