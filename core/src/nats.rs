//! Connecting to NATS, and the small helpers around messages every service needs.

use crate::config::NatsConfig;
use crate::topology::permissions::Role;
use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

/// Why a service could not connect to the bus.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read nats credentials {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to nats: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error(
        "the nats server at {0} does not require authentication: anyone who reaches it can read \
         and forge jobs. Give it users (`yard fleet init`), or set nats.insecure_dev = true \
         for a dev fleet on loopback"
    )]
    OpenBus(String),
}

/// Connects as `role` with the `[nats]` settings: its credentials (an nkey
/// seed file or a creds file), TLS (the CA the server's certificate must
/// chain to, a client certificate, TLS first) and its inbox prefix (the
/// role's own unless configured). `url` may list several servers of a
/// cluster, comma-separated; the client connects to any of them and fails
/// over to the others. Returns at once and connects in the background;
/// once connected, check the server with [`require_auth`].
pub async fn connect(config: &NatsConfig, role: &Role) -> Result<async_nats::Client, ConnectError> {
    let servers = server_addrs(&config.url).map_err(|e| {
        async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::ServerParse, e)
    })?;
    Ok(options(config, role)?
        .retry_on_initial_connect()
        .connect(servers)
        .await?)
}

/// Refuses a server that does not require authentication, unless the
/// config says `insecure_dev`: on an open bus anyone who reaches the port
/// can read and forge jobs.
pub fn require_auth(
    info: &async_nats::ServerInfo,
    config: &NatsConfig,
) -> Result<(), ConnectError> {
    if info.auth_required || config.insecure_dev {
        Ok(())
    } else {
        Err(ConnectError::OpenBus(config.url.clone()))
    }
}

/// The connect options of `role` under `config` (see [`connect`]).
pub fn options(
    config: &NatsConfig,
    role: &Role,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|source| ConnectError::Credentials {
            path: path.to_owned(),
            source,
        })
    };
    let mut options = match &config.creds_file {
        Some(path) => {
            let creds = read(path)?;
            async_nats::ConnectOptions::with_credentials(&creds).map_err(|source| {
                ConnectError::Credentials {
                    path: path.clone(),
                    source,
                }
            })?
        }
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(path) = &config.nkey_seed_file {
        options = options.nkey(read(path)?.trim().to_string());
    }
    if config.tls_ca_file.is_some() || config.tls_cert_file.is_some() || config.tls_first {
        install_tls_provider();
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_first {
        options = options.tls_first();
    }
    let inbox = config
        .inbox_prefix
        .clone()
        .unwrap_or_else(|| role.inbox_prefix());
    Ok(options
        .name(role.connection_name())
        .custom_inbox_prefix(inbox))
}

/// Names rustls' crypto provider for the process: both of its providers
/// are linked in (other crates enable one each), and TLS refuses to pick.
/// An earlier call's choice stays.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
