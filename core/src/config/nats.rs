//! The `[nats]` section: how services reach the bus.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Seconds a task may go without an ack or in-progress ack before redelivery.
    pub ack_wait_secs: u64,
    /// Ceiling on deliveries of one task: no retry policy (`[retry.*]` or a
    /// job's) goes past it. The cap itself is the policy's `max_attempts`.
    pub max_deliver: u32,
    /// Tasks of one stage's consumer (one per training pool) handed out
    /// and not yet settled, all tenants together: a running task holds one
    /// of these; a task waiting for its retry does not (see
    /// `core::runtime`: a retry is acked and republished to run later).
    /// An existing consumer keeps the value it was created with.
    pub max_ack_pending: i64,
    /// Replicas of every stream and bucket (3 on a cluster).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub dedup_window_secs: u64,
    /// How long job events are kept.
    pub event_max_age_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            max_ack_pending: 1000,
            replicas: 1,
            dedup_window_secs: 600,
            event_max_age_secs: 7 * 24 * 3600,
        }
    }
}

impl NatsConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs.max(1))
    }
}
