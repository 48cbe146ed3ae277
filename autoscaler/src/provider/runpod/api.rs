//! One GraphQL call to RunPod, and what its failure means: the API key in
//! the `Authorization` header only (never in the URL, which `reqwest`
//! errors print), redacted from every message that leaves this module.

use super::model::{ErrorMeaning, meaning};
use std::time::{Duration, SystemTime};

/// The API key; its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        Self(key)
    }

    /// `text` with every occurrence of the key replaced.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "<redacted>")
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why one call failed (messages already redacted).
#[derive(Clone, Debug, PartialEq)]
pub enum CallError {
    /// The request may or may not have been carried out: a timeout, a
    /// connection error, 429 or 5xx (with the server's `Retry-After`).
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// 401 or 403: the key is wrong or lacks access.
    Auth(String),
    /// GraphQL `errors[]`, read by [`meaning`] (the first decides).
    Graphql {
        meaning: ErrorMeaning,
        message: String,
    },
    /// An answer we cannot read.
    Malformed(String),
}

impl CallError {
    pub fn message(&self) -> &str {
        match self {
            CallError::Transient { message, .. }
            | CallError::Auth(message)
            | CallError::Graphql { message, .. }
            | CallError::Malformed(message) => message,
        }
    }

    /// Whether the same call may succeed if sent again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CallError::Transient { .. }
                | CallError::Graphql {
                    meaning: ErrorMeaning::Transient,
                    ..
                }
        )
    }
}

/// A GraphQL endpoint with its key.
#[derive(Clone, Debug)]
pub struct Graphql {
    http: reqwest::Client,
    url: String,
    key: ApiKey,
}

impl Graphql {
    pub fn new(url: String, key: ApiKey, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http, url, key })
    }

    pub fn key(&self) -> &ApiKey {
        &self.key
    }

    /// Sends `query` with `variables` once; the `data` object on success.
    pub async fn call(
        &self,
        query: &str,
        variables: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        let body = serde_json::to_vec(&serde_json::json!({
            "query": query,
            "variables": variables,
        }))
        .map_err(|e| CallError::Malformed(e.to_string()))?;
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {}", self.key.0),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| CallError::Transient {
                message: self.key.redact(&e.without_url().to_string()),
                retry_after: None,
            })?;
        let status = response.status();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let bytes = response.bytes().await.map_err(|e| CallError::Transient {
            message: self.key.redact(&e.without_url().to_string()),
            retry_after: None,
        })?;
        let text = self.key.redact(&String::from_utf8_lossy(&bytes));
        let text: String = text.chars().take(500).collect();
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(CallError::Auth(format!("{status}: {text}")));
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(CallError::Transient {
                message: format!("{status}: {text}"),
                retry_after,
            });
        }
        let parsed: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| CallError::Malformed(format!("{status}: {text}")))?;
        if let Some(first) = parsed
            .get("errors")
            .and_then(|e| e.as_array())
            .and_then(|e| e.first())
        {
            let message = self.key.redact(
                first
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("graphql error"),
            );
            let meaning = match first.pointer("/extensions/code").and_then(|c| c.as_str()) {
                Some("UNAUTHENTICATED" | "FORBIDDEN") => ErrorMeaning::Auth,
                Some("INTERNAL_SERVER_ERROR") if meaning(&message) == ErrorMeaning::Other => {
                    ErrorMeaning::Transient
                }
                _ => meaning(&message),
            };
            return Err(match meaning {
                ErrorMeaning::Auth => CallError::Auth(message),
                meaning => CallError::Graphql { meaning, message },
            });
        }
        if !status.is_success() {
            return Err(CallError::Malformed(format!("{status}: {text}")));
        }
        parsed
            .get("data")
            .cloned()
            .filter(|d| !d.is_null())
            .ok_or_else(|| CallError::Malformed(format!("no data: {text}")))
    }
}

/// `Retry-After`: delta-seconds or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows() {
        let key = ApiKey::new("rpa_secret".into());
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(key.redact("bad key rpa_secret!"), "bad key <redacted>!");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert(reqwest::header::RETRY_AFTER, later.parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
    }
}
