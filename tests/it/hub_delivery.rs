//! Delivery to `hf://` destinations against the loopback Hub stand-in
//! (`tests/src/hub/`): the uploader's deliver stage run on a task as the
//! stage runtime would, the preflight probe, and one job through the whole
//! fleet.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_core::destination::{Destinations, ProbeFailure};
use trainyard_core::events::EventSink;
use trainyard_core::runtime::{StageError, StageHandler, TaskContext, TaskMeta};
use trainyard_core::store::keys;
use trainyard_proto::v1::{
    Artifact, DeliverTask, DeliveredFile, Destination, ErrorKind, JobSpec, JobState, Secrets,
    Stage, stage_result::Outcome,
};
use trainyard_proto::{Attempt, JobId, TenantId};
use trainyard_tests::hub::{FakeHub, FakeUser};
use trainyard_tests::*;

const HF_TOKEN: &str = "hf_write-me";
const REPO: &str = "me/my-lora";

/// A stand-in Hub where [`HF_TOKEN`] is user `me`, and a fleet (NATS and
/// the store only) whose `hf://` destinations go to it.
async fn setup() -> (FakeHub, Fleet) {
    let hub = FakeHub::start("unused").await;
    hub.add_user(HF_TOKEN, FakeUser::writer("me"));
    let endpoint = hub.endpoint();
    let fleet = Fleet::start_with(Services::NONE, move |c| {
        c.destinations.hf.endpoint = endpoint;
    })
    .await;
    (hub, fleet)
}

fn hf_spec(uri: &str, token: &str) -> JobSpec {
    let mut spec = spec("file:///unused", 10);
    spec.name = "my lora".into();
    spec.destinations = vec![Destination {
        uri: uri.into(),
        ..Default::default()
    }];
    spec.secrets = Some(Secrets {
        hf_token: token.into(),
        ..Default::default()
    });
    spec
}

/// A deliver task of tenant acme: an adapter of `size` bytes in the store
/// and a prepared dataset whose manifest holds two captions.
async fn deliver_task(fleet: &Fleet, spec: JobSpec, size: usize) -> (JobId, DeliverTask) {
    let job = JobId::generate();
    let acme = TenantId::parse("acme").unwrap();
    let adapter: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let stored = fleet
        .store
        .put_bytes(
            &keys::output_file(&acme, &job, "lora.safetensors"),
            adapter.into(),
        )
        .await
        .unwrap();
    let dataset = keys::dataset(&acme, &job);
    let captions = serde_json::json!({"images": [
        {"caption": "tyzx a red chair"}, {"caption": "tyzx a red chair"}, {"caption": "tyzx a cat"},
    ]});
    fleet
        .store
        .put_bytes(
            &format!("{dataset}/manifest.json"),
            serde_json::to_vec(&captions).unwrap().into(),
        )
        .await
        .unwrap();
    let task = DeliverTask {
        job_id: job.to_string(),
        tenant: "acme".into(),
        attempt: 1,
        spec: Some(spec),
        artifacts: vec![Artifact {
            name: "lora.safetensors".into(),
            ..stored
        }],
        dataset_uri: fleet.store.uri(&dataset),
        ..Default::default()
    };
    (job, task)
}

/// A task context of tenant acme; `created_ms`: when the job was created,
/// as its record says (`None`: a record without it).
fn context(
    js: &async_nats::jetstream::Context,
    job: &JobId,
    created_ms: Option<i64>,
) -> TaskContext {
    let tenant = TenantId::parse("acme").unwrap();
    let record = trainyard_proto::v1::JobRecord {
        created_at_ms: created_ms.unwrap_or_default(),
        ..Default::default()
    };
    TaskContext {
        meta: TaskMeta {
            tenant: tenant.clone(),
            job: job.clone(),
            attempt: Attempt(1),
        },
        stage: Stage::Deliver,
        delivered: 1,
        worker_id: "test".into(),
        record: record.into(),
        events: EventSink::new(js.clone(), tenant, job.clone()),
        cancel: CancellationToken::new(),
        stop: CancellationToken::new(),
        log_bytes: Default::default(),
    }
}

/// Runs the uploader's deliver stage on `task`.
async fn deliver(fleet: &Fleet, job: &JobId, task: DeliverTask) -> Result<Outcome, StageError> {
    deliver_created(fleet, job, task, None).await
}

/// [`deliver`] for a job created at `created_ms`.
async fn deliver_created(
    fleet: &Fleet,
    job: &JobId,
    task: DeliverTask,
    created_ms: Option<i64>,
) -> Result<Outcome, StageError> {
    let parts = fleet.coordinator_parts().await;
    let stage = trainyard_uploader::deliver::DeliverStage::new(&fleet.config).unwrap();
    stage
        .handle(task, context(&parts.js, job, created_ms))
        .await
}

/// The files delivered to the Hub.
fn hub_files(outcome: &Outcome) -> Vec<DeliveredFile> {
    let Outcome::Delivered(output) = outcome else {
        panic!("not delivered: {outcome:?}");
    };
    output
        .files
        .iter()
        .filter(|f| f.destination.starts_with("hf://"))
        .cloned()
        .collect()
}

/// Commits of `repo` carrying `job`'s trailer.
fn job_commits(hub: &FakeHub, repo: &str, job: &JobId) -> usize {
    let mark = format!("Trainyard-Job: {job}");
    hub.commits(repo)
        .iter()
        .filter(|c| c.message.lines().any(|l| l == mark))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_private_repo_gets_one_commit_with_the_adapter_card_and_manifest() {
    let (hub, fleet) = setup().await;
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/my-lora", HF_TOKEN), 4096).await;
    let adapter = task.artifacts[0].clone();
    let outcome = deliver(&fleet, &job, task).await.expect("delivered");

    assert_eq!(hub.created_repos(), [(REPO.to_string(), true)], "private");
    assert_eq!(job_commits(&hub, REPO, &job), 1);
    let repo = hub.repo(REPO).unwrap();
    let head = repo.commit.clone();
    assert_eq!(
        repo.log.last().unwrap().id,
        head,
        "the job's commit is the head"
    );

    let files = hub_files(&outcome);
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].commit, head);
    assert_eq!(files[0].uri, format!("hf://{REPO}@{head}/lora.safetensors"));
    assert_eq!(files[0].sha256, adapter.sha256);

    let stored = hub
        .file(REPO, "lora.safetensors")
        .expect("adapter committed");
    assert!(stored.lfs, "the adapter went through LFS");
    assert_eq!(stored.sha256(), adapter.sha256);
    assert!(!hub.token_sent_to_storage(), "the token stays on the Hub");

    let manifest: serde_json::Value =
        serde_json::from_slice(&hub.file(REPO, "manifest.json").unwrap().data).unwrap();
    assert_eq!(manifest["job_id"], job.to_string());
    assert_eq!(manifest["files"][0]["sha256"], adapter.sha256.as_str());
    assert_eq!(
        manifest["files"][0]["uris"][0],
        format!("hf://{REPO}@main/lora.safetensors")
    );
    let card = String::from_utf8(hub.file(REPO, "README.md").unwrap().data.to_vec()).unwrap();
    assert!(card.starts_with("---\n"), "{card}");
    assert!(card.contains("license: other"), "{card}");
    assert!(card.contains("instance_prompt: tyzx"), "{card}");
    assert!(
        card.contains("- `tyzx a red chair`\n- `tyzx a cat`"),
        "{card}"
    );

    // The committed adapter reads back whole through the resolve route,
    // with the token (the repository is private).
    let client = reqwest::Client::new();
    let url = format!("{}/{REPO}/resolve/{head}/lora.safetensors", hub.endpoint());
    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 404, "private");
    let bytes = client
        .get(&url)
        .bearer_auth(HF_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        adapter.sha256
    );

    // The artifact store's manifest names the commit.
    let Outcome::Delivered(output) = &outcome else {
        unreachable!()
    };
    let key = fleet.store.key_of(&output.manifest_uri).unwrap();
    let ours: serde_json::Value =
        serde_json::from_slice(&fleet.store.get_bytes(&key).await.unwrap()).unwrap();
    let uris = ours["files"][0]["uris"].as_array().unwrap();
    assert!(uris.iter().any(|u| *u == files[0].uri.as_str()), "{uris:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_commit_conflict_is_retried_and_makes_one_commit() {
    let (hub, fleet) = setup().await;
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/my-lora", HF_TOKEN), 1024).await;
    hub.inject_conflicts(1);
    let outcome = deliver(&fleet, &job, task).await.expect("delivered");
    assert_eq!(hub.commit_requests(), 2, "refused once, then accepted");
    let titles: Vec<String> = hub.commits(REPO).into_iter().map(|c| c.title).collect();
    assert_eq!(
        titles,
        [
            "initial commit",
            "someone else's commit",
            "Trainyard: my lora"
        ]
    );
    assert_eq!(job_commits(&hub, REPO, &job), 1);
    let repo = hub.repo(REPO).unwrap();
    assert_eq!(hub_files(&outcome)[0].commit, repo.commit);
    assert!(repo.files.contains_key("notes.txt"), "their file is kept");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_finds_the_jobs_commit_and_does_not_commit_again() {
    let (hub, fleet) = setup().await;
    // A branch and a folder, and the LFS upload in parts.
    hub.set_multipart_chunk(Some(1000));
    let uri = "hf://me/my-lora@dev/loras/v1";
    let (job, task) = deliver_task(&fleet, hf_spec(uri, HF_TOKEN), 2500).await;
    let first = deliver(&fleet, &job, task.clone())
        .await
        .expect("delivered");
    let (requests, puts) = (hub.commit_requests(), hub.lfs_puts());
    assert_eq!(puts, 3, "three parts");

    // The uploader crashed after the commit, before its result: the task
    // comes again.
    let second = deliver(&fleet, &job, task).await.expect("delivered again");
    assert_eq!(hub.commit_requests(), requests, "no second commit");
    assert_eq!(hub.lfs_puts(), puts, "nothing uploaded again");
    assert_eq!(job_commits(&hub, REPO, &job), 1);
    let (a, b) = (hub_files(&first), hub_files(&second));
    assert_eq!(a, b, "the same commit recorded");

    let repo = hub.repo(REPO).unwrap();
    let head = repo.branches["dev"].clone();
    assert_eq!(a[0].commit, head);
    assert_eq!(
        a[0].uri,
        format!("hf://{REPO}@{head}/loras/v1/lora.safetensors")
    );
    let (_, files) = repo.at("dev").unwrap();
    for path in [
        "loras/v1/lora.safetensors",
        "loras/v1/README.md",
        "loras/v1/manifest.json",
    ] {
        assert!(files.contains_key(path), "{path}: {:?}", files.keys());
    }
    assert!(
        !repo.files.contains_key("loras/v1/README.md"),
        "main untouched"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_follows_the_hubs_pages_to_the_jobs_commit() {
    let (hub, fleet) = setup().await;
    hub.set_commit_page_size(2);
    let created = trainyard_core::now_ms() - 60_000;
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/my-lora", HF_TOKEN), 1024).await;
    let first = deliver_created(&fleet, &job, task.clone(), Some(created))
        .await
        .expect("delivered");
    let requests = hub.commit_requests();
    // Others commit to the branch before the task comes again: the job's
    // commit is now the sixth, on the third page of two.
    hub.add_commits(REPO, "main", 5, trainyard_core::now_ms());
    let seen = hub.commit_pages().len();
    let second = deliver_created(&fleet, &job, task, Some(created))
        .await
        .expect("delivered again");
    assert_eq!(hub.commit_pages()[seen..], [0, 1, 2], "three pages read");
    assert_eq!(hub.commit_requests(), requests, "no second commit");
    assert_eq!(job_commits(&hub, REPO, &job), 1);
    assert_eq!(hub_files(&first), hub_files(&second), "the same commit");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_walk_stops_at_commits_older_than_the_job_or_at_the_page_cap() {
    use trainyard_uploader::hub::MAX_COMMIT_PAGES;
    let (hub, fleet) = setup().await;
    hub.set_commit_page_size(2);
    let now = trainyard_core::now_ms();
    let pages_of = |hub: &FakeHub, from: usize| hub.commit_pages()[from..].to_vec();

    // Ten commits from 2020: the first page is older than the job.
    const YEAR_2020_MS: i64 = 1_577_836_800_000;
    hub.add_repo("me/old", Default::default());
    hub.add_commits("me/old", "main", 10, YEAR_2020_MS);
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/old", HF_TOKEN), 512).await;
    deliver_created(&fleet, &job, task, Some(now))
        .await
        .expect("delivered");
    assert_eq!(pages_of(&hub, 0), [0], "one page read");
    assert_eq!(job_commits(&hub, "me/old", &job), 1);

    // A job whose creation is unknown reads to the last page (eleven
    // commits now, six pages).
    let seen = hub.commit_pages().len();
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/old", HF_TOKEN), 512).await;
    deliver(&fleet, &job, task).await.expect("delivered");
    assert_eq!(pages_of(&hub, seen), [0, 1, 2, 3, 4, 5]);
    assert_eq!(job_commits(&hub, "me/old", &job), 1);

    // More commits since the job's creation than the cap covers: the walk
    // stops at the cap and the delivery commits.
    hub.add_repo("me/busy", Default::default());
    hub.add_commits("me/busy", "main", 2 * MAX_COMMIT_PAGES + 1, now);
    let seen = hub.commit_pages().len();
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/busy", HF_TOKEN), 512).await;
    deliver_created(&fleet, &job, task, Some(now - 3_600_000))
        .await
        .expect("delivered");
    let pages: Vec<usize> = (0..MAX_COMMIT_PAGES).collect();
    assert_eq!(pages_of(&hub, seen), pages, "the cap's pages, no more");
    assert_eq!(job_commits(&hub, "me/busy", &job), 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_holding_a_slash_is_created_committed_to_and_found_again() {
    let (hub, fleet) = setup().await;
    // `exp/run-1`, written as HfFileSystem reads a revision.
    let uri = "hf://me/my-lora@exp%2Frun-1/loras/v1";
    let (job, task) = deliver_task(&fleet, hf_spec(uri, HF_TOKEN), 2048).await;
    let first = deliver(&fleet, &job, task.clone())
        .await
        .expect("delivered");
    let repo = hub.repo(REPO).unwrap();
    let head = repo.branches.get("exp/run-1").cloned().expect("the branch");
    assert_eq!(repo.branches.len(), 1, "{:?}", repo.branches);
    let files = hub_files(&first);
    assert_eq!(files[0].commit, head);
    assert_eq!(
        files[0].uri,
        format!("hf://{REPO}@{head}/loras/v1/lora.safetensors")
    );
    let (_, committed) = repo.at("exp/run-1").unwrap();
    assert!(committed.contains_key("loras/v1/lora.safetensors"));
    assert!(
        !repo.files.contains_key("loras/v1/README.md"),
        "main untouched"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&committed["loras/v1/manifest.json"].data).unwrap();
    assert_eq!(
        manifest["files"][0]["uris"][0],
        format!("hf://{REPO}@exp%2Frun-1/loras/v1/lora.safetensors"),
        "the branch quoted, so the URI reads back to it"
    );
    // The Hub's resolve route reads the branch as one encoded segment.
    let url = format!(
        "{}/{REPO}/resolve/exp%2Frun-1/loras/v1/README.md",
        hub.endpoint()
    );
    let card = reqwest::Client::new()
        .get(&url)
        .bearer_auth(HF_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(card.status(), 200);
    assert_eq!(card.headers()["x-repo-commit"], head.as_str());

    // Delivered again: the branch exists, the commit is found.
    let requests = hub.commit_requests();
    let second = deliver(&fleet, &job, task).await.expect("delivered again");
    assert_eq!(hub.commit_requests(), requests, "no second commit");
    assert_eq!(hub_files(&second), files);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_fails_the_job_with_auth_naming_the_destination() {
    let (hub, fleet) = setup().await;
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/my-lora", "hf_wrong"), 512).await;
    match deliver(&fleet, &job, task).await {
        Err(StageError::Fail(error)) => {
            assert_eq!(error.kind(), ErrorKind::Auth, "{error:?}");
            assert!(
                error.message.contains("hf://me/my-lora"),
                "{}",
                error.message
            );
            assert!(!error.message.contains("hf_wrong"), "{}", error.message);
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(hub.created_repos().is_empty());
    assert_eq!(hub.commit_requests(), 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_go_back_to_the_runtime_with_retry_after() {
    let (hub, fleet) = setup().await;
    let (job, task) = deliver_task(&fleet, hf_spec("hf://me/my-lora", HF_TOKEN), 512).await;
    for (status, retry_after, delay) in [(429, Some(7), 7), (503, None, 0)] {
        hub.inject_commit_failure(status, retry_after);
        match deliver(&fleet, &job, task.clone()).await {
            Err(StageError::Retry { error, delay: d }) => {
                assert_eq!(error.kind(), ErrorKind::Storage, "{error:?}");
                assert!(error.retryable);
                assert_eq!(d, Duration::from_secs(delay), "{status}");
                assert!(
                    error.message.contains("hf://me/my-lora"),
                    "{}",
                    error.message
                );
            }
            other => panic!("{status}: expected a retry, got {other:?}"),
        }
    }
    assert_eq!(job_commits(&hub, REPO, &job), 0);
    // The next delivery goes through, once.
    deliver(&fleet, &job, task).await.expect("delivered");
    assert_eq!(job_commits(&hub, REPO, &job), 1);
    fleet.stop().await;
}

#[tokio::test]
async fn the_probe_checks_the_token_and_namespace_without_creating_anything() {
    let hub = FakeHub::start("unused").await;
    hub.add_user(HF_TOKEN, FakeUser::writer("me"));
    hub.add_user(
        "hf_reader",
        FakeUser {
            role: "read".into(),
            ..FakeUser::writer("me")
        },
    );
    let rules = Destinations::default().hf_endpoint(&hub.endpoint());
    let secrets = |token: &str| Secrets {
        hf_token: token.into(),
        ..Default::default()
    };
    rules
        .probe("acme", "hf://me/new-repo", Some(&secrets(HF_TOKEN)))
        .await
        .expect("writable");
    assert!(hub.created_repos().is_empty(), "the probe creates nothing");
    for (uri, token) in [
        ("hf://me/r", "hf_wrong"),
        ("hf://me/r", "hf_reader"),
        ("hf://someone-else/r", HF_TOKEN),
    ] {
        let error = rules
            .probe("acme", uri, Some(&secrets(token)))
            .await
            .unwrap_err();
        assert_eq!(
            error.failure,
            ProbeFailure::Denied,
            "{uri} {token}: {error}"
        );
        assert!(error.message.contains(uri), "{error}");
    }
    let error = rules.probe("acme", "hf://me/r", None).await.unwrap_err();
    assert_eq!(error.failure, ProbeFailure::Refused, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivered_to_the_hub_succeeds_with_its_commit() {
    let hub = FakeHub::start("unused").await;
    hub.add_user(HF_TOKEN, FakeUser::writer("me"));
    let endpoint = hub.endpoint();
    let fleet = Fleet::start_with(Services::ALL, move |c| {
        c.destinations.hf.endpoint = endpoint;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let sample = fleet.sample_uri().await;
    // Refused at submission: a name the Hub would refuse, no token, a
    // license that is not an id.
    for (uri, token, license, field) in [
        ("hf://me/bad--name", HF_TOKEN, "", "destinations[0].uri"),
        (
            "hf://me/my-lora@refs%2Fpr%2F1",
            HF_TOKEN,
            "",
            "destinations[0].uri",
        ),
        ("hf://me/my-lora", "", "", "destinations[0].uri"),
        (
            "hf://me/my-lora",
            HF_TOKEN,
            "MIT License",
            "destinations[0].license",
        ),
    ] {
        let mut bad = hf_spec(uri, token);
        bad.dataset = trainyard_tests::spec(&sample, 10).dataset;
        bad.destinations[0].license = license.into();
        let status = client
            .submit(trainyard_proto::v1::SubmitRequest { spec: Some(bad) })
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{uri}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{uri}: {}",
            status.message()
        );
    }
    let mut spec = hf_spec("hf://me/my-lora", HF_TOKEN);
    spec.dataset = trainyard_tests::spec(&sample, 10).dataset;
    spec.destinations[0].public = true;
    spec.destinations[0].license = "apache-2.0".into();
    let job = submit(&mut client, spec).await;
    let record = wait_for("the job to finish", Duration::from_secs(120), || {
        let mut client = client.clone();
        let job = job.job_id.clone();
        async move {
            let record = get(&mut client, &job).await;
            matches!(
                record.state(),
                JobState::Succeeded | JobState::Failed | JobState::Cancelled
            )
            .then_some(record)
        }
    })
    .await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    assert_eq!(hub.created_repos(), [(REPO.to_string(), false)], "public");
    let head = hub.repo(REPO).unwrap().commit;
    let delivered: Vec<_> = record
        .delivered
        .iter()
        .filter(|d| d.destination.starts_with("hf://"))
        .collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].commit, head);
    let adapter = hub.file(REPO, "lora.safetensors").unwrap();
    assert_eq!(adapter.sha256(), delivered[0].sha256);
    let card = String::from_utf8(hub.file(REPO, "README.md").unwrap().data.to_vec()).unwrap();
    assert!(card.contains("license: apache-2.0"), "{card}");
    fleet.stop().await;
}
