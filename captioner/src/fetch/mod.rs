//! The one guarded HTTP client for every URL a user gives us.
//!
//! Dataset URLs are attacker-controlled input fetched from inside our
//! network, so every download goes through [`GuardedClient`]: http(s) only;
//! no private, loopback, link-local, CGNAT or otherwise non-public address,
//! checked *after* DNS resolution by a custom resolver, on literal-IP URLs,
//! and again on every redirect hop; a bounded number of redirects; connect
//! and total time limits; and a byte limit enforced on the bytes actually
//! received (a missing or lying `Content-Length` does not help). System
//! proxies are ignored, because through a proxy the resolver would only ever
//! see the proxy's address.
//!
//! Errors say whether trying again later can help ([`FetchError::is_retryable`])
//! and how long the server asked us to wait ([`FetchError::retry_after`]);
//! this module never retries by itself — the stage runtime owns redelivery.
//! URLs in error messages have their query string and credentials removed,
//! because presigned URLs carry secrets there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use reqwest::{StatusCode, Url};
use tokio::io::AsyncWriteExt;

use trainyard_core::redact::{display, display_url};

pub use trainyard_core::netguard::is_forbidden_ip;
use trainyard_core::netguard::{Guard, GuardedResolver, Refusal};

/// Limits for every fetch. The default refuses private addresses.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Allow private, loopback and link-local targets. Only for development
    /// and tests, which serve datasets on loopback.
    pub allow_private_addresses: bool,
    /// Host names (compared case-insensitively, exactly as written in the
    /// URL) exempt from the address check, for an operator's own internal
    /// mirror. Empty by default; never fill it from user input.
    pub trusted_hosts: Vec<String>,
    /// Largest body accepted, counted on the received bytes.
    pub max_bytes: u64,
    pub connect_timeout: Duration,
    /// Whole request, headers and body.
    pub total_timeout: Duration,
    pub max_redirects: usize,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            allow_private_addresses: false,
            trusted_hosts: Vec::new(),
            max_bytes: 2 * 1024 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30 * 60),
            max_redirects: 5,
        }
    }
}

/// A fetch failure. URLs are shown without query string or credentials.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid url {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("url {url} uses scheme {scheme:?}; only http and https are allowed")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("url {url} points at host {host}, which is not a public address")]
    ForbiddenAddress {
        url: String,
        host: String,
        addr: Option<std::net::IpAddr>,
    },
    #[error("url {url} redirected more than {max} times")]
    TooManyRedirects { url: String, max: usize },
    #[error("url {url} answered http status {status}")]
    Status {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("url {url} returned more than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("could not connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("fetching {url} timed out")]
    Timeout { url: String },
    #[error("transfer from {url} failed")]
    Transfer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("could not write download to {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("http client setup failed")]
    Client(#[source] reqwest::Error),
}

impl FetchError {
    /// True when the same fetch may succeed later: connection failures,
    /// timeouts, interrupted transfers, local disk trouble, and HTTP 408,
    /// 425, 429 and 5xx. Everything else (bad URL, forbidden address, other
    /// 4xx, too large) is the user's input and will fail again.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Connect { .. }
            | FetchError::Timeout { .. }
            | FetchError::Transfer { .. }
            | FetchError::Io { .. } => true,
            FetchError::Status { status, .. } => is_retryable_status(*status),
            FetchError::InvalidUrl { .. }
            | FetchError::UnsupportedScheme { .. }
            | FetchError::ForbiddenAddress { .. }
            | FetchError::TooManyRedirects { .. }
            | FetchError::TooLarge { .. }
            | FetchError::Client(_) => false,
        }
    }

    /// The delay a 429 or 503 response asked for in `Retry-After`
    /// (delta-seconds or an HTTP date).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Maps a reqwest error, recovering the guard's own refusals from the
    /// source chain (they arrive wrapped in connect or redirect errors).
    fn from_reqwest(url: String, err: reqwest::Error) -> Self {
        // reqwest errors print the full URL, query string included.
        let err = err.without_url();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = source {
            if let Some(refusal) = e.downcast_ref::<Refusal>() {
                return Self::from_refusal(url, refusal.clone());
            }
            source = e.source();
        }
        if err.is_timeout() {
            FetchError::Timeout { url }
        } else if err.is_connect() {
            FetchError::Connect { url, source: err }
        } else {
            FetchError::Transfer { url, source: err }
        }
    }

    fn from_refusal(url: String, refusal: Refusal) -> Self {
        match refusal {
            Refusal::Scheme(scheme) => FetchError::UnsupportedScheme { url, scheme },
            Refusal::NoHost => FetchError::InvalidUrl {
                url,
                reason: "no host".into(),
            },
            Refusal::Forbidden { host, addr } => FetchError::ForbiddenAddress { url, host, addr },
            Refusal::TooManyRedirects(max) => FetchError::TooManyRedirects { url, max },
        }
    }
}

fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..=599).contains(&status)
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub path: PathBuf,
    /// Bytes received and written.
    pub bytes: u64,
    /// The URL after redirects (may carry secrets in its query; do not log).
    pub final_url: Url,
    pub content_type: Option<String>,
}

/// The guarded client. Cheap to clone; build one per process and share it.
#[derive(Debug, Clone)]
pub struct GuardedClient {
    client: reqwest::Client,
    guard: Guard,
    policy: Arc<FetchPolicy>,
}

impl GuardedClient {
    pub fn new(policy: FetchPolicy) -> Result<Self, FetchError> {
        let guard = Guard {
            allow_private: policy.allow_private_addresses,
            trusted_hosts: policy
                .trusted_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            max_redirects: policy.max_redirects,
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("trainyard-captioner/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .dns_resolver(GuardedResolver(guard.clone()))
            .redirect(guard.clone().redirect_policy())
            .connect_timeout(policy.connect_timeout)
            .timeout(policy.total_timeout)
            .build()
            .map_err(FetchError::Client)?;
        Ok(Self {
            client,
            guard,
            policy: Arc::new(policy),
        })
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// Downloads `url` to `dest`, streaming. The body goes to a `.part`
    /// file renamed into place only when complete, so `dest` never holds a
    /// partial download; on any error the partial file is removed.
    pub async fn download_to_file(&self, url: &str, dest: &Path) -> Result<Downloaded, FetchError> {
        let parsed = Url::parse(url).map_err(|e| FetchError::InvalidUrl {
            url: display_url(url),
            reason: e.to_string(),
        })?;
        let shown = display(&parsed);
        self.guard
            .check_url(&parsed)
            .map_err(|r| FetchError::from_refusal(shown.clone(), r))?;

        let response = self
            .client
            .get(parsed)
            .send()
            .await
            .map_err(|e| FetchError::from_reqwest(shown.clone(), e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: shown,
                status: status.as_u16(),
                retry_after: retry_after(&response, status),
            });
        }
        let limit = self.policy.max_bytes;
        if response.content_length().is_some_and(|len| len > limit) {
            return Err(FetchError::TooLarge { url: shown, limit });
        }
        let final_url = response.url().clone();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);

        let part = part_path(dest);
        let result = stream_body(response, &part, limit, &shown).await;
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(err) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(err);
            }
        };
        tokio::fs::rename(&part, dest)
            .await
            .map_err(|source| FetchError::Io {
                path: dest.to_owned(),
                source,
            })?;
        tracing::debug!(url = %shown, bytes, "downloaded");
        Ok(Downloaded {
            path: dest.to_owned(),
            bytes,
            final_url,
            content_type,
        })
    }
}

async fn stream_body(
    response: reqwest::Response,
    part: &Path,
    limit: u64,
    shown: &str,
) -> Result<u64, FetchError> {
    let io_err = |source| FetchError::Io {
        path: part.to_owned(),
        source,
    };
    let mut file = tokio::fs::File::create(part).await.map_err(io_err)?;
    let mut stream = response.bytes_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| FetchError::from_reqwest(shown.to_owned(), e))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(FetchError::TooLarge {
                url: shown.to_owned(),
                limit,
            });
        }
        file.write_all(&chunk).await.map_err(io_err)?;
    }
    file.flush().await.map_err(io_err)?;
    file.sync_all().await.map_err(io_err)?;
    Ok(written)
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// The delay a 429 or 503 `response` asks for in `Retry-After` (shared
/// with the caption backends).
pub(crate) fn retry_after(response: &reqwest::Response, status: StatusCode) -> Option<Duration> {
    if !matches!(status.as_u16(), 429 | 503) {
        return None;
    }
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    parse_retry_after(value, SystemTime::now())
}

/// `Retry-After` is either delta-seconds or an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
