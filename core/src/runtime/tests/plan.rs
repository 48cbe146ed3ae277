//! The settle table: how the handler ended × the retry policy × the
//! cancel token × the claim.

use super::*;
use crate::runtime::plan::{self, Ended, Why};
use crate::runtime::stage::{StageError, job_error};

fn fetch_error(retryable: bool) -> v1::JobError {
    job_error(ErrorKind::Fetch, "503", retryable)
}

fn retry(delay_ms: u64) -> StageError {
    StageError::Retry {
        error: fetch_error(true),
        delay: Duration::from_millis(delay_ms),
    }
}

fn retry_reporting() -> StageError {
    StageError::RetryWithReport {
        error: job_error(ErrorKind::Oom, "out of memory", true),
        delay: Duration::ZERO,
        report: Box::new(Outcome::Adjusted(v1::TrainingAdjusted {
            note: "oom: batch_size 4 → 2".into(),
            delivered: 1,
            ..Default::default()
        })),
    }
}

fn ok() -> Result<Outcome, StageError> {
    Ok(Outcome::Started(StageStarted { delivered: 1 }))
}

/// How a handler ended, for a row: on delivery 1, the cancel token not
/// fired, the claim held at the check, unless a row says otherwise.
fn ended(result: Result<Outcome, StageError>) -> Ended {
    Ended {
        result: Some(result),
        cancelled: false,
        still_held: true,
        delivered: 1,
    }
}

impl Ended {
    fn on(self, delivered: u32) -> Ended {
        Ended { delivered, ..self }
    }

    fn cancelled(self) -> Ended {
        Ended {
            cancelled: true,
            ..self
        }
    }

    /// The claim found lost at the check after the handler.
    fn lost(self) -> Ended {
        Ended {
            still_held: false,
            ..self
        }
    }
}

fn planned(ended: Ended) -> Plan {
    plan::plan(ended, &policy(), STAGE, &claim())
}

/// Checks rows of (what, how the handler ended, the plan's shape, the
/// stage-duration label); returns how many.
fn check_plans(rows: Vec<(&str, Ended, Shape, &str)>) -> usize {
    let count = rows.len();
    for (row, ended, want, label) in rows {
        let plan = planned(ended);
        assert_eq!(shape(&plan), want, "{row}");
        assert_eq!(plan.finished, Some(label), "{row}");
    }
    count
}

/// Ok: the result under the claim, required before the ACK.
fn done() -> Shape {
    Shape {
        report: Some(Sent {
            what: "result",
            id: ReportId::Result,
            claimed: true,
            required: true,
        }),
        ..only(Settle::Ack)
    }
}

#[test]
fn plan_table_ok_and_fail() {
    let rows = vec![
        ("Ok: result, then ACK", ended(ok()), done(), "ok"),
        (
            "Fail: letter, failed result under the claim, TERM",
            ended(Err(StageError::fail(ErrorKind::InvalidSpec, "no"))),
            failed(ErrorKind::InvalidSpec, true),
            "failed",
        ),
        (
            "Interrupted: release, NAK without delay",
            ended(Err(StageError::Interrupted)),
            retried(Settle::Nak(None), None),
            "interrupted",
        ),
    ];
    assert_eq!(check_plans(rows), 3);
}

#[test]
fn plan_table_retry() {
    let rows = vec![
        (
            "Retry: release, DEFER 100 ms",
            ended(Err(retry(0))),
            retried(defer(100), None),
            "retry",
        ),
        (
            "Retry on delivery 2: DEFER 200 ms",
            ended(Err(retry(0))).on(2),
            retried(defer(200), None),
            "retry",
        ),
        (
            "Retry with a Retry-After above the backoff: DEFER after it",
            ended(Err(retry(7_000))),
            retried(defer(7_000), None),
            "retry",
        ),
        (
            "Retry on the last delivery: gave up (letter, failed result, TERM)",
            ended(Err(retry(0))).on(MAX_ATTEMPTS),
            failed(ErrorKind::Fetch, true),
            "retry",
        ),
        (
            "Retry of a non-retryable error: letter, failed result, TERM",
            ended(Err(StageError::Retry {
                error: fetch_error(false),
                delay: Duration::ZERO,
            })),
            failed(ErrorKind::Fetch, true),
            "retry",
        ),
        (
            "Retry of a kind the policy never retries: letter, failed result, TERM",
            ended(Err(StageError::retry(
                ErrorKind::BadDataset,
                "x",
                Duration::ZERO,
            ))),
            failed(ErrorKind::BadDataset, true),
            "retry",
        ),
    ];
    assert_eq!(check_plans(rows), 6);
}

/// The rows under a fleet maximum of 500 ms (`[retry] fleet_max_delay_ms`):
/// no delay the policy, the job or a server asks for goes past it.
#[test]
fn plan_table_retry_under_the_fleet_maximum() {
    let capped = policy().capped(Duration::from_millis(500));
    let rows = vec![
        (
            "backoff below the maximum: as is",
            ended(Err(retry(0))),
            defer(100),
        ),
        (
            "backoff on delivery 2, below the maximum",
            ended(Err(retry(0))).on(2),
            defer(200),
        ),
        (
            "a Retry-After of an hour: the maximum",
            ended(Err(retry(3_600_000))),
            defer(500),
        ),
        (
            "a Retry-After below the maximum: kept",
            ended(Err(retry(300))),
            defer(300),
        ),
    ];
    assert_eq!(rows.len(), 4);
    for (row, ended, settle) in rows {
        let plan = plan::plan(ended, &capped, STAGE, &claim());
        assert_eq!(shape(&plan), retried(settle, None), "{row}");
    }
    let long = Policy {
        multiplier: 10.0,
        ..capped
    };
    let plan = plan::plan(ended(Err(retry(0))).on(2), &long, STAGE, &claim());
    assert_eq!(
        shape(&plan),
        retried(defer(500), None),
        "backoff past the maximum"
    );
}

#[test]
fn plan_table_retry_with_a_report() {
    let rows = vec![
        (
            "the report under the claim, release, DEFER",
            ended(Err(retry_reporting())),
            retried(defer(100), Some(1)),
            "retry",
        ),
        (
            "on delivery 2: reported under delivery 2's id",
            ended(Err(retry_reporting())).on(2),
            retried(defer(200), Some(2)),
            "retry",
        ),
        (
            "out of attempts: no report, gave up",
            ended(Err(retry_reporting())).on(MAX_ATTEMPTS),
            failed(ErrorKind::Oom, true),
            "retry",
        ),
        (
            "a kind the policy never retries: no report, failed",
            ended(Err(StageError::RetryWithReport {
                error: job_error(ErrorKind::BadDataset, "x", true),
                delay: Duration::ZERO,
                report: Box::new(ok().unwrap()),
            })),
            failed(ErrorKind::BadDataset, true),
            "retry",
        ),
    ];
    assert_eq!(check_plans(rows), 4);
}

#[test]
fn plan_table_cancel() {
    let term = || only(Settle::Term);
    let rows = vec![
        (
            "Cancelled: TERM, no letter",
            ended(Err(StageError::Cancelled)),
            term(),
            "cancelled",
        ),
        (
            "Cancelled with the claim lost: TERM (the job is final)",
            ended(Err(StageError::Cancelled)).cancelled().lost(),
            term(),
            "cancelled",
        ),
        (
            "Fail after the cancel fired: cancelled",
            ended(Err(StageError::fail(ErrorKind::Trainer, "killed"))).cancelled(),
            term(),
            "cancelled",
        ),
        (
            "Retry after the cancel fired: cancelled",
            ended(Err(retry(0))).cancelled(),
            term(),
            "cancelled",
        ),
        (
            "Retry with a report after the cancel fired: nothing reported",
            ended(Err(retry_reporting())).cancelled(),
            term(),
            "cancelled",
        ),
        (
            "Ok after the cancel fired still counts",
            ended(ok()).cancelled(),
            done(),
            "ok",
        ),
        (
            "Interrupted after the cancel fired: still handed back",
            ended(Err(StageError::Interrupted)).cancelled(),
            retried(Settle::Nak(None), None),
            "interrupted",
        ),
    ];
    assert_eq!(check_plans(rows), 7);
}

#[test]
fn plan_table_claim_lost() {
    let leave = || only(Settle::Leave);
    let while_running = Ended {
        result: None,
        ..ended(ok()).cancelled()
    };
    let rows = vec![
        (
            "while running: nothing",
            while_running,
            leave(),
            "claim_lost",
        ),
        (
            "before reporting Ok: nothing",
            ended(ok()).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before reporting a Fail: no letter, nothing",
            ended(Err(StageError::fail(ErrorKind::Trainer, "x"))).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before a Retry: no release, nothing",
            ended(Err(retry(0))).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before a Retry with a report: nothing reported",
            ended(Err(retry_reporting())).lost(),
            leave(),
            "claim_lost",
        ),
        (
            "before an Interrupted: nothing",
            ended(Err(StageError::Interrupted)).lost(),
            leave(),
            "claim_lost",
        ),
    ];
    assert_eq!(check_plans(rows), 6);
}

/// What happens to a plan after its own steps: a required report not
/// stored, a claim lost between the report and the ACK.
#[test]
fn settle_after_the_report_table() {
    let ok = planned(ended(ok()));
    let rows: Vec<(&str, Shape, Shape)> = vec![
        (
            "Ok whose result was not stored: release, NAK 5 s",
            shape(&ok.clone().unreported()),
            retried(nak(5_000), None),
        ),
        (
            "ACK with the claim still held: ACK",
            only(Settle::Ack.fenced(true)),
            only(Settle::Ack),
        ),
        (
            "ACK with the claim lost after the report: no settle",
            only(Settle::Ack.fenced(false)),
            only(Settle::Leave),
        ),
        (
            "a NAK or TERM is not fenced",
            only(Settle::Term.fenced(false)),
            only(Settle::Term),
        ),
    ];
    assert_eq!(rows.len(), 4);
    for (row, got, want) in rows {
        assert_eq!(got, want, "{row}");
    }
}

#[test]
fn giving_up_says_after_how_many_deliveries() {
    let plan = planned(ended(Err(retry(0))).on(MAX_ATTEMPTS));
    assert_eq!(plan.why, Why::GaveUp);
    let Some(Report {
        outcome: Outcome::Failed(error),
        claim: Some(claim),
        ..
    }) = plan.report
    else {
        panic!("a failed result under the claim");
    };
    assert_eq!(error.message, "gave up after 3 deliveries: 503");
    assert!(!error.retryable);
    assert_eq!(error.stage(), STAGE, "the result names the stage");
    assert_eq!(claim.token, "t-1");
    assert_eq!(
        plan.dead_letter.map(|l| l.reason),
        Some(error.message.clone())
    );
}

#[test]
fn a_fatal_retry_is_no_longer_retryable_and_a_report_goes_out_as_given() {
    let plan = planned(ended(Err(retry_reporting())));
    let Some(Report {
        outcome: Outcome::Adjusted(adjusted),
        ..
    }) = plan.report
    else {
        panic!("the handler's report");
    };
    assert_eq!(adjusted.note, "oom: batch_size 4 → 2");
    assert!(matches!(
        plan.why,
        Why::Retry {
            kind: ErrorKind::Oom,
            ..
        }
    ));
    let fatal = StageError::retry(ErrorKind::BadDataset, "x", Duration::ZERO);
    let plan = planned(ended(Err(fatal)));
    assert_eq!(plan.why, Why::Fatal);
    let Some(Report {
        outcome: Outcome::Failed(error),
        ..
    }) = plan.report
    else {
        panic!("a failed result");
    };
    assert!(!error.retryable);
}

#[test]
fn only_a_cancelled_result_skips_the_claim_check() {
    assert!(!plan::checks_claim(&Err(StageError::Cancelled)));
    for result in [
        ok(),
        Err(retry(0)),
        Err(retry_reporting()),
        Err(StageError::fail(ErrorKind::Trainer, "x")),
        Err(StageError::Interrupted),
    ] {
        assert!(plan::checks_claim(&result), "{result:?}");
    }
}

#[test]
fn stage_errors_show_their_message() {
    assert_eq!(retry(0).to_string(), "503");
    assert_eq!(retry_reporting().to_string(), "out of memory");
    assert_eq!(
        StageError::fail(ErrorKind::InvalidSpec, "training: is required").to_string(),
        "training: is required"
    );
    assert_eq!(StageError::Cancelled.to_string(), "the job was cancelled");
}
