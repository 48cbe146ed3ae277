//! One trace per job, end to end: the four services run as separate
//! processes of the real binaries, each exporting spans over OTLP to an
//! in-test receiver. A job submitted with a W3C `traceparent` is one trace
//! from the submit call to the last delivery, across every service, and the
//! training attempt redelivered after its worker is SIGKILLed is a new span
//! in the same trace with its delivery number. The job carries secrets: they
//! appear in no span, no log line and no event.
//!
//! Needs `cargo build --workspace --bins` first (the binaries beside the
//! test executable).

use futures::StreamExt;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trainyard_proto::v1::{
    JobState, Secrets, SubmitRequest, WatchRequest, Webhook, job_event::Kind,
};
use trainyard_tests::chaos::{Chaos, Service};
use trainyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use trainyard_tests::webhook::Receiver;
use trainyard_tests::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(240);
const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";
const CLIENT_SPAN: &str = "eee19b7ec3c1b174";
const HF_TOKEN: &str = "hf_traceTestSecretToken7f3a9c";
const API_KEY: &str = "sk-traceTestSecretValue51d2e8";
const WEBHOOK_SECRET: &str = "whsec_dHJhaW55YXJkLXRyYWNlLXRlc3Qta2V5";

fn spans_of<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The services (by process name) that sent spans of the trace.
fn services(spans: &[ReceivedSpan]) -> BTreeSet<String> {
    spans.iter().map(|s| s.service.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_across_every_service_and_attempt() {
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint();
    let webhooks = Receiver::start(&[]).await;
    let mut chaos = Chaos::start_env(
        2,
        |config| config.webhooks.allow_private_addresses = true,
        &[
            // The config file the harness writes leaves secrets out.
            ("TY_WEBHOOKS__SECRET", WEBHOOK_SECRET),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("TY_LOG_FORMAT", "json"),
            ("TY_LOG", "info"),
        ],
    )
    .await;
    let sample = chaos.sample_uri().await;
    let mut spec = with_destination(spec(&sample, 100), &chaos.outputs_dir());
    let training = spec.training.as_mut().expect("training");
    training.save_every = 10;
    // Larger images make steps slow enough for the kill to land mid-run.
    training.resolution = 64;
    spec.webhook = Some(Webhook {
        url: webhooks.url(),
        events: vec![],
    });
    spec.secrets = Some(Secrets {
        hf_token: HF_TOKEN.into(),
        values: [("api_key".to_string(), API_KEY.to_string())].into(),
    });

    // The client's own span is the trace's root.
    let mut client = chaos.client().await;
    let mut request = tonic::Request::new(SubmitRequest { spec: Some(spec) });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    let job = client
        .submit(request)
        .await
        .expect("submit")
        .into_inner()
        .job
        .expect("job")
        .job_id;

    // Every event of the job, as Watch streams them.
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut stream = client
        .watch(WatchRequest {
            job_id: job.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let sink = events.clone();
    let watching = tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            sink.lock().unwrap().push(event);
        }
    });

    // Kill the worker training it once a checkpoint is stored: another
    // worker gets the task again (a redelivery) and resumes.
    wait_for("a checkpoint", JOB_TIMEOUT, || async {
        let events = events.lock().unwrap();
        events
            .iter()
            .any(|e| matches!(&e.kind, Some(Kind::Checkpoint(c)) if c.step >= 10))
            .then_some(())
    })
    .await;
    let killed = chaos.worker_running(&job).expect("a worker trains the job");
    chaos.proc(&killed).kill();
    let survivor = chaos
        .running(Service::Worker)
        .into_iter()
        .find(|w| *w != killed)
        .expect("another worker");

    tokio::time::timeout(JOB_TIMEOUT, watching)
        .await
        .expect("job finished in time")
        .expect("watch task");
    let record = get(&mut client, &job).await;
    assert_eq!(record.state(), JobState::Succeeded, "{record:?}");

    // The spans of the last stage arrive a moment after the job ends: wait
    // until the coordinator applied the delivery and every parent is there
    // (but those of the killed worker's process span, which never ended).
    let spans = receiver
        .wait_for_spans(Duration::from_secs(30), |spans| {
            let trace: Vec<&ReceivedSpan> =
                spans.iter().filter(|s| s.trace_id == TRACE_ID).collect();
            let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
            let applied = trace.iter().any(|s| {
                s.name == "process ty.result.deliver" && s.service.starts_with("coordinator")
            });
            let hooked = trace.iter().any(|s| s.name == "webhook.deliver");
            applied
                && hooked
                && trace.iter().all(|s| match s.parent_span_id.as_deref() {
                    Some(p) => p == CLIENT_SPAN || ids.contains(p) || s.service == killed,
                    None => true,
                })
        })
        .await;
    let trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .cloned()
        .collect();
    // The test's own Watch and Get calls, sent without a context, are
    // traces of their own; nothing else about the job may be.
    let others: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id != TRACE_ID && s.attr("trainyard.job.id") == Some(job.as_str()))
        .filter(|s| s.attr("rpc.system").is_none())
        .collect();
    assert!(
        others.is_empty(),
        "spans of the job outside its trace: {others:#?}"
    );

    // Every service took part.
    let names = services(&trace);
    for service in ["coordinator", "captioner", "uploader"] {
        assert!(
            names.iter().any(|n| n.starts_with(service)),
            "no span from {service} in {names:?}"
        );
    }
    assert!(names.contains(&survivor), "{names:?}");
    // The killed worker's open process span died with it, but what it
    // finished before (its start report, its checkpoint uploads) is there.
    assert!(names.contains(&killed), "{names:?}");

    // One root: the submit call's server span, a child of the client's span.
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let submit = spans_of(&trace, "trainyard.v1.JobService/Submit");
    assert_eq!(submit.len(), 1, "{trace:#?}");
    assert_eq!(submit[0].parent_span_id.as_deref(), Some(CLIENT_SPAN));
    assert_eq!(submit[0].attr("rpc.system"), Some("grpc"));
    // Every other span hangs off a span of the trace, except the children
    // of the killed worker's process span, which never ended.
    for span in &trace {
        let Some(parent) = span.parent_span_id.as_deref() else {
            panic!("a second root: {span:#?}");
        };
        if parent == CLIENT_SPAN {
            assert_eq!(span.span_id, submit[0].span_id);
            continue;
        }
        assert!(
            by_id.contains_key(parent) || span.service == killed,
            "parent of {span:#?} not in the trace"
        );
    }

    // Each stage's task is handled in a process span whose parent is the
    // coordinator's publish of that task.
    for (stage, subject) in [
        ("prepare", "ty.task.prepare"),
        ("train", "ty.task.train.default"),
        ("deliver", "ty.task.deliver"),
    ] {
        let process = spans_of(&trace, &format!("process {subject}"));
        assert!(!process.is_empty(), "no {stage} process span");
        for span in &process {
            assert_eq!(span.attr("messaging.system"), Some("nats"));
            assert_eq!(span.attr("messaging.destination.name"), Some(subject));
            assert_eq!(span.attr("trainyard.stage"), Some(stage));
            assert_eq!(span.attr("trainyard.job.id"), Some(job.as_str()));
            assert_eq!(span.attr("trainyard.tenant"), Some("acme"));
            let parent = by_id[span.parent_span_id.as_deref().unwrap()];
            assert_eq!(parent.name, format!("publish {subject}"), "{span:#?}");
            assert!(parent.service.starts_with("coordinator"), "{parent:#?}");
        }
    }
    // Each stage's own steps are spans of the trace, down to each caption
    // call, each checkpoint upload, each destination and the webhook.
    for name in [
        "prepare.fetch",
        "prepare.caption",
        "caption.call",
        "prepare.store",
        "train.inputs",
        "train.model",
        "train.run",
        "train.checkpoint.upload",
        "train.adapter.upload",
        "deliver.destination",
        "deliver.manifest",
        "webhook.deliver",
    ] {
        assert!(
            !spans_of(&trace, name).is_empty(),
            "no {name} span in {:#?}",
            trace.iter().map(|s| &s.name).collect::<BTreeSet<_>>()
        );
    }
    // The webhook POST carries the delivery's context: the receiver can
    // join the job's trace.
    let hits = webhooks.wait_hits(1, Duration::from_secs(30)).await;
    let traceparent = hits[0].header("traceparent");
    assert!(traceparent.contains(TRACE_ID), "{traceparent}");
    let deliver = spans_of(&trace, "webhook.deliver");
    assert!(
        deliver.iter().any(|s| traceparent.contains(&s.span_id)
            || traceparent.contains(s.parent_span_id.as_deref().unwrap_or("-"))),
        "{traceparent} names neither a webhook.deliver span nor its child"
    );

    // The training stage ran twice: the survivor's span is the redelivered
    // attempt.
    let train: Vec<_> = spans_of(&trace, "process ty.task.train.default");
    let resumed = train
        .iter()
        .find(|s| s.service == survivor)
        .expect("the survivor's attempt");
    let attempt: u32 = resumed.attr("trainyard.attempt").unwrap().parse().unwrap();
    assert!(attempt >= 2, "redelivered attempt is {attempt}");

    // No secret anywhere: spans, log lines, events.
    for span in &spans {
        for value in span.attributes.values().chain([&span.name]) {
            assert!(
                !value.contains(HF_TOKEN) && !value.contains(API_KEY),
                "secret in span {span:#?}"
            );
        }
    }
    let mut lines_in_trace = 0;
    for proc in &chaos.procs {
        let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
        assert!(
            !log.contains(HF_TOKEN) && !log.contains(API_KEY),
            "secret in the log of {}",
            proc.name
        );
        for line in log.lines().filter(|l| l.starts_with('{')) {
            let line: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", proc.name));
            if line["trace_id"] == TRACE_ID {
                lines_in_trace += 1;
                assert!(line["span_id"].as_str().is_some_and(|s| s.len() == 16));
            }
        }
    }
    assert!(lines_in_trace > 0, "no log line carries the job's trace id");
    let js = chaos.js().await;
    let mut stream = js
        .get_stream(trainyard_core::topology::EVENTS_STREAM)
        .await
        .expect("events stream");
    let stored = stream.info().await.expect("info").state.messages;
    assert!(stored > 0);
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("ty.event.acme.{job}.>"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut seen = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        seen += 1;
        let text = String::from_utf8_lossy(&message.payload);
        assert!(!text.contains(HF_TOKEN) && !text.contains(API_KEY));
        // Every event carries the job's trace context.
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        let event = trainyard_proto::v1::JobEvent::decode(message.payload.clone()).unwrap();
        assert!(
            traceparent.contains(TRACE_ID),
            "event without the trace: {event:?} {traceparent:?}"
        );
        if message.info().map(|i| i.pending).unwrap_or(0) == 0 {
            break;
        }
    }
    assert!(seen > 10, "{seen} events");
    chaos.stop().await;
}
