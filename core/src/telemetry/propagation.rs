//! Trace context across processes: W3C `traceparent`/`tracestate` in NATS
//! headers and gRPC metadata, and the spans that carry it.
//!
//! A publisher wraps its publish in [`send_span`] and injects that span's
//! context with [`inject_nats`]; a consumer extracts it with [`extract_nats`]
//! and handles the message inside [`process_span`], which becomes a child of
//! the publisher's span, so a job is one trace across every service. gRPC
//! does the same with [`inject_grpc`]/[`extract_grpc`] and [`rpc_server_span`].
//!
//! Span attributes follow the OpenTelemetry semantic conventions for
//! messaging (`messaging.system`, `messaging.destination.name`,
//! `messaging.operation.type`, `messaging.operation.name`) and RPC
//! (`rpc.system`, `rpc.service`, `rpc.method`), plus the job's attributes
//! (`trainyard.job.id`, `trainyard.tenant`, `trainyard.stage`,
//! `trainyard.attempt`). Only identifiers go into spans, never payloads.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// NATS headers as an OpenTelemetry carrier.
struct NatsHeaders<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Read-only NATS headers; names match without regard to case.
struct NatsHeadersRef<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeadersRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if let Some(v) = self.0.get(key) {
            return Some(v.as_str());
        }
        self.0
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Writes `cx`'s trace context into NATS headers (nothing when `cx` holds
/// no valid span, e.g. with tracing off).
pub fn inject_nats(cx: &Context, headers: &mut async_nats::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut NatsHeaders(headers));
}

/// [`inject_nats`] with the context of the current `tracing` span.
pub fn inject_current_nats(headers: &mut async_nats::HeaderMap) {
    inject_nats(&tracing::Span::current().context(), headers);
}

/// The trace context NATS headers carry (an empty context when they carry
/// none or a malformed one).
pub fn extract_nats(headers: &async_nats::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&NatsHeadersRef(headers))
}

/// gRPC metadata as an OpenTelemetry carrier.
struct GrpcMetadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for GrpcMetadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.as_str());
        if let (Ok(key), Ok(value)) = (key, value) {
            self.0.insert(key, value);
        }
    }
}

struct GrpcMetadataRef<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for GrpcMetadataRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `cx`'s trace context into gRPC metadata.
pub fn inject_grpc(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut GrpcMetadata(metadata));
}

/// The trace context gRPC metadata carries.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&GrpcMetadataRef(metadata))
}

/// A tonic client interceptor that sends the current span's context along:
/// `Client::with_interceptor(channel, telemetry::propagation::grpc_client_interceptor)`.
pub fn grpc_client_interceptor(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_grpc(&tracing::Span::current().context(), request.metadata_mut());
    Ok(request)
}

/// Makes `span` a child of the remote context `parent`; a context without a
/// valid span (nothing propagated) leaves it as it is.
pub fn set_remote_parent(span: &tracing::Span, parent: Context) {
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed, and then there
        // is no trace to join.
        let _ = span.set_parent(parent);
    }
}

/// What a messaging operation does (`messaging.operation.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Publishing a message (span kind producer).
    Send,
    /// Fetching messages (span kind consumer).
    Receive,
    /// Handling a message (span kind consumer).
    Process,
    /// Acking, naking or terminating a message (span kind client).
    Settle,
}

impl Operation {
    pub fn type_name(self) -> &'static str {
        match self {
            Operation::Send => "send",
            Operation::Receive => "receive",
            Operation::Process => "process",
            Operation::Settle => "settle",
        }
    }

    fn span_kind(self) -> &'static str {
        match self {
            Operation::Send => "producer",
            Operation::Receive | Operation::Process => "consumer",
            Operation::Settle => "client",
        }
    }
}

/// The job a message is about; every field optional.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobAttrs<'a> {
    pub job_id: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub stage: Option<&'a str>,
    /// Attempt number, 1 for the first delivery.
    pub attempt: Option<u32>,
}

/// A messaging span for `operation` on `subject`. Its name is
/// `"<operation> <destination>"`, the destination being `subject` with its
/// job-specific tokens left out by the caller (pass the stage's subject,
/// e.g. `ty.task.train.a100`, or an event subject template).
pub fn messaging_span(
    operation: Operation,
    operation_name: &str,
    subject: &str,
    job: JobAttrs<'_>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: "trainyard::messaging",
        "messaging",
        otel.name = %format_args!("{} {}", operation_name, subject),
        otel.kind = operation.span_kind(),
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.operation.type = operation.type_name(),
        messaging.operation.name = %operation_name,
        trainyard.job.id = tracing::field::Empty,
        trainyard.tenant = tracing::field::Empty,
        trainyard.stage = tracing::field::Empty,
        trainyard.attempt = tracing::field::Empty,
    );
    record_job(&span, job);
    span
}

/// Fills a span's job attributes (declared by [`messaging_span`] and
/// [`rpc_server_span`]).
pub fn record_job(span: &tracing::Span, job: JobAttrs<'_>) {
    if let Some(v) = job.job_id {
        span.record("trainyard.job.id", v);
    }
    if let Some(v) = job.tenant {
        span.record("trainyard.tenant", v);
    }
    if let Some(v) = job.stage {
        span.record("trainyard.stage", v);
    }
    if let Some(v) = job.attempt {
        span.record("trainyard.attempt", v);
    }
}

/// The span of publishing one message; inject its context into the
/// message's headers: `inject_nats(&span.context(), &mut headers)`.
pub fn send_span(subject: &str, job: JobAttrs<'_>) -> tracing::Span {
    messaging_span(Operation::Send, "publish", subject, job)
}

/// The span of handling one received message, a child of the context its
/// headers carry (a new trace when they carry none).
pub fn process_span(
    headers: Option<&async_nats::HeaderMap>,
    subject: &str,
    job: JobAttrs<'_>,
) -> tracing::Span {
    let span = messaging_span(Operation::Process, "process", subject, job);
    if let Some(headers) = headers {
        set_remote_parent(&span, extract_nats(headers));
    }
    span
}

/// The span of settling (ack, nak, term) one message.
pub fn settle_span(operation_name: &str, subject: &str, job: JobAttrs<'_>) -> tracing::Span {
    messaging_span(Operation::Settle, operation_name, subject, job)
}

/// The server span of one gRPC call, a child of the context the caller sent.
/// `method` is the full path, e.g. `/trainyard.v1.Jobs/Submit`.
pub fn rpc_server_span(method: &str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let path = method.trim_start_matches('/');
    let (service, name) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::info_span!(
        target: "trainyard::rpc",
        "rpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %name,
        trainyard.job.id = tracing::field::Empty,
        trainyard.tenant = tracing::field::Empty,
        trainyard.stage = tracing::field::Empty,
        trainyard.attempt = tracing::field::Empty,
    );
    set_remote_parent(&span, extract_grpc(metadata));
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    fn remote() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x1")]).unwrap(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn nats_headers_carry_traceparent_and_tracestate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "abc");
        inject_nats(&remote(), &mut headers);
        assert_eq!(
            headers.get("traceparent").unwrap().as_str(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(headers.get("tracestate").unwrap().as_str(), "vendor=x1");
        assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "abc");

        let cx = extract_nats(&headers);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(sc.trace_state().get("vendor"), Some("x1"));
    }

    #[test]
    fn header_names_match_without_case() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let cx = extract_nats(&headers);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn missing_or_malformed_context_extracts_as_none() {
        let empty = async_nats::HeaderMap::new();
        assert!(!extract_nats(&empty).span().span_context().is_valid());
        let mut bad = async_nats::HeaderMap::new();
        bad.insert("traceparent", "00-nothex-00f067aa0ba902b7-01");
        assert!(!extract_nats(&bad).span().span_context().is_valid());
        let mut zero = async_nats::HeaderMap::new();
        zero.insert(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        );
        assert!(!extract_nats(&zero).span().span_context().is_valid());
    }

    #[test]
    fn an_empty_context_injects_nothing() {
        let mut headers = async_nats::HeaderMap::new();
        inject_nats(&Context::new(), &mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn grpc_metadata_round_trips() {
        let mut md = tonic::metadata::MetadataMap::new();
        inject_grpc(&remote(), &mut md);
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let sc = extract_grpc(&md).span().span_context().clone();
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(sc.trace_state().get("vendor"), Some("x1"));
    }

    #[test]
    fn the_client_interceptor_sends_the_current_context() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let span = send_span("ty.task.prepare", JobAttrs::default());
            let _entered = span.enter();
            let trace_id = span.context().span().span_context().trace_id();
            let request = grpc_client_interceptor(tonic::Request::new(())).unwrap();
            let got = extract_grpc(request.metadata());
            assert_eq!(got.span().span_context().trace_id(), trace_id);
            assert!(trace_id != TraceId::INVALID);
        });
    }
}
