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
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    headers: Option<HeaderMap>,
    payload: Bytes,
) -> Result<(), jetstream::context::PublishError> {
    let mut publish = jetstream::message::PublishMessage::build()
        .payload(payload)
        .message_id(msg_id);
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            for value in values {
                publish = publish.header(name.clone(), value.clone());
            }
        }
    }
    let ack = js.send_publish(subject, publish).await?;
    ack.await?;
    Ok(())
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
