//! Whether a task message may run, decided without doing anything: from
//! its bytes, the job record read for it and the claim taken for it. Each
//! step either lets the task go on or says why not: a [`Plan`] that ends it
//! now, or a hold while a store cannot be read. The order matters and is
//! the run loop's: decode, then the record (a task of a job already final
//! is dropped without a letter, even when out of deliveries), then the
//! delivery cap, then the claim.

use super::plan::{Plan, Settle, Why};
use super::stage::{StageTask, TaskMeta};
use crate::claim::{Acquire, Held};
use bytes::Bytes;
use prost::Message as _;
use std::sync::Arc;
use trainyard_proto::v1::{JobRecord, Stage};

/// Why a task does not run (yet).
#[derive(Debug)]
pub(super) enum Stop {
    /// Settle the message with this plan; the task ends here.
    Settle(Box<Plan>),
    /// A store (`store`) cannot be read: keep the message and try again.
    Hold { store: &'static str, error: String },
}

/// The next step of admission, or why it stops.
pub(super) type Admit<T> = Result<T, Stop>;

/// The task and its ids, from a message's payload; `header_meta` are the
/// ids read from its `Nats-Msg-Id`, so even an undecodable task's job gets
/// its failed result.
pub(super) fn task<T: StageTask>(
    payload: &[u8],
    header_meta: Option<&TaskMeta>,
    stage: Stage,
) -> Admit<(T, TaskMeta)> {
    let decoded = T::decode(payload)
        .map_err(|e| {
            format!(
                "task is not a valid {} message: {e}",
                std::any::type_name::<T>()
            )
        })
        .and_then(|task| {
            task.meta()
                .map(|meta| (task, meta))
                .map_err(|e| format!("task has a bad id: {e}"))
        });
    decoded.map_err(|reason| {
        Stop::Settle(Box::new(Plan::poison(
            Why::Poison,
            reason,
            stage,
            header_meta.is_some(),
        )))
    })
}

/// What reading a job record gave.
#[derive(Debug)]
pub(super) enum RecordRead {
    Found(Bytes),
    /// No entry, or a deleted one.
    Missing,
    /// The bucket did not answer.
    Unavailable(String),
}

/// The job record, if the task is still to run: the job is not final and
/// runs this stage and attempt, and the message has deliveries left
/// (`delivered` ≤ `max_attempts`; checked after the record, so a task of a
/// finished job is dropped without a letter).
pub(super) fn record(
    read: RecordRead,
    meta: &TaskMeta,
    stage: Stage,
    delivered: u32,
    max_attempts: u32,
) -> Admit<Arc<JobRecord>> {
    let drop = |why| Stop::Settle(Box::new(Plan::settle(Why::Dropped(why), Settle::Term)));
    let bytes = match read {
        RecordRead::Found(bytes) => bytes,
        RecordRead::Missing => return Err(drop("no job record")),
        RecordRead::Unavailable(error) => {
            return Err(Stop::Hold {
                store: "job record",
                error,
            });
        }
    };
    let Ok(record) = JobRecord::decode(bytes) else {
        return Err(drop("job record unreadable"));
    };
    if record.state().is_final() {
        return Err(drop("job already finished"));
    }
    if record.stage() != stage || record.attempt != meta.attempt.0 {
        return Err(drop("stale attempt"));
    }
    if delivered > max_attempts {
        let reason = format!("{} task ran out of deliveries ({delivered})", stage.name());
        return Err(Stop::Settle(Box::new(Plan::poison(
            Why::OutOfDeliveries,
            reason,
            stage,
            true,
        ))));
    }
    Ok(Arc::new(record))
}

/// The claim, if this runtime got it.
pub(super) fn claim(acquire: Acquire) -> Admit<Held> {
    match acquire {
        Acquire::Held(held) => Ok(held),
        Acquire::Busy(wait) => Err(Stop::Settle(Box::new(Plan::settle(
            Why::Busy,
            Settle::Nak(Some(wait)),
        )))),
        Acquire::Unavailable(error) => Err(Stop::Hold {
            store: "claim",
            error,
        }),
    }
}
