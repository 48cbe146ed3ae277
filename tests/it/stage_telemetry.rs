//! What the prepare and deliver stages add to a job's trace and to the
//! metrics: one span per step of the stage, children of the task's process
//! span and so part of the job's trace; artifact byte counters on the
//! services' `/metrics`; and no secret of a dataset URL in any log line or
//! span attribute.
//!
//! The stage handlers run here inside a process span made from a task's
//! `traceparent`, as the stage runtime runs them, and export to an in-test
//! OTLP receiver. The last test runs the real `ty-captioner` and
//! `ty-uploader` binaries (build them first: `cargo build --workspace --bins`)
//! beside an in-process coordinator and worker.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use trainyard_core::events::EventSink;
use trainyard_core::runtime::{StageHandler, TaskContext, TaskMeta};
use trainyard_core::store::keys;
use trainyard_core::telemetry::propagation::{JobAttrs, process_span};
use trainyard_core::telemetry::{Telemetry, TelemetrySettings};
use trainyard_core::topology::subject;
use trainyard_proto::v1::{
    Artifact, DatasetSource, DeliverTask, Destination, JobState, PrepareTask, Stage,
    dataset_source, job_event::Kind, stage_result::Outcome,
};
use trainyard_proto::{Attempt, JobId, TenantId};
use trainyard_tests::chaos::procs::{Proc, Service, bin_dir};
use trainyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use trainyard_tests::*;

const WAIT: Duration = Duration::from_secs(30);
/// In every dataset URL of these tests, as password and as query value.
const SECRET: &str = "SECRET-7f3a";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TASK_SPAN_ID: &str = "00f067aa0ba902b7";

fn settings(service: &str, receiver: &OtlpReceiver) -> TelemetrySettings {
    let env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            receiver.endpoint(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ];
    TelemetrySettings::resolve(service, &Default::default(), &env).expect("settings")
}

/// The task's headers, as the coordinator's publish leaves them.
fn task_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE_ID}-{TASK_SPAN_ID}-01").as_str(),
    );
    headers
}

/// A context like the one the stage runtime hands a handler.
fn context(fleet_js: &async_nats::jetstream::Context, stage: Stage, job: &JobId) -> TaskContext {
    let tenant = TenantId::parse("acme").unwrap();
    TaskContext {
        meta: TaskMeta {
            tenant: tenant.clone(),
            job: job.clone(),
            attempt: Attempt(1),
        },
        stage,
        delivered: 1,
        worker_id: "test".into(),
        record: Default::default(),
        events: EventSink::new(fleet_js.clone(), tenant, job.clone()),
        cancel: CancellationToken::new(),
        stop: CancellationToken::new(),
        log_bytes: Default::default(),
    }
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one span named {name:?} in {spans:#?}");
    found[0]
}

fn child_of(child: &ReceivedSpan, parent: &ReceivedSpan) {
    assert_eq!(
        child.parent_span_id.as_deref(),
        Some(parent.span_id.as_str()),
        "{} is a child of {}",
        child.name,
        parent.name
    );
}

fn number(span: &ReceivedSpan, key: &str) -> u64 {
    span.attr(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{} has a numeric {key}: {span:#?}", span.name))
}

fn no_secret_in(spans: &[ReceivedSpan]) {
    for span in spans {
        for (key, value) in &span.attributes {
            assert!(
                !value.contains(SECRET),
                "{}.{key} holds the secret: {value}",
                span.name
            );
        }
    }
}

/// The bundled sample dataset (8 images, some with sidecar captions) as a zip.
fn sample_zip(dir: &Path) -> (Vec<u8>, usize) {
    let folder = dir.join("sample-src");
    trainyard_captioner::sample::write_sample_dataset(&folder).expect("sample");
    let mut entries = Vec::new();
    let mut images = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if trainyard_captioner::IMAGE_EXTENSIONS
            .iter()
            .any(|ext| name.to_lowercase().ends_with(&format!(".{ext}")))
        {
            images += 1;
        }
        entries.push((name, std::fs::read(&path).unwrap()));
    }
    let entries: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    (make_zip(&entries), images)
}

/// Serves `body` to every GET on loopback; returns the port.
async fn serve_zip(body: Vec<u8>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/zip\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    port
}

/// A zip URL whose password and query carry [`SECRET`].
fn secret_url(port: u16) -> String {
    format!("http://user:{SECRET}@127.0.0.1:{port}/datasets/cats.zip?token={SECRET}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_task_traces_fetch_unpack_validate_caption_and_store() {
    let receiver = OtlpReceiver::start().await;
    let fleet = Fleet::start_with(Services::NONE, |c| c.captioner.allow_private_urls = true).await;
    let parts = fleet.coordinator_parts().await;
    let (zip, images) = sample_zip(fleet.dir.path());
    let port = serve_zip(zip).await;

    let job = JobId::generate();
    let mut spec = spec("unused", 20);
    spec.dataset = Some(DatasetSource {
        source: Some(dataset_source::Source::ZipUrl(secret_url(port))),
    });
    let task = PrepareTask {
        job_id: job.to_string(),
        tenant: "acme".into(),
        attempt: 1,
        spec: Some(trainyard_coordinator::validate::normalise(spec).expect("valid spec")),
    };
    let handler = trainyard_captioner::stage::PrepareStage::new(&fleet.config).unwrap();
    let (telemetry, dispatch) = Telemetry::start(&settings("ty-captioner", &receiver)).unwrap();
    let headers = task_headers();
    let topic = subject::task(Stage::Prepare, "default");
    // Made under the captioner's subscriber, as the runtime makes it.
    let span = tracing::dispatcher::with_default(&dispatch, || {
        process_span(
            Some(&headers),
            &topic,
            JobAttrs {
                job_id: Some(job.as_str()),
                tenant: Some("acme"),
                stage: Some("prepare"),
                attempt: Some(1),
            },
        )
    });
    let ctx = context(&parts.js, Stage::Prepare, &job);
    let outcome = handler
        .handle(task, ctx)
        .instrument(span)
        .with_subscriber(dispatch)
        .await
        .expect("prepared");
    let Outcome::Prepared(prepared) = outcome else {
        panic!("a prepare outcome: {outcome:?}");
    };
    assert_eq!(prepared.image_count as usize, images);
    telemetry.flush().await;

    let spans = receiver
        .wait_for_spans(WAIT, |s| {
            named(s, "caption.call").len() >= images && !named(s, "prepare.store").is_empty()
        })
        .await;
    no_secret_in(&spans);
    assert!(
        spans.iter().all(|s| s.trace_id == TRACE_ID),
        "one trace, the task's: {spans:#?}"
    );
    let process = one(&spans, &format!("process {topic}"));
    assert_eq!(process.parent_span_id.as_deref(), Some(TASK_SPAN_ID));
    let fetch = one(&spans, "prepare.fetch");
    let unpack = one(&spans, "prepare.unpack");
    let validate = one(&spans, "prepare.validate_images");
    let caption = one(&spans, "prepare.caption");
    let store = one(&spans, "prepare.store");
    for step in [fetch, unpack, validate, caption, store] {
        child_of(step, process);
        assert_eq!(step.service, "ty-captioner");
    }

    assert_eq!(fetch.attr("trainyard.dataset.source"), Some("zip_url"));
    assert_eq!(fetch.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(fetch.attr("trainyard.outcome"), Some("ok"));
    assert_eq!(number(fetch, "trainyard.files"), 1);
    assert!(number(fetch, "trainyard.bytes") > 0);
    assert!(number(unpack, "trainyard.files") >= images as u64);
    assert!(number(unpack, "trainyard.bytes") > number(fetch, "trainyard.bytes") / 2);
    assert_eq!(number(validate, "trainyard.images"), images as u64);
    assert_eq!(number(validate, "trainyard.rejected"), 0);
    assert_eq!(caption.attr("trainyard.caption.backend"), Some("template"));
    assert_eq!(number(caption, "trainyard.images"), images as u64);
    // images and captions and the manifest
    assert_eq!(number(store, "trainyard.files"), 2 * images as u64 + 1);
    assert!(number(store, "trainyard.bytes") > 0);
    assert_eq!(store.attr("trainyard.outcome"), Some("ok"));

    let calls = named(&spans, "caption.call");
    assert_eq!(calls.len(), images, "one caption.call per image");
    let mut indices = BTreeSet::new();
    let mut sources = BTreeSet::new();
    for call in &calls {
        child_of(call, caption);
        assert_eq!(call.attr("trainyard.outcome"), Some("ok"));
        assert_eq!(call.attr("trainyard.caption.backend"), Some("template"));
        assert!(
            call.attr("trainyard.image.file")
                .is_some_and(|f| !f.is_empty())
        );
        indices.insert(number(call, "trainyard.image.index"));
        sources.insert(call.attr("trainyard.caption.source").unwrap().to_string());
    }
    assert_eq!(indices, (1..=images as u64).collect());
    assert!(
        sources.iter().all(|s| s == "sidecar" || s == "backend"),
        "{sources:?}"
    );
    telemetry.shutdown().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliver_task_traces_one_span_per_destination() {
    let receiver = OtlpReceiver::start().await;
    let s3 = S3Server::start();
    s3.create_bucket("deliveries").await;
    let options = s3.options();
    let fleet = Fleet::start_with(Services::NONE, |c| c.store.s3 = options).await;
    let parts = fleet.coordinator_parts().await;

    let job = JobId::generate();
    let adapter = fleet
        .store
        .put_bytes(
            &keys::output_file(
                &trainyard_proto::TenantId::parse("acme").unwrap(),
                &job,
                "lora.safetensors",
            ),
            vec![7u8; 4096].into(),
        )
        .await
        .unwrap();
    let outputs = fleet.outputs_dir();
    let mut spec = spec("unused", 20);
    spec.destinations = vec![
        Destination {
            uri: format!("file://{}", outputs.display()),
            ..Default::default()
        },
        Destination {
            uri: "s3://deliveries/adapters".into(),
            ..Default::default()
        },
    ];
    spec.secrets = Some(s3.job_secrets());
    let task = DeliverTask {
        job_id: job.to_string(),
        tenant: "acme".into(),
        attempt: 1,
        spec: Some(spec),
        artifacts: vec![Artifact {
            name: "lora.safetensors".into(),
            ..adapter.clone()
        }],
        ..Default::default()
    };
    let handler = trainyard_uploader::deliver::DeliverStage::new(&fleet.config).unwrap();
    let (telemetry, dispatch) = Telemetry::start(&settings("ty-uploader", &receiver)).unwrap();
    let headers = task_headers();
    let topic = subject::task(Stage::Deliver, "default");
    let span = tracing::dispatcher::with_default(&dispatch, || {
        process_span(Some(&headers), &topic, JobAttrs::default())
    });
    let outcome = handler
        .handle(task, context(&parts.js, Stage::Deliver, &job))
        .instrument(span)
        .with_subscriber(dispatch)
        .await
        .expect("delivered");
    let Outcome::Delivered(delivered) = outcome else {
        panic!("a deliver outcome: {outcome:?}");
    };
    assert_eq!(delivered.files.len(), 3, "store, file and s3 copies");
    assert!(
        outputs
            .join(job.as_str())
            .join("lora.safetensors")
            .is_file()
    );
    telemetry.flush().await;

    let spans = receiver
        .wait_for_spans(WAIT, |s| {
            named(s, "deliver.destination").len() >= 2 && !named(s, "deliver.manifest").is_empty()
        })
        .await;
    assert!(spans.iter().all(|s| s.trace_id == TRACE_ID), "{spans:#?}");
    let process = one(&spans, &format!("process {topic}"));
    let fetch = one(&spans, "deliver.fetch");
    let output = one(&spans, "deliver.output");
    let manifest = one(&spans, "deliver.manifest");
    let destinations = named(&spans, "deliver.destination");
    assert_eq!(destinations.len(), 2, "{spans:#?}");
    for s in [fetch, output, manifest] {
        child_of(s, process);
    }
    assert_eq!(number(fetch, "trainyard.bytes"), 4096);
    // The worker's copy in the store is the output: nothing written.
    assert_eq!(output.attr("trainyard.outcome"), Some("already_present"));
    assert_eq!(number(output, "trainyard.bytes"), 0);
    assert_eq!(number(manifest, "trainyard.destinations"), 3);

    let mut schemes = BTreeSet::new();
    for d in &destinations {
        child_of(d, process);
        assert_eq!(d.attr("trainyard.outcome"), Some("verified"), "{d:#?}");
        assert_eq!(number(d, "trainyard.files"), 1);
        assert_eq!(number(d, "trainyard.bytes"), 4096);
        let scheme = d.attr("trainyard.destination.scheme").unwrap();
        match scheme {
            "s3" => assert_eq!(d.attr("trainyard.destination.bucket"), Some("deliveries")),
            "file" => assert_eq!(d.attr("trainyard.destination.bucket"), None),
            other => panic!("unexpected scheme {other}"),
        }
        schemes.insert(scheme.to_string());
    }
    assert_eq!(schemes, ["file", "s3"].map(String::from).into());
    telemetry.shutdown().await;
    fleet.stop().await;
}

/// `ty.preflight`: the captioner handles a request in a process span under
/// the requester's context, prepares inside it, and its reply carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preflight_request_is_traced_and_its_reply_carries_the_context() {
    use prost::Message;
    let receiver = OtlpReceiver::start().await;
    let fleet = Fleet::start_with(Services::NONE, |_| {}).await;
    let sample = fleet.sample_uri().await;
    let client = fleet.nats_client().await;
    let validator = std::sync::Arc::new(
        trainyard_captioner::preflight_server::PreflightServer::new(&fleet.config).unwrap(),
    );
    let requests = trainyard_captioner::preflight_server::subscribe(&client)
        .await
        .unwrap();
    let (telemetry, dispatch) = Telemetry::start(&settings("ty-captioner", &receiver)).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        trainyard_captioner::preflight_server::serve(
            client.clone(),
            requests,
            validator,
            1,
            stop.clone(),
        )
        .with_subscriber(dispatch),
    );

    let request = trainyard_proto::v1::PreflightRequest {
        tenant: "acme".into(),
        spec: Some(trainyard_coordinator::validate::normalise(spec(&sample, 20)).unwrap()),
    };
    let reply = tokio::time::timeout(
        WAIT,
        client.request_with_headers(
            subject::preflight().to_string(),
            task_headers(),
            request.encode_to_vec().into(),
        ),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    let answer = trainyard_proto::v1::ValidateReply::decode(reply.payload.clone()).unwrap();
    assert!(answer.problems.is_empty(), "{answer:?}");
    let traceparent = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .expect("the reply carries a traceparent")
        .as_str()
        .to_string();
    telemetry.flush().await;

    let spans = receiver
        .wait_for_spans(WAIT, |s| {
            !named(s, &format!("process {}", subject::preflight())).is_empty()
        })
        .await;
    let process = one(&spans, &format!("process {}", subject::preflight()));
    assert_eq!(process.trace_id, TRACE_ID);
    assert_eq!(process.parent_span_id.as_deref(), Some(TASK_SPAN_ID));
    assert_eq!(process.attr("trainyard.tenant"), Some("acme"));
    assert_eq!(
        traceparent,
        format!("00-{TRACE_ID}-{}-01", process.span_id),
        "the reply's context is the process span's"
    );
    child_of(one(&spans, "prepare.fetch"), process);
    assert_eq!(
        one(&spans, "prepare.fetch").attr("trainyard.dataset.source"),
        Some("artifact")
    );
    stop.cancel();
    server.await.unwrap().unwrap();
    telemetry.shutdown().await;
    fleet.stop().await;
}

/// A free loopback port for a service's `/metrics`.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape_counter(port: u16, name: &str, stage: &str) -> f64 {
    let body = wait_for(
        &format!("{name} on 127.0.0.1:{port}"),
        WAIT,
        || async move {
            let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            body.contains(name).then_some(body)
        },
    )
    .await;
    prom::value(&prom::parse(&body), name, &[("stage", stage)])
        .unwrap_or_else(|| panic!("{name}{{stage={stage}}} in {body}"))
}

/// The real binaries: a job whose dataset URL carries a secret runs
/// through the captioner and the uploader; their `/metrics` count the
/// artifact bytes, and neither their logs nor any span holds the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stage_binaries_count_bytes_and_never_show_a_secret() {
    let bins = bin_dir();
    let receiver = OtlpReceiver::start().await;
    let fleet = Fleet::start_with(
        Services {
            coordinator: true,
            captioner: false,
            worker: true,
            uploader: false,
        },
        |c| c.captioner.allow_private_urls = true,
    )
    .await;
    let (zip, _) = sample_zip(fleet.dir.path());
    let port = serve_zip(zip).await;

    let mut procs = Vec::new();
    let mut metrics_ports = Vec::new();
    for (service, name) in [
        (Service::Captioner, "captioner"),
        (Service::Uploader, "uploader"),
    ] {
        let mut config = fleet.config.clone();
        let metrics_port = free_port();
        config.telemetry.metrics_port = metrics_port;
        config.telemetry.metrics_host = "127.0.0.1".into();
        config.telemetry.otlp_endpoint = receiver.endpoint();
        config.telemetry.log_filter =
            "info,trainyard_captioner=debug,trainyard_uploader=debug,trainyard_core=debug".into();
        metrics_ports.push(metrics_port);
        procs.push(Proc::spawn(
            &bins,
            fleet.dir.path(),
            service,
            name,
            config,
            vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ));
    }

    let mut client = fleet.client(TOKEN).await;
    let outputs = fleet.outputs_dir();
    let mut spec = with_destination(spec("unused", 20), &outputs);
    spec.dataset = Some(DatasetSource {
        source: Some(dataset_source::Source::ZipUrl(secret_url(port))),
    });
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(180)).await;
    let last = events.iter().rev().find_map(|e| match &e.kind {
        Some(Kind::State(s)) => Some(s.state()),
        _ => None,
    });
    assert_eq!(
        last,
        Some(JobState::Succeeded),
        "captioner log:\n{}\nuploader log:\n{}",
        procs[0].log_tail(40),
        procs[1].log_tail(40)
    );

    for (port, stage) in [(metrics_ports[0], "prepare"), (metrics_ports[1], "deliver")] {
        for name in [
            "trainyard_artifact_downloaded_bytes_total",
            "trainyard_artifact_uploaded_bytes_total",
        ] {
            let value = scrape_counter(port, name, stage).await;
            assert!(value > 0.0, "{name}{{stage={stage}}} = {value}");
        }
    }

    let spans = receiver
        .wait_for_spans(WAIT, |s| {
            !named(s, "prepare.fetch").is_empty() && !named(s, "deliver.destination").is_empty()
        })
        .await;
    no_secret_in(&spans);
    assert_eq!(
        one(&spans, "prepare.fetch").attr("server.address"),
        Some("127.0.0.1")
    );
    for proc in &mut procs {
        proc.signal(nix::sys::signal::Signal::SIGTERM);
        proc.wait_exit(WAIT).await;
        let log = std::fs::read_to_string(&proc.log).unwrap();
        assert!(
            log.contains("stage runtime started"),
            "{} logged: {log}",
            proc.name
        );
        assert!(
            !log.contains(SECRET),
            "{} logged the secret:\n{log}",
            proc.name
        );
    }
    fleet.stop().await;
}
