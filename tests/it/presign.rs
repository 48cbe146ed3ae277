//! Presigned uploads and downloads on a fleet whose artifact store is a
//! bucket (moto on loopback): `CreateUpload` hands out PUT URLs below the
//! caller's tenant's uploads, the bytes go straight to the bucket, a job
//! trains on them, and `CreateDownload` gives GET URLs for its outputs whose
//! bytes match their sha256s. Another tenant gets nothing of the job, the
//! caps hold as for `Upload`, and a fleet on a local store says to stream.

use std::path::Path;
use std::time::Duration;
use trainyard_core::store::{get_url, put_url, sha256_file};
use trainyard_proto::v1::{
    CreateUploadRequest, DownloadRequest, JobState, UploadFile, job_event::Kind,
};
use trainyard_tests::*;

/// The files below `dir` as a `CreateUpload` names them.
async fn files_of(dir: &Path) -> Vec<UploadFile> {
    let mut names = trainyard_core::store::walk(dir).expect("walk");
    names.sort();
    let mut files = Vec::new();
    for name in names {
        let (size, sha256) = sha256_file(&dir.join(&name)).await.expect("sha256");
        files.push(UploadFile {
            path: name,
            size,
            sha256,
        });
    }
    files
}

fn download(job_id: &str) -> DownloadRequest {
    DownloadRequest {
        job_id: job_id.to_string(),
        name: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_carry_a_job_from_upload_to_download_on_s3() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::ALL, |config| {
        config.store.uri = "s3://fleet/store".into();
        config.store.s3 = options;
        config.store.presign_expiry_secs = 600;
        config.store.max_upload_files = 20;
        config.store.max_upload_bytes = 10 << 20;
    })
    .await;
    let sample = fleet.dir.path().join("sample-dir");
    trainyard_captioner::sample::write_sample_dataset(&sample).expect("sample");
    let files = files_of(&sample).await;
    let mut acme = fleet.client(TOKEN).await;
    let reply = acme
        .create_upload(CreateUploadRequest {
            files: files.clone(),
        })
        .await
        .expect("upload URLs")
        .into_inner();
    let prefix = fleet.store.key_of(&reply.uri).expect("in the store");
    assert!(prefix.starts_with("tenants/acme/uploads/"), "{prefix}");
    assert_eq!(reply.urls.len(), files.len());
    assert!(reply.expires_at_ms > trainyard_core::now_ms());
    let http = reqwest::Client::new();
    for (file, url) in files.iter().zip(&reply.urls) {
        assert_eq!(url.path, file.path);
        assert!(
            url.url.contains(&format!("/fleet/store/{prefix}/")),
            "{}",
            url.url
        );
        assert!(url.url.contains("X-Amz-Expires=600"), "{}", url.url);
        put_url(
            &http,
            &url.url,
            &sample.join(&file.path),
            file.size,
            &file.sha256,
        )
        .await
        .expect("PUT through the URL");
    }
    let mut stored = fleet.store.list(&prefix).await.expect("list");
    stored.sort();
    let mut expected: Vec<(String, u64)> = files
        .iter()
        .map(|f| (format!("{prefix}/{}", f.path), f.size))
        .collect();
    expected.sort();
    assert_eq!(stored, expected);

    // A job trains on the upload.
    let job = submit(&mut acme, spec(&reply.uri, 30)).await;
    let events = watch_all(&mut acme, &job.job_id, Duration::from_secs(180)).await;
    let record = get(&mut acme, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "{:?}",
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::State(s)) => Some(format!("{:?} {:?}", s.state(), s.error)),
                _ => None,
            })
            .collect::<Vec<_>>()
    );

    // Its outputs come back through GET URLs, each checked.
    let down = acme
        .create_download(download(&job.job_id))
        .await
        .expect("download URLs")
        .into_inner();
    assert_eq!(down.urls.len(), record.artifacts.len());
    let out = fleet.dir.path().join("fetched");
    for url in &down.urls {
        let artifact = record
            .artifacts
            .iter()
            .find(|a| a.name == url.path)
            .expect("an artifact of the job");
        assert_eq!((url.size, &url.sha256), (artifact.size, &artifact.sha256));
        let local = out.join(&url.path);
        get_url(&http, &url.url, &local, url.size, &url.sha256)
            .await
            .expect("GET through the URL");
        assert_eq!(sha256_hex(&local), artifact.sha256);
        // Bytes that do not match what the record says are refused.
        let wrong = out.join("wrong.bin");
        let err = get_url(&http, &url.url, &wrong, url.size, &"0".repeat(64))
            .await
            .expect_err("checksum mismatch");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(!wrong.exists());
    }
    assert!(out.join("lora.safetensors").exists());

    // Another tenant gets nothing of acme's job.
    let mut globex = fleet.client(OTHER_TOKEN).await;
    let status = globex
        .create_download(download(&job.job_id))
        .await
        .expect_err("not globex's job");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");

    // The caps and checks of Upload hold.
    let file = |path: &str, size: u64| UploadFile {
        path: path.into(),
        size,
        sha256: "ab".repeat(32),
    };
    for (files, code) in [
        (
            (0..21).map(|i| file(&format!("{i}.png"), 1)).collect(),
            tonic::Code::ResourceExhausted,
        ),
        (
            vec![file("a.png", 6 << 20), file("b.png", 6 << 20)],
            tonic::Code::ResourceExhausted,
        ),
        (
            vec![file("a.png", 1), file("b.png", u64::MAX)],
            tonic::Code::ResourceExhausted,
        ),
        (
            vec![file("../../acme/x.png", 1)],
            tonic::Code::InvalidArgument,
        ),
        (
            vec![file("a.png", 1), file("a.png", 1)],
            tonic::Code::InvalidArgument,
        ),
        (
            vec![UploadFile {
                sha256: "nothex".into(),
                ..file("a.png", 1)
            }],
            tonic::Code::InvalidArgument,
        ),
        (vec![], tonic::Code::InvalidArgument),
    ] {
        let status = globex
            .create_upload(CreateUploadRequest { files })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{status}");
    }
    // globex's own URLs are below its own prefix.
    let own = globex
        .create_upload(CreateUploadRequest {
            files: vec![file("a.png", 1)],
        })
        .await
        .expect("globex's upload")
        .into_inner();
    assert!(
        own.urls[0]
            .url
            .contains("/fleet/store/tenants/globex/uploads/"),
        "{}",
        own.urls[0].url
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_a_local_store_says_to_stream_instead() {
    let fleet = Fleet::start_with(
        Services {
            coordinator: true,
            ..Services::NONE
        },
        |_| {},
    )
    .await;
    assert!(fleet.store.root().starts_with("file://"));
    let mut acme = fleet.client(TOKEN).await;
    let status = acme
        .create_upload(CreateUploadRequest {
            files: vec![UploadFile {
                path: "a.png".into(),
                size: 1,
                sha256: "ab".repeat(32),
            }],
        })
        .await
        .expect_err("a local store cannot sign");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    assert!(status.message().contains("instead"), "{status}");
    let parts = fleet.coordinator_parts().await;
    let (job, _) = store_queued(&parts.repo, spec(&fleet.upload_uri("acme", "x"), 10)).await;
    let status = acme
        .create_download(download(job.as_ref()))
        .await
        .expect_err("a local store cannot sign");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    assert_eq!(fleet.store.list("tenants").await.expect("list"), []);
    fleet.stop().await;
}
