//! Serving a core-NATS request subject (request/reply, no stream), once for
//! every service: the coordinator's job API on `ty.api.*` and the
//! captioners' `ty.preflight`.
//!
//! [`serve`] takes requests from a queue-group subscription ([`subscribe`])
//! and answers each on its own task, at most `concurrency` at a time: a
//! request beyond that stays in the subscription until a slot frees (it is
//! not taken, so no task waits in memory for it). A slow request (a
//! `Validate` waiting minutes for a captioner) holds one slot, not the
//! subject. Each request is answered inside a process span named after its
//! destination, a child of the trace context its headers carry; the reply
//! carries that span's context.
//!
//! The answer's payload is the service's own reply type; a service that
//! puts an error in it names it by a stable code, [`code_name`] (the same
//! names whatever the `Debug` form of `tonic::Code` becomes).
//!
//! At shutdown the subject is left at once. A request still running is
//! answered with the responder's [`Responder::stopping`] answer, when it
//! has one, else it runs to its end; requests already received but not yet
//! taken get the stopping answer too, or none.

use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use crate::telemetry::propagation::{self, JobAttrs};

/// Subscribes to `subject` in the queue group `queue` and flushes, so a
/// request sent once this returns finds a responder. Call it before the
/// service reports ready.
pub async fn subscribe(
    client: &async_nats::Client,
    subject: &str,
    queue: &str,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    let requests = client
        .queue_subscribe(subject.to_owned(), queue.to_owned())
        .await?;
    client.flush().await?;
    Ok(requests)
}

/// What a request/reply service answers.
pub trait Responder: Send + Sync + 'static {
    /// The low-cardinality destination the request's span is named after
    /// (a subject from `topology`, never one with ids in it).
    fn destination(&self, subject: &str) -> String;

    /// The reply to one request, errors included (encoded as the service's
    /// reply type encodes them, with a [`code_name`]).
    fn answer(&self, request: &Message) -> impl Future<Output = Bytes> + Send;

    /// The reply to a request interrupted by shutdown. `None` (the default)
    /// lets a running request finish and leaves unread ones unanswered.
    fn stopping(&self) -> Option<Bytes> {
        None
    }
}

/// Where replies go: a NATS client, or a stand-in in tests.
pub trait Replies: Clone + Send + Sync + 'static {
    fn reply(
        &self,
        to: Subject,
        headers: HeaderMap,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), async_nats::Error>> + Send;
}

impl Replies for async_nats::Client {
    async fn reply(
        &self,
        to: Subject,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), async_nats::Error> {
        Ok(self.publish_with_headers(to, headers, payload).await?)
    }
}

/// Why [`serve`] stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The subscription closed (the connection is gone for good).
    #[error("the request subscription ended")]
    SubscriptionEnded,
}

/// Answers `requests` until `shutdown`, at most `concurrency` at once
/// (at least one). Returns when every request taken has been answered.
pub async fn serve<R, P, S>(
    mut requests: S,
    replies: P,
    responder: Arc<R>,
    concurrency: usize,
    shutdown: CancellationToken,
) -> Result<(), ServeError>
where
    R: Responder,
    P: Replies,
    S: Stream<Item = Message> + Unpin + Send,
{
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let tracker = TaskTracker::new();
    let mut ended = Ok(());
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => {
                    ended = Err(ServeError::SubscriptionEnded);
                    break;
                }
            },
        };
        tracker.spawn(respond(
            message,
            slot,
            replies.clone(),
            responder.clone(),
            shutdown.clone(),
        ));
    }
    // Requests received but not taken: answered "stopping" when the
    // service has such an answer; then the subject is left.
    if responder.stopping().is_some() {
        while let Some(Some(message)) = requests.next().now_or_never() {
            stopped(message, &replies, &*responder).await;
        }
    }
    drop(requests);
    tracker.close();
    tracker.wait().await;
    ended
}

/// Answers one request in its span; the slot is freed when the reply is sent.
fn respond<R: Responder, P: Replies>(
    message: Message,
    slot: OwnedSemaphorePermit,
    replies: P,
    responder: Arc<R>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    let span = propagation::process_span(
        message.headers.as_ref(),
        &responder.destination(&message.subject),
        JobAttrs::default(),
    );
    async move {
        let Some(reply_to) = message.reply.clone() else {
            return; // a publish, not a request: nobody waits for an answer
        };
        let answer = if let Some(stopping) = responder.stopping() {
            tokio::select! {
                answer = responder.answer(&message) => answer,
                _ = shutdown.cancelled() => stopping,
            }
        } else {
            responder.answer(&message).await
        };
        send(&replies, reply_to, answer).await;
        drop(slot);
    }
    .instrument(span)
    .with_current_subscriber()
}

/// Answers a request received but not taken before shutdown.
async fn stopped<R: Responder, P: Replies>(message: Message, replies: &P, responder: &R) {
    let span = propagation::process_span(
        message.headers.as_ref(),
        &responder.destination(&message.subject),
        JobAttrs::default(),
    );
    if let (Some(reply_to), Some(answer)) = (message.reply, responder.stopping()) {
        send(replies, reply_to, answer).instrument(span).await;
    }
}

/// Sends a reply carrying the current span's trace context.
async fn send<P: Replies>(replies: &P, to: Subject, answer: Bytes) {
    let mut headers = HeaderMap::new();
    propagation::inject_current_nats(&mut headers);
    if let Err(error) = replies.reply(to, headers, answer).await {
        tracing::warn!(%error, "could not send a reply");
    }
}

/// The stable wire name of a status code, as request/reply errors carry
/// it: `InvalidArgument`, `NotFound`, … (the names replies have always
/// used; a reader compares against these strings).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Holds every request until the test lets one through.
    struct Gate {
        gate: Arc<Semaphore>,
        running: AtomicUsize,
        most: AtomicUsize,
        started: mpsc::UnboundedSender<Bytes>,
        stopping: Option<Bytes>,
    }

    impl Responder for Gate {
        fn destination(&self, _subject: &str) -> String {
            "ty.test".into()
        }

        async fn answer(&self, request: &Message) -> Bytes {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let _ = self.started.send(request.payload.clone());
            let pass = self.gate.acquire().await.expect("open");
            pass.forget();
            self.running.fetch_sub(1, Ordering::SeqCst);
            request.payload.clone()
        }

        fn stopping(&self) -> Option<Bytes> {
            self.stopping.clone()
        }
    }

    #[derive(Clone)]
    struct Sent(mpsc::UnboundedSender<(Subject, Bytes)>);

    impl Replies for Sent {
        async fn reply(
            &self,
            to: Subject,
            _headers: HeaderMap,
            payload: Bytes,
        ) -> Result<(), async_nats::Error> {
            Ok(self.0.send((to, payload))?)
        }
    }

    fn request(n: usize) -> Message {
        Message {
            subject: "ty.test".into(),
            reply: Some(format!("_INBOX.{n}").into()),
            payload: Bytes::from(n.to_string()),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    struct Harness {
        requests: mpsc::Sender<Message>,
        replies: mpsc::UnboundedReceiver<(Subject, Bytes)>,
        started: mpsc::UnboundedReceiver<Bytes>,
        responder: Arc<Gate>,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<Result<(), ServeError>>,
    }

    fn start_many(concurrency: usize, stopping: Option<&'static str>) -> Harness {
        let (requests, rx) = mpsc::channel::<Message>(16);
        let stream = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        }));
        let (sent, replies) = mpsc::unbounded_channel();
        let (started_tx, started) = mpsc::unbounded_channel();
        let responder = Arc::new(Gate {
            gate: Arc::new(Semaphore::new(0)),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            started: started_tx,
            stopping: stopping.map(|s| Bytes::from_static(s.as_bytes())),
        });
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(
            stream,
            Sent(sent),
            responder.clone(),
            concurrency,
            shutdown.clone(),
        ));
        Harness {
            requests,
            replies,
            started,
            responder,
            shutdown,
            served,
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    #[tokio::test]
    async fn a_request_beyond_the_limit_waits_in_the_subscription() {
        let mut h = start_many(2, None);
        for n in 0..3 {
            h.requests.send(request(n)).await.unwrap();
        }
        let first = [next(&mut h.started).await, next(&mut h.started).await];
        assert!(!first.contains(&Bytes::from("2")), "{first:?}");
        // Two run; the third is still in the subscription, not in a task.
        assert_eq!(
            h.requests.max_capacity() - h.requests.capacity(),
            1,
            "the third request was taken without a free slot"
        );
        h.responder.gate.add_permits(1);
        let (_, answered) = next(&mut h.replies).await;
        assert!(first.contains(&answered));
        assert_eq!(next(&mut h.started).await, Bytes::from("2"));
        h.responder.gate.add_permits(2);
        next(&mut h.replies).await;
        next(&mut h.replies).await;
        assert_eq!(h.responder.most.load(Ordering::SeqCst), 2);
        h.shutdown.cancel();
        h.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_slow_request_does_not_hold_up_the_next() {
        let mut h = start_many(4, None);
        h.requests.send(request(0)).await.unwrap();
        assert_eq!(next(&mut h.started).await, Bytes::from("0"));
        h.requests.send(request(1)).await.unwrap();
        // The second starts while the first still waits.
        assert_eq!(next(&mut h.started).await, Bytes::from("1"));
        h.responder.gate.add_permits(2);
        next(&mut h.replies).await;
        next(&mut h.replies).await;
        h.shutdown.cancel();
        h.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn at_shutdown_a_running_request_gets_the_stopping_answer() {
        let mut h = start_many(1, Some("stopping"));
        h.requests.send(request(0)).await.unwrap();
        next(&mut h.started).await;
        h.requests.send(request(1)).await.unwrap();
        h.shutdown.cancel();
        let mut answers = vec![next(&mut h.replies).await, next(&mut h.replies).await];
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            answers,
            [
                ("_INBOX.0".into(), Bytes::from("stopping")),
                ("_INBOX.1".into(), Bytes::from("stopping")),
            ]
        );
        h.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn without_a_stopping_answer_a_running_request_finishes() {
        let mut h = start_many(1, None);
        h.requests.send(request(0)).await.unwrap();
        next(&mut h.started).await;
        h.shutdown.cancel();
        assert!(!h.served.is_finished());
        h.responder.gate.add_permits(1);
        assert_eq!(next(&mut h.replies).await.1, Bytes::from("0"));
        h.served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_closed_subscription_is_an_error() {
        let h = start_many(1, None);
        drop(h.requests);
        let ended = tokio::time::timeout(WAIT, h.served).await.unwrap().unwrap();
        assert!(matches!(ended, Err(ServeError::SubscriptionEnded)));
    }

    #[test]
    fn codes_have_stable_names() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "InvalidArgument");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "Unauthenticated");
        assert_eq!(code_name(tonic::Code::NotFound), "NotFound");
        assert_eq!(code_name(tonic::Code::Unavailable), "Unavailable");
        assert_eq!(code_name(tonic::Code::Internal), "Internal");
    }
}
