//! A loopback receiver for trainers that report their progress through HTTP
//! (SimpleTuner's `webhook_config`). One per run: it listens on
//! `127.0.0.1:0` under a random path, answers every POST with 200, and
//! hands the JSON bodies to the run loop, which feeds them to the backend's
//! parser next to the output lines.
//!
//! Not to be confused with the coordinator's job webhooks (`webhooks`),
//! which go out to users: this one only ever listens on loopback for the
//! trainer the worker started. The backends' names for it (`wants_webhook`,
//! `TrainInputs::webhook_url`, `OutputParser::webhook`) follow the trainer's
//! own word for the feature.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bodies larger than this are refused (progress posts are small).
const MAX_BODY: usize = 1 << 20;
/// Longest request or header line.
const MAX_LINE: u64 = 8 << 10;
/// A connection is closed after this long, whatever it is doing.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

pub struct ProgressReceiver {
    pub url: String,
    pub bodies: mpsc::Receiver<serde_json::Value>,
    stop: CancellationToken,
}

impl Drop for ProgressReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ProgressReceiver {
    pub async fn bind() -> std::io::Result<ProgressReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let secret = uuid::Uuid::now_v7().simple().to_string();
        let path = format!("/hook/{secret}");
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let expected = path.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or similar: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let tx = tx.clone();
                let expected = expected.clone();
                tokio::spawn(async move {
                    let served = tokio::time::timeout(IDLE, serve(stream, &expected, &tx)).await;
                    if let Ok(Err(e)) = served {
                        tracing::debug!(error = %e, "progress receiver connection ended");
                    }
                });
            }
        });
        Ok(ProgressReceiver {
            url: format!("http://127.0.0.1:{port}{path}"),
            bodies: rx,
            stop,
        })
    }
}

/// Serves one keep-alive connection: `POST <path>` with a Content-Length body.
async fn serve(
    stream: tokio::net::TcpStream,
    expected_path: &str,
    tx: &mpsc::Sender<serde_json::Value>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if (&mut reader)
            .take(MAX_LINE)
            .read_line(&mut request_line)
            .await?
            == 0
        {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut length = 0usize;
        let mut close = false;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if (&mut reader).take(MAX_LINE).read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(usize::MAX);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = !value.eq_ignore_ascii_case("identity");
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        let status = if chunked {
            "411 Length Required"
        } else if length > MAX_BODY {
            "413 Payload Too Large"
        } else if method != "POST" || path != expected_path {
            "404 Not Found"
        } else {
            "200 OK"
        };
        let mut body = Vec::new();
        if chunked || length > MAX_BODY {
            close = true;
        } else {
            body.resize(length, 0);
            reader.read_exact(&mut body).await?;
        }
        // Answer at once: the trainer posts from its training loop.
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: {}\r\n\r\n",
            if close { "close" } else { "keep-alive" }
        );
        write.write_all(reply.as_bytes()).await?;
        if status.starts_with("200") {
            match serde_json::from_slice(&body) {
                Ok(value) => {
                    if tx.try_send(value).is_err() {
                        tracing::debug!("progress post dropped: the run is not reading");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "progress post body is not JSON"),
            }
        }
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn post(url: &str, body: &str) -> String {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let request = format!(
            "POST /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn posted_json_reaches_the_run_and_other_paths_do_not() {
        let mut hook = ProgressReceiver::bind().await.unwrap();
        let reply = post(
            &hook.url,
            r#"{"type":"training.status","progress":{"current":3}}"#,
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let body = tokio::time::timeout(std::time::Duration::from_secs(5), hook.bodies.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body["progress"]["current"], 3);
        let wrong = hook.url.rsplit_once('/').unwrap().0.to_string() + "/guess";
        let reply = post(&wrong, "{}").await;
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        assert!(hook.bodies.try_recv().is_err());
    }
}
