//! What a failed Hub request means: [`HubApiError`], read from the
//! answer's status, `X-Error-Code` and `Retry-After`.

use reqwest::StatusCode;
use reqwest::header;
use std::time::Duration;

/// Why a Hub request failed.
#[derive(Debug, thiserror::Error)]
pub enum HubApiError {
    #[error("invalid hub endpoint {0:?}")]
    InvalidEndpoint(String),
    /// 401/403: the token is missing, wrong, or may not do this.
    #[error("the hub refused the token (http {status}{})", code_suffix(code))]
    Auth { status: u16, code: Option<String> },
    #[error("{what} not found on the hub{}", code_suffix(code))]
    NotFound { what: String, code: Option<String> },
    /// The branch moved past the parent commit (412, or 409 on commit).
    #[error("the branch moved while committing (http {status})")]
    Conflict { status: u16 },
    #[error("the hub is rate limiting requests (http 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("the hub answered http {status} for {what}")]
    Server {
        status: u16,
        what: String,
        retry_after: Option<Duration>,
    },
    /// Any other refusal (400, 413, 422…): trying again will not help.
    #[error("the hub refused {what} (http {status}): {message}")]
    Refused {
        status: u16,
        what: String,
        message: String,
    },
    #[error("cannot reach the hub for {what}: {message}")]
    Network { what: String, message: String },
    #[error("unexpected answer from the hub for {what}: {message}")]
    Protocol { what: String, message: String },
    #[error("local file {path}: {message}")]
    Io { path: String, message: String },
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_deref()
        .map(|c| format!(", {c}"))
        .unwrap_or_default()
}

impl HubApiError {
    /// A local file at `path` could not be read.
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        HubApiError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    pub fn is_auth(&self) -> bool {
        matches!(self, HubApiError::Auth { .. })
    }

    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HubApiError::RateLimited { .. }
                | HubApiError::Server { .. }
                | HubApiError::Network { .. }
                | HubApiError::Protocol { .. }
                | HubApiError::Io { .. }
        )
    }

    /// How long the Hub asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HubApiError::RateLimited { retry_after } | HubApiError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error a non-success answer means.
pub(super) async fn error_of(response: reqwest::Response, what: &str) -> HubApiError {
    let status = response.status();
    let code = response
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let wait = retry_after(&response);
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            if !matches!(
                code.as_deref(),
                Some("RepoNotFound" | "RevisionNotFound" | "EntryNotFound")
            ) =>
        {
            HubApiError::Auth {
                status: status.as_u16(),
                code,
            }
        }
        StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            HubApiError::NotFound {
                what: what.to_owned(),
                code,
            }
        }
        StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => HubApiError::Conflict {
            status: status.as_u16(),
        },
        StatusCode::TOO_MANY_REQUESTS => HubApiError::RateLimited { retry_after: wait },
        s if s.is_server_error() => HubApiError::Server {
            status: s.as_u16(),
            what: what.to_owned(),
            retry_after: wait,
        },
        s => {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(body);
            HubApiError::Refused {
                status: s.as_u16(),
                what: what.to_owned(),
                message: message.chars().take(300).collect(),
            }
        }
    }
}
