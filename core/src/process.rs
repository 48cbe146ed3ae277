//! The one way Trainyard starts a trainer or captioning command.
//!
//! Launchers (accelerate, deepspeed, shell wrappers) do not pass signals on,
//! so every child runs in a new process group and the whole group is
//! signalled. Dropping the handle kills the group: a worker task that is
//! cancelled or panics never leaves a trainer holding the GPU. Arguments are
//! an argv vector, never a shell line. Output is read line by line on its own
//! tasks, split on `\r` as well as `\n` (progress bars) with ANSI escapes removed.
//!
//! A child does not inherit this service's environment: that holds the
//! store's keys, the NATS URL and credentials, and trainer code is not
//! trusted. It gets [`inherited_env`] (what a program and the Python and
//! CUDA stacks need to run) and the spec's own variables, nothing else.
//!
//! Dropping the handle cannot help when the whole worker is SIGKILLed:
//! [`ChildGroup::spawn_guarded`] puts the trainer guard ([`crate::guard`])
//! at the head of the group, which ends the group when the worker is gone.
//! Waiting after SIGKILL is bounded ([`ChildGroup::kill`]).

use crate::guard::Message;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// What to run.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// Added to the allowed part of this process's environment ([`inherited_env`]).
    pub env: Vec<(String, String)>,
}

/// Variables a child gets from this process, by name.
const KEEP: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "VIRTUAL_ENV",
    "OMP_NUM_THREADS",
    "RUST_BACKTRACE",
];
/// Variables a child gets from this process, by prefix: locale, CUDA and
/// NVIDIA, NCCL, PyTorch, the Python and Hugging Face stacks' settings
/// and caches, accelerate, Triton, conda.
const KEEP_PREFIXES: &[&str] = &[
    "LC_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "TORCH",
    "PYTORCH_",
    "PYTHON",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DIFFUSERS_",
    "ACCELERATE_",
    "TRITON_",
    "CONDA_",
    "XDG_",
];
/// Credentials that a kept prefix would let through: never passed on.
const NEVER: &[&str] = &["HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN"];

/// The part of `vars` (this process's environment) a child inherits.
pub fn inherited_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    vars.into_iter()
        .filter(|(name, _)| {
            let Some(name) = name.to_str() else {
                return false;
            };
            !NEVER.contains(&name)
                && (KEEP.contains(&name) || KEEP_PREFIXES.iter().any(|p| name.starts_with(p)))
        })
        .collect()
}

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn name(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

#[derive(Clone, Debug)]
pub struct OutputLine {
    pub stream: OutputStream,
    pub line: String,
}

/// Where the trainer guard ([`crate::guard`]) is, and how long it lets an
/// orphaned trainer save before it SIGKILLs the group.
#[derive(Clone, Debug)]
pub struct Guard {
    pub program: PathBuf,
    pub grace: Duration,
}

/// How long the guard may take to start the trainer and say so.
const GUARD_START: Duration = Duration::from_secs(30);
/// How long to wait for the group leader after SIGKILL, unless changed
/// with [`ChildGroup::set_kill_wait`].
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A running child and its process group.
pub struct ChildGroup {
    child: tokio::process::Child,
    pgid: Pid,
    exited: bool,
    /// The guard's link, when the child is a guard; with what was read of it.
    link: Option<(tokio::net::UnixStream, Vec<u8>)>,
    trainer_pid: u32,
    kill_wait: Duration,
}

impl ChildGroup {
    /// Starts the command in its own process group. Lines of stdout and
    /// stderr arrive on the returned channel until both pipes close.
    pub fn spawn(spec: &CommandSpec) -> std::io::Result<(ChildGroup, mpsc::Receiver<OutputLine>)> {
        let mut command = tokio::process::Command::new(&spec.program);
        command.args(&spec.args).stdin(Stdio::null());
        Self::launch(command, spec)
    }

    /// Starts the command under the trainer guard: the group outlives this
    /// process by at most the guard's grace. Statuses, signals and output
    /// are the command's own, as with [`ChildGroup::spawn`]; a command that
    /// cannot be started is an error here too.
    pub async fn spawn_guarded(
        spec: &CommandSpec,
        guard: &Guard,
    ) -> std::io::Result<(ChildGroup, mpsc::Receiver<OutputLine>)> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let args = crate::guard::GuardArgs {
            grace: guard.grace,
            program: spec.program.clone().into(),
            args: spec.args.clone(),
        };
        let mut command = tokio::process::Command::new(&guard.program);
        command
            .args(args.to_args())
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
        // The command (and with it the guard's end of the link) is dropped
        // inside: only the guard holds that end now.
        let (mut group, rx) = Self::launch(command, spec).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", guard.program.display()),
            )
        })?;
        ours.set_nonblocking(true)?;
        group.link = Some((tokio::net::UnixStream::from_std(ours)?, Vec::new()));
        let said = tokio::time::timeout(GUARD_START, group.next_message())
            .await
            .ok()
            .flatten();
        match said {
            Some(Message::Started(pid)) => {
                group.trainer_pid = pid;
                Ok((group, rx))
            }
            Some(Message::Failed(reason)) => {
                let _ = group.kill().await;
                Err(std::io::Error::new(std::io::ErrorKind::NotFound, reason))
            }
            _ => {
                let _ = group.kill().await;
                Err(std::io::Error::other(format!(
                    "{} did not start the trainer",
                    guard.program.display()
                )))
            }
        }
    }

    fn launch(
        mut command: tokio::process::Command,
        spec: &CommandSpec,
    ) -> std::io::Result<(ChildGroup, mpsc::Receiver<OutputLine>)> {
        command
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(inherited_env(std::env::vars_os()))
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("child exited before it could be watched"))?;
        let (tx, rx) = mpsc::channel(1024);
        if let Some(out) = child.stdout.take() {
            // Ends by itself at EOF, when the child's stdout closes.
            tokio::spawn(read_lines(out, OutputStream::Stdout, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(read_lines(err, OutputStream::Stderr, tx));
        }
        Ok((
            ChildGroup {
                child,
                pgid: Pid::from_raw(pid as i32),
                exited: false,
                link: None,
                trainer_pid: pid,
                kill_wait: KILL_WAIT,
            },
            rx,
        ))
    }

    /// The process group's id (the guard's pid, when guarded).
    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    /// The command's own pid.
    pub fn trainer_pid(&self) -> u32 {
        self.trainer_pid
    }

    /// How long [`ChildGroup::stop`] waits for the group after SIGKILL
    /// before it gives up on it.
    pub fn set_kill_wait(&mut self, wait: Duration) {
        self.kill_wait = wait;
    }

    /// Sends a signal to the whole group.
    pub fn signal(&self, signal: Signal) {
        if !self.exited {
            let _ = killpg(self.pgid, signal);
        }
    }

    /// Waits for the command to exit. Unbounded: for a group not yet signalled.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.exited = true;
        // Anything the leader left behind in its group goes with it.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        Ok(self.command_status(status).await)
    }

    /// SIGTERM to the group, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                self.exited = true;
                let _ = killpg(self.pgid, Signal::SIGKILL);
                Ok(self.command_status(status?).await)
            }
            Err(_) => self.kill().await,
        }
    }

    /// SIGKILL to the group; waits for it at most the kill wait. A process
    /// in uninterruptible sleep (a wedged GPU driver call) can outlast
    /// SIGKILL: then this gives up with a `TimedOut` error rather than hang
    /// the caller.
    pub async fn kill(&mut self) -> std::io::Result<ExitStatus> {
        if !self.exited {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
        match tokio::time::timeout(self.kill_wait, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let message = format!(
                    "process group {} did not exit within {:?} of SIGKILL (uninterruptible sleep?); giving up on it",
                    self.pgid, self.kill_wait
                );
                tracing::error!(pgid = self.pgid.as_raw(), "{message}");
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
            }
        }
    }

    /// The command's status: the guard's report of it, or (not guarded, or
    /// a guard killed with its group) the leader's own.
    async fn command_status(&mut self, leader: ExitStatus) -> ExitStatus {
        if self.link.is_none() {
            return leader;
        }
        // The guard wrote before it exited, and nothing else holds its end:
        // this ends at once; the bound is only a guard against surprises.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, self.next_message()).await {
            if let Message::Exit(status) = message {
                return status;
            }
        }
        leader
    }

    /// The next message on the guard's link; `None` at EOF or on an error.
    async fn next_message(&mut self) -> Option<Message> {
        let (link, buf) = self.link.as_mut()?;
        loop {
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                match Message::parse(String::from_utf8_lossy(&line).trim_end()) {
                    Some(message) => return Some(message),
                    None => continue,
                }
            }
            let mut chunk = [0u8; 256];
            match link.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

impl Drop for ChildGroup {
    fn drop(&mut self) {
        // Once reaped (and its group killed), the pgid may belong to a new process.
        if !self.exited {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

async fn read_lines<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: OutputStream,
    tx: mpsc::Sender<OutputLine>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &byte in &buf[..n] {
            if byte == b'\n' || byte == b'\r' {
                if !pending.is_empty() {
                    let line = clean_line(&pending);
                    pending.clear();
                    if !line.is_empty() && tx.send(OutputLine { stream, line }).await.is_err() {
                        return;
                    }
                }
            } else if pending.len() < 64 * 1024 {
                pending.push(byte);
            }
        }
    }
    if !pending.is_empty() {
        let line = clean_line(&pending);
        if !line.is_empty() {
            let _ = tx.send(OutputLine { stream, line }).await;
        }
    }
}

/// Decodes lossily and removes ANSI escape sequences (`ESC [ … letter`).
pub fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![],
        }
    }

    #[test]
    fn a_child_inherits_no_credentials() {
        let parent = [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("CUDA_VISIBLE_DEVICES", "0"),
            ("PYTHONPATH", "/opt/p"),
            ("HF_HOME", "/cache/hf"),
            ("LC_ALL", "C.UTF-8"),
            ("HF_TOKEN", "hf_worker-own"),
            ("AWS_SECRET_ACCESS_KEY", "store-key"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("TY_STORE__S3__SECRET_ACCESS_KEY", "store-key"),
            ("TY_NATS__URL", "nats://user:pass@nats:4222"),
            ("NATS_CREDS", "/etc/nats/worker.creds"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer x"),
            ("TY_TOKEN", "ty_client"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let kept: Vec<String> = inherited_env(parent)
            .into_iter()
            .map(|(k, _)| k.into_string().unwrap())
            .collect();
        assert_eq!(
            kept,
            [
                "PATH",
                "HOME",
                "CUDA_VISIBLE_DEVICES",
                "PYTHONPATH",
                "HF_HOME",
                "LC_ALL"
            ]
        );
    }

    #[tokio::test]
    async fn a_child_gets_only_the_allowed_environment_and_its_own() {
        let mut spec = sh("env");
        spec.env.push(("TY_STANDIN_OWN".into(), "1".into()));
        let (mut child, mut rx) = ChildGroup::spawn(&spec).unwrap();
        assert!(child.wait().await.unwrap().success());
        let mut names = Vec::new();
        while let Some(line) = rx.recv().await {
            if let Some((name, _)) = line.line.split_once('=') {
                names.push(name.to_string());
            }
        }
        assert!(names.contains(&"TY_STANDIN_OWN".to_string()), "{names:?}");
        let allowed: Vec<String> = inherited_env(std::env::vars_os())
            .into_iter()
            .map(|(k, _)| k.into_string().unwrap())
            .collect();
        // What the shell sets itself (PWD, SHLVL, _) aside, nothing else.
        for name in names {
            assert!(
                allowed.contains(&name)
                    || name == "TY_STANDIN_OWN"
                    || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&name.as_str()),
                "{name} reached the child"
            );
        }
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(clean_line(b"\x1b[32mok\x1b[0m 5%  "), "ok 5%");
    }

    #[tokio::test]
    async fn lines_split_on_carriage_returns() {
        let (mut child, mut rx) =
            ChildGroup::spawn(&sh("printf 'a\\rb\\nc'; printf 'err\\n' >&2")).unwrap();
        let status = child.wait().await.unwrap();
        assert!(status.success());
        let mut lines = Vec::new();
        while let Some(line) = rx.recv().await {
            lines.push((line.stream, line.line));
        }
        let stdout: Vec<_> = lines
            .iter()
            .filter(|(s, _)| *s == OutputStream::Stdout)
            .map(|(_, l)| l.as_str())
            .collect();
        assert_eq!(stdout, ["a", "b", "c"]);
        assert!(lines.contains(&(OutputStream::Stderr, "err".into())));
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group() {
        // The shell starts a grandchild that ignores SIGTERM; the group kill reaches it.
        let (mut child, mut rx) =
            ChildGroup::spawn(&sh("trap '' TERM; sleep 300 & echo $!; wait")).unwrap();
        let grandchild: i32 = rx.recv().await.unwrap().line.parse().unwrap();
        child.stop(Duration::from_millis(200)).await.unwrap();
        let gone = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.contains(") Z "))
                .unwrap_or(true)
        };
        // Signal delivery is asynchronous: poll the predicate with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone(grandchild) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let alive = !gone(grandchild);
        assert!(!alive, "grandchild {grandchild} survived the group kill");
    }

    #[tokio::test]
    async fn waiting_after_sigkill_is_bounded() {
        // The leader moves itself out of its group (into this test's), so
        // the group SIGKILL misses it, as it would miss nothing but a
        // process in uninterruptible sleep: the wait must end anyway.
        let (mut child, mut rx) = ChildGroup::spawn(&CommandSpec {
            program: "/usr/bin/perl".into(),
            args: vec![
                "-e".into(),
                "setpgrp(0, getpgrp(getppid())) or die; $| = 1; print \"moved\\n\"; sleep 300"
                    .into(),
            ],
            cwd: std::env::temp_dir(),
            env: vec![],
        })
        .unwrap();
        assert_eq!(rx.recv().await.unwrap().line, "moved");
        child.set_kill_wait(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let error = child.stop(Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert!(error.to_string().contains("SIGKILL"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Clean up the survivor by its pid.
        let pid = Pid::from_raw(child.trainer_pid() as i32);
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
        let status = child.kill().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}
