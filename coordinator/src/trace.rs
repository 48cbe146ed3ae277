//! The coordinator's side of a job's trace.
//!
//! Submit stores the trace context of its span in the record
//! (`JobRecord.trace_context`: the `traceparent` value, then a line feed
//! and the `tracestate` value when there is one). Work the coordinator
//! starts on its own, not in answer to a message carrying a context (the
//! reconciler, deadlines, TTLs, the effects of a cancel), runs inside
//! [`job_span`], whose remote parent is that stored context, so the tasks
//! and events it publishes rejoin the job's trace.

use trainyard_core::telemetry::propagation::{
    JobAttrs, extract_nats, inject_current_nats, set_remote_parent,
};
use trainyard_proto::v1::JobRecord;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The current span's trace context as `JobRecord.trace_context` stores
/// it; empty when tracing is off.
pub fn current_context() -> String {
    let mut headers = async_nats::HeaderMap::new();
    inject_current_nats(&mut headers);
    let Some(parent) = headers.get(TRACEPARENT) else {
        return String::new();
    };
    match headers.get(TRACESTATE).map(|v| v.as_str()) {
        Some(state) if !state.is_empty() => format!("{}\n{state}", parent.as_str()),
        _ => parent.as_str().to_string(),
    }
}

/// The headers a stored `trace_context` stands for (none for an empty or
/// malformed one).
pub fn headers_of(stored: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    let (parent, state) = stored.split_once('\n').unwrap_or((stored, ""));
    let parent = parent.trim();
    // Header values cannot hold control characters; a damaged value is
    // dropped rather than sent.
    let clean = |v: &str| !v.is_empty() && v.chars().all(|c| !c.is_control());
    if clean(parent) {
        headers.insert(TRACEPARENT, parent);
        if clean(state.trim()) {
            headers.insert(TRACESTATE, state.trim());
        }
    }
    headers
}

/// The trace id a stored `trace_context` names, if it is well formed.
pub fn trace_id_of(stored: &str) -> Option<&str> {
    let parent = stored.split('\n').next()?;
    let mut parts = parent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

/// A span for work the coordinator does on a job of its own accord
/// (`operation` names it, e.g. `"reconcile republish"`), a child of the
/// trace context stored in the record. Without one it stays a child of the
/// current span, or starts a trace.
pub fn job_span(operation: &'static str, record: &JobRecord) -> tracing::Span {
    let span = tracing::info_span!(
        target: "trainyard::coordinator",
        "job",
        otel.name = operation,
        otel.kind = "internal",
        trainyard.job.id = %record.job_id,
        trainyard.tenant = %record.tenant,
        trainyard.stage = record.stage().name(),
        trainyard.attempt = record.attempt,
    );
    if !record.trace_context.is_empty() {
        set_remote_parent(&span, extract_nats(&headers_of(&record.trace_context)));
    }
    span
}

/// The job attributes of a record, for the spans of `propagation`.
pub fn attrs(record: &JobRecord) -> JobAttrs<'_> {
    JobAttrs {
        job_id: Some(&record.job_id),
        tenant: Some(&record.tenant),
        stage: Some(record.stage().name()),
        attempt: Some(record.attempt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_stored_context_gives_back_its_headers() {
        let headers = headers_of(&format!("{PARENT}\nvendor=x1,other=y"));
        assert_eq!(headers.get(TRACEPARENT).unwrap().as_str(), PARENT);
        assert_eq!(
            headers.get(TRACESTATE).unwrap().as_str(),
            "vendor=x1,other=y"
        );
        let headers = headers_of(PARENT);
        assert_eq!(headers.get(TRACEPARENT).unwrap().as_str(), PARENT);
        assert!(headers.get(TRACESTATE).is_none());
        assert!(headers_of("").is_empty());
        assert!(headers_of("00-\u{7}bad").is_empty());
        assert_eq!(
            trace_id_of(&format!("{PARENT}\nvendor=x1")),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of("garbage"), None);
        assert_eq!(trace_id_of(""), None);
    }

    #[test]
    fn without_tracing_there_is_no_context_to_store() {
        assert_eq!(current_context(), "");
    }
}
