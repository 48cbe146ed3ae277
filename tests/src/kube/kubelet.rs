//! The kubelet's part of the stand-in: a pod of a Deployment with a
//! [`PodTemplate`] runs its container as a real child process, started when
//! the ReplicaSet makes the pod and stopped as Kubernetes stops a pod —
//! SIGTERM to the container's main process, SIGKILL to all of it once the
//! pod's termination grace is over — after which the pod is gone from the
//! API. A container that exits on its own is not restarted: its pod shows
//! `CrashLoopBackOff` until it is deleted.

use super::{Inner, PodExit, lock};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, Weak};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What each pod of a Deployment runs (its pod template's one container).
#[derive(Clone, Debug)]
pub struct PodTemplate {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The container's environment (`env` with values).
    pub env: BTreeMap<String, String>,
    /// Variables set to the pod's own name, as `valueFrom.fieldRef:
    /// metadata.name` does (the worker's id is its pod's name).
    pub pod_name_env: Vec<String>,
    /// `terminationGracePeriodSeconds`: SIGTERM, then SIGKILL after this.
    pub termination_grace: Duration,
    /// Each pod's own folder `<pods_dir>/<pod>/` is its working directory
    /// (its container's disk, an `emptyDir`: pods share no files), and its
    /// output goes to `<pods_dir>/<pod>.log` (`kubectl logs`).
    pub pods_dir: PathBuf,
}

/// What a container gets from the node besides its own environment, as an
/// image's defaults would give it; nothing else of the test's environment.
const NODE_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG", "RUST_BACKTRACE"];

/// Starts `pod`'s container; its runner stops it when `terminate` is
/// cancelled (the pod deleted) or `stop` is (the stand-in dropped).
/// Returns its pid.
pub(super) fn start(
    inner: Weak<Mutex<Inner>>,
    template: &PodTemplate,
    pod: &str,
    terminate: CancellationToken,
    stop: CancellationToken,
) -> std::io::Result<u32> {
    let disk = template.pods_dir.join(pod);
    std::fs::create_dir_all(&disk)?;
    let log = std::fs::File::create(template.pods_dir.join(format!("{pod}.log")))?;
    let mut command = tokio::process::Command::new(&template.program);
    command
        .args(&template.args)
        .current_dir(&disk)
        .env_clear()
        .envs(
            NODE_ENV
                .iter()
                .filter_map(|k| Some((*k, std::env::var_os(k)?))),
        )
        .envs(&template.env)
        .envs(template.pod_name_env.iter().map(|k| (k.as_str(), pod)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // The container: its own group, all of which SIGKILL ends.
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn()?;
    let pid = child.id().unwrap_or_default();
    tokio::spawn(run(
        inner,
        pod.to_string(),
        child,
        template.termination_grace,
        terminate,
        stop,
    ));
    Ok(pid)
}

fn kill_container(pid: u32) {
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Watches one container until its pod is gone.
async fn run(
    inner: Weak<Mutex<Inner>>,
    pod: String,
    mut child: tokio::process::Child,
    grace: Duration,
    terminate: CancellationToken,
    stop: CancellationToken,
) {
    let pid = child.id().unwrap_or_default();
    let crashed = tokio::select! {
        status = child.wait() => Some(status.ok().and_then(|s| s.code())),
        _ = terminate.cancelled() => None,
        _ = stop.cancelled() => {
            kill_container(pid);
            let _ = child.wait().await;
            return;
        }
    };
    let exit = match crashed {
        Some(code) => {
            if let Some(inner) = inner.upgrade() {
                lock(&inner).crashed(&pod);
            }
            tokio::select! {
                _ = terminate.cancelled() => {}
                _ = stop.cancelled() => return,
            }
            PodExit::Crashed(code)
        }
        None => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            tokio::select! {
                ended = tokio::time::timeout(grace, child.wait()) => match ended {
                    Ok(status) => PodExit::Terminated(status.ok().and_then(|s| s.code())),
                    Err(_) => {
                        kill_container(pid);
                        let _ = child.wait().await;
                        PodExit::Killed
                    }
                },
                _ = stop.cancelled() => {
                    kill_container(pid);
                    let _ = child.wait().await;
                    return;
                }
            }
        }
    };
    // Whatever else the container still ran goes with it.
    kill_container(pid);
    if let Some(inner) = inner.upgrade() {
        lock(&inner).gone(&pod, Some(exit));
    }
}
