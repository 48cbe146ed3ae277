//! The `[nats]` section: how services reach the bus.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
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
    /// This service's identity: a file holding its nkey seed (`SU…`), as
    /// `yard fleet init` writes one per role. Unset: no nkey is presented.
    pub nkey_seed_file: Option<PathBuf>,
    /// A NATS credentials file (user JWT and seed), for a server run with
    /// decentralized JWT auth; instead of `nkey_seed_file`.
    pub creds_file: Option<PathBuf>,
    /// CA certificate (PEM) the server's certificate must chain to. Setting
    /// it requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), when the server verifies clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Start TLS before the server's INFO (a server with `handshake_first`).
    pub tls_first: bool,
    /// Prefix of this service's reply subjects. Unset: `_INBOX_<role>`
    /// (e.g. `_INBOX_coordinator`, `_INBOX_worker_<pool>`), which its NATS
    /// user may read; no role reads `_INBOX.>`, so no one collects another
    /// role's replies.
    pub inbox_prefix: Option<String>,
    /// Allow a server that does not require authentication. Only for a dev
    /// fleet on loopback and tests: without it a service refuses to start
    /// against an open bus.
    pub insecure_dev: bool,
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
            max_ack_pending: 1000,
            replicas: 1,
            dedup_window_secs: 600,
            event_max_age_secs: 7 * 24 * 3600,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_first: false,
            inbox_prefix: None,
            insecure_dev: false,
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
