//! Background loops with a declared policy: what happens when one fails,
//! and a health signal that says when one is down.
//!
//! A service runs a few loops beside its main one (the coordinator: results,
//! the NATS API, webhooks, the backlog poller, the reconciler). Each is
//! started with [`Supervisor::spawn`] and a [`Policy`]:
//!
//! - [`Policy::ShutDown`]: its failure stops the whole service (the
//!   shutdown token is cancelled), for a loop the service is useless
//!   without;
//! - [`Policy::Restart`]: it is started again after a delay that doubles
//!   from `initial` up to `max` (a run that lasted `max` starts the delays
//!   over), for a loop whose work can wait.
//!
//! A loop fails when it returns an error, panics, or returns while the
//! service is not shutting down. From its failure until a restarted run has
//! lasted `initial`, its name is in [`Supervisor::down`], which the service
//! turns into its health status (the coordinator's gRPC health says
//! NOT_SERVING). Every run gets a child of the service's shutdown token.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::instrument::WithSubscriber;

/// What a loop's failure does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Stop the service.
    ShutDown,
    /// Start the loop again after a delay, doubling from `initial` to `max`.
    Restart { initial: Duration, max: Duration },
}

impl Policy {
    /// Restart after 1 s, 2 s, 4 s, … at most a minute apart.
    pub const fn restart() -> Policy {
        Policy::Restart {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// The names of the loops that are down; empty when all run.
pub type Down = BTreeSet<&'static str>;

/// Starts loops under their policies and reports which are down.
pub struct Supervisor {
    shutdown: CancellationToken,
    tracker: TaskTracker,
    down: watch::Sender<Down>,
}

impl Supervisor {
    /// Loops run until `shutdown`; a [`Policy::ShutDown`] loop's failure
    /// cancels it.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            tracker: TaskTracker::new(),
            down: watch::Sender::new(Down::new()),
        }
    }

    /// The loops that are down, updated as they fail and recover.
    pub fn down(&self) -> watch::Receiver<Down> {
        self.down.subscribe()
    }

    /// Runs `run` under `policy`; each run gets a child of the shutdown
    /// token and should return once it is cancelled.
    pub fn spawn<F, Fut, E>(&self, name: &'static str, policy: Policy, mut run: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let (shutdown, tracker, down) = (
            self.shutdown.clone(),
            self.tracker.clone(),
            self.down.clone(),
        );
        let settle = match policy {
            Policy::ShutDown => Duration::ZERO,
            Policy::Restart { initial, .. } => initial,
        };
        let mut delay = settle;
        let supervise = async move {
            // Every run after the first follows a failure.
            let mut restarted = false;
            loop {
                let started = Instant::now();
                let mut handle =
                    tracker.spawn(run(shutdown.child_token()).with_current_subscriber());
                let ended = if restarted {
                    tokio::select! {
                        ended = &mut handle => ended,
                        _ = tokio::time::sleep(settle) => {
                            set(&down, name, false);
                            tracing::info!(task = name, "background loop running again");
                            handle.await
                        }
                    }
                } else {
                    handle.await
                };
                if shutdown.is_cancelled() {
                    break;
                }
                let why = match ended {
                    Ok(Ok(())) => "it ended before shutdown".to_owned(),
                    Ok(Err(error)) => error.to_string(),
                    Err(join) if join.is_panic() => "it panicked".to_owned(),
                    Err(join) => join.to_string(),
                };
                restarted = true;
                set(&down, name, true);
                match policy {
                    Policy::ShutDown => {
                        tracing::error!(task = name, %why, "background loop failed; stopping the service");
                        shutdown.cancel();
                        break;
                    }
                    Policy::Restart { initial, max } => {
                        if started.elapsed() >= max {
                            delay = initial;
                        }
                        tracing::error!(task = name, %why, restart_in_ms = delay.as_millis() as u64, "background loop failed; restarting");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(max);
                    }
                }
            }
        };
        self.tracker.spawn(supervise.with_current_subscriber());
    }

    /// Waits for every loop to end (after shutdown, or a failure that
    /// stopped the service).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn set(down: &watch::Sender<Down>, name: &'static str, is_down: bool) {
    down.send_modify(|set| {
        if is_down {
            set.insert(name);
        } else {
            set.remove(name);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const WAIT: Duration = Duration::from_secs(600);

    async fn until(down: &mut watch::Receiver<Down>, check: impl FnMut(&Down) -> bool) {
        tokio::time::timeout(WAIT, down.wait_for(check))
            .await
            .expect("in time")
            .expect("supervisor alive");
    }

    /// A loop that fails its first `failures` runs, then runs until
    /// shutdown; it records when each run started.
    fn flaky(
        failures: usize,
        starts: Arc<Mutex<Vec<Instant>>>,
    ) -> impl FnMut(CancellationToken) -> futures::future::BoxFuture<'static, Result<(), String>>
    {
        move |stop| {
            let starts = starts.clone();
            Box::pin(async move {
                let run = {
                    let mut starts = starts.lock().unwrap();
                    starts.push(Instant::now());
                    starts.len()
                };
                if run <= failures {
                    return Err(format!("run {run} failed"));
                }
                stop.cancelled().await;
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_loop_is_restarted_with_backoff_and_down_meanwhile() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone());
        let mut down = supervisor.down();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let policy = Policy::Restart {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        };
        supervisor.spawn("api", policy, flaky(3, starts.clone()));
        until(&mut down, |d| d.contains("api")).await;
        // Down until the fourth run has lasted `initial`.
        until(&mut down, |d| d.is_empty()).await;
        let starts = starts.lock().unwrap().clone();
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps,
            [1, 2, 4].map(Duration::from_secs),
            "the delays double"
        );
        assert!(!shutdown.is_cancelled());
        shutdown.cancel();
        supervisor.wait().await;
        assert!(supervisor.down().borrow().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_shut_down_loop_stops_the_service() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone());
        let starts = Arc::new(Mutex::new(Vec::new()));
        supervisor.spawn("results", Policy::ShutDown, flaky(1, starts.clone()));
        tokio::time::timeout(WAIT, shutdown.cancelled())
            .await
            .expect("the service is stopped");
        supervisor.wait().await;
        assert_eq!(starts.lock().unwrap().len(), 1, "not restarted");
        assert!(supervisor.down().borrow().contains("results"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_or_ends_early_counts_as_failed() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone());
        let mut down = supervisor.down();
        let runs = Arc::new(Mutex::new(0));
        let counted = runs.clone();
        supervisor.spawn("backlog", Policy::restart(), move |stop| {
            let runs = counted.clone();
            async move {
                let run = {
                    let mut runs = runs.lock().unwrap();
                    *runs += 1;
                    *runs
                };
                match run {
                    1 => panic!("a bug"),
                    2 => return Ok::<(), String>(()),
                    _ => stop.cancelled().await,
                }
                Ok(())
            }
        });
        until(&mut down, |d| d.contains("backlog")).await;
        until(&mut down, |d| d.is_empty()).await;
        assert_eq!(*runs.lock().unwrap(), 3);
        shutdown.cancel();
        supervisor.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn loops_ending_at_shutdown_are_not_failures() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone());
        let starts = Arc::new(Mutex::new(Vec::new()));
        supervisor.spawn("reconciler", Policy::ShutDown, flaky(0, starts.clone()));
        supervisor.spawn("webhooks", Policy::restart(), flaky(0, starts.clone()));
        shutdown.cancel();
        supervisor.wait().await;
        assert!(supervisor.down().borrow().is_empty());
        assert!(starts.lock().unwrap().len() <= 2);
    }
}
