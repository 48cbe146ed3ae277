//! The backlog poller: every few seconds (`coordinator.backlog_interval_secs`)
//! it reads the JetStream state the autoscaler and the alerts need and sets
//! the gauges of [`trainyard_core::telemetry::metrics`]:
//!
//! - `trainyard_stage_backlog{stage,pool,state}`: for every stage consumer
//!   in `TY_TASKS` (`ty-prepare`, `ty-deliver`, `ty-train-<pool>`), its
//!   pending and ack-pending counts from consumer info; for a task subject
//!   with messages and no consumer yet (a pool no worker has served), its
//!   message count as pending. A series whose consumer and messages are
//!   gone is cleared.
//! - `trainyard_dlq_depth{stage}`: messages held in `TY_DLQ` per
//!   `ty.dlq.<stage>` subject.
//!
//! Every replica polls; they all report the same values, which is harmless.

use async_nats::jetstream;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use trainyard_core::telemetry::metrics;
use trainyard_core::topology::{DLQ_STREAM, TASKS_STREAM, subject};
use trainyard_proto::v1::Stage;

/// The stages tasks and dead letters are kept for.
const STAGES: [Stage; 3] = [Stage::Prepare, Stage::Train, Stage::Deliver];

/// The pool label of the stages that have no GPU pool.
const NO_POOL: &str = "default";

/// (stage, pool) → (pending, ack pending).
pub type Backlog = BTreeMap<(String, String), (u64, u64)>;

/// The stage and pool a `TY_TASKS` consumer serves, from its name
/// ([`trainyard_core::topology::consumer_name`]).
pub fn stage_of_consumer(name: &str) -> Option<(&'static str, String)> {
    if let Some(pool) = name.strip_prefix("ty-train-") {
        return (!pool.is_empty()).then(|| ("train", pool.to_string()));
    }
    STAGES
        .into_iter()
        .filter(|s| *s != Stage::Train)
        .find(|s| name.strip_prefix("ty-") == Some(s.name()))
        .map(|s| (s.name(), NO_POOL.to_string()))
}

/// The stage and pool of a task subject (`ty.task.prepare`,
/// `ty.task.train.<pool>`).
pub fn stage_of_subject(task_subject: &str) -> Option<(&'static str, String)> {
    let rest = task_subject.strip_prefix("ty.task.")?;
    if let Some(pool) = rest.strip_prefix("train.") {
        return (!pool.is_empty()).then(|| ("train", pool.to_string()));
    }
    STAGES
        .into_iter()
        .filter(|s| *s != Stage::Train)
        .find(|s| s.name() == rest)
        .map(|s| (s.name(), NO_POOL.to_string()))
}

/// Reads the backlog of every stage and pool once.
pub async fn read_backlog(js: &jetstream::Context) -> Result<Backlog, async_nats::Error> {
    let stream = js.get_stream(TASKS_STREAM).await?;
    let mut backlog = Backlog::new();
    let mut consumers = stream.consumers();
    while let Some(info) = consumers.next().await {
        let info = info?;
        if let Some((stage, pool)) = stage_of_consumer(&info.name) {
            backlog.insert(
                (stage.to_string(), pool),
                (info.num_pending, info.num_ack_pending as u64),
            );
        }
    }
    // Tasks waiting for a pool no worker has opened a consumer for.
    let mut subjects = stream.info_with_subjects(subject::all_tasks()).await?;
    while let Some(entry) = subjects.next().await {
        let (task_subject, count) = entry?;
        if let Some((stage, pool)) = stage_of_subject(&task_subject) {
            backlog
                .entry((stage.to_string(), pool))
                .or_insert((count as u64, 0));
        }
    }
    Ok(backlog)
}

/// Messages in `TY_DLQ` per stage (0 for a stage with none).
pub async fn read_dlq_depth(
    js: &jetstream::Context,
) -> Result<BTreeMap<&'static str, u64>, async_nats::Error> {
    let stream = js.get_stream(DLQ_STREAM).await?;
    let mut depth: BTreeMap<&'static str, u64> = STAGES.iter().map(|s| (s.name(), 0)).collect();
    let mut subjects = stream.info_with_subjects(subject::all_dlq()).await?;
    while let Some(entry) = subjects.next().await {
        let (dlq_subject, count) = entry?;
        if let Some(stage) = STAGES.iter().find(|s| subject::dlq(**s) == dlq_subject) {
            depth.insert(stage.name(), count as u64);
        }
    }
    Ok(depth)
}

/// One poll: sets the gauges, clears the backlog series that disappeared
/// since `reported`, and returns the series now reported.
pub async fn poll(
    js: &jetstream::Context,
    reported: &BTreeSet<(String, String)>,
) -> Result<BTreeSet<(String, String)>, async_nats::Error> {
    let m = metrics();
    let backlog = read_backlog(js).await?;
    for ((stage, pool), (pending, ack_pending)) in &backlog {
        m.set_backlog(stage, pool, *pending, *ack_pending);
    }
    for (stage, pool) in reported {
        if !backlog.contains_key(&(stage.clone(), pool.clone())) {
            m.clear_backlog(stage, pool);
        }
    }
    for (stage, depth) in read_dlq_depth(js).await? {
        m.set_dlq_depth(stage, depth);
    }
    Ok(backlog.into_keys().collect())
}

/// Polls every `every` until `shutdown`. A failed poll is logged; the
/// gauges keep their last values until the next one succeeds.
pub async fn run(js: jetstream::Context, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => match poll(&js, &reported).await {
                Ok(now) => reported = now,
                Err(error) => tracing::debug!(%error, "backlog poll failed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_core::topology::consumer_name;

    #[test]
    fn consumers_and_subjects_name_their_stage_and_pool() {
        for (stage, pool) in [
            (Stage::Prepare, "default"),
            (Stage::Deliver, "default"),
            (Stage::Train, "a100"),
            (Stage::Train, "default"),
        ] {
            let want = Some((stage.name(), pool.to_string()));
            assert_eq!(stage_of_consumer(&consumer_name(stage, pool)), want);
            assert_eq!(stage_of_subject(&subject::task(stage, pool)), want);
        }
        assert_eq!(stage_of_consumer("ty-results"), None);
        assert_eq!(stage_of_consumer("ty-train-"), None);
        assert_eq!(stage_of_consumer("other"), None);
        assert_eq!(stage_of_subject("ty.task.unknown"), None);
        assert_eq!(stage_of_subject("ty.result.prepare"), None);
    }
}
