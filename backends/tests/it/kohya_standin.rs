//! The kohya backend driving the kohya stand-in (`tests/standins/kohya`)
//! under the accelerate stand-in, the way the worker's run loop does: render,
//! write the files, spawn the process group, parse every line, find
//! checkpoints, kill, restore only the checkpoint's files, resume.

use crate::common;
use crate::support;

use common::{Fixture, settings, standin_tools};
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::Duration;
use support::safetensors_header;
use trainyard_backends::{
    FoundCheckpoint, LineEvent, Resume, TrainInputs, TrainerBackend, by_name,
};
use trainyard_core::process::{ChildGroup, CommandSpec};
use trainyard_models::ModelFamily;
use trainyard_proto::v1::ErrorKind;

const DEADLINE: Duration = Duration::from_secs(60);

fn backend() -> Box<dyn TrainerBackend> {
    by_name("kohya", &standin_tools()).unwrap()
}

/// Renders, writes the files and returns the command with the run loop's
/// environment plus the stand-in's.
fn prepare(b: &dyn TrainerBackend, inputs: &TrainInputs, env: &[(&str, &str)]) -> CommandSpec {
    let launch = b.render(inputs).unwrap();
    for (path, body) in &launch.files {
        std::fs::write(path, body).unwrap();
    }
    let mut spec = launch.command;
    spec.env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    spec.env.push(("PYTHONIOENCODING".into(), "utf-8".into()));
    spec.env
        .push(("STANDIN_STEP_SECONDS".into(), "0.01".into()));
    spec.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    spec
}

struct Finished {
    status: ExitStatus,
    lines: Vec<String>,
    events: Vec<LineEvent>,
}

impl Finished {
    fn tail(&self) -> Vec<String> {
        self.lines[self.lines.len().saturating_sub(40)..].to_vec()
    }

    fn progress_steps(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|e| match e {
                LineEvent::Progress { step, .. } => Some(*step),
                _ => None,
            })
            .collect()
    }
}

/// Runs to the end, feeding every line to the backend's parser.
async fn run(b: &dyn TrainerBackend, inputs: &TrainInputs, env: &[(&str, &str)]) -> Finished {
    let spec = prepare(b, inputs, env);
    let (mut child, mut rx) = ChildGroup::spawn(&spec).unwrap();
    let mut parser = b.parser(inputs);
    let (mut lines, mut events) = (Vec::new(), Vec::new());
    tokio::time::timeout(DEADLINE, async {
        while let Some(out) = rx.recv().await {
            events.extend(parser.line(&out.line));
            lines.push(out.line);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the run did not end; last lines: {:?}",
            &lines[lines.len().saturating_sub(10)..]
        )
    });
    let status = child.wait().await.unwrap();
    Finished {
        status,
        lines,
        events,
    }
}

fn copy_checkpoint(found: &FoundCheckpoint, from: &std::path::Path, to: &std::path::Path) {
    for rel in &found.files {
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from.join(rel), dest).unwrap();
    }
}

#[tokio::test]
async fn a_killed_run_resumes_from_its_checkpoint_with_absolute_steps() {
    let b = backend();
    let fx = Fixture::new(ModelFamily::Flux, 3);
    let mut s = settings(40, 10, HashMap::new());
    // 3 images × 2 repeats would be 6 steps an epoch: a resume past the first
    // epoch, where kohya's step count goes wrong, unless the run is one epoch.
    s.repeats = 2;
    let inputs = fx.inputs(ModelFamily::Flux, s);
    let spec = prepare(b.as_ref(), &inputs, &[("STANDIN_STEP_SECONDS", "0.03")]);
    let (mut child, mut rx) = ChildGroup::spawn(&spec).unwrap();
    let mut parser = b.parser(&inputs);
    let mut first_lines = Vec::new();
    // The run loop looks for a checkpoint when the trainer says it saved.
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(out) = rx.recv().await {
            let saved = parser
                .line(&out.line)
                .iter()
                .any(|e| matches!(e, LineEvent::Saved { .. }));
            first_lines.push(out.line);
            if let Some(found) = saved.then(|| b.latest_checkpoint(&inputs)).flatten() {
                return found;
            }
        }
        panic!("the run ended without a checkpoint: {first_lines:?}");
    })
    .await
    .expect("a checkpoint within the deadline");
    child.signal(Signal::SIGKILL);
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    assert_eq!(b.final_adapter(&inputs), None, "killed before the end");
    assert!(found.step % 10 == 0 && found.step < 40, "{found:?}");
    assert!(
        found
            .files
            .iter()
            .any(|f| f.ends_with("random_states_0.pkl")),
        "{found:?}"
    );
    assert!(
        !first_lines
            .iter()
            .any(|l| l.contains("No caption file found")),
        "the stand-in read the .txt captions"
    );

    // Another machine: a fresh output folder holding only the checkpoint.
    let out2 = fx.path("out2");
    let run2 = fx.path("run2");
    std::fs::create_dir_all(&run2).unwrap();
    copy_checkpoint(&found, &inputs.output_dir, &out2);
    let resumed = TrainInputs {
        output_dir: out2.clone(),
        run_dir: run2,
        resume: Some(Resume {
            step: found.step,
            files: found.files.clone(),
        }),
        ..inputs.clone()
    };
    let done = run(b.as_ref(), &resumed, &[]).await;
    assert!(done.status.success(), "{:?}", done.tail());
    assert!(
        done.events
            .contains(&LineEvent::Resumed { step: found.step })
    );
    let steps = done.progress_steps();
    assert_eq!(
        steps.first(),
        Some(&found.step),
        "progress continues from the checkpoint"
    );
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&40));
    // stdout and stderr are read apart, so `model saved.` may overtake the bar.
    assert!(done.events.contains(&LineEvent::Done));

    let adapter = b.final_adapter(&resumed).expect("the final adapter");
    let header = safetensors_header(&adapter);
    assert_eq!(header["__metadata__"]["ss_steps"], "40");
    assert!(
        header
            .get("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
            .is_some()
    );
    // kohya's own step numbers stayed absolute: its saves after the resume
    // are the next multiples of 10, and the last one is the newest checkpoint.
    let next = found.step + 10;
    assert!(
        out2.join(format!("job123-step{next:08}-state/random_states_0.pkl"))
            .is_file()
    );
    let last = b.latest_checkpoint(&resumed).unwrap();
    assert_eq!(last.step, 40);
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out2.join("job123-step00000040-state/train_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["current_step"], 40);
}

#[tokio::test]
async fn sdxl_runs_to_the_end() {
    let b = backend();
    let fx = Fixture::new(ModelFamily::Sdxl, 2);
    let inputs = fx.inputs(ModelFamily::Sdxl, settings(6, 3, HashMap::new()));
    let done = run(b.as_ref(), &inputs, &[]).await;
    assert!(done.status.success(), "{:?}", done.tail());
    assert_eq!(done.progress_steps().last(), Some(&6));
    assert!(done.events.contains(&LineEvent::Saved { step: Some(3) }));
    let header = safetensors_header(&b.final_adapter(&inputs).unwrap());
    assert!(
        header
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("lora_unet_input_blocks"))
    );
    assert_eq!(b.latest_checkpoint(&inputs).unwrap().step, 6);
}

#[tokio::test]
async fn out_of_memory_is_retryable_and_names_the_line() {
    let b = backend();
    let fx = Fixture::new(ModelFamily::Flux, 2);
    let inputs = fx.inputs(ModelFamily::Flux, settings(10, 5, HashMap::new()));
    let done = run(b.as_ref(), &inputs, &[("STANDIN_FAULT", "oom@3")]).await;
    assert!(!done.status.success());
    let e = b.classify(done.status, &done.tail());
    assert_eq!(
        (e.kind(), e.retryable),
        (ErrorKind::Oom, true),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains("torch.OutOfMemoryError: CUDA out of memory"),
        "{}",
        e.message
    );
    assert!(
        done.lines
            .iter()
            .any(|l| l.contains("subprocess.CalledProcessError"))
    );
}

#[tokio::test]
async fn exit_zero_without_the_adapter_is_not_a_success() {
    let b = backend();
    let fx = Fixture::new(ModelFamily::Flux, 2);
    let inputs = fx.inputs(ModelFamily::Flux, settings(10, 5, HashMap::new()));
    let done = run(b.as_ref(), &inputs, &[("STANDIN_FAULT", "exit0@3")]).await;
    assert!(done.status.success());
    assert_eq!(b.final_adapter(&inputs), None);
    assert!(!done.events.contains(&LineEvent::Done));
    let e = b.classify(done.status, &done.tail());
    assert_eq!(e.kind(), ErrorKind::Trainer, "{}", e.message);
}

#[tokio::test]
async fn an_empty_dataset_is_a_bad_dataset() {
    let b = backend();
    let fx = Fixture::new(ModelFamily::Flux, 0);
    let inputs = fx.inputs(ModelFamily::Flux, settings(10, 5, HashMap::new()));
    let done = run(b.as_ref(), &inputs, &[]).await;
    // kohya logs the error and returns: exit 0 with no adapter.
    assert!(done.status.success(), "{:?}", done.tail());
    assert_eq!(b.final_adapter(&inputs), None);
    let e = b.classify(done.status, &done.tail());
    assert_eq!(
        (e.kind(), e.retryable),
        (ErrorKind::BadDataset, false),
        "{}",
        e.message
    );
    assert!(e.message.contains("No data found"), "{}", e.message);
}

#[tokio::test]
async fn a_missing_model_file_is_named() {
    let b = backend();
    let fx = Fixture::new(ModelFamily::Flux, 2);
    std::fs::remove_file(fx.path("models/ae.safetensors")).unwrap();
    let inputs = fx.inputs(ModelFamily::Flux, settings(10, 5, HashMap::new()));
    let done = run(b.as_ref(), &inputs, &[]).await;
    assert!(!done.status.success());
    let e = b.classify(done.status, &done.tail());
    assert_eq!(
        (e.kind(), e.retryable),
        (ErrorKind::InvalidSpec, false),
        "{}",
        e.message
    );
    assert!(e.message.contains("ae.safetensors"), "{}", e.message);
}
