//! The `local` provider: a machine is a service process on this host —
//! `ty-worker` for a training pool (its pool in `TY_WORKER__POOL`),
//! `ty-captioner` for `prepare`, `ty-uploader` for `deliver` — started with
//! the launch's environment and the fleet's config file, its output in
//! `<log_dir>/<name>.log`.
//!
//! Every machine has a state file `<state_dir>/<name>.json` (its pid and
//! the process' start time, so a reused pid is not taken for it): listing
//! reads the folder, so every autoscaler replica on this host sees the same
//! machines, and a new leader finds the machines the last one started (they
//! outlive the replica that started them, as pods outlive theirs). A
//! process that is gone without being released lists as exited until it
//! is. Releasing sends SIGTERM (a worker stops taking tasks and hands a
//! running one back once its trainer has saved; a drained one runs
//! nothing and exits at once), waits, and SIGKILLs after a grace. Each
//! signal is noted in the machine's log ([`SIGTERM_NOTE`],
//! [`SIGKILL_NOTE`]), so its log tells how it was stopped.

use super::{Launch, Machine, MachineState, Provider, ProviderError};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// How long a released machine has to exit after SIGTERM.
pub const RELEASE_GRACE: Duration = Duration::from_secs(60);

/// The line a release adds to the machine's log when it sends SIGTERM.
pub const SIGTERM_NOTE: &str = "[local provider] release: SIGTERM";
/// The line a release adds when the machine outlived the grace: SIGKILL.
pub const SIGKILL_NOTE: &str = "[local provider] release: still running after the grace; SIGKILL";

/// A machine's state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateFile {
    pid: i32,
    /// The process' start time in clock ticks since boot (`/proc/<pid>/stat`).
    start_ticks: u64,
    pool: String,
    created_at_ms: i64,
}

/// Services as child processes.
pub struct LocalProvider {
    bin_dir: PathBuf,
    config_file: Option<PathBuf>,
    state_dir: PathBuf,
    log_dir: Option<PathBuf>,
    grace: Duration,
    /// The processes this replica started, to reap them.
    children: Mutex<HashMap<String, Child>>,
}

fn io_err(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Unavailable(e.to_string())
}

/// The start time of a live, non-zombie process (None: gone).
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    // `starttime` is field 22 of stat; `rest` starts at field 3.
    fields.get(19)?.parse().ok()
}

impl LocalProvider {
    /// `bin_dir` holds the service binaries, `config_file` is passed to
    /// them (`--config`), state files go to `state_dir`, output to
    /// `log_dir` (inherited when `None`).
    pub fn new(
        bin_dir: PathBuf,
        config_file: Option<PathBuf>,
        state_dir: PathBuf,
        log_dir: Option<PathBuf>,
    ) -> Result<Self, ProviderError> {
        std::fs::create_dir_all(&state_dir).map_err(io_err)?;
        if let Some(dir) = &log_dir {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        Ok(Self {
            bin_dir,
            config_file,
            state_dir,
            log_dir,
            grace: RELEASE_GRACE,
            children: Mutex::default(),
        })
    }

    /// The grace after SIGTERM before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The binary a pool's machines run.
    pub fn binary(pool: &str) -> Option<&'static str> {
        match crate::backlog::stage_of_pool(pool)?.0 {
            trainyard_proto::v1::Stage::Prepare => Some("ty-captioner"),
            trainyard_proto::v1::Stage::Deliver => Some("ty-uploader"),
            _ => Some("ty-worker"),
        }
    }

    fn log_path(&self, name: &str) -> Option<PathBuf> {
        Some(self.log_dir.as_ref()?.join(format!("{name}.log")))
    }

    /// Adds `note` to the machine's log (when it has one).
    fn note(&self, name: &str, note: &str) {
        let Some(path) = self.log_path(name) else {
            return;
        };
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut log| {
                std::io::Write::write_all(&mut log, format!("{note}\n").as_bytes())
            });
        if let Err(error) = written {
            tracing::debug!(machine = name, %error, "cannot note a release in the machine's log");
        }
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.json"))
    }

    fn read_state(path: &Path) -> Option<StateFile> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Whether the process of `state` still runs (reaping it when ours).
    fn alive(&self, name: &str, state: &StateFile) -> bool {
        if let Some(child) = self.children.lock().expect("children").get_mut(name)
            && !matches!(child.try_wait(), Ok(None))
        {
            return false;
        }
        start_ticks(state.pid) == Some(state.start_ticks)
    }

    fn machine(&self, name: &str, state: &StateFile) -> Machine {
        Machine {
            id: state.pid.to_string(),
            name: name.to_string(),
            pool: state.pool.clone(),
            gpu_type: String::new(),
            dollars_per_hour: 0.0,
            interruptible: false,
            state: if self.alive(name, state) {
                MachineState::Running
            } else {
                MachineState::Exited
            },
            created_at_ms: state.created_at_ms,
            host: "localhost".into(),
        }
    }

    fn spawn(&self, launch: &Launch) -> Result<Machine, ProviderError> {
        let binary = Self::binary(&launch.pool)
            .ok_or_else(|| ProviderError::Refused(format!("unknown pool {:?}", launch.pool)))?;
        let program = self.bin_dir.join(binary);
        let mut command = Command::new(&program);
        if let Some(file) = &self.config_file {
            command.arg("--config").arg(file);
        }
        command.envs(&launch.env).stdin(Stdio::null());
        if let Some(path) = self.log_path(&launch.name) {
            // Appending, as the provider's notes are.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err)?;
            let err = log.try_clone().map_err(io_err)?;
            command.stdout(log).stderr(err);
        }
        let child = command.spawn().map_err(|e| {
            ProviderError::Refused(format!("cannot start {}: {e}", program.display()))
        })?;
        let pid = child.id() as i32;
        let state = StateFile {
            pid,
            start_ticks: start_ticks(pid).unwrap_or_default(),
            pool: launch.pool.clone(),
            created_at_ms: trainyard_core::now_ms(),
        };
        let json = serde_json::to_vec(&state).map_err(io_err)?;
        std::fs::write(self.state_path(&launch.name), json).map_err(io_err)?;
        self.children
            .lock()
            .expect("children")
            .insert(launch.name.clone(), child);
        tracing::info!(machine = %launch.name, pool = %launch.pool, pid, "local machine started");
        Ok(self.machine(&launch.name, &state))
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn list(&self) -> Result<Vec<Machine>, ProviderError> {
        let mut machines = Vec::new();
        for entry in std::fs::read_dir(&self.state_dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some(state) = Self::read_state(&path) {
                machines.push(self.machine(name, &state));
            }
        }
        machines.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(machines)
    }

    async fn launch(&self, launch: &Launch) -> Result<Machine, ProviderError> {
        if let Some(state) = Self::read_state(&self.state_path(&launch.name)) {
            let machine = self.machine(&launch.name, &state);
            if machine.state != MachineState::Exited {
                return Ok(machine);
            }
        }
        self.spawn(launch)
    }

    async fn release(&self, machine: &Machine) -> Result<(), ProviderError> {
        let path = self.state_path(&machine.name);
        let Some(state) = Self::read_state(&path) else {
            return Ok(()); // already released
        };
        if self.alive(&machine.name, &state) {
            let pid = Pid::from_raw(state.pid);
            self.note(&machine.name, SIGTERM_NOTE);
            let _ = kill(pid, Signal::SIGTERM);
            let mut deadline = tokio::time::Instant::now() + self.grace;
            let mut killed = false;
            while self.alive(&machine.name, &state) {
                if tokio::time::Instant::now() >= deadline {
                    if killed {
                        return Err(ProviderError::Unavailable(format!(
                            "{} survives SIGKILL",
                            machine.name
                        )));
                    }
                    tracing::warn!(machine = %machine.name, "still running after the grace; SIGKILL");
                    self.note(&machine.name, SIGKILL_NOTE);
                    let _ = kill(pid, Signal::SIGKILL);
                    killed = true;
                    deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(mut child) = self
            .children
            .lock()
            .expect("children")
            .remove(&machine.name)
        {
            let _ = child.try_wait();
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_map_to_their_service() {
        assert_eq!(LocalProvider::binary("prepare"), Some("ty-captioner"));
        assert_eq!(LocalProvider::binary("deliver"), Some("ty-uploader"));
        assert_eq!(LocalProvider::binary("train.a100"), Some("ty-worker"));
        assert_eq!(LocalProvider::binary("nope"), None);
    }

    fn launch(name: &str) -> Launch {
        Launch {
            name: name.into(),
            pool: "train.default".into(),
            env: [("TY_RUNTIME__WORKER_ID".to_string(), name.to_string())].into(),
            gpu_types: vec![],
            gpu_count: 0,
            interruptible: false,
            bid_per_gpu: 0.0,
            max_price_per_gpu: 0.0,
            avoid_hosts: vec![],
        }
    }

    #[tokio::test]
    async fn machines_are_started_once_listed_and_released() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // A stand-in service: runs until signalled.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        let worker = bin.join("ty-worker");
        std::fs::write(&worker, "#!/bin/sh\nexec sleep 60\n").expect("script");
        std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let provider = LocalProvider::new(
            bin,
            None,
            dir.path().join("state"),
            Some(dir.path().join("logs")),
        )
        .expect("provider")
        .with_grace(Duration::from_secs(5));
        let first = provider.launch(&launch("m-0")).await.expect("launch");
        let again = provider.launch(&launch("m-0")).await.expect("launch again");
        assert_eq!(first.id, again.id, "a launch is idempotent by name");
        let other = provider.launch(&launch("m-1")).await.expect("launch");
        let listed = provider.list().await.expect("list");
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|m| m.state == MachineState::Running));
        // One dies on its own: listed as exited until released.
        kill(Pid::from_raw(other.id.parse().unwrap()), Signal::SIGKILL).expect("kill");
        let exited = crate::test_wait(|| async {
            provider
                .list()
                .await
                .ok()?
                .into_iter()
                .find(|m| m.name == "m-1" && m.state == MachineState::Exited)
        })
        .await;
        provider.release(&exited).await.expect("release the exited");
        provider.release(&first).await.expect("release the running");
        provider.release(&first).await.expect("released twice");
        assert!(provider.list().await.expect("list").is_empty());
        assert_eq!(start_ticks(first.id.parse().unwrap()), None, "stopped");
        let log = std::fs::read_to_string(dir.path().join("logs/m-0.log")).expect("log");
        assert!(log.contains(SIGTERM_NOTE), "{log}");
        assert!(!log.contains(SIGKILL_NOTE), "{log}");
    }

    #[tokio::test]
    async fn a_machine_that_outlives_the_grace_is_killed_and_its_log_says_so() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // A stand-in service that ignores SIGTERM.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        let worker = bin.join("ty-worker");
        std::fs::write(
            &worker,
            "#!/bin/sh\ntrap '' TERM\necho ignoring\nexec sleep 60\n",
        )
        .expect("script");
        std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let provider = LocalProvider::new(
            bin,
            None,
            dir.path().join("state"),
            Some(dir.path().join("logs")),
        )
        .expect("provider")
        .with_grace(Duration::from_millis(200));
        let stubborn = provider.launch(&launch("m-0")).await.expect("launch");
        let log = dir.path().join("logs/m-0.log");
        crate::test_wait(|| async {
            let ready = std::fs::read_to_string(&log).ok()?.contains("ignoring");
            ready.then_some(())
        })
        .await;
        provider.release(&stubborn).await.expect("release");
        assert_eq!(start_ticks(stubborn.id.parse().unwrap()), None, "killed");
        let log = std::fs::read_to_string(&log).expect("log");
        let (term, kill) = (log.find(SIGTERM_NOTE), log.find(SIGKILL_NOTE));
        assert!(term.is_some() && kill.is_some() && term < kill, "{log}");
    }

    #[test]
    fn this_process_has_a_start_time() {
        let me = std::process::id() as i32;
        assert!(start_ticks(me).is_some());
        assert_eq!(start_ticks(i32::MAX), None);
    }
}
