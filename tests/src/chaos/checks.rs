//! The invariants every fault test ends with: each accepted job reached
//! exactly one final state, by legal transitions only, and its events hold
//! exactly one final state event (a lost one is published again by the
//! reconciler, so the check waits for it), and a `Watch` of it ends with
//! exactly one final state, the record's; every artifact in a
//! record exists once in the store with the recorded sha256, and every
//! delivered file matches too, with no partial file left visible; the task
//! stream is empty; the DLQ holds exactly the expected entries; no trainer
//! of these jobs is still running.

use super::Chaos;
use futures::StreamExt;
use prost::Message;
use sha2::Digest;
use std::collections::BTreeMap;
use std::time::Duration;
use trainyard_core::topology::{DLQ_STREAM, EVENTS_STREAM, TASKS_STREAM};
use trainyard_proto::v1::{DeadLetter, JobEvent, JobRecord, JobState, job_event::Kind};

/// How long a test's leftovers (acks, deletions) get to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// Whether `from → to` is a transition the job state machine may make.
pub fn legal(from: JobState, to: JobState) -> bool {
    use JobState::*;
    match (from, to) {
        (Queued, Preparing) | (Queued | Preparing, Training) | (Training, Delivering) => true,
        (Delivering, Succeeded) => true,
        (from, Failed | Cancelled) => !from.is_final(),
        _ => false,
    }
}

/// The state events of every job, in stream order.
pub async fn state_events(js: &async_nats::jetstream::Context) -> BTreeMap<String, Vec<JobState>> {
    let stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "ty.event.*.*.state".into(),
            ..Default::default()
        })
        .await
        .expect("events consumer");
    let mut messages = consumer.messages().await.expect("events");
    let mut states: BTreeMap<String, Vec<JobState>> = BTreeMap::new();
    loop {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await
        else {
            break;
        };
        let message = message.expect("event message");
        let pending = message.info().map(|i| i.pending).unwrap_or(0);
        let event = JobEvent::decode(message.payload.clone()).expect("job event");
        if let Some(Kind::State(state)) = &event.kind {
            states.entry(event.job_id).or_default().push(state.state());
        }
        if pending == 0 {
            break;
        }
    }
    states
}

/// [`state_events`] once every job of `jobs` has a final state event, or
/// [`SETTLE`] passed (the caller's assertions then name the job without).
async fn final_state_events(
    js: &async_nats::jetstream::Context,
    jobs: &BTreeMap<String, JobState>,
) -> BTreeMap<String, Vec<JobState>> {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let events = state_events(js).await;
        let all_final = jobs.keys().all(|job| {
            events
                .get(job)
                .is_some_and(|seen| seen.iter().any(|s| s.is_final()))
        });
        if all_final || std::time::Instant::now() >= deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The dead letters, decoded.
pub async fn dead_letters(js: &async_nats::jetstream::Context) -> Vec<DeadLetter> {
    let mut stream = js.get_stream(DLQ_STREAM).await.expect("dlq stream");
    let info = stream.info().await.expect("dlq info").state.clone();
    let mut letters = Vec::new();
    if info.messages == 0 {
        return letters;
    }
    for seq in info.first_sequence..=info.last_sequence {
        if let Ok(raw) = stream.get_raw_message(seq).await {
            letters.push(DeadLetter::decode(raw.payload).expect("dead letter"));
        }
    }
    letters
}

/// Checks every invariant for `jobs` (id → expected final state) and
/// `dlq` dead letters; returns the final records.
pub async fn global(
    chaos: &Chaos,
    jobs: &BTreeMap<String, JobState>,
    dlq: usize,
) -> BTreeMap<String, JobRecord> {
    check(chaos, jobs, dlq, true, false).await
}

/// [`global`] where an intermediate state event may be missing (the events
/// stream's leader died while it was published, or the coordinator's node
/// was cut off: only the final state's event is repeated until stored);
/// the states seen must still move forward, and end with exactly one final
/// state event.
pub async fn global_with_event_gaps(
    chaos: &Chaos,
    jobs: &BTreeMap<String, JobState>,
    dlq: usize,
) -> BTreeMap<String, JobRecord> {
    check(chaos, jobs, dlq, true, true).await
}

/// The order of the states along the happy path.
fn rank(state: JobState) -> u8 {
    match state {
        JobState::Queued => 0,
        JobState::Preparing => 1,
        JobState::Training => 2,
        JobState::Delivering => 3,
        _ => 4,
    }
}

/// [`global`] for jobs whose first state was written by a coordinator that
/// died before announcing it: their events may start past `Queued`.
pub async fn global_without_events(
    chaos: &Chaos,
    jobs: &BTreeMap<String, JobState>,
    dlq: usize,
) -> BTreeMap<String, JobRecord> {
    check(chaos, jobs, dlq, false, false).await
}

async fn check(
    chaos: &Chaos,
    jobs: &BTreeMap<String, JobState>,
    dlq: usize,
    from_queued: bool,
    gaps: bool,
) -> BTreeMap<String, JobRecord> {
    let mut client = chaos.client().await;
    let js = chaos.js().await;
    let mut records = BTreeMap::new();
    for (job, expected) in jobs {
        let record = crate::get(&mut client, job).await;
        assert_eq!(
            record.state(),
            *expected,
            "job {job} ended {:?}: {:?}",
            record.state(),
            record.error
        );
        records.insert(job.clone(), record);
    }

    // Exactly one final state per job, reached by legal transitions. A
    // repeated state (a redelivered stage announcing itself again) is no
    // transition. A final state event lost on the way is published again
    // by the coordinator's reconciler: wait for it.
    let events = final_state_events(&js, jobs).await;
    for job in jobs.keys() {
        let seen = events.get(job).cloned().unwrap_or_default();
        let mut path = seen.clone();
        path.dedup();
        if from_queued {
            assert_eq!(
                path.first(),
                Some(&JobState::Queued),
                "{job} starts queued: {seen:?}"
            );
        }
        for pair in path.windows(2) {
            let forward = if gaps {
                rank(pair[0]) < rank(pair[1]) && !pair[0].is_final()
            } else {
                legal(pair[0], pair[1])
            };
            assert!(
                forward,
                "{job}: illegal {:?} -> {:?} in {seen:?}",
                pair[0], pair[1]
            );
        }
        let finals = seen.iter().filter(|s| s.is_final()).count();
        assert_eq!(finals, 1, "{job}: one final state in {seen:?}");
        assert_eq!(path.last(), Some(&jobs[job]), "{job}: {seen:?}");
    }

    // What a client sees: Watch ends, with one final state, the record's.
    for (job, record) in &records {
        let watched = crate::watch_all(&mut client, job, SETTLE).await;
        let states: Vec<JobState> = watched
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::State(s)) => Some(s.state()),
                _ => None,
            })
            .collect();
        assert_eq!(
            states.iter().filter(|s| s.is_final()).count(),
            1,
            "{job}: watch shows one final state in {states:?}"
        );
        let last = watched.last().and_then(|e| match &e.kind {
            Some(Kind::State(s)) => Some(s.state()),
            _ => None,
        });
        assert_eq!(
            last,
            Some(record.state()),
            "{job}: watch ends with the record's state"
        );
    }

    // Artifacts: once each, and the bytes match the record.
    for (job, record) in &records {
        let mut names: Vec<&str> = record.artifacts.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "{job}: artifacts once each");
        for artifact in &record.artifacts {
            let key = chaos
                .store
                .key_of(&artifact.uri)
                .expect("artifact in the store");
            let bytes = chaos.store.get_bytes(&key).await.expect("artifact exists");
            assert_eq!(
                bytes.len() as u64,
                artifact.size,
                "{job}: {} size",
                artifact.uri
            );
            assert_eq!(
                hex::encode(sha2::Sha256::digest(&bytes)),
                artifact.sha256,
                "{job}: {} sha256",
                artifact.uri
            );
        }
        for file in &record.delivered {
            let path = file
                .uri
                .strip_prefix("file://")
                .expect("a file destination");
            let bytes = std::fs::read(path).expect("delivered file exists");
            assert_eq!(
                hex::encode(sha2::Sha256::digest(&bytes)),
                file.sha256,
                "{job}: delivered {path}"
            );
        }
        if record.state() != JobState::Succeeded {
            assert!(record.delivered.is_empty(), "{job}: nothing delivered");
        }
        let delivered_dir = chaos.outputs_dir().join(job);
        if let Ok(entries) = std::fs::read_dir(&delivered_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    record.delivered.iter().any(|d| d.uri.ends_with(&name))
                        || name == "manifest.json",
                    "{job}: {name} in the destination is not a recorded delivery"
                );
            }
        }
    }

    // Nothing left to do, nothing left running.
    crate::wait_for("task stream empty", SETTLE, || {
        let js = js.clone();
        async move {
            let mut tasks = js.get_stream(TASKS_STREAM).await.ok()?;
            (tasks.info().await.ok()?.state.messages == 0).then_some(())
        }
    })
    .await;
    let letters = dead_letters(&js).await;
    assert_eq!(letters.len(), dlq, "dead letters: {letters:?}");
    crate::wait_for("no trainer of these jobs left", SETTLE, || async {
        jobs.keys()
            .all(|job| crate::processes_mentioning(job).is_empty())
            .then_some(())
    })
    .await;
    records
}
