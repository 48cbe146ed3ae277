//! The runtime's decisions, row by row, without a server: every row of the
//! admit table (decode, job record, delivery cap, claim) and of the settle
//! table (how the handler ended × the retry policy × the cancel token × the
//! claim). The end-to-end suites (`fencing`, `retry`, `failures`,
//! `outage`, `faults`) prove the executor does what a plan says.

mod admit;
mod plan;

use super::plan::{Plan, Report, ReportId, Settle};
use super::stage::TaskMeta;
use crate::config::RetryPolicyConfig;
use crate::retry::Policy;
use prost::Message as _;
use std::time::Duration;
use trainyard_proto::v1::{
    self, ErrorKind, JobRecord, JobState, Stage, StageStarted, TaskClaim, TrainTask,
    stage_result::Outcome,
};
use trainyard_proto::{Attempt, JobId, TenantId};

const STAGE: Stage = Stage::Train;
/// The policy of every plan row: 100 ms doubling, 3 attempts, no jitter,
/// `bad_dataset` never retried.
const MAX_ATTEMPTS: u32 = 3;

fn policy() -> Policy {
    Policy::from_config(&RetryPolicyConfig {
        initial_delay_ms: 100,
        multiplier: 2.0,
        max_delay_ms: 1_000,
        max_attempts: MAX_ATTEMPTS,
        jitter: 0.0,
        non_retryable: vec!["bad_dataset".into()],
    })
}

fn meta() -> TaskMeta {
    TaskMeta {
        tenant: TenantId::parse("acme").unwrap(),
        job: JobId::parse("j-1").unwrap(),
        attempt: Attempt(2),
    }
}

fn claim() -> TaskClaim {
    TaskClaim {
        stage: STAGE as i32,
        attempt: 2,
        worker_id: "w-1".into(),
        token: "t-1".into(),
        lease_until_ms: 1,
        released: false,
        log_bytes: 0,
    }
}

/// What a plan does, in the terms of the settle table.
#[derive(Debug, PartialEq)]
struct Shape {
    /// The dead letter's kind.
    letter: Option<ErrorKind>,
    report: Option<Sent>,
    release: bool,
    settle: Settle,
}

/// A report, as a row sees it.
#[derive(Debug, PartialEq)]
struct Sent {
    /// "result" (a handler's outcome), "failed" or "adjusted".
    what: &'static str,
    id: ReportId,
    claimed: bool,
    required: bool,
}

fn shape(plan: &Plan) -> Shape {
    Shape {
        letter: plan.dead_letter.as_ref().map(|l| l.kind),
        report: plan.report.as_ref().map(|r: &Report| Sent {
            what: match r.outcome {
                Outcome::Failed(_) => "failed",
                Outcome::Adjusted(_) => "adjusted",
                _ => "result",
            },
            id: r.id,
            claimed: r.claim.is_some(),
            required: r.required,
        }),
        release: plan.release,
        settle: plan.settle,
    }
}

/// Only a settle.
fn only(settle: Settle) -> Shape {
    Shape {
        letter: None,
        report: None,
        release: false,
        settle,
    }
}

/// Dead letter, failed result (under the claim or none), TERM.
fn failed(kind: ErrorKind, claimed: bool) -> Shape {
    Shape {
        letter: Some(kind),
        report: Some(Sent {
            what: "failed",
            id: ReportId::Result,
            claimed,
            required: false,
        }),
        release: false,
        settle: Settle::Term,
    }
}

fn nak(ms: u64) -> Settle {
    Settle::Nak(Some(Duration::from_millis(ms)))
}

/// A retry: republished to run after `ms`, this message acked.
fn defer(ms: u64) -> Settle {
    Settle::Defer(Duration::from_millis(ms))
}

/// Release, then NAK; with the handler's report first when `reported`.
fn retried(settle: Settle, reported: Option<u32>) -> Shape {
    Shape {
        report: reported.map(|delivered| Sent {
            what: "adjusted",
            id: ReportId::Retry { delivered },
            claimed: true,
            required: false,
        }),
        release: true,
        ..only(settle)
    }
}
