//! The stand-in's pods as real processes: with a [`PodRunner`] set, a
//! created pod boots as RunPod boots one — its env's
//! `{{ RUNPOD_SECRET_<name> }}` references resolved from the account's
//! secret table (one that does not exist: the container never starts), then
//! the image's entrypoint and command run as a child process with the pod's
//! env over the image's. The pod's folder (`<dir>/<pod id>/`) is its
//! container's disk: the entrypoint's credential folder, the worker's work
//! dir and `pod.log`.
//!
//! Stopping is RunPod's: `podTerminate` sends SIGTERM to the container's
//! main process and SIGKILL after [`TERMINATE_GRACE`] (Docker's default
//! stop timeout); a spot preemption sends SIGTERM and SIGKILL
//! [`SPOT_NOTICE`] later. When the main process ends, whatever it left in
//! the container (trainers in their own process groups) is killed, as a
//! container's teardown would. No process outlives the stand-in.

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What a spot pod gets from SIGTERM to SIGKILL on RunPod.
pub const SPOT_NOTICE: Duration = Duration::from_secs(5);

/// What a terminated pod gets from SIGTERM to SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// The image a pod runs, on this host.
#[derive(Clone, Debug)]
pub struct PodRunner {
    /// The image's entrypoint (`deploy/runpod/entrypoint.sh`).
    pub entrypoint: PathBuf,
    /// The image's command (`ty-worker`).
    pub command: Vec<String>,
    /// Put first on the pod's `PATH` (the test's binaries, as installed
    /// in the image).
    pub bin_dir: PathBuf,
    /// The image's environment (a pod's own env wins), for what the
    /// image would hold: a config file, say.
    pub image_env: BTreeMap<String, String>,
    /// Where each pod's folder goes.
    pub dir: PathBuf,
}

/// How a pod's main process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodExit {
    /// Its exit code (None: ended by a signal).
    pub code: Option<i32>,
    /// It was still running when its grace ran out, and was SIGKILLed.
    pub killed: bool,
}

/// One pod's process, or why it never started.
pub(super) struct PodProcess {
    pub dir: PathBuf,
    pid: Option<u32>,
    stop: watch::Sender<Option<Duration>>,
    pub exit: Arc<Mutex<Option<PodExit>>>,
    /// A secret it names that does not exist.
    pub boot_error: Option<String>,
}

impl PodProcess {
    /// Whether its main process runs.
    pub fn running(&self) -> bool {
        self.pid.is_some() && lock(&self.exit).is_none()
    }

    /// SIGTERM now, SIGKILL after `grace` (once: a second stop is a no-op).
    pub fn stop(&self, grace: Duration) {
        self.stop.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(grace);
            true
        });
    }

    /// SIGKILLs it and everything in its container, now.
    pub fn kill_now(&self) {
        if let Some(pid) = self.pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        teardown(&self.dir);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `value` with every `{{ RUNPOD_SECRET_<name> }}` replaced from
/// `secrets`; the first name not there is the error.
pub fn resolve_secrets(value: &str, secrets: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        let reference = &rest[start..start + len + 2];
        match trainyard_core::config::runpod_secret_name(reference) {
            Some(name) => {
                let secret = secrets.get(name).ok_or_else(|| name.to_string())?;
                out.push_str(&rest[..start]);
                out.push_str(secret);
            }
            None => out.push_str(&rest[..start + len + 2]),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Boots a pod: resolves its secrets and starts its container's main
/// process (must run inside the Tokio runtime).
pub(super) fn boot(
    runner: &PodRunner,
    pod_id: &str,
    env: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
) -> PodProcess {
    let dir = runner.dir.join(pod_id);
    let (stop, stop_rx) = watch::channel(None);
    let exit = Arc::new(Mutex::new(None));
    let not_started = |error: String| PodProcess {
        dir: dir.clone(),
        pid: None,
        stop: stop.clone(),
        exit: exit.clone(),
        boot_error: Some(error),
    };
    let mut resolved = BTreeMap::new();
    for (key, value) in env {
        match resolve_secrets(value, secrets) {
            Ok(v) => {
                resolved.insert(key.clone(), v);
            }
            Err(name) => {
                return not_started(format!("{key}: secret {name:?} does not exist"));
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all(dir.join("work")) {
        return not_started(format!("pod folder: {e}"));
    }
    let log = match std::fs::File::create(dir.join("pod.log")) {
        Ok(log) => log,
        Err(e) => return not_started(format!("pod log: {e}")),
    };
    let Ok(err) = log.try_clone() else {
        return not_started("pod log".into());
    };
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", runner.bin_dir.display());
    let mut command = tokio::process::Command::new("sh");
    command
        .arg(&runner.entrypoint)
        .args(&runner.command)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &dir)
        .env("RUNPOD_POD_ID", pod_id)
        // Where the image keeps these, inside this pod's folder.
        .env("TY_ENTRYPOINT_DIR", dir.join("run"))
        .env("TY_TRAINER_ENV_FILE", dir.join("trainer.env"))
        .env("TY_WORKER__WORK_DIR", dir.join("work"))
        .envs(&runner.image_env)
        .envs(&resolved)
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return not_started(format!("cannot start the container: {e}")),
    };
    let pid = child.id();
    tokio::spawn(supervise(child, stop_rx, exit.clone(), dir.clone()));
    PodProcess {
        dir,
        pid,
        stop,
        exit,
        boot_error: None,
    }
}

/// Waits for the main process to end on its own or be stopped; then tears
/// the container down and records how it ended.
async fn supervise(
    mut child: tokio::process::Child,
    mut stop: watch::Receiver<Option<Duration>>,
    exit: Arc<Mutex<Option<PodExit>>>,
    dir: PathBuf,
) {
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut killed = false;
    let stopped = async {
        let grace = stop.wait_for(Option::is_some).await.ok().and_then(|g| *g);
        grace.unwrap_or(Duration::ZERO)
    };
    let status = tokio::select! {
        status = child.wait() => status,
        grace = stopped => {
            if let Some(pid) = pid {
                let _ = kill(pid, Signal::SIGTERM);
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    killed = true;
                    if let Some(pid) = pid {
                        let _ = killpg(pid, Signal::SIGKILL);
                    }
                    child.wait().await
                }
            }
        }
    };
    teardown(&dir);
    let code = status.ok().and_then(|s| s.code());
    *lock(&exit) = Some(PodExit { code, killed });
}

/// SIGKILLs every process left in a pod's container (they mention its
/// folder: the worker's trainers run in its work dir).
fn teardown(dir: &Path) {
    let needle = dir.display().to_string();
    for pid in crate::processes_mentioning(&needle) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_references_resolve_and_an_unknown_one_is_named() {
        let secrets: BTreeMap<String, String> = [("seed".to_string(), "SU1".to_string())].into();
        assert_eq!(
            resolve_secrets("{{ RUNPOD_SECRET_seed }}", &secrets).unwrap(),
            "SU1"
        );
        assert_eq!(
            resolve_secrets("a {{RUNPOD_SECRET_seed}} b {{ other }}", &secrets).unwrap(),
            "a SU1 b {{ other }}"
        );
        assert_eq!(
            resolve_secrets("{{ RUNPOD_SECRET_nope }}", &secrets),
            Err("nope".to_string())
        );
    }
}
