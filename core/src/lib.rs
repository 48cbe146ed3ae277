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
pub mod nats;
pub mod netguard;
pub mod process;
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
