//! `ty-trainer-guard` as a real process: the trainer's statuses, signals and
//! output pass through it unchanged, and when its worker's end of the link
//! closes (the worker died) it ends the whole group.

use nix::sys::signal::Signal;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use trainyard_core::process::{ChildGroup, CommandSpec, Guard, OutputStream};

fn guard() -> Guard {
    Guard {
        program: PathBuf::from(env!("CARGO_BIN_EXE_ty-trainer-guard")),
        grace: Duration::from_millis(500),
    }
}

fn sh(script: &str) -> CommandSpec {
    CommandSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        cwd: std::env::temp_dir(),
        env: vec![("TY_GUARD_TEST".into(), "yes".into())],
    }
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.contains(") Z "))
        .unwrap_or(true)
}

async fn wait_gone(pids: &[i32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !pids.iter().all(|&pid| gone(pid)) {
        assert!(
            Instant::now() < deadline,
            "still running after {timeout:?}: {:?}",
            pids.iter().filter(|&&p| !gone(p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn exit_codes_output_and_environment_pass_through() {
    let (mut child, mut lines) = ChildGroup::spawn_guarded(
        &sh("echo out $TY_GUARD_TEST; pwd; echo err >&2; exit 3"),
        &guard(),
    )
    .await
    .unwrap();
    assert_ne!(
        child.trainer_pid(),
        child.pid(),
        "the guard leads the group"
    );
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(3));
    let mut seen = Vec::new();
    while let Some(line) = lines.recv().await {
        seen.push((line.stream, line.line));
    }
    assert!(
        seen.contains(&(OutputStream::Stdout, "out yes".into())),
        "{seen:?}"
    );
    let cwd = std::env::temp_dir().canonicalize().unwrap();
    assert!(
        seen.contains(&(OutputStream::Stdout, cwd.display().to_string())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(OutputStream::Stderr, "err".into())),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_signal_to_the_group_reaches_the_trainer_and_its_death_is_reported() {
    // The trainer reports itself ready, then waits to be signalled.
    let (mut child, mut lines) =
        ChildGroup::spawn_guarded(&sh("echo ready; exec sleep 300"), &guard())
            .await
            .unwrap();
    assert_eq!(lines.recv().await.unwrap().line, "ready");
    let status = child.stop(Duration::from_secs(10)).await.unwrap();
    // Killed by SIGTERM itself (not SIGKILL after the grace), and the guard,
    // which caught SIGTERM, lived to say so.
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status:?}");

    let (mut child, mut lines) =
        ChildGroup::spawn_guarded(&sh("echo ready; exec sleep 300"), &guard())
            .await
            .unwrap();
    assert_eq!(lines.recv().await.unwrap().line, "ready");
    child.signal(Signal::SIGUSR1);
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGUSR1 as i32), "{status:?}");
}

#[tokio::test]
async fn a_trainer_that_cannot_start_is_an_error() {
    let spec = CommandSpec {
        program: "/nonexistent/trainer".into(),
        args: vec![],
        cwd: std::env::temp_dir(),
        env: vec![],
    };
    let error = match ChildGroup::spawn_guarded(&spec, &guard()).await {
        Ok(_) => panic!("a missing trainer started"),
        Err(error) => error,
    };
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
    assert!(error.to_string().contains("No such file"), "{error}");

    let missing_guard = Guard {
        program: "/nonexistent/ty-trainer-guard".into(),
        grace: Duration::from_secs(1),
    };
    let error = match ChildGroup::spawn_guarded(&sh("exit 0"), &missing_guard).await {
        Ok(_) => panic!("a missing guard started"),
        Err(error) => error,
    };
    assert!(
        error.to_string().contains("/nonexistent/ty-trainer-guard"),
        "{error}"
    );
}

#[tokio::test]
async fn when_the_worker_end_closes_the_whole_group_is_ended() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("got-term");
    // The trainer notes SIGTERM and exits; its grandchild ignores SIGTERM,
    // as launchers' workers may, so only the SIGKILL after the grace ends it.
    let script = format!(
        "trap 'echo term > {}; exit 0' TERM; (trap '' TERM; exec sleep 300) & echo $$ $!; wait; wait",
        marker.display()
    );
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let args = trainyard_core::guard::GuardArgs {
        grace: Duration::from_millis(500),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
    };
    let mut guard = tokio::process::Command::new(env!("CARGO_BIN_EXE_ty-trainer-guard"))
        .args(args.to_args())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let guard_pid = guard.id().unwrap() as i32;
    let mut out = BufReader::new(guard.stdout.take().unwrap()).lines();
    let line = out.next_line().await.unwrap().unwrap();
    let pids: Vec<i32> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{line}");

    // The worker dies: its end of the link closes.
    drop(ours);
    let status = tokio::time::timeout(Duration::from_secs(20), guard.wait())
        .await
        .expect("the guard ends")
        .unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status:?}");
    wait_gone(&[guard_pid, pids[0], pids[1]], Duration::from_secs(10)).await;
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        "term",
        "the trainer was asked to stop before it was killed"
    );
}
