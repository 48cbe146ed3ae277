//! The trainer guard: a small process (`ty-trainer-guard`) between a worker
//! and its trainer, so a worker that is SIGKILLed (or crashes, or is
//! OOM-killed) never leaves a trainer group holding the GPU.
//!
//! The worker starts the guard as the leader of a new process group, with
//! one end of a Unix socket pair as the guard's stdin (the *link*), and
//! keeps the other end. The guard starts the trainer in the same group, its
//! stdin `/dev/null` and its stdout and stderr the worker's pipes (inherited
//! from the guard), and then only waits:
//!
//! - signals the worker sends to the group reach the trainer directly; the
//!   guard catches (and so ignores) the terminating ones;
//! - when the trainer exits the guard writes its raw wait status on the link,
//!   SIGKILLs whatever else is left in the group (a launcher's workers) and
//!   exits, so the worker sees the trainer's own exit code or signal;
//! - when the link reaches EOF the worker is gone: the guard sends SIGTERM
//!   to the group, waits a grace, then SIGKILLs the group (itself included),
//!   so launchers' grandchildren go too.
//!
//! Link messages, guard → worker, one per line: `started <pid>`, or
//! `failed <reason>` (the trainer could not be started; the guard exits
//! 127), then `exit <raw wait status>`. The worker writes nothing.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

/// The guard's binary name.
pub const BINARY: &str = "ty-trainer-guard";

/// What the guard said on the link.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Started(u32),
    Failed(String),
    Exit(ExitStatus),
}

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Started(pid) => format!("started {pid}\n"),
            Message::Failed(reason) => format!("failed {}\n", reason.replace('\n', " ")),
            Message::Exit(status) => format!("exit {}\n", status.into_raw()),
        }
    }

    /// One line without its newline; `None` for anything else.
    pub fn parse(line: &str) -> Option<Message> {
        let (word, rest) = line.split_once(' ')?;
        match word {
            "started" => rest.parse().ok().map(Message::Started),
            "failed" => Some(Message::Failed(rest.to_string())),
            "exit" => rest
                .parse()
                .ok()
                .map(|raw| Message::Exit(ExitStatus::from_raw(raw))),
            _ => None,
        }
    }
}

/// The guard's command line: `--grace-ms <n> -- <program> [args…]`.
#[derive(Debug, PartialEq, Eq)]
pub struct GuardArgs {
    pub grace: Duration,
    pub program: OsString,
    pub args: Vec<OsString>,
}

impl GuardArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            "--grace-ms".into(),
            self.grace.as_millis().to_string().into(),
            "--".into(),
            self.program.clone(),
        ];
        out.extend(self.args.iter().cloned());
        out
    }

    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<GuardArgs, ArgsError> {
        let mut args = args.into_iter();
        if args.next().as_deref() != Some("--grace-ms".as_ref()) {
            return Err(ArgsError::Usage);
        }
        let grace = args
            .next()
            .and_then(|ms| ms.to_str()?.parse::<u64>().ok())
            .ok_or(ArgsError::GraceMs)?;
        if args.next().as_deref() != Some("--".as_ref()) {
            return Err(ArgsError::Usage);
        }
        let program = args.next().ok_or(ArgsError::Usage)?;
        Ok(GuardArgs {
            grace: Duration::from_millis(grace),
            program,
            args: args.collect(),
        })
    }
}

/// Why the guard's arguments were refused; the message shows the usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("usage: {BINARY} --grace-ms <milliseconds> -- <program> [args...]")]
    Usage,
    #[error(
        "--grace-ms needs a whole number of milliseconds; usage: {BINARY} --grace-ms <milliseconds> -- <program> [args...]"
    )]
    GraceMs,
}

/// Signals a worker may send the group to stop or poke a trainer; the guard
/// catches them so only the trainer acts on them. (Caught, not ignored: the
/// trainer starts with default dispositions.)
const PASSED_ON: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
];

/// The guard's whole life; returns its exit code. Must run on a Tokio
/// runtime (a current-thread one is enough).
pub async fn run(args: GuardArgs) -> i32 {
    // Caught for the guard's whole life; the streams are never read.
    let mut caught = Vec::new();
    for caught_signal in PASSED_ON {
        match signal(SignalKind::from_raw(caught_signal as i32)) {
            Ok(stream) => caught.push(stream),
            Err(e) => eprintln!("{BINARY}: cannot catch {caught_signal}: {e}"),
        }
    }
    let mut link = match link() {
        Ok(link) => link,
        Err(e) => {
            eprintln!("{BINARY}: stdin must be the worker's socket: {e}");
            return 2;
        }
    };
    let group = getpgrp();
    let spawned = tokio::process::Command::new(&args.program)
        .args(&args.args)
        .stdin(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let reason = e.to_string();
            let _ = link
                .write_all(Message::Failed(reason).encode().as_bytes())
                .await;
            return 127;
        }
    };
    let pid = child.id().unwrap_or_default();
    // The worker may already be gone; the EOF below then says so.
    let _ = link
        .write_all(Message::Started(pid).encode().as_bytes())
        .await;
    let mut buf = [0u8; 64];
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            read = link.read(&mut buf) => match read {
                // The worker never writes; anything read is ignored.
                Ok(n) if n > 0 => continue,
                _ => {
                    orphaned(group, &mut child, args.grace).await;
                    return 1;
                }
            },
        }
    };
    match status {
        Ok(status) => {
            let _ = link
                .write_all(Message::Exit(status).encode().as_bytes())
                .await;
            // What the trainer left behind (a launcher's workers) goes now,
            // whether or not the worker is still there to do it.
            kill_rest_of_group(group);
            status.code().unwrap_or(1)
        }
        Err(e) => {
            eprintln!("{BINARY}: cannot wait for the trainer: {e}");
            let _ = killpg(group, Signal::SIGKILL);
            1
        }
    }
}

/// SIGKILLs every other process of `group`, found in `/proc` (the guard
/// itself stays to exit with the trainer's code).
fn kill_rest_of_group(group: Pid) {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp …`: comm may hold spaces and parens.
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(group.as_raw()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The worker is gone: SIGTERM the group, a grace, then SIGKILL the group,
/// this process included.
async fn orphaned(group: Pid, child: &mut tokio::process::Child, grace: Duration) {
    let _ = killpg(group, Signal::SIGTERM);
    let _ = tokio::time::timeout(grace, child.wait()).await;
    // Grandchildren may remain after the trainer exits.
    let _ = killpg(group, Signal::SIGKILL);
}

/// Stdin as the link socket.
fn link() -> std::io::Result<tokio::net::UnixStream> {
    let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
    let stream = std::os::unix::net::UnixStream::from(fd);
    // Not a socket: fails here rather than on first use.
    stream.peer_addr()?;
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for message in [
            Message::Started(42),
            Message::Failed("no such file".into()),
            Message::Exit(ExitStatus::from_raw(3 << 8)),
            Message::Exit(ExitStatus::from_raw(9)),
        ] {
            let line = message.encode();
            assert_eq!(Message::parse(line.trim_end()), Some(message));
        }
        let Some(Message::Exit(status)) = Message::parse("exit 9") else {
            panic!("exit parses");
        };
        assert_eq!(status.signal(), Some(9));
        assert_eq!(Message::parse("exit nine"), None);
        assert_eq!(Message::parse("hello"), None);
    }

    #[test]
    fn arguments_round_trip_and_bad_ones_are_refused() {
        let args = GuardArgs {
            grace: Duration::from_millis(1500),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "exit 3".into()],
        };
        assert_eq!(GuardArgs::parse(args.to_args()), Ok(args));
        for (bad, kind) in [
            (vec![], ArgsError::Usage),
            (vec!["--grace-ms", "soon", "--", "x"], ArgsError::GraceMs),
            (vec!["--grace-ms", "10", "x"], ArgsError::Usage),
            (vec!["--grace-ms", "10", "--"], ArgsError::Usage),
        ] {
            let error = GuardArgs::parse(bad.into_iter().map(OsString::from)).unwrap_err();
            assert_eq!(error, kind);
            // What the binary prints shows how to call it.
            assert!(error.to_string().contains("usage"), "{error}");
        }
    }
}
