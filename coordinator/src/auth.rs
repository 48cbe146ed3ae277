//! Who is calling: a bearer token to a tenant, for gRPC and the NATS API
//! alike. The fleet keeps only each token's SHA-256 (`[coordinator.tokens]`
//! keys `sha256:<hex>`); a presented token is hashed and compared with every
//! configured digest in constant time. A peer that fails too often is
//! refused for the rest of the minute, before its token is even looked at.

use crate::api::ApiError;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use trainyard_core::auth::{parse_token_key, token_digest};
use trainyard_proto::TenantId;

/// The window failures are counted in.
const WINDOW: Duration = Duration::from_secs(60);
/// Most peers whose failures are tracked at once; past it new peers share
/// one count, so a flood of addresses cannot grow the table without end.
const MAX_PEERS: usize = 16_384;
/// The shared count of peers past [`MAX_PEERS`].
const OVERFLOW: &str = "(other peers)";

/// Maps bearer tokens to tenants, and limits failed attempts per peer.
#[derive(Clone)]
pub struct Auth {
    digests: Arc<Vec<([u8; 32], TenantId)>>,
    limiter: Arc<FailureLimiter>,
}

impl Auth {
    /// From `[coordinator.tokens]` (keys checked by the config's
    /// validation; any other is skipped) and the failures allowed per
    /// peer per minute (0: no limit).
    pub fn new(tokens: &BTreeMap<String, String>, failures_per_minute: u32) -> Self {
        Self {
            digests: Arc::new(
                tokens
                    .iter()
                    .filter_map(|(key, tenant)| {
                        Some((parse_token_key(key)?, TenantId::parse(tenant).ok()?))
                    })
                    .collect(),
            ),
            limiter: Arc::new(FailureLimiter::new(failures_per_minute)),
        }
    }

    /// The tenant of an `authorization` header value (`Bearer <token>`)
    /// sent by `peer` (an address, or another stable name of the caller).
    pub fn tenant(&self, header: Option<&str>, peer: &str) -> Result<TenantId, ApiError> {
        self.limiter.check(peer)?;
        let found = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .and_then(|token| self.lookup(token.trim()));
        match found {
            Some(tenant) => Ok(tenant),
            None => {
                self.limiter.failed(peer);
                tracing::warn!(peer, "authentication failed");
                Err(ApiError::Unauthenticated)
            }
        }
    }

    /// Every digest is compared, each in constant time: how long a lookup
    /// takes says nothing about which (or whether a) token matched.
    fn lookup(&self, token: &str) -> Option<TenantId> {
        let digest = token_digest(token);
        let mut found = None;
        for (known, tenant) in self.digests.iter() {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(tenant.clone());
            }
        }
        found
    }
}

/// Failed attempts per peer in a fixed one-minute window.
struct FailureLimiter {
    per_minute: u32,
    peers: Mutex<HashMap<String, Window>>,
}

struct Window {
    started: Instant,
    failures: u32,
}

impl FailureLimiter {
    fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Window>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses a peer that used up its failures in the current window.
    fn check(&self, peer: &str) -> Result<(), ApiError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let peers = self.lock();
        let Some(window) = peers.get(peer).or_else(|| peers.get(OVERFLOW)) else {
            return Ok(());
        };
        let elapsed = window.started.elapsed();
        if elapsed < WINDOW && window.failures >= self.per_minute {
            let retry = (WINDOW - elapsed).as_secs().max(1);
            return Err(ApiError::RateLimited(format!(
                "too many failed authentications from this client; retry in {retry}s"
            )));
        }
        Ok(())
    }

    fn failed(&self, peer: &str) {
        if self.per_minute == 0 {
            return;
        }
        let mut peers = self.lock();
        let now = Instant::now();
        if peers.len() >= MAX_PEERS && !peers.contains_key(peer) {
            peers.retain(|_, w| now.duration_since(w.started) < WINDOW);
        }
        let key = if peers.len() >= MAX_PEERS && !peers.contains_key(peer) {
            OVERFLOW
        } else {
            peer
        };
        let window = peers.entry(key.to_string()).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_core::auth::token_key;

    fn auth(per_minute: u32) -> Auth {
        Auth::new(
            &[
                (token_key("ty_acme"), "acme".to_string()),
                (token_key("ty_globex"), "globex".to_string()),
            ]
            .into(),
            per_minute,
        )
    }

    #[test]
    fn a_listed_token_is_its_tenant_and_nothing_else_is() {
        let auth = auth(0);
        assert_eq!(
            auth.tenant(Some("Bearer ty_acme"), "p").unwrap().as_str(),
            "acme"
        );
        assert_eq!(
            auth.tenant(Some("bearer ty_globex "), "p")
                .unwrap()
                .as_str(),
            "globex"
        );
        for header in [
            None,
            Some("ty_acme"),
            Some("Bearer "),
            Some("Bearer ty_acm"),
            // The stored digest is not a token.
            Some(&*format!("Bearer {}", token_key("ty_acme"))),
        ] {
            let err = auth.tenant(header, "p").unwrap_err();
            assert!(matches!(err, ApiError::Unauthenticated), "{header:?}");
        }
    }

    #[test]
    fn a_peer_that_keeps_failing_is_refused_and_others_are_not() {
        let auth = auth(3);
        for _ in 0..3 {
            let err = auth.tenant(Some("Bearer guess"), "10.0.0.9").unwrap_err();
            assert!(matches!(err, ApiError::Unauthenticated));
        }
        // Refused now, even with a good token: the guessing stops here.
        let err = auth.tenant(Some("Bearer ty_acme"), "10.0.0.9").unwrap_err();
        assert!(matches!(err, ApiError::RateLimited(_)), "{err}");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(auth.tenant(Some("Bearer ty_acme"), "10.0.0.10").is_ok());
    }
}
