//! The ai-toolkit backend against its stand-in (`tests/standins/ai-toolkit`),
//! run as rendered: `python3 run.py <run_dir>/job.yaml` in the checkout.

use crate::session;

use nix::sys::signal::Signal;
use session::{
    Fixture, Session, first_progress, hf_home, max_progress, restore, sdxl_preset_model, tools,
};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use trainyard_backends::ai_toolkit::AiToolkit;
use trainyard_backends::{LineEvent, StopRequest, TrainInputs, TrainerBackend};
use trainyard_proto::v1::ErrorKind;

fn backend() -> AiToolkit {
    AiToolkit::new(&tools())
}

#[tokio::test]
async fn a_killed_run_resumes_from_the_restored_step_file_and_optimizer() {
    let b = backend();
    let fx = Fixture::new(3);
    let first = fx.inputs("ai-toolkit", "first", 60, 10);
    let mut run = Session::start(&b, &first, &[("STANDIN_STEP_SECONDS", "0.05")], None);
    let mut found = None;
    run.until(|_| {
        found = b.latest_checkpoint(&first);
        found.is_some()
    })
    .await;
    let found = found.expect("a complete checkpoint");
    // Taken while the trainer runs on, as the worker uploads it.
    let mut second = fx.inputs("ai-toolkit", "second", 60, 10);
    second.resume = Some(restore(&found, &first.output_dir, &second.output_dir));
    let step = found.step;
    assert!(
        run.until(|s| s.events.contains(&LineEvent::Saved { step: Some(step) }))
            .await
    );
    let status = run.kill().await;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(found.step >= 10 && found.step % 10 == 0, "{found:?}");
    let names: Vec<_> = found
        .files
        .iter()
        .map(|f| f.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            format!("lora1/lora1_{:09}.safetensors", found.step),
            "lora1/optimizer.pt".to_string()
        ]
    );

    let done = Session::start(&b, &second, &[("STANDIN_STEP_SECONDS", "0.01")], None)
        .finish()
        .await;
    assert!(done.status.success(), "{:?}", done.last_lines());
    assert_eq!(
        first_progress(&done.events),
        Some(found.step),
        "{:?}",
        done.events
    );
    assert!(
        done.events
            .contains(&LineEvent::Resumed { step: found.step })
    );
    assert!(
        done.tail
            .iter()
            .any(|l| l.starts_with("Loading optimizer state from"))
    );
    assert!(done.events.contains(&LineEvent::Saved {
        step: Some(found.step + 10)
    }));
    assert!(done.events.contains(&LineEvent::Done));
    assert!(max_progress(&done.events).unwrap() >= 59);
    assert!(b.final_adapter(&second).is_some());
}

#[tokio::test]
async fn sigint_stops_without_saving_and_exits_zero() {
    let b = backend();
    let fx = Fixture::new(3);
    let inputs = fx.inputs("ai-toolkit", "sigint", 400, 0);
    assert_eq!(b.stop_request(&inputs), StopRequest::Unsupported);
    let mut run = Session::start(&b, &inputs, &[("STANDIN_STEP_SECONDS", "0.02")], None);
    assert!(
        run.until(|s| max_progress(&s.events).is_some_and(|n| n >= 3))
            .await
    );
    run.child.signal(Signal::SIGINT);
    let done = run.finish().await;
    assert_eq!(done.status.code(), Some(0));
    assert!(
        done.tail.iter().any(|l| l == "Job stopped"),
        "{:?}",
        done.last_lines()
    );
    assert_eq!(b.final_adapter(&inputs), None);
    assert_eq!(
        b.latest_checkpoint(&inputs),
        None,
        "nothing saved on the way out"
    );
    let error = b.classify(done.status, done.last_lines());
    assert!(error.message.contains("interrupted"), "{}", error.message);
}

#[tokio::test]
async fn an_oom_is_classified_as_out_of_memory() {
    let b = backend();
    let fx = Fixture::new(3);
    let inputs = fx.inputs("ai-toolkit", "oom", 30, 0);
    let done = Session::start(&b, &inputs, &[("STANDIN_FAULT", "oom@3")], None)
        .finish()
        .await;
    assert_eq!(done.status.code(), Some(1));
    assert!(
        done.tail
            .iter()
            .any(|l| l == "# OOM during training step, skipping batch 3/3 #")
    );
    let error = b.classify(done.status, done.last_lines());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::Oom, true),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn exit_zero_midway_leaves_no_final_adapter() {
    let b = backend();
    let fx = Fixture::new(3);
    let inputs = fx.inputs("ai-toolkit", "exit0", 30, 0);
    let done = Session::start(&b, &inputs, &[("STANDIN_FAULT", "exit0@3")], None)
        .finish()
        .await;
    assert!(done.status.success());
    assert_eq!(b.final_adapter(&inputs), None);
    assert!(!done.events.contains(&LineEvent::Done));
    let error = b.classify(done.status, done.last_lines());
    assert_eq!(error.kind(), ErrorKind::Trainer, "{}", error.message);
}

#[tokio::test]
async fn an_empty_dataset_is_a_bad_dataset() {
    let b = backend();
    let fx = Fixture::new(0);
    let inputs = fx.inputs("ai-toolkit", "empty", 30, 0);
    let done = Session::start(&b, &inputs, &[], None).finish().await;
    assert_eq!(done.status.code(), Some(1));
    assert!(
        done.tail.iter().any(|l| l == " - 1 failure"),
        "{:?}",
        done.last_lines()
    );
    let error = b.classify(done.status, done.last_lines());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::BadDataset, false),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_missing_model_is_named() {
    let b = backend();
    let fx = Fixture::new(3);
    let mut inputs = fx.inputs("ai-toolkit", "nomodel", 30, 0);
    let missing = fx.dir.path().join("no-such-model");
    inputs.model.parts.insert("diffusers".into(), missing);
    let done = Session::start(&b, &inputs, &[], None).finish().await;
    assert_eq!(done.status.code(), Some(1));
    let error = b.classify(done.status, done.last_lines());
    assert_eq!(error.kind(), ErrorKind::Model, "{}", error.message);
}

/// The repository whose config files diffusers reads to load an SDXL
/// checkpoint with `from_single_file`.
const SDXL_CONFIGS: &str = "stabilityai/stable-diffusion-xl-base-1.0";

/// ai-toolkit loads a folder without a variant, and the `sdxl-base-1.0`
/// preset's folder holds only fp16 files: SDXL goes through the preset's
/// single-file checkpoint.
#[tokio::test]
async fn the_sdxl_preset_loads_through_its_single_file_checkpoint() {
    let b = backend();
    let fx = Fixture::new(3);
    let model = sdxl_preset_model(fx.dir.path());
    let file = model.parts["checkpoint"].clone();
    let inputs = TrainInputs {
        model,
        ..fx.inputs("ai-toolkit", "sdxl", 6, 0)
    };
    let home = hf_home(fx.dir.path(), &[SDXL_CONFIGS]);
    let done = Session::start(&b, &inputs, &[("HF_HOME", home.to_str().unwrap())], None)
        .finish()
        .await;
    assert!(done.status.success(), "{:?}", done.last_lines());
    assert!(done.events.contains(&LineEvent::Done));
    assert!(b.final_adapter(&inputs).is_some());
    let job: serde_yaml::Value =
        serde_yaml::from_slice(&std::fs::read(inputs.run_dir.join("job.yaml")).unwrap()).unwrap();
    let model = &job["config"]["process"][0]["model"];
    assert_eq!(model["name_or_path"], file.to_str().unwrap());
    assert_eq!(model["is_xl"], true);
}

/// Each way ai-toolkit fails to load the SDXL preset's files: the folder
/// (no plain weight names), and the checkpoint without the config files
/// diffusers reads from the Hub. Each failure is the base model's and
/// final, and names what is missing.
#[tokio::test]
async fn the_model_is_loaded_as_strictly_as_ai_toolkit_loads_it() {
    let b = backend();
    let fx = Fixture::new(3);
    let inputs = TrainInputs {
        model: sdxl_preset_model(fx.dir.path()),
        ..fx.inputs("ai-toolkit", "strict", 6, 0)
    };
    let folder = inputs.model.parts["diffusers"].clone();
    let cached = hf_home(fx.dir.path(), &[SDXL_CONFIGS]);
    let empty = hf_home(&fx.dir.path().join("empty"), &[]);
    let cases: [(&str, Option<&Path>, &Path, &str); 2] = [
        (
            "the diffusers folder",
            Some(&folder),
            &cached,
            "text_encoder",
        ),
        ("no config files", None, &empty, SDXL_CONFIGS),
    ];
    for (case, name_or_path, home, named) in cases {
        let mut launch = b.render(&inputs).unwrap();
        if let Some(path) = name_or_path {
            let body = &mut launch.files[0].1;
            let mut job: serde_yaml::Value = serde_yaml::from_slice(body).unwrap();
            job["config"]["process"][0]["model"]["name_or_path"] = path.to_str().unwrap().into();
            *body = serde_yaml::to_string(&job).unwrap().into_bytes();
        }
        session::write_files(&launch);
        let done = Session::spawn(
            launch,
            b.parser(&inputs),
            &inputs,
            &[("HF_HOME", home.to_str().unwrap())],
            None,
        )
        .finish()
        .await;
        assert_eq!(done.status.code(), Some(1), "{case}");
        let error = b.classify(done.status, done.last_lines());
        assert_eq!(
            (error.kind(), error.retryable),
            (ErrorKind::Model, false),
            "{case}: {}",
            error.message
        );
        assert!(error.message.contains(named), "{case}: {}", error.message);
    }
}
