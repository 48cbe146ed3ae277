//! What every Trainyard service shares: configuration, the NATS topology
//! (subjects, streams, consumers and KV buckets as typed constructors), the
//! stage runtime that owns acks, the artifact store, delivery destinations,
//! events, the trainer subprocess constructor, telemetry and shutdown; and,
//! re-exported from `trainyard-proto`, [`redact`]: how a URL may be shown.
//!
//! Services depend on this crate and on `trainyard-proto`; nothing here knows
//! about a particular stage.

pub mod auth;
pub mod claim;
pub mod config;
pub mod destination;
pub mod events;
pub mod fleet;
pub mod guard;
pub mod manifest;
pub mod nats;
pub mod netguard;
pub mod process;
pub mod registry;
pub mod retry;
pub mod runtime;
pub mod secrets;
pub mod serve;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod topology;

pub use config::Config;
/// Showing URLs without their secrets (lives in proto, the bottom of the graph).
pub use trainyard_proto::redact;

/// Milliseconds since the Unix epoch, the unit of every timestamp we store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `2026-12-01T20:31:11.123Z` for a Unix time in milliseconds (webhook
/// timestamps, a scheduled retry's `Nats-Schedule: @at …`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
