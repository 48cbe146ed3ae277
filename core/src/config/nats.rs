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
    /// Replicas of every stream and bucket (3 on a cluster).
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub dedup_window_secs: u64,
    /// How long job events are kept.
    pub event_max_age_secs: u64,
    /// Bytes `TY_EVENTS` may hold; past it the oldest events are dropped,
    /// so a chatty job can never fill JetStream's store (where tasks,
    /// results and job records live too).
    pub event_max_bytes: u64,
    /// Bytes `TY_DLQ` may hold; past it the oldest dead letters are dropped.
    pub dlq_max_bytes: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            replicas: 1,
            dedup_window_secs: 600,
            event_max_age_secs: 7 * 24 * 3600,
            event_max_bytes: 1 << 30,
            dlq_max_bytes: 256 << 20,
        }
    }
}

impl NatsConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs.max(1))
    }
}
