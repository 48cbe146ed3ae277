//! The pieces reqwest calls back into: a DNS resolver that drops forbidden
//! addresses, and a redirect policy that re-checks every hop.
//!
//! reqwest resolves host *names* through the resolver but connects to
//! literal-IP hosts directly, so literal IPs are checked here on every hop
//! (and by the client before the first request). Errors raised here travel
//! inside `reqwest::Error`; a client finds them again by walking the
//! error's source chain (see [`super::refusal_of`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::{Attempt, Policy};

use super::address::is_forbidden_ip;

/// What the guard needs to know, shared by the resolver and redirect policy.
#[derive(Debug, Clone)]
pub struct Guard {
    pub allow_private: bool,
    /// Lower-cased host names exempt from the address check.
    pub trusted_hosts: Arc<[String]>,
    pub max_redirects: usize,
}

/// Why a URL or hop was refused before any byte was sent to it.
#[derive(Debug, Clone)]
pub enum Refusal {
    Scheme(String),
    NoHost,
    Forbidden { host: String, addr: Option<IpAddr> },
    TooManyRedirects(usize),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Scheme(s) => write!(f, "scheme {s:?} is not allowed"),
            Refusal::NoHost => write!(f, "url has no host"),
            Refusal::Forbidden { host, .. } => write!(f, "host {host} is not a public address"),
            Refusal::TooManyRedirects(n) => write!(f, "more than {n} redirects"),
        }
    }
}

impl std::error::Error for Refusal {}

impl Guard {
    pub fn is_trusted(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.trusted_hosts.contains(&host)
    }

    /// Checks scheme and, for literal-IP hosts, the address itself. Names
    /// are left to the resolver, which sees what they resolve to.
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(Refusal::Scheme(other.to_owned())),
        }
        let host = url.host_str().ok_or(Refusal::NoHost)?;
        if self.allow_private || self.is_trusted(host) {
            return Ok(());
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(ip) if is_forbidden_ip(ip) => Err(Refusal::Forbidden {
                host: host.to_owned(),
                addr: Some(ip),
            }),
            _ => Ok(()),
        }
    }

    /// The redirect policy: a hop limit plus [`Guard::check_url`] on every
    /// target.
    pub fn redirect_policy(self) -> Policy {
        Policy::custom(move |attempt: Attempt| {
            // `previous` starts with the original URL, so it holds one more
            // entry than the number of redirects followed so far.
            if attempt.previous().len() > self.max_redirects {
                return attempt.error(Refusal::TooManyRedirects(self.max_redirects));
            }
            match self.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refusal) => attempt.error(refusal),
            }
        })
    }
}

/// Resolves with the system resolver, then keeps only public addresses
/// (unless private addresses are allowed or the host is trusted). reqwest
/// connects only to what this returns, so a DNS answer that changes between
/// check and connect cannot slip a private address through.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Guard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if guard.allow_private || guard.is_trusted(&host) {
                return Ok(Box::new(resolved.into_iter()) as Addrs);
            }
            let first = resolved.first().map(SocketAddr::ip);
            let public: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| !is_forbidden_ip(a.ip()))
                .collect();
            if public.is_empty() {
                tracing::warn!(host = %host, addr = ?first, "refused a host that resolves only to non-public addresses");
                return Err(Refusal::Forbidden { host, addr: first }.into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}
