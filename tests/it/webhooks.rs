//! Job webhooks end to end: real jobs on a real fleet post to a real HTTP
//! receiver on loopback, which records every request and answers as the
//! test scripts it. Signatures are checked here with an HMAC written
//! independently of the coordinator's.

use prost::Message;
use std::time::{Duration, SystemTime};
use trainyard_coordinator::webhooks::{Deliverer, SecretStore};
use trainyard_core::telemetry::propagation::{JobAttrs, inject_nats, send_span};
use trainyard_core::telemetry::{Telemetry, TelemetrySettings};
use trainyard_core::topology::EVENTS_STREAM;
use trainyard_core::topology::{self, EventKind, subject};
use trainyard_proto::v1::{
    GetWebhookSecretRequest, JobEvent, JobSpec, JobState, RotateWebhookSecretRequest, Secrets,
    SubmitRequest, Webhook, job_event::Kind,
};
use trainyard_proto::v1::{JobRecord, StateChanged};
use trainyard_proto::{JobId, TenantId};
use trainyard_tests::chaos::{Chaos, Service};
use trainyard_tests::otlp::OtlpReceiver;
use trainyard_tests::webhook::{
    Hit, Receiver, Reply, publish_state, signatures, signed_by, store_job, wait_idle,
};
use trainyard_tests::*;

/// A fleet-wide secret as older configs set it: it still turns webhooks
/// on, and signs nothing.
const LEGACY_SECRET: &str = "whsec_dHJhaW55YXJkLXdlYmhvb2stdGVzdC1rZXk=";
const HF_TOKEN: &str = "hf_webhook_test_secret_token";

/// Checks a request as a Standard Webhooks receiver holding `secret` would.
fn verify(hit: &Hit, secret: &str) {
    let ts: u64 = hit
        .header("webhook-timestamp")
        .parse()
        .expect("unix seconds");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(ts) < 300, "timestamp {ts} far from now {now}");
    assert!(
        signed_by(hit, secret),
        "{} is not signed by the tenant's secret",
        hit.header("webhook-signature")
    );
    assert!(
        !signed_by(hit, LEGACY_SECRET),
        "signed with the fleet-wide secret"
    );
    assert_eq!(hit.header("content-type"), "application/json");
}

/// The caller's tenant's webhook secret, from the API.
async fn secret_of(client: &mut Client) -> String {
    client
        .get_webhook_secret(GetWebhookSecretRequest {})
        .await
        .expect("webhook secret")
        .into_inner()
        .secret
}

fn with_webhooks(config: &mut trainyard_core::Config) {
    config.webhooks.enabled = true;
    config.webhooks.allow_private_addresses = true;
    config.webhooks.timeout_secs = 5;
    config.webhooks.initial_delay_ms = 200;
    config.webhooks.max_delay_ms = 2000;
}

fn hooked(mut spec: JobSpec, url: &str, events: &[&str]) -> JobSpec {
    spec.webhook = Some(Webhook {
        url: url.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
    });
    spec.secrets = Some(Secrets {
        hf_token: HF_TOKEN.into(),
        ..Default::default()
    });
    spec
}

/// The job's newest log event line.
async fn last_log(js: &async_nats::jetstream::Context, job: &str) -> Option<String> {
    let stream = js.get_stream(EVENTS_STREAM).await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(&format!("ty.event.acme.{job}.log"))
        .await
        .ok()?;
    match JobEvent::decode(message.payload).ok()?.kind? {
        Kind::Log(line) => Some(line.line),
        _ => None,
    }
}

async fn wait_log(js: &async_nats::jetstream::Context, job: &str, what: &str) -> String {
    wait_for(
        &format!("log event {what:?}"),
        Duration::from_secs(60),
        || async { last_log(js, job).await.filter(|l| l.contains(what)) },
    )
    .await
}

fn states_of(events: &[JobEvent]) -> Vec<JobState> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::State(s)) => Some(s.state()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_posts_one_signed_completed_webhook() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_with(Services::ALL, with_webhooks).await;
    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let spec = with_destination(spec(&fleet.sample_uri().await, 20), &outputs);
    let job = submit(&mut client, hooked(spec, &receiver.url(), &[])).await;
    assert_eq!(
        job.spec.as_ref().unwrap().webhook.as_ref().unwrap().events,
        ["completed"]
    );
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    assert_eq!(states_of(&events).last(), Some(&JobState::Succeeded));

    let hits = receiver.wait_hits(1, Duration::from_secs(60)).await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    wait_idle(&js).await;
    let hits_after = receiver.hits();
    assert_eq!(hits_after.len(), 1, "exactly one POST: {hits_after:?}");
    let hit = &hits[0];
    verify(hit, &secret_of(&mut client).await);
    let other = secret_of(&mut fleet.client(OTHER_TOKEN).await).await;
    assert!(
        !signed_by(hit, &other),
        "another tenant's secret verifies it"
    );
    assert_eq!(
        hit.header("webhook-id"),
        format!("{}.completed.succeeded", job.job_id)
    );
    let text = String::from_utf8(hit.body.clone()).unwrap();
    assert!(!text.contains(HF_TOKEN), "secret in the body: {text}");
    assert!(
        !text.contains("receiver-query-token"),
        "url in the body: {text}"
    );
    let body = hit.json();
    assert_eq!(body["type"], "job.completed");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    let data = &body["data"];
    assert_eq!(data["job_id"], job.job_id.as_str());
    assert_eq!(data["tenant"], "acme");
    assert_eq!(data["state"], "succeeded");
    assert_eq!(data["name"], "test");
    let record = get(&mut client, &job.job_id).await;
    let artifacts = data["artifacts"].as_array().expect("artifacts");
    assert_eq!(artifacts.len(), record.artifacts.len());
    assert!(!artifacts.is_empty());
    for (sent, stored) in artifacts.iter().zip(&record.artifacts) {
        assert_eq!(sent["uri"], stored.uri.as_str());
        assert_eq!(sent["size"], stored.size);
        assert_eq!(sent["sha256"], stored.sha256.as_str());
    }
    let delivered = data["delivered"].as_array().expect("delivered");
    assert_eq!(delivered.len(), record.delivered.len());
    assert!(!delivered.is_empty());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_filter_posts_every_state_in_order() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_with(Services::ALL, with_webhooks).await;
    let mut client = fleet.client(TOKEN).await;
    let spec = spec(&fleet.sample_uri().await, 10);
    let job = submit(&mut client, hooked(spec, &receiver.url(), &["state"])).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let states = states_of(&events);
    assert_eq!(states.last(), Some(&JobState::Succeeded));

    receiver
        .wait_hits(states.len(), Duration::from_secs(60))
        .await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    wait_idle(&js).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), states.len(), "one POST per state: {hits:?}");
    let secret = secret_of(&mut client).await;
    for (hit, state) in hits.iter().zip(&states) {
        verify(hit, &secret);
        let body = hit.json();
        let name = state
            .as_str_name()
            .trim_start_matches("JOB_STATE_")
            .to_ascii_lowercase();
        assert_eq!(body["type"], "job.state");
        assert_eq!(body["data"]["state"], name.as_str());
        assert_eq!(
            hit.header("webhook-id"),
            format!("{}.state.{name}", job.job_id)
        );
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_with_the_same_id() {
    let receiver = Receiver::start(&[Reply::Status(500), Reply::RetryAfter(503, 2)]).await;
    let fleet = Fleet::start_with(Services::ALL, with_webhooks).await;
    let mut client = fleet.client(TOKEN).await;
    let spec = spec(&fleet.sample_uri().await, 10);
    let job = submit(&mut client, hooked(spec, &receiver.url(), &["completed"])).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;

    let hits = receiver.wait_hits(3, Duration::from_secs(60)).await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    wait_idle(&js).await;
    assert_eq!(receiver.hits().len(), 3, "delivered on the third try");
    let secret = secret_of(&mut client).await;
    for hit in &hits {
        verify(hit, &secret);
        assert_eq!(hit.header("webhook-id"), hits[0].header("webhook-id"));
        assert_eq!(hit.body, hits[0].body, "the same message each time");
    }
    // 200 ms ± 10 % after the first failure; the 503's Retry-After (2 s)
    // holds the third try back.
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(150));
    assert!(hits[2].at - hits[1].at >= Duration::from_millis(1900));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_receiver_is_given_up_after_one_try() {
    let receiver = Receiver::start(&[Reply::Status(410)]).await;
    let fleet = Fleet::start_with(Services::ALL, with_webhooks).await;
    let mut client = fleet.client(TOKEN).await;
    let spec = spec(&fleet.sample_uri().await, 10);
    let job = submit(&mut client, hooked(spec, &receiver.url(), &[])).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;

    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let line = wait_log(&js, &job.job_id, "webhook delivery failed").await;
    assert_eq!(line, "webhook delivery failed: http 410");
    wait_idle(&js).await;
    assert_eq!(receiver.hits().len(), 1, "no retry after a 410");
    let record = get(&mut client, &job.job_id).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "the job is not affected"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_every_time_is_given_up_after_the_last_attempt() {
    let receiver = Receiver::start(&[Reply::Status(502); 5]).await;
    let fleet = Fleet::start_with(Services::ALL, |config| {
        with_webhooks(config);
        config.webhooks.max_attempts = 3;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let spec = spec(&fleet.sample_uri().await, 10);
    let job = submit(&mut client, hooked(spec, &receiver.url(), &[])).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;

    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let line = wait_log(&js, &job.job_id, "webhook delivery failed").await;
    assert_eq!(
        line,
        "webhook delivery failed: http 502 (gave up after 3 attempts)"
    );
    wait_idle(&js).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 3, "max_attempts POSTs");
    assert!(
        hits.iter()
            .all(|h| h.header("webhook-id") == hits[0].header("webhook-id"))
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_a_private_address_is_refused_at_delivery() {
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_with(Services::ALL, |config| {
        with_webhooks(config);
        config.webhooks.allow_private_addresses = false;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let spec = spec(&fleet.sample_uri().await, 10);
    // A name, so the submit check (literal addresses only) lets it through.
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let job = submit(&mut client, hooked(spec, &url, &[])).await;
    watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;

    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let line = wait_log(&js, &job.job_id, "webhook delivery failed").await;
    assert_eq!(
        line,
        "webhook delivery failed: host localhost is not a public address"
    );
    wait_idle(&js).await;
    assert!(receiver.hits().is_empty(), "nothing reached the receiver");
    fleet.stop().await;
}

async fn submit_error(client: &mut Client, spec: JobSpec) -> tonic::Status {
    client
        .submit(SubmitRequest { spec: Some(spec) })
        .await
        .expect_err("submit refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_webhooks_the_fleet_cannot_deliver() {
    let coordinator_only = Services {
        coordinator: true,
        ..Services::NONE
    };
    let base = spec("file:///data/set.zip", 10);
    {
        let fleet = Fleet::start_with(coordinator_only, |_| {}).await;
        let mut client = fleet.client(TOKEN).await;
        let status = submit_error(
            &mut client,
            hooked(base.clone(), "https://hooks.example/x", &[]),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "webhook: webhooks are not configured on this fleet"
        );
        fleet.stop().await;
    }
    let fleet = Fleet::start_with(coordinator_only, |config| {
        config.webhooks.enabled = true;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    for (url, events, expected) in [
        (
            "ftp://hooks.example/x",
            &[][..],
            "webhook.url: must be an http",
        ),
        (
            "https://u:p@hooks.example/x",
            &[],
            "webhook.url: must not hold credentials",
        ),
        (
            "http://10.1.2.3/x",
            &[],
            "webhook.url: host 10.1.2.3 is not a public address",
        ),
        (
            "http://[::1]:8080/x",
            &[],
            "webhook.url: host [::1] is not a public address",
        ),
        (
            "https://hooks.example/x",
            &["done"],
            "webhook.events: unknown event \"done\"",
        ),
    ] {
        let status = submit_error(&mut client, hooked(base.clone(), url, events)).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(
            status.message().starts_with(expected),
            "{url}: {}",
            status.message()
        );
    }
    fleet.stop().await;
}

/// The coordinator is SIGKILLed while its POST is open; the state event was
/// never acked, so the restarted coordinator posts it (same `webhook-id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_by_a_coordinator_crash_is_made_after_restart() {
    let receiver = Receiver::start(&[Reply::Hang]).await;
    let mut chaos = Chaos::start(1, |config| {
        config.webhooks.allow_private_addresses = true;
        config.webhooks.timeout_secs = 3;
        config.webhooks.initial_delay_ms = 200;
        config.webhooks.max_delay_ms = 1000;
    })
    .await;
    // Webhooks turned on the old way, by a fleet-wide secret (from the
    // environment, as service configs are written with secrets redacted):
    // they are on, and signed with the tenant's own secret, not that one.
    let first = chaos.running(Service::Coordinator).remove(0);
    chaos.proc(&first).kill();
    let coordinator = chaos.spawn_env(
        Service::Coordinator,
        &[("TY_WEBHOOKS__SECRET", LEGACY_SECRET)],
    );
    let mut client = chaos.client().await;
    let spec = spec(&chaos.sample_uri().await, 10);
    let job = submit(&mut client, hooked(spec, &receiver.url(), &[])).await;

    let first_try = receiver.wait_hits(1, Duration::from_secs(180)).await;
    chaos.proc(&coordinator).kill();
    let record = {
        chaos.restart(&coordinator);
        let mut client = chaos.client().await;
        get(&mut client, &job.job_id).await
    };
    assert_eq!(record.state(), JobState::Succeeded);
    let hits = receiver.wait_hits(2, Duration::from_secs(60)).await;
    let js = chaos.js().await;
    wait_idle(&js).await;
    assert_eq!(receiver.hits().len(), 2, "one cut try, one delivery");
    let secret = secret_of(&mut chaos.client().await).await;
    for hit in &hits {
        verify(hit, &secret);
        assert_eq!(hit.header("webhook-id"), first_try[0].header("webhook-id"));
    }
    assert_eq!(hits[1].json()["data"]["state"], "succeeded");
    chaos.stop().await;
}

/// The POST runs in a `webhook.deliver` span, a child of the span that
/// handles the state event, itself a child of the event's publisher: the
/// delivery is part of the job's trace, and its `traceparent` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_span_continues_the_state_events_trace() {
    use opentelemetry::trace::TraceContextExt;
    use tracing::instrument::WithSubscriber;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let otlp = OtlpReceiver::start().await;
    let receiver = Receiver::start(&[]).await;
    let fleet = Fleet::start_with(Services::NONE, with_webhooks).await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), otlp.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ];
    let settings = TelemetrySettings::resolve("ty-coordinator", &Default::default(), &env).unwrap();
    let (telemetry, dispatch) = Telemetry::start(&settings).unwrap();
    let parts = fleet.coordinator_parts().await;

    let (tenant, job) = (TenantId::parse("acme").unwrap(), JobId::generate());
    let record = JobRecord {
        job_id: job.to_string(),
        tenant: tenant.to_string(),
        state: JobState::Succeeded as i32,
        spec: Some(hooked(
            spec("file:///data/set.zip", 10),
            &receiver.url(),
            &[],
        )),
        ..Default::default()
    };
    parts.repo.create(&record).await.unwrap();
    let hooks = &fleet.config.webhooks;
    let bucket = topology::webhook_secrets_bucket(&parts.js, &fleet.config.nats)
        .await
        .unwrap();
    let secrets = SecretStore::new(bucket, Duration::from_secs(60));
    let secret = secrets
        .get_or_create(&tenant)
        .await
        .unwrap()
        .current
        .to_whsec();
    let deliverer = Deliverer::new(hooks, parts.repo.clone(), parts.js.clone(), secrets)
        .unwrap()
        .expect("webhooks on");
    let consumer = topology::webhooks_consumer(&parts.js, Deliverer::ack_wait(hooks))
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let loop_task = tokio::spawn(
        deliverer
            .run(consumer, stop.clone())
            .with_subscriber(dispatch.clone()),
    );

    let event = JobEvent {
        job_id: job.to_string(),
        tenant: tenant.to_string(),
        at_ms: trainyard_core::now_ms(),
        kind: Some(Kind::State(StateChanged {
            state: JobState::Succeeded as i32,
            ..Default::default()
        })),
    };
    let trace_id = async {
        let publish = send_span(
            "ty.event.{tenant}.{job}.state",
            JobAttrs {
                job_id: Some(&record.job_id),
                tenant: Some("acme"),
                ..Default::default()
            },
        );
        let mut headers = async_nats::HeaderMap::new();
        inject_nats(&publish.context(), &mut headers);
        parts
            .js
            .publish_with_headers(
                subject::event(&tenant, &job, EventKind::State),
                headers,
                event.encode_to_vec().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        publish.context().span().span_context().trace_id()
    }
    .with_subscriber(dispatch)
    .await;

    let hits = receiver.wait_hits(1, Duration::from_secs(30)).await;
    verify(&hits[0], &secret);
    let traceparent = hits[0].header("traceparent").to_string();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[1], trace_id.to_string(), "the job's trace");

    telemetry.flush().await;
    let spans = otlp
        .wait_for_spans(Duration::from_secs(20), |s| {
            // The process span ends after the delivery's: wait for all three.
            [
                "publish ty.event.{tenant}.{job}.state",
                "process ty.event.{tenant}.{job}.state",
                "webhook.deliver",
            ]
            .iter()
            .all(|name| s.iter().any(|s| s.name == *name))
        })
        .await;
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("span {name:?} in {spans:#?}"))
    };
    let publish = named("publish ty.event.{tenant}.{job}.state");
    let process = named("process ty.event.{tenant}.{job}.state");
    let deliver = named("webhook.deliver");
    for span in [publish, process, deliver] {
        assert_eq!(span.trace_id, trace_id.to_string(), "{}", span.name);
    }
    assert_eq!(
        process.parent_span_id.as_deref(),
        Some(publish.span_id.as_str())
    );
    assert_eq!(
        deliver.parent_span_id.as_deref(),
        Some(process.span_id.as_str())
    );
    assert_eq!(
        fields[2], deliver.span_id,
        "traceparent names the delivery span"
    );
    assert_eq!(
        process.attr("trainyard.job.id"),
        Some(record.job_id.as_str())
    );
    assert_eq!(deliver.attr("http.response.status_code"), Some("200"));
    assert_eq!(
        deliver.attr("trainyard.webhook.type"),
        Some("job.completed")
    );
    assert!(
        spans
            .iter()
            .flat_map(|s| s.attributes.values())
            .all(|v| !v.contains(HF_TOKEN) && !v.contains("receiver-query-token")),
        "no secret in a span"
    );

    stop.cancel();
    loop_task.await.unwrap().unwrap();
    telemetry.shutdown().await;
    fleet.stop().await;
}

/// After a rotation the new secret signs every delivery, and the old one
/// signs beside it (two `v1,` entries) until the overlap ends; then only
/// the new one does. The secret a tenant is shown follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_old_one_until_the_overlap_ends() {
    const OVERLAP_SECS: u64 = 8;
    let receiver = Receiver::start(&[]).await;
    let coordinator_only = Services {
        coordinator: true,
        ..Services::NONE
    };
    let fleet = Fleet::start_with(coordinator_only, |config| {
        with_webhooks(config);
        config.webhooks.secret_overlap_secs = OVERLAP_SECS;
    })
    .await;
    let mut client = fleet.client(TOKEN).await;
    let parts = fleet.coordinator_parts().await;
    let delivered = |n: usize| {
        let (receiver, parts) = (&receiver, &parts);
        async move {
            let record = store_job(
                &parts.repo,
                "acme",
                JobState::Succeeded,
                &receiver.url(),
                &[],
            )
            .await;
            publish_state(&parts.js, "acme", &record.job_id, JobState::Succeeded, None).await;
            let hits = receiver.wait_hits(n, Duration::from_secs(30)).await;
            assert_eq!(hits[n - 1].json()["data"]["job_id"], record.job_id.as_str());
            hits[n - 1].clone()
        }
    };

    let old = secret_of(&mut client).await;
    let before = delivered(1).await;
    verify(&before, &old);
    assert_eq!(signatures(&before).count(), 1);

    let rotated = client
        .rotate_webhook_secret(RotateWebhookSecretRequest {})
        .await
        .expect("rotate")
        .into_inner();
    assert_ne!(rotated.secret, old);
    assert!(rotated.secret.starts_with("whsec_"));
    let until = rotated.previous_valid_until_ms;
    assert!(until > trainyard_core::now_ms(), "an overlap: {until}");
    assert_eq!(secret_of(&mut client).await, rotated.secret, "shown after");

    let during = delivered(2).await;
    assert!(
        trainyard_core::now_ms() < until,
        "the delivery came inside the overlap"
    );
    verify(&during, &rotated.secret);
    verify(&during, &old);
    assert_eq!(signatures(&during).count(), 2);

    wait_for(
        "the overlap to end",
        Duration::from_secs(OVERLAP_SECS + 10),
        || async { (trainyard_core::now_ms() >= until).then_some(()) },
    )
    .await;
    let after = delivered(3).await;
    verify(&after, &rotated.secret);
    assert!(!signed_by(&after, &old), "the old secret no longer signs");
    assert_eq!(signatures(&after).count(), 1);
    let shown = client
        .get_webhook_secret(GetWebhookSecretRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.secret, rotated.secret);
    assert_eq!(shown.previous_valid_until_ms, 0);
    fleet.stop().await;
}
