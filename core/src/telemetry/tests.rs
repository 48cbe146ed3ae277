use super::metrics::{self, CATALOG, GpuSample, JobProgress, Kind};
use super::*;
use std::collections::{BTreeMap, BTreeSet};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn resolve(pairs: &[(&str, &str)]) -> Result<TelemetrySettings, TelemetryError> {
    TelemetrySettings::resolve("ty-worker", &TelemetryConfig::default(), &env(pairs))
}

#[test]
fn defaults_export_nothing_and_name_the_service() {
    let s = resolve(&[]).unwrap();
    assert_eq!(s.service_name, "ty-worker");
    assert_eq!(s.otlp_endpoint, None);
    assert_eq!(s.metrics_listen, None);
    assert_eq!(s.sampler, SamplerSetting::ParentBasedAlwaysOn);
    assert!(!s.json_logs);
    assert_eq!(s.log_filter, "info");
}

#[test]
fn standard_variables_configure_export() {
    let s = resolve(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ("OTEL_SERVICE_NAME", "worker-a100-1"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, host.name=gpu%2D7 ,service.name=ignored",
        ),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1500"),
        ("TY_LOG_FORMAT", "json"),
        ("TY_LOG", "debug"),
    ])
    .unwrap();
    assert_eq!(s.otlp_endpoint.as_deref(), Some("http://collector:4317"));
    assert_eq!(s.service_name, "worker-a100-1");
    assert_eq!(
        s.resource_attributes,
        vec![
            ("deployment.environment".to_string(), "prod".to_string()),
            ("host.name".to_string(), "gpu-7".to_string()),
        ]
    );
    assert_eq!(s.sampler, SamplerSetting::ParentBasedTraceIdRatio(0.25));
    assert_eq!(s.metric_export_interval, Duration::from_millis(1500));
    assert!(s.json_logs);
    assert_eq!(s.log_filter, "debug");
    // service.name in the attributes counts when OTEL_SERVICE_NAME is unset.
    let s = resolve(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs")]).unwrap();
    assert_eq!(s.service_name, "from-attrs");
    assert!(s.resource_attributes.is_empty());
}

#[test]
fn the_config_sets_endpoint_and_scrape_port_and_the_environment_wins() {
    let config = TelemetryConfig {
        otlp_endpoint: "http://from-config:4317".into(),
        metrics_port: 9464,
        metrics_host: "127.0.0.1".into(),
        ..TelemetryConfig::default()
    };
    let s = TelemetrySettings::resolve("ty-uploader", &config, &[]).unwrap();
    assert_eq!(s.otlp_endpoint.as_deref(), Some("http://from-config:4317"));
    assert_eq!(s.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    let s = TelemetrySettings::resolve(
        "ty-uploader",
        &config,
        &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://elsewhere:4317")]),
    )
    .unwrap();
    assert_eq!(s.otlp_endpoint.as_deref(), Some("https://elsewhere:4317"));
    let s = TelemetrySettings::resolve(
        "ty-uploader",
        &config,
        &env(&[("OTEL_SDK_DISABLED", "true")]),
    )
    .unwrap();
    assert_eq!(s.otlp_endpoint, None);
    let s = TelemetrySettings::resolve(
        "ty-uploader",
        &config,
        &env(&[("OTEL_METRICS_EXPORTER", "none")]),
    )
    .unwrap();
    assert!(s.export_traces && !s.export_metrics);
}

#[test]
fn bad_settings_are_clear_errors() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            "not a URL",
        ),
        (&[("OTEL_TRACES_SAMPLER", "sometimes")], "is not one of"),
        (
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            "ratio between 0 and 1",
        ),
        (
            &[("OTEL_RESOURCE_ATTRIBUTES", "novalue")],
            "is not key=value",
        ),
        (&[("OTEL_RESOURCE_ATTRIBUTES", "k=%zz")], "percent-encoded"),
        (
            &[("OTEL_METRIC_EXPORT_INTERVAL", "soon")],
            "positive number of ms",
        ),
    ];
    for (vars, expected) in cases {
        let err = resolve(vars).unwrap_err().to_string();
        assert!(err.contains(expected), "{vars:?}: {err}");
    }
    let config = TelemetryConfig {
        metrics_port: 9464,
        metrics_host: "localhost:1".into(),
        ..TelemetryConfig::default()
    };
    let err = TelemetrySettings::resolve("x", &config, &[]).unwrap_err();
    assert!(err.to_string().contains("not an IP address"), "{err}");
}

#[test]
fn otlp_export_needs_a_runtime() {
    let mut s = resolve(&[]).unwrap();
    s.otlp_endpoint = Some("http://127.0.0.1:4317".into());
    let err = Telemetry::start(&s).expect_err("no runtime here");
    assert!(matches!(err, TelemetryError::NoRuntime(_)), "{err}");
}

#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
    type Writer = Captured;
    fn make_writer(&'w self) -> Captured {
        self.clone()
    }
}

#[test]
fn json_lines_carry_the_ids_of_the_current_span() {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let out = Captured::default();
    let provider = SdkTracerProvider::builder().build();
    let subscriber = Registry::default()
        .with(log_layer(true, EnvFilter::new("info"), out.clone()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("t"))
                .with_filter(trace_filter()),
        );
    let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
        tracing::info!(outside = 1, "before any span");
        let span = tracing::info_span!("work", job = "j1");
        let _in = span.enter();
        tracing::info!(step = 3, "inside");
        let sc = span.context().span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["message"], "before any span");
    assert!(lines[0].get("trace_id").is_none());
    assert_eq!(lines[1]["message"], "inside");
    assert_eq!(lines[1]["step"], 3);
    assert_eq!(lines[1]["level"], "INFO");
    assert_eq!(lines[1]["span"]["job"], "j1");
    assert_eq!(lines[1]["trace_id"], trace_id.as_str());
    assert_eq!(lines[1]["span_id"], span_id.as_str());
    assert_eq!(trace_id.len(), 32);
}

#[test]
fn text_lines_stay_human_readable() {
    let out = Captured::default();
    let subscriber =
        Registry::default().with(log_layer(false, EnvFilter::new("info"), out.clone()));
    tracing::subscriber::with_default(subscriber, || tracing::info!(n = 2, "hello"));
    let raw = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    // Drop colour escapes (ESC [ ... m).
    let mut text = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    assert!(
        text.contains(" INFO ") && text.contains("hello n=2"),
        "{text}"
    );
    assert!(!text.trim_start().starts_with('{'));
}

fn scrape(telemetry: &Telemetry) -> prometheus_parse::Scrape {
    let text = telemetry.render_prometheus().expect("scrape endpoint on");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(b) => b.last().map(|b| b.count).unwrap_or(0.0),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

fn record_everything(m: &Metrics) {
    m.autoscaler_decision("train.a100", "scale_up");
    m.autoscaler_machines("train.a100", "busy", 2);
    m.autoscaler_dollars("train.a100", 1.5);
    m.job_submitted("acme", "reference");
    m.job_finished("acme", "reference", "succeeded");
    m.stage_finished("train", "a100", "ok", Duration::from_secs(42));
    m.queue_waited("train", "a100", Duration::from_millis(1500));
    m.task_retried("train", "transient");
    m.task_redelivered("train", "ack_timeout");
    m.dead_lettered("deliver", "poison");
    m.set_dlq_depth("deliver", 1);
    m.set_backlog("train", "a100", 7, 2);
    m.job_progress(
        "j-1",
        JobProgress {
            tenant: "acme".into(),
            backend: "reference".into(),
            step: 10,
            total_steps: 100,
            loss: Some(0.5),
            learning_rate: Some(1e-4),
            samples_per_second: Some(12.5),
            reported_at: 1_700_000_000.0,
        },
    );
    m.set_gpus([GpuSample {
        index: 0,
        name: "A100".into(),
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 80 << 30,
        utilization: 0.9,
    }]);
    m.slot_busy("train", "a100", Duration::from_secs(3));
    m.slot_idle("train", "a100", Duration::from_secs(1));
    m.slots_changed("train", "a100", 1);
    m.running_changed("train", "a100", 1);
    m.model_cache_hit();
    m.model_cache_miss(2048);
    m.set_model_cache_size(4096);
    m.artifact_uploaded("train", 100);
    m.artifact_downloaded("prepare", 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_names_are_the_catalog() {
    let mut settings = resolve(&[]).unwrap();
    settings.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let (telemetry, _dispatch) = Telemetry::start(&settings).unwrap();
    assert!(telemetry.metrics_addr().unwrap().port() != 0);
    let m = telemetry.metrics().clone();
    record_everything(&m);
    let scraped = scrape(&telemetry);

    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for line in telemetry.render_prometheus().unwrap().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        }
    }
    types.remove("target_info");
    let expected: BTreeMap<String, String> = CATALOG
        .iter()
        .map(|d| {
            let kind = match d.kind {
                Kind::Counter => "counter",
                Kind::Histogram => "histogram",
                Kind::Gauge => "gauge",
            };
            (d.name.to_string(), kind.to_string())
        })
        .collect();
    assert_eq!(types, expected);

    // Labels are the catalog's.
    for d in CATALOG {
        let sample = scraped
            .samples
            .iter()
            .find(|s| s.metric == d.name)
            .unwrap_or_else(|| panic!("{} has a sample", d.name));
        let keys: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = d.labels.iter().copied().collect();
        assert_eq!(keys, want, "labels of {}", d.name);
    }

    let v = |name, labels: &[(&str, &str)]| value(&scraped, name, labels).unwrap();
    assert_eq!(
        v("trainyard_jobs_submitted_total", &[("tenant", "acme")]),
        1.0
    );
    assert_eq!(v("trainyard_stage_backlog", &[("state", "pending")]), 7.0);
    assert_eq!(
        v("trainyard_stage_backlog", &[("state", "ack_pending")]),
        2.0
    );
    assert_eq!(v("trainyard_job_step", &[("job_id", "j-1")]), 10.0);
    assert_eq!(v("trainyard_job_loss", &[("job_id", "j-1")]), 0.5);
    assert_eq!(v("trainyard_gpu_utilization_ratio", &[("gpu", "0")]), 0.9);
    assert_eq!(v("trainyard_model_cache_fetched_bytes_total", &[]), 2048.0);
    assert_eq!(
        v("trainyard_worker_busy_seconds_total", &[("pool", "a100")]),
        3.0
    );
    assert_eq!(
        v("trainyard_stage_duration_seconds", &[("outcome", "ok")]),
        1.0
    );
    let resource = scraped
        .samples
        .iter()
        .find(|s| s.metric == "target_info")
        .expect("target_info");
    assert_eq!(resource.labels.get("service_name"), Some("ty-worker"));

    // A job that stopped running leaves no series behind; counters stay.
    m.job_ended("j-1");
    m.set_gpus([]);
    m.job_submitted("acme", "reference");
    let scraped = scrape(&telemetry);
    assert_eq!(value(&scraped, "trainyard_job_step", &[]), None);
    assert_eq!(
        value(&scraped, "trainyard_gpu_memory_used_bytes", &[]),
        None
    );
    assert_eq!(
        value(
            &scraped,
            "trainyard_jobs_submitted_total",
            &[("tenant", "acme")]
        ),
        Some(2.0)
    );
    telemetry.shutdown().await;
}

#[test]
fn catalog_names_are_unique_and_prometheus_shaped() {
    let mut seen = BTreeSet::new();
    for d in CATALOG {
        assert!(seen.insert(d.name), "duplicate {}", d.name);
        assert!(d.name.starts_with("trainyard_"));
        assert!(
            d.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert_eq!(
            d.kind == Kind::Counter,
            d.name.ends_with("_total"),
            "{}",
            d.name
        );
        assert!(d.otel_name.starts_with("trainyard."));
    }
    assert!(metrics::is_exported_series(
        "trainyard_queue_wait_seconds_bucket"
    ));
    assert!(!metrics::is_exported_series(
        "trainyard_queue_wait_seconds_total"
    ));
}

#[test]
fn the_readme_table_is_the_catalog() {
    let readme =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/README.md");
    let text = std::fs::read_to_string(&readme).expect("deploy/observability/README.md");
    assert!(
        text.contains(&metrics::catalog_markdown()),
        "the metric table in {} is stale; replace it with:\n{}",
        readme.display(),
        metrics::catalog_markdown()
    );
}

#[test]
fn init_twice_is_safe() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let first = init("ty-test", &TelemetryConfig::default()).unwrap();
        let second = init("ty-test", &TelemetryConfig::default()).unwrap();
        assert!(!second.tracing_enabled());
        metrics().job_submitted("t", "b");
        drop(second);
        drop(first);
    });
}

/// What a service publishes while handling a message that carried `incoming`.
fn passed_on(settings: &TelemetrySettings, incoming: &str) -> Option<String> {
    let (_telemetry, dispatch) = Telemetry::start(settings).unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", incoming);
        let process = propagation::process_span(
            Some(&headers),
            "ty.task.prepare",
            propagation::JobAttrs::default(),
        );
        let _in_process = process.enter();
        let send = propagation::send_span("ty.result.prepare", propagation::JobAttrs::default());
        let mut out = async_nats::HeaderMap::new();
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        propagation::inject_nats(&send.context(), &mut out);
        out.get("traceparent").map(|v| v.to_string())
    })
}

#[test]
fn a_service_without_an_exporter_passes_the_trace_on() {
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let out = passed_on(&resolve(&[]).unwrap(), incoming).expect("a traceparent goes out");
    let parts: Vec<&str> = out.split('-').collect();
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "{out}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "a span of its own: {out}");
    assert_eq!(parts[3], "01");
    // OTEL_SDK_DISABLED turns the whole SDK off, propagation included.
    let disabled = resolve(&[("OTEL_SDK_DISABLED", "true")]).unwrap();
    assert_eq!(passed_on(&disabled, incoming), None);
}
