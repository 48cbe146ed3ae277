//! An in-test OTLP receiver: a tonic server on loopback implementing the
//! OTLP trace and metrics services (`opentelemetry-proto`), keeping what it
//! receives for assertions. Point a service's `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `telemetry.otlp_endpoint`) at [`OtlpReceiver::endpoint`].

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One span as the receiver got it, ids in lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    /// OTLP span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// One metric of one export.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedMetric {
    pub service: String,
    pub name: String,
    pub unit: String,
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    metrics: Mutex<Vec<ReceivedMetric>>,
    changed: Notify,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn service_of(resource: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
        .map(|kv| text(&kv.value))
        .unwrap_or_default()
}

#[derive(Clone)]
struct Service(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = service_of(&rs.resource);
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: (!span.parent_span_id.is_empty()
                            && span.parent_span_id.iter().any(|b| *b != 0))
                        .then(|| hex::encode(&span.parent_span_id)),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.0.spans.lock().unwrap().extend(got);
        self.0.changed.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rm in request.into_inner().resource_metrics {
            let service = service_of(&rm.resource);
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    got.push(ReceivedMetric {
                        service: service.clone(),
                        name: m.name,
                        unit: m.unit,
                    });
                }
            }
        }
        self.0.metrics.lock().unwrap().extend(got);
        self.0.changed.notify_waiters();
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: std::net::SocketAddr,
    received: Arc<Received>,
    stop: CancellationToken,
}

impl OtlpReceiver {
    /// Listens on a free loopback port.
    pub async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Received::default());
        let stop = CancellationToken::new();
        let service = Service(received.clone());
        let signal = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service.clone()))
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    signal,
                )
                .await
                .expect("OTLP receiver serves");
        });
        OtlpReceiver {
            addr,
            received,
            stop,
        }
    }

    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Every metric received so far (one entry per metric per export).
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        self.received.metrics.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the spans received, or panics with what
    /// arrived after `timeout`.
    pub async fn wait_for_spans(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.received.changed.notified();
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("spans not received within {timeout:?}; got {spans:#?}");
            }
        }
    }

    /// Waits until `done` holds for the metrics received.
    pub async fn wait_for_metrics(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedMetric]) -> bool,
    ) -> Vec<ReceivedMetric> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.received.changed.notified();
            let metrics = self.metrics();
            if done(&metrics) {
                return metrics;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("metrics not received within {timeout:?}; got {metrics:#?}");
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
