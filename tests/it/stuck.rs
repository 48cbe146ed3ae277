//! Stuck trainers: the worker's watchdog kills a trainer that stops making
//! steps, emits a `stuck` event and hands the task back, so the next attempt
//! resumes from the stored checkpoint; a trainer that hangs on every attempt
//! fails the job once the deliveries run out, with the reason.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use trainyard_core::topology::DLQ_STREAM;
use trainyard_proto::v1::{
    ErrorKind, ExtraValue, JobEvent, JobState, Stuck, extra_value, job_event::Kind,
};
use trainyard_tests::*;

fn stuck_events(events: &[JobEvent]) -> Vec<Stuck> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Stuck(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn finals(events: &[JobEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(&e.kind, Some(Kind::State(s)) if s.state().is_final()))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_always_hangs_fails_the_job_after_the_cap_with_the_reason() {
    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.nats.max_deliver = 2;
        c.worker.stuck.stuck_after_secs = 3;
        c.worker.stuck.first_step_secs = 120;
        c.worker.stuck.silent_secs = 0;
    })
    .await;
    let sample = fleet.sample_uri().await;
    let mut spec = spec(&sample, 40);
    let training = spec.training.as_mut().unwrap();
    training.save_every = 5;
    training.extras.insert(
        "fault_hang_at_step".into(),
        ExtraValue {
            kind: Some(extra_value::Kind::Int(12)),
        },
    );
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;

    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Failed);
    let error = record.error.unwrap();
    assert_eq!(error.kind(), ErrorKind::Trainer);
    assert!(
        error.message.contains("stuck") && error.message.contains("2 deliveries"),
        "{}",
        error.message
    );
    assert_eq!(finals(&events), 1);
    // One stuck event per attempt, each at the hanging step.
    let stuck = stuck_events(&events);
    assert_eq!(stuck.len(), 2, "{stuck:?}");
    for s in &stuck {
        assert_eq!((s.step, s.cause.as_str()), (12, "no_step"), "{s:?}");
        assert!(s.seconds >= 3.0, "{s:?}");
    }
    // The retry resumed from the checkpoint stored before the hang (step 10).
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, Some(Kind::Checkpoint(c)) if c.step == 10))
    );
    assert!(
        events.iter().any(|e| matches!(
            &e.kind,
            Some(Kind::Log(l)) if l.line == "trainer resumed at step 10"
        )),
        "the second attempt did not resume from step 10"
    );
    // No trainer left behind, one dead letter.
    assert!(processes_mentioning(&job.job_id).is_empty());
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    let mut dlq = js.get_stream(DLQ_STREAM).await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_hangs_once_is_killed_and_the_retry_succeeds() {
    // A wrapper around the real trainer that hangs, silent, on its first
    // training run only.
    let wrap = tempfile::tempdir().unwrap();
    let real = trainyard_worker::models::find_trainer(None).expect("ty-reference-trainer built");
    let script = wrap.path().join("hang-once");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = train ] && mkdir '{}' 2>/dev/null; then exec sleep 3600; fi\nexec '{}' \"$@\"\n",
            wrap.path().join("hung").display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fleet = Fleet::start_with(Services::ALL, |c| {
        c.worker.reference_trainer = Some(script.clone());
        c.worker.stuck.first_step_secs = 3;
        c.worker.stuck.stuck_after_secs = 20;
        c.worker.stuck.silent_secs = 0;
    })
    .await;
    let sample = fleet.sample_uri().await;
    let mut client = fleet.client(TOKEN).await;
    let job = submit(&mut client, spec(&sample, 20)).await;
    let events = watch_all(&mut client, &job.job_id, Duration::from_secs(120)).await;

    let record = get(&mut client, &job.job_id).await;
    assert_eq!(record.state(), JobState::Succeeded, "{:?}", record.error);
    assert_eq!(finals(&events), 1);
    let stuck = stuck_events(&events);
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!((stuck[0].step, stuck[0].cause.as_str()), (0, "first_step"));
    assert!(wrap.path().join("hung").is_dir());
    assert!(processes_mentioning(&job.job_id).is_empty());
    fleet.stop().await;
}
