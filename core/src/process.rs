//! The one way Trainyard starts a trainer or captioning command.
//!
//! Launchers (accelerate, deepspeed, shell wrappers) do not pass signals on,
//! so every child runs in a new process group and the whole group is
//! signalled. Dropping the handle kills the group: a worker task that is
//! cancelled or panics never leaves a trainer holding the GPU. Arguments are
//! an argv vector, never a shell line. Output is read line by line on its own
//! tasks, split on `\r` as well as `\n` (progress bars) with ANSI escapes removed.

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
    /// Added to the inherited environment.
    pub env: Vec<(String, String)>,
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

/// A running child and its process group.
pub struct ChildGroup {
    child: tokio::process::Child,
    pgid: Pid,
    exited: bool,
}

impl ChildGroup {
    /// Starts the command in its own process group. Lines of stdout and
    /// stderr arrive on the returned channel until both pipes close.
    pub fn spawn(spec: &CommandSpec) -> std::io::Result<(ChildGroup, mpsc::Receiver<OutputLine>)> {
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .current_dir(&spec.cwd)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
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
            },
            rx,
        ))
    }

    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    /// Sends a signal to the whole group.
    pub fn signal(&self, signal: Signal) {
        if !self.exited {
            let _ = killpg(self.pgid, signal);
        }
    }

    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.exited = true;
        // Anything the leader left behind in its group goes with it.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        Ok(status)
    }

    /// SIGTERM to the group, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                self.exited = true;
                let _ = killpg(self.pgid, Signal::SIGKILL);
                status
            }
            Err(_) => {
                let _ = killpg(self.pgid, Signal::SIGKILL);
                self.wait().await
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
}
