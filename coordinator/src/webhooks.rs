//! Job webhooks: a job whose spec has a `webhook` is told by HTTP POST when
//! it changes state, instead of polling.
//!
//! Delivery is a loop of its own in every coordinator replica, on the
//! shared durable consumer `ty-webhooks` of `TY_EVENTS` filtered to state
//! events (`ty.event.*.*.state`), so each state event is handled by one
//! replica and survives a crash (an unacked event is redelivered after the
//! consumer's ack wait).
//!
//! The event is only a hint ("look at job X"): anyone who can publish on
//! the bus can publish one. What is sent comes from the job record the
//! coordinators store ([`held_state`]): the event's state is posted only
//! when the record is in it or, for a state before the final ones, has
//! passed through it (its `times`); state, outputs, error and timestamp in
//! the body are the record's. An event for a job that does not exist, for
//! a state the record never held, or naming another tenant than the
//! record's, posts nothing. A job with no webhook, or whose `events` filter
//! does not take this change, is acked at once. Otherwise the POST goes
//! out through the address guard
//! (no private, loopback or link-local target after DNS, unless
//! `[webhooks] allow_private_addresses`; no redirects followed):
//!
//! - 2xx → ack;
//! - 408, 425, 429, 5xx, connection errors and timeouts → NAK with the
//!   delay `initial_delay_ms × 2^(k-1)` capped at `max_delay_ms` (a
//!   `Retry-After` is a lower bound), until `max_attempts` deliveries of the
//!   event (each a POST, or a coordinator lost in the middle of one) or
//!   `max_age_secs` after the state change;
//! - any other status, a refused address, or out of attempts → given up:
//!   an error log, a `log` event on the job ("webhook delivery failed: …")
//!   and TERM.
//!
//! Requests are signed per Standard Webhooks with the job's tenant's own
//! secret ([`secrets`]): `webhook-id` (stable per job, webhook type and
//! state, so a receiver can drop retried duplicates), `webhook-timestamp`
//! (unix seconds of this attempt) and
//! `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{ts}.{body}")>`,
//! one such entry per signing secret, space-separated (two during a
//! rotation's overlap). The fleet-wide `[webhooks] secret` of older configs
//! signs nothing.
//! The body never holds a secret: only ids, name, labels, state, error and
//! outputs. Each POST runs in a `webhook.deliver` span, a child of the
//! state event's trace context, and sends that span's `traceparent`.
//!
//! A replica posts up to [`Deliverer::CONCURRENCY`] events at once, pulling
//! one only when a slot is free; events waiting for a retry stay pending on
//! the consumer (up to `topology::WEBHOOKS_MAX_ACK_PENDING`). As with other
//! webhook senders, order is not guaranteed: a receiver orders a job's
//! states by the body's `timestamp` (or its state) and drops repeats by
//! `webhook-id`.

pub mod secrets;
mod sign;

pub use sign::{Secret, SecretError, hmac_sha256, signature};

pub use secrets::{SecretStore, SecretStoreError, TenantSecrets};

mod message;
pub use message::{COMPLETED, EVENTS, Outgoing, STATE, held_state, messages_for, state_name};

use crate::repo::{JobRepo, RepoError};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use prost::Message;
use reqwest::Url;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use trainyard_core::config::{RetryPolicyConfig, WebhooksConfig};
use trainyard_core::events::EventSink;
use trainyard_core::netguard::{self, Guard, GuardedResolver, Refusal};
use trainyard_core::redact;
use trainyard_core::retry;
use trainyard_core::telemetry::propagation::{self, JobAttrs};
use trainyard_core::topology::subject;
use trainyard_proto::v1::{JobEvent, JobRecord, JobState, Stage, job_event::Kind};
use trainyard_proto::{JobId, TenantId};

/// The address guard of webhook targets: no redirects, private
/// addresses only when allowed.
pub(crate) fn guard(allow_private: bool) -> Guard {
    Guard {
        allow_private,
        trusted_hosts: Vec::new().into(),
        max_redirects: 0,
    }
}

/// How one POST went.
#[derive(Debug)]
enum Outcome {
    Delivered,
    /// Worth another try, after at least this long.
    Retry {
        why: String,
        after: Duration,
    },
    /// Will fail again: give up now.
    Refused(String),
}

/// Posts webhooks for the state events of the coordinators' consumer.
#[derive(Clone)]
pub struct Deliverer {
    repo: JobRepo,
    js: jetstream::Context,
    client: reqwest::Client,
    guard: Guard,
    secrets: SecretStore,
    policy: retry::Policy,
    max_age: Duration,
    /// Signs the outputs' download URLs a `job.completed` body carries.
    download_urls: Option<std::sync::Arc<crate::downloads::DownloadUrls>>,
}

impl Deliverer {
    /// `job.completed` bodies carry download URLs signed by `urls`.
    pub fn with_download_urls(
        mut self,
        urls: std::sync::Arc<crate::downloads::DownloadUrls>,
    ) -> Self {
        self.download_urls = Some(urls);
        self
    }

    /// `None` when webhooks are off. Each delivery is signed with its
    /// tenant's secrets from `secrets`.
    pub fn new(
        config: &WebhooksConfig,
        repo: JobRepo,
        js: jetstream::Context,
        secrets: SecretStore,
    ) -> anyhow::Result<Option<Deliverer>> {
        if !config.is_enabled() {
            return Ok(None);
        }
        warn_legacy_secret(config);
        let client = reqwest::Client::builder()
            .user_agent(concat!("trainyard-webhooks/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .dns_resolver(GuardedResolver(guard(config.allow_private_addresses)))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .build()?;
        let policy = retry::Policy::from_config(&RetryPolicyConfig {
            initial_delay_ms: config.initial_delay_ms,
            multiplier: 2.0,
            max_delay_ms: config.max_delay_ms,
            max_attempts: config.max_attempts,
            jitter: 0.1,
            non_retryable: Vec::new(),
        });
        Ok(Some(Deliverer {
            repo,
            js,
            client,
            guard: guard(config.allow_private_addresses),
            secrets,
            policy,
            max_age: Duration::from_secs(config.max_age_secs.max(1)),
            download_urls: None,
        }))
    }

    /// The consumer's ack wait: one POST's timeout and a margin.
    pub fn ack_wait(config: &WebhooksConfig) -> Duration {
        Duration::from_secs(config.timeout_secs.max(1) + 5)
    }

    /// Handles state events until `shutdown`, up to [`Self::CONCURRENCY`] at
    /// once, each pulled only when a slot is free (nothing waits in a
    /// client buffer while its ack wait runs, so the delivery count is the
    /// number of real attempts). An event being posted when shutdown comes
    /// is left unacked, so another replica (or this one, restarted) posts it
    /// after the ack wait.
    pub async fn run(
        self,
        consumer: PullConsumer,
        shutdown: CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let this = std::sync::Arc::new(self);
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(Self::CONCURRENCY));
        let tracker = tokio_util::task::TaskTracker::new();
        while let Some((message, permit)) =
            trainyard_core::runtime::pull_in_slot(&consumer, &slots, &shutdown).await
        {
            let this = this.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(
                async move {
                    let ack = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ack = this.handle(&message) => ack,
                    };
                    if let Err(error) = message.ack_with(ack).await {
                        tracing::warn!(%error, "could not ack a state event");
                    }
                    drop(permit);
                }
                .with_current_subscriber(),
            );
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Webhooks posted at once by one coordinator: a slow or silent
    /// receiver holds one slot, not the whole fleet's deliveries.
    pub const CONCURRENCY: usize = 8;

    async fn handle(&self, message: &jetstream::Message) -> AckKind {
        let Ok(event) = JobEvent::decode(message.payload.clone()) else {
            tracing::error!(subject = %message.subject, "undecodable state event skipped");
            return AckKind::Term;
        };
        let Some(Kind::State(change)) = &event.kind else {
            return AckKind::Ack;
        };
        let (Ok(tenant), Ok(job)) = (TenantId::parse(&event.tenant), JobId::parse(&event.job_id))
        else {
            return AckKind::Term;
        };
        let info = message.info().ok();
        let delivered = info.as_ref().map_or(1, |i| i.delivered.max(1) as u32);
        let record = match self.repo.get(&tenant, &job).await {
            Ok(found) => found.record,
            // Removed by its TTL (nobody left to tell), or never was.
            Err(RepoError::NotFound(_)) => {
                tracing::debug!(%job, "state event for no stored job; nothing sent");
                return AckKind::Ack;
            }
            Err(error) => {
                tracing::warn!(%job, %error, "cannot read a job for its webhook");
                return AckKind::Nak(Some(Duration::from_secs(2)));
            }
        };
        let claimed = change.state();
        let at_ms = match held_state(&record, claimed) {
            Some(at) if record.tenant == tenant.as_str() && record.job_id == job.as_str() => {
                if at > 0 { at } else { event.at_ms }
            }
            _ => {
                tracing::warn!(%job, %tenant, claimed = claimed.as_str_name(), stored = record.state().as_str_name(),
                    "state event the job record does not bear out; no webhook sent");
                return AckKind::Ack;
            }
        };
        let mut record = record;
        // A retry may come after the uploader's URLs expired: not sent then.
        crate::downloads::drop_expired(&mut record, trainyard_core::now_ms());
        if claimed == JobState::Succeeded
            && let Some(urls) = &self.download_urls
        {
            urls.fill_from(&mut record, at_ms).await;
        }
        let outgoing = messages_for(&record, claimed, at_ms);
        if outgoing.is_empty() {
            return AckKind::Ack;
        }
        let secrets = match self.secrets.get_or_create(&tenant).await {
            Ok(secrets) => secrets,
            Err(error) => {
                tracing::warn!(%job, %error, "cannot read the tenant's webhook secret");
                return AckKind::Nak(Some(Duration::from_secs(2)));
            }
        };
        let url = record
            .spec
            .as_ref()
            .and_then(|s| s.webhook.as_ref())
            .map(|h| h.url.clone())
            .unwrap_or_default();
        let span = propagation::process_span(
            message.headers.as_ref(),
            &subject::destination(&message.subject),
            JobAttrs {
                job_id: Some(&event.job_id),
                tenant: Some(&event.tenant),
                stage: None,
                attempt: Some(delivered),
            },
        );
        async {
            for (i, hook) in outgoing.iter().enumerate() {
                if i > 0 {
                    // The ack wait covers one POST: restart it for the next.
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                match self.post(&url, hook, &secrets, delivered).await {
                    Outcome::Delivered => {
                        tracing::info!(%job, kind = hook.kind, attempt = delivered, "webhook delivered");
                    }
                    Outcome::Refused(why) => {
                        return self.give_up(&tenant, &job, &record, &why).await;
                    }
                    Outcome::Retry { why, after } => {
                        let age = event_age(at_ms);
                        if delivered >= self.policy.max_attempts || age >= self.max_age {
                            let why = format!("{why} (gave up after {delivered} attempts)");
                            return self.give_up(&tenant, &job, &record, &why).await;
                        }
                        let delay = self.policy.delay(delivered, after);
                        tracing::warn!(%job, attempt = delivered, %why, retry_in_ms = delay.as_millis() as u64, "webhook not delivered; will retry");
                        return AckKind::Nak(Some(delay));
                    }
                }
            }
            AckKind::Ack
        }
        .instrument(span)
        .await
    }

    async fn post(
        &self,
        url: &str,
        message: &Outgoing,
        secrets: &TenantSecrets,
        attempt: u32,
    ) -> Outcome {
        let span = tracing::info_span!(
            "webhook.deliver",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            trainyard.webhook.type = message.kind,
            trainyard.attempt = attempt,
        );
        let parsed = match target(&self.guard, url) {
            Ok(u) => u,
            Err(why) => return Outcome::Refused(why.to_string()),
        };
        if let Some(host) = parsed.host_str() {
            span.record("server.address", host);
        }
        async {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let timestamp = now.as_secs();
            let keys = secrets.signing(i64::try_from(now.as_millis()).unwrap_or(i64::MAX));
            let mut request = self
                .client
                .post(parsed)
                .header("content-type", "application/json")
                .header("webhook-id", &message.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header(
                    "webhook-signature",
                    signature(&keys, &message.id, timestamp, &message.body),
                );
            let mut trace = async_nats::HeaderMap::new();
            propagation::inject_current_nats(&mut trace);
            for name in ["traceparent", "tracestate"] {
                if let Some(value) = trace.get(name) {
                    request = request.header(name, value.as_str());
                }
            }
            let outcome = classify(request.body(message.body.clone()).send().await);
            if let Some(status) = outcome.1 {
                tracing::Span::current().record("http.response.status_code", status);
            }
            outcome.0
        }
        .instrument(span)
        .await
    }

    async fn give_up(
        &self,
        tenant: &TenantId,
        job: &JobId,
        record: &JobRecord,
        why: &str,
    ) -> AckKind {
        let url = record
            .spec
            .as_ref()
            .and_then(|s| s.webhook.as_ref())
            .map(|h| redact::origin(&h.url))
            .unwrap_or_default();
        tracing::error!(%job, url = %url, %why, "webhook delivery failed; given up");
        EventSink::new(self.js.clone(), tenant.clone(), job.clone())
            .log(
                record.stage.try_into().unwrap_or(Stage::Unspecified),
                "webhook",
                &format!("webhook delivery failed: {why}"),
            )
            .await;
        AckKind::Term
    }
}

/// Says, at start-up, that a fleet-wide `[webhooks] secret` signs nothing.
fn warn_legacy_secret(config: &WebhooksConfig) {
    if !config.secret.is_empty() {
        tracing::warn!(
            "webhooks.secret is ignored: each tenant's webhooks are signed with the tenant's own \
             secret (GetWebhookSecret, `yard webhooks secret`); set webhooks.enabled = true and \
             remove webhooks.secret"
        );
    }
}

/// Why a webhook's URL is not posted to.
#[derive(Debug, thiserror::Error)]
enum TargetError {
    #[error("invalid url: {0}")]
    Invalid(#[from] url::ParseError),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The URL to post to, checked again at delivery: reqwest connects to a
/// literal IP without asking the resolver, so the guard looks at it here.
fn target(guard: &Guard, url: &str) -> Result<Url, TargetError> {
    let parsed = Url::parse(url)?;
    guard.check_url(&parsed)?;
    Ok(parsed)
}

fn event_age(at_ms: i64) -> Duration {
    Duration::from_millis(trainyard_core::now_ms().saturating_sub(at_ms).max(0) as u64)
}

/// Sorts a POST's result; the status, when there is one, goes second.
fn classify(result: Result<reqwest::Response, reqwest::Error>) -> (Outcome, Option<u16>) {
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(refusal) = netguard::refusal_of(&error) {
                let why = match refusal {
                    Refusal::Forbidden { host, .. } => {
                        format!("host {host} is not a public address")
                    }
                    other => other.to_string(),
                };
                return (Outcome::Refused(why), None);
            }
            let why = if error.is_timeout() {
                "timed out".to_string()
            } else if error.is_connect() {
                "could not connect".to_string()
            } else {
                "request failed".to_string()
            };
            return (
                Outcome::Retry {
                    why,
                    after: Duration::ZERO,
                },
                None,
            );
        }
    };
    let status = response.status().as_u16();
    let outcome = match status {
        200..=299 => Outcome::Delivered,
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            why: format!("http {status}"),
            after: retry_after(&response),
        },
        _ => Outcome::Refused(format!("http {status}")),
    };
    (outcome, Some(status))
}

/// `Retry-After` in delta-seconds (an HTTP date is ignored), at most an hour.
fn retry_after(response: &reqwest::Response) -> Duration {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, |s| Duration::from_secs(s.min(3600)))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_private_targets_are_refused_at_delivery_too() {
        let strict = guard(false);
        for url in [
            "http://127.0.0.1:9/x",
            "http://0x7f000001/x",
            "http://[::ffff:10.0.0.1]/x",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let why = target(&strict, url).unwrap_err();
            assert!(
                matches!(why, TargetError::Refused(Refusal::Forbidden { .. })),
                "{url}: {why}"
            );
        }
        assert!(matches!(
            target(&strict, "ftp://hooks.example/x"),
            Err(TargetError::Refused(Refusal::Scheme(_)))
        ));
        assert!(target(&strict, "https://hooks.example/x").is_ok());
        assert!(target(&guard(true), "http://127.0.0.1:9/x").is_ok());
    }
}
