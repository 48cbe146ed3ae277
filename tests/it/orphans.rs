//! A worker that is SIGKILLed (a machine's OOM killer, `kill -9`, a crash)
//! leaves no trainer behind: the trainer guard ends the trainer's process
//! group, even a trainer that ignores SIGTERM.
//!
//! Needs `cargo build --workspace --bins` first (the binaries beside the
//! test executable).

use futures::StreamExt;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::time::{Duration, Instant};
use trainyard_proto::v1::{ExtraValue, Stage, WatchRequest, extra_value, job_event::Kind};
use trainyard_tests::chaos::{Chaos, Service};
use trainyard_tests::*;

/// The pid and process group of the `ty-reference-trainer` process whose
/// command line mentions `needle`, if one runs.
fn trainer_under(needle: &str) -> Option<(i32, i32)> {
    processes_mentioning(needle).into_iter().find_map(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let program = cmdline.split(|&b| b == 0).next()?;
        if !String::from_utf8_lossy(program).ends_with("ty-reference-trainer") {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After "(comm) ": state, ppid, pgrp.
        let pgrp = stat.rsplit_once(") ")?.1.split(' ').nth(2)?.parse().ok()?;
        Some((pid as i32, pgrp))
    })
}

/// The live (not zombie) processes of process group `group`.
fn members_of(group: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let fields: Vec<&str> = rest.split(' ').collect();
            fields.len() > 2 && fields[0] != "Z" && fields[2] == group.to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_leaves_no_trainer_running() {
    let mut chaos = Chaos::start(1, |_| {}).await;
    let sample = chaos.sample_uri().await;
    let mut client = chaos.client().await;
    let mut spec = spec(&sample, 1000);
    // Right after step 1 the trainer wedges: it sleeps and SIGTERM only
    // sets a flag it never checks again, so only SIGKILL ends it.
    spec.training.as_mut().expect("training").extras.insert(
        "fault_hang_at_step".into(),
        ExtraValue {
            kind: Some(extra_value::Kind::Int(1)),
        },
    );
    let job = submit(&mut client, spec).await.job_id;
    let mut events = client
        .watch(WatchRequest {
            job_id: job.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(Ok(event)) = events.next().await {
            if let Some(Kind::Progress(p)) = &event.kind
                && p.stage() == Stage::Train
                && p.step >= 1
            {
                return;
            }
        }
        panic!("the event stream ended before training progressed");
    })
    .await
    .expect("training reaches step 1");
    // An open watch would hold the coordinator's graceful stop.
    drop(events);
    drop(client);

    let worker = chaos.running(Service::Worker).remove(0);
    let work_dir = chaos
        .proc(&worker)
        .config
        .worker
        .work_dir
        .display()
        .to_string();
    let (trainer, group) = trainer_under(&work_dir).expect("the trainer runs under the worker");
    assert_ne!(trainer, group, "the guard leads the trainer's group");
    assert!(members_of(group).contains(&trainer));

    // Not Proc::kill, which also kills what the worker left behind.
    chaos.proc(&worker).signal(Signal::SIGKILL);
    chaos.proc(&worker).wait_exit(Duration::from_secs(10)).await;
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(60);
    loop {
        // Gone, or only zombies left for an init that reaps slowly.
        let probe = killpg(Pid::from_raw(group), None);
        let members = members_of(group);
        if probe == Err(Errno::ESRCH) || members.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trainer's group {group} outlived its worker by 60 s: {members:?} live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "trainer group gone {:?} after its worker was SIGKILLed",
        killed.elapsed()
    );
    assert!(
        trainer_under(&work_dir).is_none(),
        "no trainer runs under the dead worker's work dir"
    );
    chaos.stop().await;
}
