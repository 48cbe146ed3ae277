//! Logging set-up shared by every binary: human-readable lines by default,
//! one JSON object per line with `TY_LOG_FORMAT=json` (or `telemetry.log_format`).

use crate::config::TelemetryConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call twice (the second call is a no-op),
/// which in-process tests rely on.
pub fn init(service: &str, config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_env("TY_LOG")
        .unwrap_or_else(|_| EnvFilter::new(config.log_filter.clone()));
    let json = std::env::var("TY_LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(config.log_format == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "telemetry initialised");
    }
}
