//! Telemetry end to end: spans cross a real nats-server in W3C headers and
//! reach an OTLP receiver as one trace; the Prometheus endpoint serves the
//! metric catalog over HTTP; OTLP metric export reaches the receiver.

use futures::StreamExt;
use opentelemetry::trace::TraceContextExt;
use std::path::Path;
use std::time::Duration;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use trainyard_core::telemetry::propagation::{
    JobAttrs, inject_current_nats, inject_nats, process_span, send_span,
};
use trainyard_core::telemetry::{Telemetry, TelemetrySettings, metrics};
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_tests::otlp::{OtlpReceiver, ReceivedSpan};
use trainyard_tests::prom;

const WAIT: Duration = Duration::from_secs(20);

fn settings(service: &str, env: &[(&str, String)]) -> TelemetrySettings {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    TelemetrySettings::resolve(service, &Default::default(), &env).expect("settings")
}

fn nats() -> (tempfile::TempDir, NatsServer) {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let binary = find_nats_server(root).expect("nats-server");
    let server = NatsServer::start(&binary, &dir.path().join("nats")).expect("nats-server starts");
    (dir, server)
}

fn by_name<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one span named {name:?} in {spans:#?}");
    found[0]
}

/// The coordinator-side service submits and publishes a task; the captioner
/// side handles it and publishes a result; the coordinator side handles the
/// result. Two telemetry pipelines (two service names), one nats-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_across_nats() {
    let receiver = OtlpReceiver::start().await;
    let (_dir, server) = nats();
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let (front, front_dispatch) = Telemetry::start(&settings("ty-coordinator", &otlp)).unwrap();
    let (back, back_dispatch) = Telemetry::start(&settings("ty-captioner", &otlp)).unwrap();
    assert!(front.tracing_enabled() && back.tracing_enabled());

    let client = async_nats::connect(server.url()).await.unwrap();
    let mut tasks = client.subscribe("ty.task.prepare").await.unwrap();
    let mut results = client.subscribe("ty.result.prepare").await.unwrap();
    client.flush().await.unwrap();
    let job = JobAttrs {
        job_id: Some("job-1"),
        tenant: Some("acme"),
        stage: Some("prepare"),
        attempt: Some(1),
    };

    // Captioner side: handle one task, publish its result.
    let captioner = {
        let client = client.clone();
        async move {
            let msg = tasks.next().await.expect("a task");
            assert!(
                msg.headers
                    .as_ref()
                    .is_some_and(|h| h.get("traceparent").is_some())
            );
            let span = process_span(msg.headers.as_ref(), "ty.task.prepare", job);
            async {
                tracing::info_span!("caption").in_scope(|| tracing::info!("captioned"));
                let publish = send_span("ty.result.prepare", job);
                let mut headers = async_nats::HeaderMap::new();
                inject_nats(&publish.context(), &mut headers);
                client
                    .publish_with_headers("ty.result.prepare", headers, "done".into())
                    .instrument(publish)
                    .await
                    .unwrap();
                client.flush().await.unwrap();
            }
            .instrument(span)
            .await;
        }
        .with_subscriber(back_dispatch)
    };
    let captioner = tokio::spawn(captioner);

    // Coordinator side: submit, publish the task, then handle the result.
    let trace_id = async {
        let submit = tracing::info_span!("submit", otel.kind = "server");
        let trace_id = submit.context().span().span_context().trace_id();
        async {
            let publish = send_span("ty.task.prepare", job);
            let mut headers = async_nats::HeaderMap::new();
            async {
                inject_current_nats(&mut headers);
                client
                    .publish_with_headers("ty.task.prepare", headers, "task".into())
                    .await
                    .unwrap();
            }
            .instrument(publish)
            .await;
        }
        .instrument(submit)
        .await;
        let msg = results.next().await.expect("a result");
        let span = process_span(msg.headers.as_ref(), "ty.result.prepare", job);
        span.in_scope(|| tracing::info!("result admitted"));
        trace_id
    }
    .with_subscriber(front_dispatch)
    .await;
    tokio::time::timeout(WAIT, captioner)
        .await
        .expect("captioner finished")
        .unwrap();

    front.flush().await;
    back.flush().await;
    let spans = receiver.wait_for_spans(WAIT, |s| s.len() >= 6).await;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let trace = trace_id.to_string();
    assert!(
        spans.iter().all(|s| s.trace_id == trace),
        "one trace: {spans:#?}"
    );

    let submit = by_name(&spans, "submit");
    let send_task = by_name(&spans, "publish ty.task.prepare");
    let process_task = by_name(&spans, "process ty.task.prepare");
    let caption = by_name(&spans, "caption");
    let send_result = by_name(&spans, "publish ty.result.prepare");
    let process_result = by_name(&spans, "process ty.result.prepare");

    assert_eq!(submit.parent_span_id, None);
    let parent = |child: &ReceivedSpan, parent: &ReceivedSpan| {
        assert_eq!(
            child.parent_span_id.as_deref(),
            Some(parent.span_id.as_str()),
            "{} is a child of {}",
            child.name,
            parent.name
        );
    };
    parent(send_task, submit);
    parent(process_task, send_task);
    parent(caption, process_task);
    parent(send_result, process_task);
    parent(process_result, send_result);

    for s in [submit, send_task, process_result] {
        assert_eq!(s.service, "ty-coordinator", "{}", s.name);
    }
    for s in [process_task, caption, send_result] {
        assert_eq!(s.service, "ty-captioner", "{}", s.name);
    }
    // Semantic conventions and job attributes.
    const PRODUCER: i32 = 4;
    const CONSUMER: i32 = 5;
    assert_eq!(send_task.kind, PRODUCER);
    assert_eq!(process_task.kind, CONSUMER);
    for s in [send_task, process_task, send_result, process_result] {
        assert_eq!(s.attr("messaging.system"), Some("nats"), "{}", s.name);
        assert_eq!(s.attr("trainyard.job.id"), Some("job-1"));
        assert_eq!(s.attr("trainyard.tenant"), Some("acme"));
        assert_eq!(s.attr("trainyard.stage"), Some("prepare"));
        assert_eq!(s.attr("trainyard.attempt"), Some("1"));
    }
    assert_eq!(
        send_task.attr("messaging.destination.name"),
        Some("ty.task.prepare")
    );
    assert_eq!(send_task.attr("messaging.operation.type"), Some("send"));
    assert_eq!(
        process_task.attr("messaging.operation.type"),
        Some("process")
    );

    front.shutdown().await;
    back.shutdown().await;
}

/// Without an endpoint nothing is exported, but the trace context still
/// travels in headers (a service without an exporter must not cut the job's
/// trace for those that export); `OTEL_SDK_DISABLED=true` turns both off.
#[tokio::test]
async fn without_an_endpoint_context_travels_but_nothing_is_exported() {
    async fn headers(env: &[(&str, String)]) -> (bool, async_nats::HeaderMap) {
        let (telemetry, dispatch) = Telemetry::start(&settings("ty-worker", env)).unwrap();
        assert_eq!(telemetry.metrics_addr(), None);
        let headers = async {
            let span = send_span("ty.task.deliver", JobAttrs::default());
            let _in = span.enter();
            let mut headers = async_nats::HeaderMap::new();
            inject_current_nats(&mut headers);
            headers
        }
        .with_subscriber(dispatch)
        .await;
        (telemetry.tracing_enabled(), headers)
    }
    let (exporting, sent) = headers(&[]).await;
    assert!(!exporting);
    let traceparent = sent
        .get("traceparent")
        .expect("context travels")
        .to_string();
    assert!(
        traceparent.starts_with("00-") && traceparent.ends_with("-01"),
        "{traceparent}"
    );
    let (exporting, sent) = headers(&[("OTEL_SDK_DISABLED", "true".into())]).await;
    assert!(!exporting);
    assert!(sent.is_empty());
}

fn sample_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::value(scrape, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} is scraped"))
}

/// Scrapes `/metrics` over HTTP and parses it with a Prometheus parser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_endpoint_serves_the_catalog() {
    let mut s = settings("ty-worker", &[]);
    s.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let (telemetry, _dispatch) = Telemetry::start(&s).unwrap();
    let addr = telemetry.metrics_addr().expect("listening");
    let m = telemetry.metrics();
    m.job_submitted("acme", "reference");
    m.stage_finished("train", "a100", "ok", Duration::from_secs(90));
    m.stage_finished("train", "a100", "ok", Duration::from_secs(30));
    m.set_backlog("train", "a100", 3, 1);
    m.job_progress(
        "job-9",
        metrics::JobProgress {
            tenant: "acme".into(),
            backend: "reference".into(),
            step: 40,
            total_steps: 100,
            loss: Some(0.25),
            learning_rate: Some(2e-4),
            samples_per_second: Some(8.0),
            reported_at: 1_700_000_000.0,
        },
    );

    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let body = response.text().await.unwrap();
    let scrape = prom::parse(&body);

    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_jobs_submitted_total",
            &[("tenant", "acme")]
        ),
        1.0
    );
    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_stage_duration_seconds",
            &[("stage", "train")]
        ),
        2.0
    );
    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_stage_backlog",
            &[("pool", "a100"), ("state", "pending")]
        ),
        3.0
    );
    assert_eq!(
        sample_value(&scrape, "trainyard_job_step", &[("job_id", "job-9")]),
        40.0
    );
    assert_eq!(
        sample_value(&scrape, "trainyard_job_total_steps", &[("job_id", "job-9")]),
        100.0
    );
    assert_eq!(
        sample_value(
            &scrape,
            "trainyard_job_samples_per_second",
            &[("job_id", "job-9")]
        ),
        8.0
    );
    // Every family on the endpoint is in the catalog.
    for sample in &scrape.samples {
        assert!(
            sample.metric == "target_info"
                || metrics::is_exported_series(&sample.metric)
                || metrics::CATALOG.iter().any(|d| d.name == sample.metric),
            "{} is not in the catalog",
            sample.metric
        );
    }
    // A finished job's series go away.
    m.job_ended("job-9");
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains("job-9"), "{body}");

    telemetry.shutdown().await;
    // The endpoint stops with the telemetry.
    assert!(
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .is_err()
    );
}

/// Metrics are pushed over OTLP when an endpoint is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reach_the_collector_over_otlp() {
    let receiver = OtlpReceiver::start().await;
    let s = settings(
        "ty-uploader",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200".to_string()),
        ],
    );
    let (telemetry, _dispatch) = Telemetry::start(&s).unwrap();
    telemetry.metrics().artifact_uploaded("deliver", 1234);
    let got = receiver
        .wait_for_metrics(WAIT, |m| {
            m.iter().any(|m| m.name == "trainyard.artifact.uploaded")
        })
        .await;
    let uploaded = got
        .iter()
        .find(|m| m.name == "trainyard.artifact.uploaded")
        .unwrap();
    assert_eq!(uploaded.service, "ty-uploader");
    assert_eq!(uploaded.unit, "By");
    telemetry.shutdown().await;
}

// ---- deploy/observability: dashboards, alert rules, compose ----

fn observability_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

fn read_yaml(path: &Path) -> serde_yaml::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    // Aggregation operators, which may take `by (…)` before their argument.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names, not metrics.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers outside label
/// matchers, strings and ranges that are neither functions, keywords nor
/// label lists of `by (…)`/`on (…)`. Grafana variables (`$x`) are skipped.
fn promql_metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_until = |i: &mut usize, close: char| -> Result<(), String> {
        let open = chars[*i];
        let mut depth = 0;
        while *i < chars.len() {
            let c = chars[*i];
            if c == '"' || c == '\'' || c == '`' {
                *i += 1;
                while *i < chars.len() && chars[*i] != c {
                    if chars[*i] == '\\' {
                        *i += 1;
                    }
                    *i += 1;
                }
            } else if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    *i += 1;
                    return Ok(());
                }
            }
            *i += 1;
        }
        Err(format!("unbalanced {open:?} in {expr:?}"))
    };
    let mut depth = 0i32;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => skip_until(&mut i, '}')?,
            '[' => skip_until(&mut i, ']')?,
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(format!("unterminated string in {expr:?}"));
                }
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            '(' => {
                depth += 1;
                i += 1;
            }
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced ')' in {expr:?}"));
                }
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (5m, 1e-4, 0.95).
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || chars[i] == '.'
                        || chars[i] == '-' && chars[i - 1] == 'e')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let next = chars.get(j).copied();
                let lower = word.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) {
                    if next == Some('(') {
                        i = j;
                        skip_until(&mut i, ')')?;
                    }
                } else if PROMQL_KEYWORDS.contains(&lower.as_str()) || next == Some('(') {
                    // A keyword or a function call.
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {expr:?}"));
    }
    Ok(names)
}

/// Metrics a query may name besides the catalog's: Prometheus' own `up`.
fn check_query(expr: &str, used: &mut std::collections::BTreeSet<String>) -> Result<(), String> {
    let names = promql_metric_names(expr)?;
    if names.is_empty() {
        return Err(format!("{expr:?} selects no metric"));
    }
    for name in names {
        if name != "up" && !metrics::is_exported_series(&name) {
            return Err(format!("{expr:?} names {name}, which no service exports"));
        }
        used.insert(name);
    }
    Ok(())
}

#[test]
fn the_promql_tokenizer_finds_metric_names() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le, stage) (rate(trainyard_stage_duration_seconds_bucket{outcome="ok", x=~"a(b"}[15m])))
           / on (stage) group_left (pool) max(trainyard_worker_slots offset 5m) unless up{job="trainyard"} > bool 1e-4
           and deriv(max(trainyard_job_step{job_id="$job_id"})[5m:])"#,
    )
    .unwrap();
    assert_eq!(
        names,
        [
            "trainyard_stage_duration_seconds_bucket",
            "trainyard_worker_slots",
            "up",
            "trainyard_job_step"
        ]
    );
    let mut used = Default::default();
    let err = check_query("sum(rate(trainyard_jobs_lost_total[5m]))", &mut used).unwrap_err();
    assert!(err.contains("trainyard_jobs_lost_total"), "{err}");
    assert!(check_query("sum by (stage) (", &mut used).is_err());
    assert!(check_query("time()", &mut used).is_err());
}

fn datasource_uids() -> std::collections::BTreeMap<String, String> {
    let doc =
        read_yaml(&observability_dir().join("grafana/provisioning/datasources/datasources.yaml"));
    doc["datasources"]
        .as_sequence()
        .expect("datasources list")
        .iter()
        .map(|d| {
            (
                d["uid"]
                    .as_str()
                    .expect("every datasource has a uid")
                    .to_string(),
                d["type"].as_str().expect("and a type").to_string(),
            )
        })
        .collect()
}

fn check_target(
    where_: &str,
    target: &serde_json::Value,
    panel_ds: &serde_json::Value,
    uids: &std::collections::BTreeMap<String, String>,
    used: &mut std::collections::BTreeSet<String>,
) {
    let ds = if target["datasource"].is_object() {
        &target["datasource"]
    } else {
        panel_ds
    };
    let uid = ds["uid"]
        .as_str()
        .unwrap_or_else(|| panic!("{where_}: no datasource uid"));
    let kind = uids
        .get(uid)
        .unwrap_or_else(|| panic!("{where_}: datasource {uid} is not provisioned"));
    assert_eq!(
        ds["type"].as_str(),
        Some(kind.as_str()),
        "{where_}: datasource type"
    );
    assert!(target["refId"].is_string(), "{where_}: refId");
    match kind.as_str() {
        "prometheus" => {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{where_}: expr"));
            check_query(expr, used).unwrap_or_else(|e| panic!("{where_}: {e}"));
        }
        "tempo" => {
            let query = target["query"].as_str().unwrap_or_default();
            assert!(
                query.contains("trainyard.job.id"),
                "{where_}: TraceQL query {query:?}"
            );
        }
        other => panic!("{where_}: unexpected datasource type {other}"),
    }
}

#[test]
fn dashboards_are_grafana_dashboards_over_exported_metrics() {
    let uids = datasource_uids();
    assert!(uids.values().any(|t| t == "prometheus") && uids.values().any(|t| t == "tempo"));
    let provider =
        read_yaml(&observability_dir().join("grafana/provisioning/dashboards/dashboards.yaml"));
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
    let mut used = std::collections::BTreeSet::new();
    let mut dashboard_uids = std::collections::BTreeSet::new();
    let dir = observability_dir().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, ["fleet", "job", "workers"]);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let d: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: title"
        );
        assert!(
            dashboard_uids.insert(d["uid"].as_str().expect("uid").to_string()),
            "{name}: uid unique"
        );
        assert!(
            d["schemaVersion"].as_u64().is_some_and(|v| v >= 30),
            "{name}: schemaVersion"
        );
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{name}: panels");
        let mut ids = std::collections::BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().expect("panel title");
            let where_ = format!("{name} / {title}");
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{where_}: id unique"
            );
            assert!(p["type"].is_string(), "{where_}: type");
            for k in ["x", "y", "w", "h"] {
                assert!(p["gridPos"][k].is_u64(), "{where_}: gridPos.{k}");
            }
            assert!(
                p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{where_}: targets");
            for t in targets {
                check_target(&where_, t, &p["datasource"], &uids, &mut used);
            }
        }
        for var in d["templating"]["list"].as_array().expect("templating.list") {
            let where_ = format!("{name} / ${}", var["name"].as_str().unwrap());
            if var["type"] == "query" {
                let query = var["query"]["query"].as_str().expect("variable query");
                let inner = query
                    .strip_prefix("label_values(")
                    .and_then(|q| q.rsplit_once(','))
                    .map(|(metric, _)| metric)
                    .unwrap_or(query);
                check_target(
                    &where_,
                    &serde_json::json!({"refId": "v", "expr": inner, "datasource": var["datasource"]}),
                    &var["datasource"],
                    &uids,
                    &mut used,
                );
            }
        }
    }
    // Every exported metric is on some dashboard.
    let alerts = alert_metric_names();
    for def in metrics::CATALOG {
        let shown = metrics::series_names(def)
            .iter()
            .any(|s| used.contains(s) || alerts.contains(s));
        assert!(shown, "{} is on no dashboard and in no alert", def.name);
    }
}

fn alert_metric_names() -> std::collections::BTreeSet<String> {
    let doc = read_yaml(&observability_dir().join("prometheus/alerts.yml"));
    let mut used = std::collections::BTreeSet::new();
    let mut alerts = std::collections::BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr");
            check_query(expr, &mut used).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(rule["for"].is_string(), "{name}: for");
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(alerts.insert(name.clone()), "{name} is unique");
        }
    }
    assert_eq!(
        alerts,
        [
            "TrainyardBacklogWithoutWorkers",
            "TrainyardDeadLetters",
            "TrainyardGpuIdleWhileHeld",
            "TrainyardJobNoProgress"
        ]
        .map(String::from)
        .into()
    );
    used
}

#[test]
fn alert_rules_name_exported_metrics() {
    let used = alert_metric_names();
    assert!(used.contains("trainyard_dlq_depth"));
    assert!(used.contains("trainyard_job_progress_timestamp_seconds"));
}

/// Every file the compose stack mounts exists, and Prometheus loads the
/// rule file the compose file mounts.
#[test]
fn the_compose_stack_mounts_files_that_exist() {
    let dir = observability_dir();
    let compose = read_yaml(&dir.join("compose.yaml"));
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "nats",
        "coordinator",
        "captioner",
        "worker",
        "uploader",
        "otel-collector",
        "tempo",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "compose runs {name}");
    }
    // `deploy/fleet` is written by `yard fleet init` (never committed):
    // what the stack mounts from it must be what that command writes.
    let fleet = tempfile::tempdir().unwrap();
    trainyard_core::fleet::init(fleet.path(), &Default::default()).expect("fleet init");
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let spec = volume.as_str().expect("short volume syntax");
            let source = spec.split(':').next().unwrap();
            if let Some(generated) = source.strip_prefix("../fleet") {
                let file = fleet.path().join(generated.trim_start_matches('/'));
                assert!(
                    file.exists(),
                    "{name:?} mounts {source}, which yard fleet init does not write"
                );
            } else if source.starts_with('.') {
                assert!(
                    dir.join(source).exists(),
                    "{name:?} mounts {source}, which is missing"
                );
            }
        }
    }
    let prometheus = read_yaml(&dir.join("prometheus/prometheus.yml"));
    assert_eq!(
        prometheus["rule_files"][0].as_str(),
        Some("/etc/prometheus/alerts.yml")
    );
    let ports = &prometheus["scrape_configs"][0]["dns_sd_configs"][0]["port"];
    assert_eq!(ports.as_u64(), Some(9464));
    // Set on the service or in the `x-env` block it merges (`<<: *env`).
    let env = &compose["services"]["coordinator"]["environment"];
    let port = env["TY_TELEMETRY__METRICS_PORT"]
        .as_str()
        .or(env["<<"]["TY_TELEMETRY__METRICS_PORT"].as_str());
    assert_eq!(port, Some("9464"));
}
