//! A webhook receiver for tests: a real HTTP server on loopback that records
//! every request (headers, body, time) and answers as the test scripts it.

use crate::wait_for;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the receiver answers to the next request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: <secs>`.
    RetryAfter(u16, u64),
    /// Never answers (the request stays open until the sender goes away).
    Hang,
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", self.headers))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

#[derive(Default)]
struct Recorded {
    hits: Mutex<Vec<Hit>>,
    replies: Mutex<VecDeque<Reply>>,
}

/// A webhook receiver on loopback; answers 200 once its script is used up.
/// Its URL carries a query token, as receivers' URLs often do.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Recorded>,
}

async fn hook(State(state): State<Arc<Recorded>>, headers: HeaderMap, body: Bytes) -> Response {
    let reply = state
        .replies
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(200));
    state.hits.lock().unwrap().push(Hit {
        headers,
        body: body.to_vec(),
        at: Instant::now(),
    });
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::RetryAfter(code, secs) => (
            StatusCode::from_u16(code).unwrap(),
            [("retry-after", secs.to_string())],
        )
            .into_response(),
        Reply::Hang => std::future::pending().await,
    }
}

impl Receiver {
    pub async fn start(script: &[Reply]) -> Receiver {
        let state = Arc::new(Recorded::default());
        state.replies.lock().unwrap().extend(script.iter().copied());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook?token=receiver-query-token", self.addr)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    pub async fn wait_hits(&self, n: usize, timeout: Duration) -> Vec<Hit> {
        wait_for(&format!("{n} webhook requests"), timeout, || async {
            let hits = self.hits();
            (hits.len() >= n).then_some(hits)
        })
        .await
    }
}

/// A Standard Webhooks receiver's check, written here independently of the
/// coordinator: does one `v1,` entry of `webhook-signature` match
/// HMAC-SHA256 keyed by `secret` (`whsec_<base64>`) over
/// `{webhook-id}.{webhook-timestamp}.{body}`?
pub fn signed_by(hit: &Hit, secret: &str) -> bool {
    let key = secret
        .strip_prefix("whsec_")
        .and_then(base64_decode)
        .unwrap_or_else(|| panic!("not a whsec_<base64> secret: {secret:?}"));
    let mut signed = format!(
        "{}.{}.",
        hit.header("webhook-id"),
        hit.header("webhook-timestamp")
    )
    .into_bytes();
    signed.extend_from_slice(&hit.body);
    let expected = format!("v1,{}", base64_encode(&hmac_sha256(&key, &signed)));
    signatures(hit).any(|s| s == expected)
}

/// The entries of a request's `webhook-signature`.
pub fn signatures(hit: &Hit) -> impl Iterator<Item = &str> {
    hit.header("webhook-signature").split(' ')
}

/// HMAC-SHA256 per RFC 2104.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut k = if key.len() > 64 {
        Sha256::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(64, 0);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::digest([ipad, data.to_vec()].concat());
    Sha256::digest([opad, inner.to_vec()].concat()).to_vec()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard (padded) base64; `None` on any other character.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.trim_end_matches('=').bytes() {
        let value = BASE64.iter().position(|&b| b == c)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Some(out)
}

/// A job record as the coordinator would store it: tenant, state, a
/// webhook to `url` with `events`, `times` up to its state, and its final
/// event marked stored so the reconciler leaves it alone.
pub fn job_record(
    tenant: &str,
    state: trainyard_proto::v1::JobState,
    url: &str,
    events: &[&str],
) -> trainyard_proto::v1::JobRecord {
    use trainyard_proto::v1::{JobRecord, JobState, StageTimes, Webhook};
    let now = trainyard_core::now_ms();
    let reached = |s: JobState| if state as i32 >= s as i32 { now } else { 0 };
    let mut spec = crate::spec("file:///data/set.zip", 10);
    spec.webhook = Some(Webhook {
        url: url.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
    });
    JobRecord {
        job_id: trainyard_proto::JobId::generate().to_string(),
        tenant: tenant.into(),
        state: state as i32,
        spec: Some(spec),
        created_at_ms: now,
        updated_at_ms: now,
        times: Some(StageTimes {
            queued_at_ms: now,
            preparing_at_ms: reached(JobState::Preparing),
            training_at_ms: reached(JobState::Training),
            delivering_at_ms: reached(JobState::Delivering),
            finished_at_ms: if state.is_final() { now } else { 0 },
            ..Default::default()
        }),
        final_event_stored: true,
        ..Default::default()
    }
}

/// Stores [`job_record`] in the coordinators' job bucket.
pub async fn store_job(
    repo: &trainyard_coordinator::repo::JobRepo,
    tenant: &str,
    state: trainyard_proto::v1::JobState,
    url: &str,
    events: &[&str],
) -> trainyard_proto::v1::JobRecord {
    let record = job_record(tenant, state, url, events);
    repo.create(&record).await.expect("record stored");
    record
}

/// Publishes a state event on the bus, as the coordinator does, or as
/// anyone with publish rights on `ty.event.>` could: the event says what
/// its publisher wants.
pub async fn publish_state(
    js: &async_nats::jetstream::Context,
    tenant: &str,
    job: &str,
    state: trainyard_proto::v1::JobState,
    error: Option<trainyard_proto::v1::JobError>,
) {
    use prost::Message;
    use trainyard_core::topology::{EventKind, subject};
    use trainyard_proto::v1::{JobEvent, StateChanged, job_event::Kind};
    let event = JobEvent {
        job_id: job.into(),
        tenant: tenant.into(),
        at_ms: trainyard_core::now_ms(),
        kind: Some(Kind::State(StateChanged {
            state: state as i32,
            error,
            ..Default::default()
        })),
    };
    let subject = subject::event(
        &trainyard_proto::TenantId::parse(tenant).expect("tenant"),
        &trainyard_proto::JobId::parse(job).expect("job"),
        EventKind::State,
    );
    js.publish(subject, event.encode_to_vec().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// Waits until the webhook consumer has handled every state event (none
/// pending, none awaiting an ack or a retry).
pub async fn wait_idle(js: &async_nats::jetstream::Context) {
    use trainyard_core::topology::{EVENTS_STREAM, WEBHOOKS_CONSUMER};
    wait_for("webhook consumer idle", Duration::from_secs(60), || async {
        let stream = js.get_stream(EVENTS_STREAM).await.ok()?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(WEBHOOKS_CONSUMER).await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for bytes in [&b""[..], b"f", b"fo", b"foo", b"trainyard-webhook-test-key"] {
            assert_eq!(base64_decode(&base64_encode(bytes)).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_decode("***"), None);
    }
}
