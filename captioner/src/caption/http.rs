//! What the HTTP caption backends share: their two kinds of client, the
//! mapping of an answer's status to a [`CaptionError`] (429 and 5xx are
//! retryable, with the server's `Retry-After`; other 4xx refuse the file),
//! and files as base64 with their media type.
//!
//! The fleet's own servers (its vLLM, Gemini) are trusted configuration
//! and get a plain client. A tenant's own endpoint is untrusted input: its
//! client resolves through the address guard (no private, loopback or
//! link-local address unless the fleet allows them), follows no redirect,
//! ignores system proxies, and is never handed a fleet key.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use reqwest::{StatusCode, Url};
use trainyard_core::netguard::{Guard, GuardedResolver, refusal_of};

use super::CaptionError;

/// The client for a fleet-configured server.
pub fn fleet_client() -> Result<reqwest::Client, CaptionError> {
    reqwest::Client::builder()
        .user_agent(concat!("trainyard-captioner/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| unavailable(format!("http client setup failed: {e}")))
}

/// The client for a tenant's endpoint, and the guard to check its URL
/// with before the first request.
pub fn tenant_client(allow_private: bool) -> Result<(reqwest::Client, Guard), CaptionError> {
    let guard = Guard {
        allow_private,
        trusted_hosts: Vec::new().into(),
        max_redirects: 0,
    };
    let client = reqwest::Client::builder()
        .user_agent(concat!("trainyard-captioner/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .dns_resolver(GuardedResolver(guard.clone()))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| unavailable(format!("http client setup failed: {e}")))?;
    Ok((client, guard))
}

/// Checks `url` against `guard` (scheme, literal addresses); names are
/// checked again by the resolver when connecting.
pub fn check_tenant_url(guard: &Guard, url: &Url) -> Result<(), CaptionError> {
    guard
        .check_url(url)
        .map_err(|refusal| CaptionError::Rejected {
            message: format!("caption.endpoint refused: {refusal}"),
        })
}

pub fn unavailable(message: impl Into<String>) -> CaptionError {
    CaptionError::Unavailable {
        message: message.into(),
        retry_after: None,
    }
}

/// A failed send: the guard's refusal is permanent, a timeout is
/// [`CaptionError::Timeout`], anything else (connect, reset) retryable.
pub fn send_error(server: &str, error: reqwest::Error) -> CaptionError {
    let error = error.without_url();
    if let Some(refusal) = refusal_of(&error) {
        return CaptionError::Rejected {
            message: format!("caption.endpoint refused: {refusal}"),
        };
    }
    if error.is_timeout() {
        return CaptionError::Timeout;
    }
    unavailable(format!("{server}: {error}"))
}

/// The body of a successful answer, or the error its status means. An
/// error answer's text (cut short) goes into the message: it says why.
pub async fn read_answer(
    server: &str,
    response: reqwest::Response,
) -> Result<Vec<u8>, CaptionError> {
    let status = response.status();
    let retry_after = crate::fetch::retry_after(&response, status);
    let body = response.bytes().await.map_err(|e| send_error(server, e))?;
    if status.is_success() {
        return Ok(body.to_vec());
    }
    let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
    let message = format!("{server} answered {status}: {}", text.trim());
    Err(match status {
        StatusCode::TOO_MANY_REQUESTS => CaptionError::Unavailable {
            message,
            retry_after,
        },
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => CaptionError::Timeout,
        s if s.is_server_error() => CaptionError::Unavailable {
            message,
            retry_after,
        },
        _ => CaptionError::Rejected { message },
    })
}

/// `error` with every occurrence of `secret` in its message replaced: a
/// server's error text may quote the key it was sent, and messages reach
/// logs and the job's failure.
pub fn redact(error: CaptionError, secret: Option<&str>) -> CaptionError {
    let Some(secret) = secret.filter(|s| s.len() >= 4) else {
        return error;
    };
    let clean = |m: String| m.replace(secret, "[redacted]");
    match error {
        CaptionError::Unavailable {
            message,
            retry_after,
        } => CaptionError::Unavailable {
            message: clean(message),
            retry_after,
        },
        CaptionError::Rejected { message } => CaptionError::Rejected {
            message: clean(message),
        },
        CaptionError::InvalidOutput { message } => CaptionError::InvalidOutput {
            message: clean(message),
        },
        CaptionError::Timeout => CaptionError::Timeout,
    }
}

/// A JSON answer as `T`; anything else is [`CaptionError::InvalidOutput`].
pub fn parse<T: serde::de::DeserializeOwned>(server: &str, body: &[u8]) -> Result<T, CaptionError> {
    serde_json::from_slice(body).map_err(|e| CaptionError::InvalidOutput {
        message: format!("{server} answered with unexpected json: {e}"),
    })
}

/// The media type of a dataset file, by extension (`None`: not one a
/// vision model reads).
pub fn media_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        _ => return None,
    })
}

/// Reads a file for a request (on the blocking pool).
pub async fn read_file(path: &Path) -> Result<Vec<u8>, CaptionError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| CaptionError::Rejected {
            message: format!("cannot read {}: {e}", path.display()),
        })
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `data:<type>;base64,<bytes>`: how an image goes to an OpenAI-compatible
/// server, never as a link the server would fetch.
pub fn data_url(media_type: &str, bytes: &[u8]) -> String {
    format!("data:{media_type};base64,{}", base64(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_by_extension() {
        assert_eq!(media_type(Path::new("a/B.JPG")), Some("image/jpeg"));
        assert_eq!(media_type(Path::new("clip.mov")), Some("video/quicktime"));
        assert_eq!(media_type(Path::new("notes.txt")), None);
        assert_eq!(data_url("image/png", b"abc"), "data:image/png;base64,YWJj");
        let error = CaptionError::Rejected {
            message: "401: Incorrect API key provided: sk-secret-1".into(),
        };
        assert_eq!(
            redact(error, Some("sk-secret-1")).to_string(),
            "caption backend rejected the image: 401: Incorrect API key provided: [redacted]"
        );
    }
}
