//! A pool's backlog, read in band from JetStream: the consumer info of the
//! pool's consumer in `TY_TASKS` (`num_pending + num_ack_pending`, answered
//! by the consumer's leader), and for a training pool its pending tasks
//! read by sequence and weighed in seconds of work (steps × the backend's
//! seconds per step). A missing consumer is an error ("no data"), except
//! for a training pool no worker has served yet: the messages on its
//! subject are its pending tasks.
//!
//! Seconds per step are learnt from finished trainings: a deliver task
//! carries its job's [`TrainSummary`](trainyard_proto::v1::TrainSummary)
//! (steps, seconds, backend), read while it waits in `TY_TASKS`. What is
//! learnt ([`StepCosts`]) is kept in `ty_autoscaler` too (see
//! [`crate::lease`]), so the next leader starts from it.

use async_nats::jetstream::{self, context::ConsumerInfoErrorKind, stream};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use trainyard_core::config::AutoscalerConfig;
use trainyard_core::topology::{TASKS_STREAM, consumer_name, subject};
use trainyard_proto::v1::{DeliverTask, Stage, TrainTask};

use crate::plan::Backlog;

/// Pending training tasks read one by one per pass at most; the rest count
/// at the average of those read.
pub const READ_AT_MOST: usize = 500;

/// Weight of a new observation in the seconds-per-step average.
const EWMA_WEIGHT: f64 = 0.3;

/// Why a pool's backlog could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BacklogError {
    #[error("unknown pool {0:?} (prepare, deliver or train.<pool>)")]
    UnknownPool(String),
    #[error("consumer {0} not found")]
    NoConsumer(String),
    #[error("jetstream: {0}")]
    JetStream(String),
}

fn js_err(e: impl std::fmt::Display) -> BacklogError {
    BacklogError::JetStream(e.to_string())
}

/// The stage and GPU pool of an autoscaler pool name (`prepare`,
/// `deliver`, `train.<pool>`).
pub fn stage_of_pool(pool: &str) -> Option<(Stage, &str)> {
    match pool {
        "prepare" => Some((Stage::Prepare, "")),
        "deliver" => Some((Stage::Deliver, "")),
        other => other
            .strip_prefix("train.")
            .filter(|p| !p.is_empty())
            .map(|p| (Stage::Train, p)),
    }
}

/// Seconds per training step, per backend: the configured priors, and an
/// average of finished trainings as they come. Its JSON is what the leader
/// keeps under [`crate::lease::LEARNT_KEY`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepCosts {
    /// Seconds per step learnt, by backend.
    #[serde(default)]
    learnt: BTreeMap<String, f64>,
    /// The last deliver task's sequence whose summary was taken.
    #[serde(default)]
    seen_up_to: u64,
}

impl StepCosts {
    /// `over`'s values on top of `base`'s (a backend only `base` knows
    /// keeps its value), with deliveries taken up to the later mark of the
    /// two: a leader taking the lease puts what the bucket holds over what
    /// it knew, and writes what it learnt over what the bucket holds.
    pub fn merged(base: &StepCosts, over: &StepCosts) -> StepCosts {
        let mut learnt = base.learnt.clone();
        learnt.extend(
            over.learnt
                .iter()
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .map(|(k, v)| (k.clone(), *v)),
        );
        StepCosts {
            learnt,
            seen_up_to: base.seen_up_to.max(over.seen_up_to),
        }
    }

    /// Seconds one step of `backend` takes: learnt, else the prior.
    pub fn seconds_per_step(&self, config: &AutoscalerConfig, backend: &str) -> f64 {
        self.learnt
            .get(backend)
            .or_else(|| config.seconds_per_step.get(backend))
            .copied()
            .unwrap_or(config.default_seconds_per_step)
            .max(0.0)
    }

    /// Takes one finished training's duration into the average.
    pub fn learn(&mut self, config: &AutoscalerConfig, backend: &str, steps: u32, seconds: f64) {
        if steps == 0 || seconds <= 0.0 || backend.is_empty() {
            return;
        }
        let observed = seconds / f64::from(steps);
        let prior = self.seconds_per_step(config, backend);
        let next = if self.learnt.contains_key(backend) {
            prior + EWMA_WEIGHT * (observed - prior)
        } else {
            observed
        };
        self.learnt.insert(backend.to_string(), next);
    }
}

/// Reads backlogs; keeps what it learnt and the tasks it already weighed.
pub struct BacklogReader {
    js: jetstream::Context,
    /// Work seconds of a training task, by stream sequence (messages do
    /// not change; the entries of tasks gone are dropped each pass).
    weighed: BTreeMap<u64, (String, u32)>,
    pub costs: StepCosts,
}

impl BacklogReader {
    pub fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            weighed: BTreeMap::new(),
            costs: StepCosts::default(),
        }
    }

    async fn stream(&self) -> Result<stream::Stream<stream::Info>, BacklogError> {
        self.js.get_stream(TASKS_STREAM).await.map_err(js_err)
    }

    /// Messages on one subject of `TY_TASKS`.
    async fn subject_count(
        stream: &stream::Stream<stream::Info>,
        task_subject: &str,
    ) -> Result<u64, BacklogError> {
        use futures::StreamExt;
        let mut subjects = stream
            .info_with_subjects(task_subject)
            .await
            .map_err(js_err)?;
        let mut count = 0;
        while let Some(entry) = subjects.next().await {
            let (found, n) = entry.map_err(js_err)?;
            if found == task_subject {
                count += n as u64;
            }
        }
        Ok(count)
    }

    /// The next message on `task_subject` at or after `seq`.
    async fn next_on(
        stream: &stream::Stream<stream::Info>,
        task_subject: &str,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BacklogError> {
        match stream
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(task_subject.to_string())
            .send()
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(js_err(e)),
        }
    }

    /// One pool's backlog.
    pub async fn read(
        &mut self,
        config: &AutoscalerConfig,
        pool: &str,
        seconds_per_task: f64,
    ) -> Result<Backlog, BacklogError> {
        let (stage, gpu_pool) =
            stage_of_pool(pool).ok_or_else(|| BacklogError::UnknownPool(pool.into()))?;
        let stream = self.stream().await?;
        let consumer = consumer_name(stage, gpu_pool);
        let task_subject = subject::task(stage, gpu_pool);
        let (pending, ack_pending) = match stream.consumer_info(&consumer).await {
            Ok(info) => (info.num_pending, info.num_ack_pending as u64),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                if stage != Stage::Train {
                    return Err(BacklogError::NoConsumer(consumer));
                }
                // No worker ever served this pool: its tasks wait on the subject.
                (Self::subject_count(&stream, &task_subject).await?, 0)
            }
            Err(e) => return Err(js_err(e)),
        };
        let tasks = pending + ack_pending;
        let work_secs = if stage == Stage::Train {
            self.train_work(config, &stream, &task_subject, tasks)
                .await?
        } else {
            tasks as f64 * seconds_per_task.max(0.0)
        };
        Ok(Backlog {
            pending,
            ack_pending,
            work_secs,
        })
    }

    /// The seconds of work of the training tasks on `task_subject` (those
    /// waiting and those out: a work queue keeps both until acked).
    async fn train_work(
        &mut self,
        config: &AutoscalerConfig,
        stream: &stream::Stream<stream::Info>,
        task_subject: &str,
        tasks: u64,
    ) -> Result<f64, BacklogError> {
        if tasks == 0 {
            return Ok(0.0);
        }
        let mut seq = 1;
        let mut read = 0usize;
        let mut work = 0.0;
        let mut seen = Vec::new();
        while read < READ_AT_MOST {
            let Some(message) = Self::next_on(stream, task_subject, seq).await? else {
                break;
            };
            seq = message.sequence + 1;
            let (backend, steps) = match self.weighed.get(&message.sequence) {
                Some(known) => known.clone(),
                None => {
                    let task = TrainTask::decode(message.payload.as_ref()).unwrap_or_default();
                    let training = task.spec.and_then(|s| s.training).unwrap_or_default();
                    let done = task.resume_from.map(|c| c.step).unwrap_or(0);
                    let known = (training.backend, training.steps.saturating_sub(done));
                    self.weighed.insert(message.sequence, known.clone());
                    known
                }
            };
            seen.push(message.sequence);
            work += f64::from(steps) * self.costs.seconds_per_step(config, &backend);
            read += 1;
        }
        // Forget tasks no longer in the stream (acked).
        self.weighed.retain(|s, _| seen.binary_search(s).is_ok());
        if read == 0 {
            // Counted by the consumer, gone from the stream since: a
            // task's worth each.
            return Ok(tasks as f64 * config.default_seconds_per_step);
        }
        let rest = tasks.saturating_sub(read as u64) as f64;
        Ok(work + rest * work / read as f64)
    }

    /// Learns seconds per step from the summaries of the deliver tasks
    /// waiting in `TY_TASKS` (each taken once); whether it took any.
    pub async fn learn_from_deliveries(
        &mut self,
        config: &AutoscalerConfig,
    ) -> Result<bool, BacklogError> {
        let before = self.costs.clone();
        self.take_deliveries(config).await?;
        Ok(self.costs != before)
    }

    async fn take_deliveries(&mut self, config: &AutoscalerConfig) -> Result<(), BacklogError> {
        let stream = self.stream().await?;
        let deliver = subject::task(Stage::Deliver, "");
        let mut seq = self.costs.seen_up_to + 1;
        for _ in 0..READ_AT_MOST {
            let Some(message) = Self::next_on(&stream, &deliver, seq).await? else {
                break;
            };
            seq = message.sequence + 1;
            self.costs.seen_up_to = message.sequence;
            if let Ok(task) = DeliverTask::decode(message.payload.as_ref())
                && let Some(summary) = task.summary
            {
                self.costs
                    .learn(config, &summary.backend, summary.steps, summary.seconds);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_map_to_stages() {
        assert_eq!(stage_of_pool("prepare"), Some((Stage::Prepare, "")));
        assert_eq!(stage_of_pool("deliver"), Some((Stage::Deliver, "")));
        assert_eq!(stage_of_pool("train.a100"), Some((Stage::Train, "a100")));
        assert_eq!(stage_of_pool("train."), None);
        assert_eq!(stage_of_pool("train"), None);
    }

    #[test]
    fn step_costs_start_at_the_prior_and_follow_finished_trainings() {
        let config = AutoscalerConfig {
            seconds_per_step: [("kohya".to_string(), 2.0)].into(),
            default_seconds_per_step: 1.0,
            ..Default::default()
        };
        let mut costs = StepCosts::default();
        assert_eq!(costs.seconds_per_step(&config, "kohya"), 2.0);
        assert_eq!(costs.seconds_per_step(&config, "other"), 1.0);
        costs.learn(&config, "kohya", 100, 400.0);
        assert_eq!(costs.seconds_per_step(&config, "kohya"), 4.0);
        costs.learn(&config, "kohya", 100, 100.0);
        let after = costs.seconds_per_step(&config, "kohya");
        assert!(after < 4.0 && after > 1.0, "{after}");
        costs.learn(&config, "kohya", 0, 100.0);
        assert_eq!(costs.seconds_per_step(&config, "kohya"), after);
    }

    #[test]
    fn step_costs_round_trip_and_merge_with_the_later_on_top() {
        let config = AutoscalerConfig {
            default_seconds_per_step: 1.0,
            ..Default::default()
        };
        let mut mine = StepCosts::default();
        mine.learn(&config, "kohya", 100, 300.0);
        mine.learn(&config, "ai-toolkit", 10, 50.0);
        mine.seen_up_to = 7;
        let json = serde_json::to_string(&mine).expect("json");
        let read: StepCosts = serde_json::from_str(&json).expect("read back");
        assert_eq!(read, mine);
        assert_eq!(
            serde_json::from_str::<StepCosts>("{}").expect("empty"),
            StepCosts::default()
        );
        let mut stored = StepCosts::default();
        stored.learn(&config, "kohya", 100, 600.0);
        stored.seen_up_to = 12;
        let taken = StepCosts::merged(&mine, &stored);
        assert_eq!(
            taken.seconds_per_step(&config, "kohya"),
            6.0,
            "the bucket's"
        );
        assert_eq!(taken.seconds_per_step(&config, "ai-toolkit"), 5.0, "kept");
        assert_eq!(taken.seen_up_to, 12);
        let written = StepCosts::merged(&stored, &mine);
        assert_eq!(written.seconds_per_step(&config, "kohya"), 3.0, "mine");
        assert_eq!(written.seen_up_to, 12);
    }
}
