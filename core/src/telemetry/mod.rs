//! Telemetry shared by every binary: logs, traces and metrics.
//!
//! - Logs: human-readable lines by default, one JSON object per line with
//!   `TY_LOG_FORMAT=json` (or `telemetry.log_format`); JSON lines carry
//!   `trace_id`/`span_id` when tracing is on.
//! - Traces: a `tracing-opentelemetry` layer exporting over OTLP/gRPC when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `telemetry.otlp_endpoint`) is set;
//!   without an endpoint there is no layer and no exporter. `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`
//!   `OTEL_TRACES_EXPORTER`/`OTEL_METRICS_EXPORTER` (`otlp` or `none`) and
//!   `OTEL_SDK_DISABLED` are honoured.
//! - Metrics: the instrument set of [`metrics`], read by a Prometheus scrape
//!   endpoint (`telemetry.metrics_port`, 0 = off) and pushed over OTLP when an
//!   endpoint is set.
//!
//! Context travels between services through [`propagation`]: W3C
//! `traceparent`/`tracestate` in NATS headers and gRPC metadata.

pub mod metrics;
pub mod propagation;
mod scrape;

pub use metrics::Metrics;

use crate::config::TelemetryConfig;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// How long shutdown waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0}")]
    Config(String),
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("cannot serve /metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0} needs a Tokio runtime; start telemetry inside one")]
    NoRuntime(&'static str),
}

/// `OTEL_TRACES_SAMPLER` (with `OTEL_TRACES_SAMPLER_ARG` for the ratio ones).
#[derive(Clone, Debug, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerSetting {
    fn parse(name: &str, arg: Option<&str>) -> Result<Self, TelemetryError> {
        let ratio = || -> Result<f64, TelemetryError> {
            match arg {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        TelemetryError::Config(format!(
                            "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio between 0 and 1"
                        ))
                    }),
            }
        };
        Ok(match name.trim() {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio(ratio()?),
            other => {
                return Err(TelemetryError::Config(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not one of always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                )));
            }
        })
    }

    fn sampler(&self) -> Sampler {
        match *self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }
}

/// Everything telemetry needs, resolved from the config and the environment.
#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    /// `service.name` of traces and metrics.
    pub service_name: String,
    /// OTLP/gRPC endpoint; `None` = no export.
    pub otlp_endpoint: Option<String>,
    /// Export spans to the endpoint (`OTEL_TRACES_EXPORTER=none` turns it off).
    pub export_traces: bool,
    /// Export metrics to the endpoint (`OTEL_METRICS_EXPORTER=none` turns it
    /// off, e.g. when Prometheus scrapes `/metrics` instead).
    pub export_metrics: bool,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: SamplerSetting,
    /// Pass trace context on even when nothing is exported (off only with
    /// `OTEL_SDK_DISABLED=true`).
    pub propagate: bool,
    /// Where `/metrics` listens; `None` = no scrape endpoint (port 0 here
    /// means "any free port", which tests use).
    pub metrics_listen: Option<SocketAddr>,
    /// How often metrics are pushed over OTLP (`OTEL_METRIC_EXPORT_INTERVAL`, ms).
    pub metric_export_interval: Duration,
    /// How long finished spans wait before a batch export (`OTEL_BSP_SCHEDULE_DELAY`, ms).
    pub span_export_delay: Duration,
    pub json_logs: bool,
    /// The `tracing` filter of log lines (`TY_LOG` or `telemetry.log_filter`).
    pub log_filter: String,
}

fn lookup<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn millis(env: &[(String, String)], name: &str, default: u64) -> Result<Duration, TelemetryError> {
    match lookup(env, name).map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(Duration::from_millis(default)),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
            .ok_or_else(|| {
                TelemetryError::Config(format!("{name}={v:?} is not a positive number of ms"))
            }),
    }
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by commas,
/// values percent-encoded.
pub fn parse_resource_attributes(value: &str) -> Result<Vec<(String, String)>, TelemetryError> {
    let mut out = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, val)) = pair.split_once('=') else {
            return Err(TelemetryError::Config(format!(
                "OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"
            )));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(TelemetryError::Config(format!(
                "OTEL_RESOURCE_ATTRIBUTES: {pair:?} has an empty key"
            )));
        }
        let val = crate::percent_decode(val.trim()).ok_or_else(|| {
            TelemetryError::Config(format!(
                "OTEL_RESOURCE_ATTRIBUTES: the value of {key:?} is not valid percent-encoded UTF-8"
            ))
        })?;
        out.push((key.to_string(), val));
    }
    Ok(out)
}

impl TelemetrySettings {
    /// Settings of `service` from its config and the process environment.
    pub fn from_env(service: &str, config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::resolve(service, config, &env)
    }

    /// [`TelemetrySettings::from_env`] with an explicit environment, for tests.
    pub fn resolve(
        service: &str,
        config: &TelemetryConfig,
        env: &[(String, String)],
    ) -> Result<Self, TelemetryError> {
        let disabled =
            lookup(env, "OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let endpoint = lookup(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
            .unwrap_or(&config.otlp_endpoint)
            .trim();
        let otlp_endpoint = if disabled || endpoint.is_empty() {
            None
        } else {
            let url = url::Url::parse(endpoint)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if url.is_none() {
                return Err(TelemetryError::Config(format!(
                    "OTLP endpoint {endpoint:?} is not a URL like http://otel-collector:4317"
                )));
            }
            Some(endpoint.to_string())
        };
        let exporter = |name: &str| -> Result<bool, TelemetryError> {
            match lookup(env, name).map(str::trim).unwrap_or("otlp") {
                "" | "otlp" => Ok(true),
                "none" => Ok(false),
                other => Err(TelemetryError::Config(format!(
                    "{name}={other:?}: only \"otlp\" and \"none\" are supported"
                ))),
            }
        };
        let export_traces = exporter("OTEL_TRACES_EXPORTER")?;
        let export_metrics = exporter("OTEL_METRICS_EXPORTER")?;
        let mut resource_attributes = match lookup(env, "OTEL_RESOURCE_ATTRIBUTES") {
            Some(v) => parse_resource_attributes(v)?,
            None => Vec::new(),
        };
        let from_attributes = resource_attributes
            .iter()
            .rev()
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v.clone());
        resource_attributes.retain(|(k, _)| k != "service.name");
        let service_name = lookup(env, "OTEL_SERVICE_NAME")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or(from_attributes)
            .unwrap_or_else(|| service.to_string());
        let sampler = match lookup(env, "OTEL_TRACES_SAMPLER").filter(|s| !s.trim().is_empty()) {
            Some(name) => SamplerSetting::parse(name, lookup(env, "OTEL_TRACES_SAMPLER_ARG"))?,
            None => SamplerSetting::ParentBasedAlwaysOn,
        };
        let metrics_listen = match config.metrics_port {
            0 => None,
            port => {
                let host: std::net::IpAddr = config.metrics_host.trim().parse().map_err(|_| {
                    TelemetryError::Config(format!(
                        "telemetry.metrics_host {:?} is not an IP address",
                        config.metrics_host
                    ))
                })?;
                Some(SocketAddr::new(host, port))
            }
        };
        let json_logs = lookup(env, "TY_LOG_FORMAT")
            .map(|v| v == "json")
            .unwrap_or(config.log_format == "json");
        let log_filter = lookup(env, "TY_LOG")
            .filter(|f| EnvFilter::try_new(f).is_ok())
            .unwrap_or(&config.log_filter)
            .to_string();
        Ok(Self {
            service_name,
            otlp_endpoint,
            export_traces,
            export_metrics,
            resource_attributes,
            sampler,
            propagate: !disabled,
            metrics_listen,
            metric_export_interval: millis(env, "OTEL_METRIC_EXPORT_INTERVAL", 60_000)?,
            span_export_delay: millis(env, "OTEL_BSP_SCHEDULE_DELAY", 5_000)?,
            json_logs,
            log_filter,
        })
    }

    fn resource(&self) -> Resource {
        Resource::builder_empty()
            .with_service_name(self.service_name.clone())
            .with_attributes(
                self.resource_attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attribute(KeyValue::new("telemetry.sdk.language", "rust"))
            .with_attribute(KeyValue::new("telemetry.sdk.name", "opentelemetry"))
            .with_attribute(KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION").to_string(),
            ))
            .build()
    }
}

/// The running telemetry of a process: its providers, its instruments and
/// its scrape endpoint. Dropping it (or [`Telemetry::shutdown`]) flushes and
/// stops the exporters; keep it alive for the life of the service.
#[must_use = "dropping the telemetry guard shuts tracing and metric export down"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    metrics: Arc<Metrics>,
    registry: Option<prometheus::Registry>,
    metrics_addr: Option<SocketAddr>,
    server: Option<tokio_util::sync::CancellationToken>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &self.tracer.is_some())
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

static GLOBAL_METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();

/// The instruments of this process: those of the first [`init`], or inert
/// ones (recording into nothing) when telemetry was never started.
pub fn metrics() -> &'static Metrics {
    GLOBAL_METRICS.get_or_init(|| Arc::new(Metrics::noop()))
}

/// Installs the global subscriber and starts exporters and the scrape
/// endpoint. Safe to call more than once (in-process tests do): later calls
/// leave the first installation in place and return an inert guard.
pub fn init(service: &str, config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(Telemetry::inert());
    }
    let settings = TelemetrySettings::from_env(service, config)?;
    let (telemetry, dispatch) = Telemetry::start(&settings)?;
    if tracing::dispatcher::set_global_default(dispatch).is_err() {
        // Someone else installed a subscriber first: keep theirs, and ours
        // is pointless.
        *installed = true;
        return Ok(Telemetry::inert());
    }
    *installed = true;
    let _ = GLOBAL_METRICS.set(telemetry.metrics.clone());
    tracing::debug!(
        service,
        service_name = %settings.service_name,
        otlp = settings.otlp_endpoint.as_deref().unwrap_or("off"),
        metrics = ?telemetry.metrics_addr,
        "telemetry initialised"
    );
    Ok(telemetry)
}

/// Filter of what becomes a span in the trace: our own spans and events at
/// info and above, never the transport crates (the exporter's own gRPC calls
/// would otherwise trace themselves).
fn trace_filter() -> Targets {
    Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("h2", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
        .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
        .with_target("tower", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
        .with_target(
            "opentelemetry_sdk",
            tracing::level_filters::LevelFilter::OFF,
        )
        .with_target(
            "opentelemetry_otlp",
            tracing::level_filters::LevelFilter::OFF,
        )
}

impl Telemetry {
    fn inert() -> Telemetry {
        Telemetry {
            tracer: None,
            meter: None,
            metrics: GLOBAL_METRICS
                .get()
                .cloned()
                .unwrap_or_else(|| Arc::new(Metrics::noop())),
            registry: None,
            metrics_addr: None,
            server: None,
        }
    }

    /// Builds providers, exporters, the scrape endpoint and a subscriber
    /// without installing anything globally; [`init`] installs the returned
    /// dispatch, tests can use it as a scoped default.
    pub fn start(
        settings: &TelemetrySettings,
    ) -> Result<(Telemetry, tracing::Dispatch), TelemetryError> {
        let resource = settings.resource();
        let runtime = tokio::runtime::Handle::try_current().ok();

        let tracer = match &settings.otlp_endpoint {
            Some(endpoint) if settings.export_traces => {
                if runtime.is_none() {
                    return Err(TelemetryError::NoRuntime("the OTLP exporter"));
                }
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| TelemetryError::Exporter {
                        endpoint: endpoint.clone(),
                        message: e.to_string(),
                    })?;
                let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                    .with_batch_config(
                        opentelemetry_sdk::trace::BatchConfigBuilder::default()
                            .with_scheduled_delay(settings.span_export_delay)
                            .build(),
                    )
                    .build();
                Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource.clone())
                        .with_sampler(settings.sampler.sampler())
                        .with_span_processor(processor)
                        .build(),
                )
            }
            _ => None,
        };
        // Without an exporter the spans still get ids, so the trace context a
        // message arrives with goes on in what this service publishes: a
        // service that exports nothing does not cut the job's trace in two
        // for the services that do. Nothing is recorded or sent.
        let propagator = match &tracer {
            Some(_) => None,
            None if !settings.propagate => None,
            None => Some(
                SdkTracerProvider::builder()
                    .with_sampler(settings.sampler.sampler())
                    .build(),
            ),
        };

        let mut meter_builder = SdkMeterProvider::builder().with_resource(resource);
        let mut any_reader = false;
        let registry = match settings.metrics_listen {
            None => None,
            Some(_) => {
                let registry = prometheus::Registry::new();
                let exporter = opentelemetry_prometheus::exporter()
                    .with_registry(registry.clone())
                    .scope_info_enabled(false)
                    .build()
                    .map_err(|e| TelemetryError::Config(format!("prometheus exporter: {e}")))?;
                meter_builder = meter_builder.with_reader(exporter);
                any_reader = true;
                Some(registry)
            }
        };
        if let Some(endpoint) = settings
            .otlp_endpoint
            .as_ref()
            .filter(|_| settings.export_metrics)
        {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_temporality(Temporality::Cumulative)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    message: e.to_string(),
                })?;
            meter_builder = meter_builder.with_reader(
                PeriodicReader::builder(exporter)
                    .with_interval(settings.metric_export_interval)
                    .build(),
            );
            any_reader = true;
        }
        let (meter, metrics) = if any_reader {
            let provider = meter_builder.build();
            let metrics = Metrics::new(&opentelemetry::metrics::MeterProvider::meter(
                &provider,
                metrics::METER_NAME,
            ));
            (Some(provider), Arc::new(metrics))
        } else {
            (None, Arc::new(Metrics::noop()))
        };

        let (metrics_addr, server) = match (settings.metrics_listen, &registry) {
            (Some(addr), Some(registry)) => {
                let Some(runtime) = &runtime else {
                    return Err(TelemetryError::NoRuntime("the /metrics endpoint"));
                };
                let (bound, token) = scrape::serve(runtime, addr, registry.clone())
                    .map_err(|source| TelemetryError::Listen { addr, source })?;
                (Some(bound), Some(token))
            }
            _ => (None, None),
        };

        let fmt_filter =
            EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
        let fmt_layer = log_layer(settings.json_logs, fmt_filter, std::io::stderr);
        let otel_layer = tracer.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(metrics::METER_NAME))
                .with_tracked_inactivity(false)
                .with_filter(trace_filter())
        });
        // Without an exporter only the spans' ids matter: no log events in
        // spans, no code locations or thread names.
        let propagation_layer = propagator.as_ref().map(|provider| {
            let targets = trace_filter();
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(metrics::METER_NAME))
                .with_tracked_inactivity(false)
                .with_location(false)
                .with_threads(false)
                .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                    meta.is_span() && targets.would_enable(meta.target(), meta.level())
                }))
        });
        let dispatch = tracing::Dispatch::new(
            Registry::default()
                .with(fmt_layer)
                .with(otel_layer)
                .with(propagation_layer),
        );

        Ok((
            Telemetry {
                tracer,
                meter,
                metrics,
                registry,
                metrics_addr,
                server,
            },
            dispatch,
        ))
    }

    /// Keeps this telemetry running until the process exits, for callers
    /// with no place to hold the guard (the CLI, test harnesses). The last
    /// batch of spans may then be lost at exit.
    pub fn keep(self) {
        static KEPT: std::sync::Mutex<Vec<Telemetry>> = std::sync::Mutex::new(Vec::new());
        KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(self);
    }

    /// The instruments this telemetry records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Whether spans are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// The Prometheus text of the current metrics (what `/metrics` serves).
    pub fn render_prometheus(&self) -> Option<String> {
        self.registry.as_ref().map(scrape::render)
    }

    /// Exports every finished span and the current metrics now.
    pub async fn flush(&self) {
        let tracer = self.tracer.clone();
        let meter = self.meter.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = tracer {
                let _ = t.force_flush();
            }
            if let Some(m) = meter {
                let _ = m.force_flush();
            }
        })
        .await;
    }

    /// Flushes and stops exporters and the scrape endpoint. Prefer this to a
    /// plain drop on a current-thread runtime, where a blocking flush could
    /// not make progress.
    pub async fn shutdown(mut self) {
        let parts = self.take();
        let _ = tokio::task::spawn_blocking(move || parts.shutdown()).await;
    }

    fn take(&mut self) -> Parts {
        if let Some(server) = self.server.take() {
            server.cancel();
        }
        Parts {
            tracer: self.tracer.take(),
            meter: self.meter.take(),
        }
    }
}

struct Parts {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Parts {
    fn is_empty(&self) -> bool {
        self.tracer.is_none() && self.meter.is_none()
    }

    fn shutdown(self) {
        if let Some(t) = self.tracer {
            let _ = t.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
        if let Some(m) = self.meter {
            let _ = m.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let parts = self.take();
        if parts.is_empty() {
            return;
        }
        // The exporters' gRPC client runs on the Tokio runtime, so the
        // blocking shutdown goes to its own thread; wait for it unless that
        // would block the only thread of a current-thread runtime.
        let handle = std::thread::spawn(move || parts.shutdown());
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => {
                let _ = handle.join();
            }
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => {}
            Ok(_) => tokio::task::block_in_place(|| {
                let _ = handle.join();
            }),
        }
    }
}

/// The log-line layer: JSON (with trace ids) or human-readable, to `writer`.
fn log_layer<W>(json: bool, filter: EnvFilter, writer: W) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    if json {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .event_format(WithTraceIds(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            ))
            .fmt_fields(format::JsonFields::new())
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter)
            .boxed()
    }
}

/// Adds `trace_id` and `span_id` of the current OpenTelemetry span to each
/// JSON line the wrapped formatter writes.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt;
        let ids = opentelemetry::Context::map_current(|cx| {
            let sc = cx.span().span_context().clone();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0
            .format_event(ctx, format::Writer::new(&mut line), event)?;
        match line.rfind('}') {
            Some(end) => {
                line.insert_str(
                    end,
                    &format!(",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\""),
                );
                writer.write_str(&line)
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests;
