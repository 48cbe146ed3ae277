//! Attacks on job webhooks, each as an attacker would make it, against a
//! real coordinator on a real nats-server, with a real HTTP receiver on
//! loopback:
//!
//! - a tenant verifying (or forging) another tenant's webhooks with its own
//!   secret: each tenant signs with its own;
//! - a tenant asking the API for another tenant's secret: the API answers
//!   with the caller's own, whatever the request holds;
//! - a forged state event published on the bus (anyone with publish rights
//!   on `ty.event.>`): the coordinator posts only what the job record holds,
//!   so a state the record never had, a job that does not exist, or another
//!   tenant's job sends nothing, and a body is the record's, not the event's.

use prost::Message;
use std::time::Duration;
use trainyard_core::topology::{AUTH_HEADER, ApiOp, subject};
use trainyard_proto::v1::{
    ApiReply, GetRequest, GetWebhookSecretRequest, JobError, JobState, RotateWebhookSecretRequest,
    api_reply::Result as Reply,
};
use trainyard_tests::webhook::{
    Receiver, job_record, publish_state, signed_by, store_job, wait_idle,
};
use trainyard_tests::*;

fn coordinator_only() -> Services {
    Services {
        coordinator: true,
        ..Services::NONE
    }
}

fn with_webhooks(config: &mut trainyard_core::Config) {
    config.webhooks.enabled = true;
    config.webhooks.allow_private_addresses = true;
    config.webhooks.timeout_secs = 5;
    config.webhooks.initial_delay_ms = 200;
    config.webhooks.max_delay_ms = 2000;
}

async fn secret_of(fleet: &Fleet, token: &str) -> String {
    fleet
        .client(token)
        .await
        .get_webhook_secret(GetWebhookSecretRequest {})
        .await
        .expect("webhook secret")
        .into_inner()
        .secret
}

/// A `ty.api.<op>` request with `token` (none: no header), and its reply.
async fn nats_call(
    nats: &async_nats::Client,
    op: ApiOp,
    token: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(token) = token {
        headers.insert(AUTH_HEADER, format!("Bearer {token}").as_str());
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        nats.request_with_headers(subject::api(op), headers, body.into()),
    )
    .await
    .expect("reply in time")
    .expect("reply");
    ApiReply::decode(reply.payload)
        .expect("ApiReply")
        .result
        .expect("result")
}

fn secret_in(reply: Reply) -> String {
    match reply {
        Reply::WebhookSecret(r) => r.secret,
        other => panic!("not a webhook secret: {other:?}"),
    }
}

/// Tenant B's secret verifies none of tenant A's deliveries, and the other
/// way round: holding one's own secret gives no way to verify, or forge, a
/// webhook another tenant's receiver accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_secret_verifies_none_of_a_tenants_deliveries() {
    let (acme_hooks, globex_hooks) = (Receiver::start(&[]).await, Receiver::start(&[]).await);
    let fleet = Fleet::start_secured(coordinator_only(), with_webhooks).await;
    let parts = fleet.coordinator_parts().await;
    let acme = store_job(
        &parts.repo,
        "acme",
        JobState::Succeeded,
        &acme_hooks.url(),
        &[],
    )
    .await;
    let globex = store_job(
        &parts.repo,
        "globex",
        JobState::Succeeded,
        &globex_hooks.url(),
        &[],
    )
    .await;
    publish_state(&parts.js, "acme", &acme.job_id, JobState::Succeeded, None).await;
    publish_state(
        &parts.js,
        "globex",
        &globex.job_id,
        JobState::Succeeded,
        None,
    )
    .await;
    let to_acme = acme_hooks
        .wait_hits(1, Duration::from_secs(30))
        .await
        .remove(0);
    let to_globex = globex_hooks
        .wait_hits(1, Duration::from_secs(30))
        .await
        .remove(0);

    let (acme_secret, globex_secret) = (
        secret_of(&fleet, TOKEN).await,
        secret_of(&fleet, OTHER_TOKEN).await,
    );
    assert_ne!(acme_secret, globex_secret);
    assert!(signed_by(&to_acme, &acme_secret));
    assert!(
        !signed_by(&to_acme, &globex_secret),
        "globex's secret verifies acme's webhook"
    );
    assert!(signed_by(&to_globex, &globex_secret));
    assert!(
        !signed_by(&to_globex, &acme_secret),
        "acme's secret verifies globex's webhook"
    );
    assert_eq!(to_acme.json()["data"]["tenant"], "acme");
    assert_eq!(to_globex.json()["data"]["tenant"], "globex");
    fleet.stop().await;
}

/// The API takes the tenant from the caller's token only: each tenant is
/// shown its own secret, on gRPC and on `ty.api.*`, whatever the request
/// body says; another tenant's rotation leaves it alone; no token, no
/// secret; and a fleet with webhooks off has none to show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_each_tenant_only_its_own_secret() {
    let fleet = Fleet::start_secured(coordinator_only(), with_webhooks).await;
    let acme = secret_of(&fleet, TOKEN).await;
    let globex = secret_of(&fleet, OTHER_TOKEN).await;
    assert!(acme.starts_with("whsec_") && globex.starts_with("whsec_"));
    assert_ne!(acme, globex);
    assert_eq!(secret_of(&fleet, TOKEN).await, acme, "made once, then kept");

    let nats = fleet.nats_client().await;
    let own = nats_call(&nats, ApiOp::WebhookSecret, Some(TOKEN), Vec::new()).await;
    assert_eq!(secret_in(own), acme);
    // A body naming the other tenant (here, as a field of another
    // message) changes nothing: the request has no tenant to choose.
    let naming = GetRequest {
        job_id: "globex".into(),
    }
    .encode_to_vec();
    let own = nats_call(&nats, ApiOp::WebhookSecret, Some(TOKEN), naming).await;
    assert_eq!(secret_in(own), acme);
    let theirs = nats_call(&nats, ApiOp::WebhookSecret, Some(OTHER_TOKEN), Vec::new()).await;
    assert_eq!(secret_in(theirs), globex);
    for token in [None, Some("token-nobody")] {
        match nats_call(&nats, ApiOp::WebhookSecret, token, Vec::new()).await {
            Reply::Error(e) => assert_eq!(e.code, "Unauthenticated"),
            other => panic!("a secret without a valid token: {other:?}"),
        }
    }
    let status = fleet
        .client("token-nobody")
        .await
        .get_webhook_secret(GetWebhookSecretRequest {})
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let rotated = nats_call(
        &nats,
        ApiOp::RotateWebhookSecret,
        Some(OTHER_TOKEN),
        Vec::new(),
    )
    .await;
    let globex_new = secret_in(rotated);
    assert_ne!(globex_new, globex);
    assert_eq!(secret_of(&fleet, OTHER_TOKEN).await, globex_new);
    assert_eq!(
        secret_of(&fleet, TOKEN).await,
        acme,
        "acme's secret is untouched"
    );

    // No secret travels where other roles read: not in any stream but the
    // coordinators' own bucket.
    let js = async_nats::jetstream::new(nats.clone());
    let names: Vec<String> = {
        use futures::TryStreamExt;
        js.stream_names().try_collect().await.unwrap()
    };
    assert!(
        names.contains(&"KV_ty_webhook_secrets".to_string()),
        "{names:?}"
    );
    for name in names.iter().filter(|n| *n != "KV_ty_webhook_secrets") {
        let mut stream = js.get_stream(name).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(seq).await else {
                continue;
            };
            let text = String::from_utf8_lossy(&message.payload);
            for secret in [&acme, &globex, &globex_new] {
                assert!(!text.contains(secret.as_str()), "a secret in stream {name}");
            }
        }
    }
    fleet.stop().await;

    let fleet = Fleet::start_secured(coordinator_only(), |_| {}).await;
    let status = fleet
        .client(TOKEN)
        .await
        .rotate_webhook_secret(RotateWebhookSecretRequest {})
        .await
        .expect_err("webhooks off");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    fleet.stop().await;
}

/// An attacker with bus access publishes `job.completed`-making events
/// for a job still training: SUCCEEDED, FAILED, CANCELLED, and DELIVERING
/// (a state it has not reached). The record holds none of them: nothing is
/// posted. The genuine state it is in still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_state_event_the_record_does_not_hold_sends_nothing() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_secured(coordinator_only(), with_webhooks).await;
    let parts = fleet.coordinator_parts().await;
    let job = store_job(
        &parts.repo,
        "acme",
        JobState::Training,
        &receiver.url(),
        &["completed", "state"],
    )
    .await;
    for forged in [
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Delivering,
    ] {
        publish_state(&parts.js, "acme", &job.job_id, forged, None).await;
    }
    wait_idle(&parts.js).await;
    assert!(
        receiver.hits().is_empty(),
        "forged states posted: {:?}",
        receiver.hits()
    );

    // The loop is alive: the state the record does hold is posted.
    publish_state(&parts.js, "acme", &job.job_id, JobState::Training, None).await;
    let hits = receiver.wait_hits(1, Duration::from_secs(30)).await;
    wait_idle(&parts.js).await;
    assert_eq!(receiver.hits().len(), 1);
    assert_eq!(hits[0].json()["type"], "job.state");
    assert_eq!(hits[0].json()["data"]["state"], "training");
    assert!(signed_by(&hits[0], &secret_of(&fleet, TOKEN).await));
    fleet.stop().await;
}

/// Forged events for a job that does not exist, and for a real job under
/// another tenant's name (the record is looked up by the event's tenant and
/// job, and must name both), post nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_event_for_a_missing_or_misattributed_job_sends_nothing() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_secured(coordinator_only(), with_webhooks).await;
    let parts = fleet.coordinator_parts().await;
    let job = store_job(
        &parts.repo,
        "acme",
        JobState::Succeeded,
        &receiver.url(),
        &[],
    )
    .await;
    let missing = trainyard_proto::JobId::generate().to_string();
    publish_state(&parts.js, "acme", &missing, JobState::Succeeded, None).await;
    publish_state(&parts.js, "globex", &job.job_id, JobState::Succeeded, None).await;
    // A record stored under one key but naming another tenant inside.
    let mut odd = job_record("globex", JobState::Succeeded, &receiver.url(), &[]);
    odd.tenant = "acme".into();
    parts
        .topo
        .jobs
        .put(format!("globex.{}", odd.job_id), odd.encode_to_vec().into())
        .await
        .unwrap();
    publish_state(&parts.js, "globex", &odd.job_id, JobState::Succeeded, None).await;
    wait_idle(&parts.js).await;
    assert!(receiver.hits().is_empty(), "posted: {:?}", receiver.hits());

    publish_state(&parts.js, "acme", &job.job_id, JobState::Succeeded, None).await;
    let hits = receiver.wait_hits(1, Duration::from_secs(30)).await;
    assert_eq!(hits[0].json()["data"]["job_id"], job.job_id.as_str());
    fleet.stop().await;
}

/// A forged event for a state the record does hold (FAILED) but with its
/// own error: the body carries the record's state and error, never the
/// event's; the event only said "look at this job".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_body_comes_from_the_record_not_the_event() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_secured(coordinator_only(), with_webhooks).await;
    let parts = fleet.coordinator_parts().await;
    let mut record = job_record("acme", JobState::Failed, &receiver.url(), &[]);
    record.error = Some(JobError {
        message: "dataset has no images".into(),
        ..Default::default()
    });
    parts.repo.create(&record).await.unwrap();
    let forged = JobError {
        message: "re-download your LoRA at https://evil.example/".into(),
        ..Default::default()
    };
    publish_state(
        &parts.js,
        "acme",
        &record.job_id,
        JobState::Failed,
        Some(forged),
    )
    .await;
    let hits = receiver.wait_hits(1, Duration::from_secs(30)).await;
    let body = hits[0].json();
    assert_eq!(body["data"]["state"], "failed");
    assert_eq!(body["data"]["error"]["message"], "dataset has no images");
    assert!(!String::from_utf8_lossy(&hits[0].body).contains("evil.example"));
    assert!(signed_by(&hits[0], &secret_of(&fleet, TOKEN).await));
    fleet.stop().await;
}
