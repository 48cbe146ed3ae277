//! The admit table: decode, job record, delivery cap, claim.

use super::*;
use crate::claim::{Acquire, Held};
use crate::runtime::admit::{self, RecordRead, Stop};
use crate::runtime::plan::Why;

/// How admission went, in a row's terms.
#[derive(Debug, PartialEq)]
enum Got {
    Run,
    Hold(&'static str),
    Settle(Shape),
}

fn got<T>(admitted: Result<T, Stop>) -> Got {
    match admitted {
        Ok(_) => Got::Run,
        Err(Stop::Hold { store, .. }) => Got::Hold(store),
        Err(Stop::Settle(plan)) => Got::Settle(shape(&plan)),
    }
}

fn task_bytes(tenant: &str, job: &str) -> Vec<u8> {
    TrainTask {
        tenant: tenant.into(),
        job_id: job.into(),
        attempt: 2,
        ..Default::default()
    }
    .encode_to_vec()
}

fn record(state: JobState, stage: Stage, attempt: u32) -> RecordRead {
    let record = JobRecord {
        state: state as i32,
        stage: stage as i32,
        attempt,
        ..Default::default()
    };
    RecordRead::Found(record.encode_to_vec().into())
}

fn live() -> RecordRead {
    record(JobState::Training, STAGE, 2)
}

fn term() -> Got {
    Got::Settle(only(Settle::Term))
}

/// Letter, failed result without a claim (when the job is known), TERM.
fn poison(job_known: bool) -> Got {
    let mut shape = failed(ErrorKind::Poison, false);
    if !job_known {
        shape.report = None;
    }
    Got::Settle(shape)
}

/// Checks rows of (what, how admission went, how it should); returns how many.
fn check_admits(rows: Vec<(&str, Got, Got)>) -> usize {
    let count = rows.len();
    for (row, got, want) in rows {
        assert_eq!(got, want, "{row}");
    }
    count
}

#[test]
fn admit_table_decode() {
    let m = meta();
    let decode = |payload: &[u8], header: Option<&TaskMeta>| {
        got(admit::task::<TrainTask>(payload, header, STAGE))
    };
    let rows = vec![
        (
            "undecodable, ids in its Nats-Msg-Id: letter, failed result, TERM",
            decode(b"\xff\xff\xff", Some(&m)),
            poison(true),
        ),
        (
            "undecodable, no ids anywhere: letter, TERM",
            decode(b"\xff\xff\xff", None),
            poison(false),
        ),
        (
            "a bad job id: letter, failed result, TERM",
            decode(&task_bytes("acme", "not a job id!"), Some(&m)),
            poison(true),
        ),
        (
            "a bad tenant, no header: letter, TERM",
            decode(&task_bytes("", "j-1"), None),
            poison(false),
        ),
        (
            "a good task goes on",
            decode(&task_bytes("acme", "j-1"), None),
            Got::Run,
        ),
    ];
    assert_eq!(check_admits(rows), 5);
}

#[test]
fn admit_table_record() {
    let m = meta();
    let check = |read, delivered| got(admit::record(read, &m, STAGE, delivered, MAX_ATTEMPTS));
    let down = || RecordRead::Unavailable("timed out".into());
    let rows = vec![
        ("no job record: TERM", check(RecordRead::Missing, 1), term()),
        (
            "a record that does not decode: TERM",
            check(RecordRead::Found(vec![0xff, 0xff].into()), 1),
            term(),
        ),
        (
            "job succeeded: TERM",
            check(record(JobState::Succeeded, STAGE, 2), 1),
            term(),
        ),
        (
            "job failed: TERM",
            check(record(JobState::Failed, STAGE, 2), 1),
            term(),
        ),
        (
            "job cancelled: TERM, no letter",
            check(record(JobState::Cancelled, STAGE, 2), 1),
            term(),
        ),
        (
            "a stale attempt: TERM",
            check(record(JobState::Training, STAGE, 3), 1),
            term(),
        ),
        (
            "the job is in another stage: TERM",
            check(record(JobState::Delivering, Stage::Deliver, 2), 1),
            term(),
        ),
        (
            "the jobs bucket does not answer: hold",
            check(down(), 1),
            Got::Hold("job record"),
        ),
        ("a live record: go on", check(live(), 1), Got::Run),
    ];
    assert_eq!(check_admits(rows), 9);
}

#[test]
fn admit_table_deliveries_and_claim() {
    let m = meta();
    let check = |read, delivered| got(admit::record(read, &m, STAGE, delivered, MAX_ATTEMPTS));
    let rows = vec![
        (
            "out of deliveries: letter, failed result without a claim, TERM",
            check(live(), MAX_ATTEMPTS + 1),
            poison(true),
        ),
        (
            "out of deliveries, job cancelled: the record first, TERM without a letter",
            check(record(JobState::Cancelled, STAGE, 2), MAX_ATTEMPTS + 1),
            term(),
        ),
        (
            "out of deliveries, the store down: hold (the cap waits for the record)",
            check(
                RecordRead::Unavailable("timed out".into()),
                MAX_ATTEMPTS + 1,
            ),
            Got::Hold("job record"),
        ),
        (
            "the last delivery still runs",
            check(live(), MAX_ATTEMPTS),
            Got::Run,
        ),
        (
            "claim busy: NAK with the lease's delay",
            got(admit::claim(Acquire::Busy(Duration::from_millis(1_500)))),
            Got::Settle(only(nak(1_500))),
        ),
        (
            "claims bucket does not answer: hold",
            got(admit::claim(Acquire::Unavailable("timed out".into()))),
            Got::Hold("claim"),
        ),
        (
            "claim taken: run",
            got(admit::claim(Acquire::Held(Held::for_tests(claim())))),
            Got::Run,
        ),
        (
            "held past the cap: NAK 2 s",
            Got::Settle(shape(&Plan::held_too_long())),
            Got::Settle(only(nak(2_000))),
        ),
    ];
    assert_eq!(check_admits(rows), 8);
}

#[test]
fn admitted_records_and_letters_say_why() {
    let m = meta();
    let Ok(record) = admit::record(live(), &m, STAGE, 1, MAX_ATTEMPTS) else {
        panic!("a live record admits the task");
    };
    assert_eq!(record.attempt, 2, "the record read is handed on");
    let Err(Stop::Settle(plan)) = admit::record(live(), &m, STAGE, 4, MAX_ATTEMPTS) else {
        panic!("out of deliveries");
    };
    assert_eq!(plan.why, Why::OutOfDeliveries);
    assert_eq!(
        plan.dead_letter.unwrap().reason,
        "train task ran out of deliveries (4)"
    );
    let Some(Report {
        outcome: Outcome::Failed(error),
        ..
    }) = plan.report
    else {
        panic!("a failed result");
    };
    assert_eq!(
        (error.kind(), error.retryable, error.stage()),
        (ErrorKind::Poison, false, STAGE)
    );
    let Err(Stop::Settle(plan)) = admit::task::<TrainTask>(b"\xff", Some(&m), STAGE) else {
        panic!("undecodable");
    };
    assert!(plan.dead_letter.unwrap().reason.contains("not a valid"));
    let Err(Stop::Settle(plan)) =
        admit::task::<TrainTask>(&task_bytes("acme", "bad id!"), Some(&m), STAGE)
    else {
        panic!("bad id");
    };
    assert!(plan.dead_letter.unwrap().reason.contains("bad id"));
}
