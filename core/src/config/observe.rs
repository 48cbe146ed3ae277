//! The `[webhooks]` and `[telemetry]` sections: what the fleet tells the outside.

use super::REDACTED;
use serde::{Deserialize, Serialize};

/// The `[webhooks]` table: whether and how the coordinators sign and post
/// job webhooks (`JobSpec.webhook`). Each tenant signs with its own secret,
/// made and kept by the coordinators (`GetWebhookSecret`); none is set here.
/// Debug output and `--print-config` never show the legacy `secret`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Post job webhooks. Off: a job asking for one is refused at submit.
    pub enabled: bool,
    /// No longer used: one fleet-wide secret let any tenant's webhooks be
    /// verified with (and so forged by) anyone holding it. Kept so older
    /// configs load; a non-empty value turns webhooks on, as it did, and the
    /// coordinator warns at start-up that the value itself is ignored.
    pub secret: String,
    /// Seconds a tenant's previous secret keeps signing after a rotation
    /// (both signatures are sent meanwhile), for receivers to switch.
    pub secret_overlap_secs: u64,
    /// Allow private, loopback and link-local webhook targets. Only for
    /// tests and fleets whose receivers are on a private network.
    pub allow_private_addresses: bool,
    /// Seconds one POST may take, connection included.
    pub timeout_secs: u64,
    /// POSTs of one webhook, the first included, before it is given up.
    pub max_attempts: u32,
    /// Delay before the second POST, in milliseconds; doubled for each
    /// further one. A receiver's `Retry-After` is a lower bound.
    pub initial_delay_ms: u64,
    /// No delay is longer than this, in milliseconds.
    pub max_delay_ms: u64,
    /// A webhook whose state change is older than this (seconds) is given
    /// up whatever the attempts left.
    pub max_age_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            secret: String::new(),
            secret_overlap_secs: 86_400,
            allow_private_addresses: false,
            timeout_secs: 10,
            max_attempts: 8,
            initial_delay_ms: 30_000,
            max_delay_ms: 1_200_000,
            max_age_secs: 7200,
        }
    }
}

impl WebhooksConfig {
    /// Webhooks are on: `enabled`, or a legacy `secret` set.
    pub fn is_enabled(&self) -> bool {
        self.enabled || !self.secret.is_empty()
    }

    /// A copy safe to show: the secret, when set, is [`REDACTED`].
    pub fn redacted(&self) -> WebhooksConfig {
        let mut shown = self.clone();
        if !shown.secret.is_empty() {
            shown.secret = REDACTED.into();
        }
        shown
    }
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("WebhooksConfig")
            .field("enabled", &shown.enabled)
            .field("secret", &shown.secret)
            .field("secret_overlap_secs", &shown.secret_overlap_secs)
            .field("allow_private_addresses", &shown.allow_private_addresses)
            .field("timeout_secs", &shown.timeout_secs)
            .field("max_attempts", &shown.max_attempts)
            .field("initial_delay_ms", &shown.initial_delay_ms)
            .field("max_delay_ms", &shown.max_delay_ms)
            .field("max_age_secs", &shown.max_age_secs)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// "text" or "json".
    pub log_format: String,
    /// A `tracing` filter, e.g. "info,trainyard_worker=debug".
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint (e.g. "http://otel-collector:4317"); empty
    /// means no trace or metric export. `OTEL_EXPORTER_OTLP_ENDPOINT` overrides.
    pub otlp_endpoint: String,
    /// Port of the Prometheus scrape endpoint (`/metrics`); 0 = off.
    pub metrics_port: u16,
    /// Address the scrape endpoint listens on.
    pub metrics_host: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            log_filter: "info".into(),
            otlp_endpoint: String::new(),
            metrics_port: 0,
            metrics_host: "0.0.0.0".into(),
        }
    }
}
