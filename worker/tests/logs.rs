//! Trainer log lines against a real nats-server: batched into few events
//! that keep every line in order, and, when NATS stalls, queued without
//! waiting and dropped (and counted) rather than slowing the trainer; past
//! the attempt's byte budget, one note and nothing more.

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prost::Message;
use std::path::Path;
use std::time::{Duration, Instant};
use trainyard_core::events::EventSink;
use trainyard_core::topology::{self, EVENTS_STREAM, subject};
use trainyard_natsd::{NatsServer, find_nats_server};
use trainyard_proto::v1::{JobEvent, LogLine, Stage, job_event::Kind};
use trainyard_proto::{JobId, TenantId};
use trainyard_worker::log_budget::LogLimits;
use trainyard_worker::logs::LogBatcher;

struct Nats {
    _dir: tempfile::TempDir,
    server: NatsServer,
    js: async_nats::jetstream::Context,
}

async fn nats() -> Nats {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let binary = find_nats_server(root).expect("nats-server (scripts/test installs it)");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().to_owned();
    let server = tokio::task::spawn_blocking(move || NatsServer::start(&binary, &store))
        .await
        .unwrap()
        .expect("nats-server starts");
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    topology::ensure(&js, &Default::default()).await.unwrap();
    Nats {
        _dir: dir,
        server,
        js,
    }
}

fn sink(js: &async_nats::jetstream::Context) -> (EventSink, TenantId, JobId) {
    let tenant = TenantId::parse("tenant-a").unwrap();
    let job = JobId::generate();
    (
        EventSink::new(js.clone(), tenant.clone(), job.clone()),
        tenant,
        job,
    )
}

/// Every log event of the job, in stream order.
async fn logs_of(
    js: &async_nats::jetstream::Context,
    tenant: &TenantId,
    job: &JobId,
) -> Vec<LogLine> {
    let stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let mut stream = stream;
    let total = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject::job_events(tenant, job),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        let event = JobEvent::decode(message.payload.as_ref()).unwrap();
        if let Some(Kind::Log(line)) = event.kind {
            out.push(line);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_batched_into_few_events_that_keep_their_order() {
    let nats = nats().await;
    let (events, tenant, job) = sink(&nats.js);
    let logs = LogBatcher::start(
        events,
        Stage::Train,
        LogLimits::default(),
        Default::default(),
    );
    let mut expected = Vec::new();
    for i in 0..1000 {
        let stream = if i % 100 == 99 { "stderr" } else { "stdout" };
        let line = format!("line {i}");
        logs.line(stream, &line);
        expected.push((stream.to_string(), line));
    }
    logs.note("trainer resumed at step 10");
    logs.close(Duration::from_secs(30)).await;

    let got = logs_of(&nats.js, &tenant, &job).await;
    // 1000 lines in runs of 99 + 1 (stream changes) or at most 200 lines.
    assert!(got.len() <= 25, "{} events for 1000 lines", got.len());
    let (note, lines) = got.split_last().unwrap();
    assert_eq!(
        (note.stream.as_str(), note.line.as_str()),
        ("worker", "trainer resumed at step 10")
    );
    let unpacked: Vec<(String, String)> = lines
        .iter()
        .flat_map(|l| {
            assert_eq!(l.stage(), Stage::Train);
            l.line
                .split('\n')
                .map(|text| (l.stream.clone(), text.to_string()))
        })
        .collect();
    assert_eq!(unpacked, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nats_costs_log_lines_never_time() {
    let nats = nats().await;
    let (events, tenant, job) = sink(&nats.js);
    let logs = LogBatcher::start(
        events,
        Stage::Train,
        LogLimits::default(),
        Default::default(),
    );
    let server = Pid::from_raw(nats.server.pid() as i32);
    kill(server, Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    const LINES: usize = 20_000;
    for i in 0..LINES {
        logs.line("stdout", &format!("line {i}"));
    }
    let spent = started.elapsed();
    kill(server, Signal::SIGCONT).unwrap();
    assert!(
        spent < Duration::from_secs(2),
        "queuing {LINES} lines took {spent:?} with NATS stalled"
    );
    logs.close(Duration::from_secs(60)).await;

    let got = logs_of(&nats.js, &tenant, &job).await;
    let dropped: usize = got
        .iter()
        .filter(|l| l.stream == "worker")
        .map(|l| {
            let (n, rest) = l.line.split_once(' ').unwrap();
            assert_eq!(
                rest,
                "trainer log lines dropped: the event stream was too slow"
            );
            n.parse::<usize>().unwrap()
        })
        .sum();
    let delivered: Vec<usize> = got
        .iter()
        .filter(|l| l.stream == "stdout")
        .flat_map(|l| l.line.split('\n'))
        .map(|t| t.strip_prefix("line ").unwrap().parse().unwrap())
        .collect();
    assert!(dropped > 0, "nothing was dropped");
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "lines out of order"
    );
    assert_eq!(delivered.first(), Some(&0));
    assert!(delivered.len() + dropped <= LINES);
    assert!(delivered.len() >= 1000, "{} delivered", delivered.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_budget_one_note_says_so_and_no_more_lines_go_out() {
    let nats = nats().await;
    let (events, tenant, job) = sink(&nats.js);
    const BUDGET: u64 = 10_000;
    let limits = LogLimits {
        budget_bytes: BUDGET,
        bytes_per_sec: 0,
    };
    // The job's count, as its claim carries it from attempt to attempt.
    let job_bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let logs = LogBatcher::start(events.clone(), Stage::Train, limits, job_bytes.clone());
    let line = "x".repeat(99);
    const LINES: u64 = 5_000;
    for _ in 0..LINES {
        logs.line("stdout", &line);
        // Let the publisher keep up: this test is about the budget, not the queue.
        tokio::task::yield_now().await;
    }
    logs.close(Duration::from_secs(30)).await;

    let got = logs_of(&nats.js, &tenant, &job).await;
    let published: u64 = got
        .iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.line.len() as u64 + 1)
        .sum();
    assert!(published <= BUDGET, "{published} bytes published");
    assert!(published > BUDGET / 2, "only {published} bytes published");
    let notes: Vec<&str> = got
        .iter()
        .filter(|l| l.stream == "worker")
        .map(|l| l.line.as_str())
        .collect();
    // On a busy machine the queue may overflow too; those lines are
    // counted in notes of their own.
    let queue_dropped: u64 = notes
        .iter()
        .filter_map(|n| n.strip_suffix(" trainer log lines dropped: the event stream was too slow"))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    let budget_notes: Vec<&str> = notes
        .iter()
        .copied()
        .filter(|n| n.starts_with("log budget exhausted"))
        .collect();
    assert_eq!(budget_notes.len(), 2, "{notes:?}");
    // No trainer line after the budget's note.
    let last_trainer = got.iter().rposition(|l| l.stream == "stdout").unwrap();
    let first_note = got
        .iter()
        .position(|l| l.line.starts_with("log budget exhausted"))
        .unwrap();
    assert!(last_trainer < first_note);
    let dropped: u64 = budget_notes[1]
        .strip_prefix("log budget exhausted, ")
        .and_then(|rest| rest.strip_suffix(" bytes dropped"))
        .expect("the closing note counts the dropped bytes")
        .parse()
        .unwrap();
    assert_eq!(published + dropped + queue_dropped * 100, LINES * 100);
    assert_eq!(
        job_bytes.load(std::sync::atomic::Ordering::Relaxed),
        published,
        "the job's count is what went out"
    );

    // The next attempt of the job starts with the budget spent: none of
    // its lines go out, one note says why.
    let again = LogBatcher::start(events, Stage::Train, limits, job_bytes.clone());
    for _ in 0..100 {
        again.line("stdout", &line);
    }
    again.close(Duration::from_secs(30)).await;
    let after = logs_of(&nats.js, &tenant, &job).await;
    let more = &after[got.len()..];
    assert!(
        more.iter().all(|l| l.stream == "worker"),
        "a later attempt published trainer lines: {more:?}"
    );
    assert!(
        more.iter()
            .any(|l| l.line.starts_with("log budget exhausted: the job's")),
        "{more:?}"
    );
    assert_eq!(
        job_bytes.load(std::sync::atomic::Ordering::Relaxed),
        published
    );
}
