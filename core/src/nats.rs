//! Connecting to NATS, and the small helpers around messages every service needs.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

/// Connects with a name that shows in the server's connection list. `url`
/// may list several servers of a cluster, comma-separated; the client
/// connects to any of them and fails over to the others.
pub async fn connect(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let servers = server_addrs(url).map_err(|e| {
        async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
    })?;
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connect(servers)
        .await
}

/// The servers of a comma-separated URL list.
pub fn server_addrs(url: &str) -> std::io::Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })
        .collect()
}

/// Publishes to a stream and waits for the server's ack, with a dedup id.
///
/// The publish is a messaging send span (a child of the current span) whose
/// trace context goes along in the message's `traceparent` header, so the
/// consumer's work joins the same trace. A dedup id that starts with
/// `<tenant>.<job>` (tasks, results, state events) names the job in the span,
/// a task's id (`<tenant>.<job>.<stage>.<attempt>`) its stage and attempt too.
/// Returns the stream's ack (`duplicate` when the dedup id was seen).
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    headers: Option<HeaderMap>,
    payload: Bytes,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    use crate::telemetry::propagation;
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let destination = crate::topology::subject::destination(&subject);
    let mut ids = msg_id.splitn(3, '.');
    let (tenant, job) = match (ids.next(), ids.next()) {
        (Some(t), Some(j))
            if trainyard_proto::TenantId::parse(t).is_ok()
                && trainyard_proto::JobId::parse(j).is_ok() =>
        {
            (Some(t), Some(j))
        }
        _ => (None, None),
    };
    let task = crate::topology::parse_task_msg_id(msg_id);
    let span = propagation::send_span(
        &destination,
        propagation::JobAttrs {
            job_id: job,
            tenant,
            stage: task.as_ref().map(|(_, _, stage, _)| stage.name()),
            attempt: task.as_ref().map(|(_, _, _, attempt)| attempt.0),
        },
    );
    let mut headers = headers.unwrap_or_default();
    propagation::inject_nats(&span.context(), &mut headers);
    let mut publish = jetstream::message::PublishMessage::build()
        .payload(payload)
        .message_id(msg_id);
    for (name, values) in headers.iter() {
        for value in values {
            publish = publish.header(name.clone(), value.clone());
        }
    }
    async move { js.send_publish(subject, publish).await?.await }
        .instrument(span)
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_url_list_names_every_server() {
        let servers =
            super::server_addrs("nats://127.0.0.1:4001, nats://127.0.0.1:4002,nats://h:4003")
                .unwrap();
        let ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4001, 4002, 4003]);
        assert!(super::server_addrs("nats://h:notaport").is_err());
    }
}
