//! Connecting to NATS, and the small helpers around messages every service needs.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

/// Connects with a name that shows in the server's connection list.
pub async fn connect(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connect(url)
        .await
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
