//! The kohya backend's rendered files and argv against checked-in golden
//! copies (the documented usage, trainers reference §1(b)), and its
//! checkpoint, adapter and settings rules. `UPDATE_GOLDEN=1` rewrites the
//! golden files.

use crate::common;
use crate::support;

use common::{Fixture, settings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trainyard_backends::{Launch, StopRequest, Tools, TrainInputs, TrainerBackend, by_name};
use trainyard_core::config::TrainerPaths;
use trainyard_models::ModelFamily;
use trainyard_proto::v1::{ExtraValue, extra_value::Kind};

fn backend() -> Box<dyn TrainerBackend> {
    let tools = Tools {
        trainers: TrainerPaths {
            accelerate: "/opt/venv/bin/accelerate".into(),
            kohya_dir: "/opt/sd-scripts".into(),
            ..Tools::default().trainers
        },
        ..Tools::default()
    };
    by_name("kohya", &tools).expect("kohya is registered")
}

fn extra(kind: Kind) -> ExtraValue {
    ExtraValue { kind: Some(kind) }
}

/// The rendered files and argv as text, with the temporary root as `$ROOT`.
fn rendered(fx: &Fixture, launch: &Launch) -> Vec<(String, String)> {
    let root = fx.root.path().to_str().unwrap();
    let mut out: Vec<(String, String)> = launch
        .files
        .iter()
        .map(|(path, body)| {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert_eq!(
                path.parent(),
                Some(fx.path("run").as_path()),
                "{name} goes in the run folder"
            );
            (
                name,
                String::from_utf8(body.clone())
                    .unwrap()
                    .replace(root, "$ROOT"),
            )
        })
        .collect();
    out.push((
        "argv".into(),
        support::argv(launch).join("\n").replace(root, "$ROOT") + "\n",
    ));
    assert_eq!(launch.command.cwd, fx.path("run"));
    out
}

fn check_golden(prefix: &str, files: &[(String, String)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kohya");
    for (name, text) in files {
        let path = dir.join(format!(
            "{prefix}-{name}{}",
            if name == "argv" { ".txt" } else { "" }
        ));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, text).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
                path.display()
            )
        });
        assert_eq!(
            text,
            &golden,
            "{} differs from the rendered file",
            path.display()
        );
    }
}

fn toml_of(launch: &Launch, file: &str) -> toml::Table {
    let (_, body) = launch
        .files
        .iter()
        .find(|(p, _)| p.ends_with(file))
        .unwrap();
    toml::from_str(std::str::from_utf8(body).unwrap()).unwrap()
}

#[test]
fn flux_matches_the_documented_usage() {
    let fx = Fixture::new(ModelFamily::Flux, 3);
    let inputs = fx.inputs(ModelFamily::Flux, settings(2000, 250, HashMap::new()));
    let launch = backend().render(&inputs).unwrap();
    check_golden("flux", &rendered(&fx, &launch));
    // 3 images × 10 repeats would be 67 epochs: repeats grow to fit 2000 steps in one.
    let dataset = toml_of(&launch, "kohya-dataset.toml");
    assert_eq!(
        dataset["datasets"][0]["subsets"][0]["num_repeats"].as_integer(),
        Some(667)
    );
    assert_eq!(
        dataset["general"]["caption_extension"].as_str(),
        Some(".txt")
    );
}

#[test]
fn sdxl_with_extras_matches_golden() {
    let extras: HashMap<String, ExtraValue> = [
        ("optimizer_type", extra(Kind::Text("adafactor".into()))),
        (
            "optimizer_args",
            extra(Kind::Text(
                "relative_step=False scale_parameter=False warmup_init=False".into(),
            )),
        ),
        (
            "lr_scheduler",
            extra(Kind::Text("constant_with_warmup".into())),
        ),
        ("lr_warmup_steps", extra(Kind::Int(20))),
        ("max_grad_norm", extra(Kind::Int(0))),
        ("min_snr_gamma", extra(Kind::Float(5.0))),
        ("mixed_precision", extra(Kind::Text("fp16".into()))),
        ("save_precision", extra(Kind::Text("fp16".into()))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let fx = Fixture::new(ModelFamily::Sdxl, 40);
    let mut s = settings(300, 0, extras);
    s.batch_size = 2;
    s.resolution = 1536;
    let launch = backend().render(&fx.inputs(ModelFamily::Sdxl, s)).unwrap();
    check_golden("sdxl", &rendered(&fx, &launch));
    let args = toml_of(&launch, "kohya-args.toml");
    // save_every 0: a tenth of the run, so that a lost worker can resume.
    assert_eq!(args["save_every_n_steps"].as_integer(), Some(30));
    // The launcher runs in the same precision as the script.
    let argv: Vec<_> = launch
        .command
        .args
        .iter()
        .map(|a| a.to_str().unwrap())
        .collect();
    let at = argv.iter().position(|a| *a == "--mixed_precision").unwrap();
    assert_eq!(argv[at + 1], "fp16");
    for key in ["clip_l", "t5xxl", "ae", "guidance_scale", "fp8_base"] {
        assert!(!args.contains_key(key), "SDXL gets no {key}");
    }
    // 40 images × 10 repeats / batch 2 = 200 batches < 300 steps: raised to 15.
    let dataset = toml_of(&launch, "kohya-dataset.toml");
    assert_eq!(
        dataset["datasets"][0]["subsets"][0]["num_repeats"].as_integer(),
        Some(15)
    );
    assert_eq!(
        dataset["datasets"][0]["max_bucket_reso"].as_integer(),
        Some(1536)
    );
}

#[test]
fn resume_names_the_state_folder_and_skips_to_its_step() {
    let fx = Fixture::new(ModelFamily::Flux, 3);
    let mut inputs = fx.inputs(ModelFamily::Flux, settings(100, 10, HashMap::new()));
    inputs.resume = common::resume(30, vec![]);
    let launch = backend().render(&inputs).unwrap();
    let args = toml_of(&launch, "kohya-args.toml");
    let state = fx.path("out/job123-step00000030-state");
    assert_eq!(args["resume"].as_str(), state.to_str());
    assert_eq!(args["skip_until_initial_step"].as_bool(), Some(true));
    let fresh = toml_of(
        &backend()
            .render(&fx.inputs(ModelFamily::Flux, settings(100, 10, HashMap::new())))
            .unwrap(),
        "kohya-args.toml",
    );
    assert!(!fresh.contains_key("resume") && !fresh.contains_key("skip_until_initial_step"));
    // kohya refuses to resume at or past the last step.
    inputs.resume = common::resume(100, vec![]);
    assert!(backend().render(&inputs).is_err());
}

#[test]
fn settings_problems_are_all_reported() {
    let b = backend();
    let extras: HashMap<String, ExtraValue> = [
        ("optimiser", extra(Kind::Text("adamw".into()))),
        ("timestep_sampling", extra(Kind::Text("logit".into()))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut s = settings(100, 10, extras);
    s.resolution = 1000;
    s.seed = 1 << 40;
    let problems = b
        .check(&s, ModelFamily::Flux)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("training.extras.optimiser: unknown key for kohya"))
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("training.extras.timestep_sampling"))
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("training.resolution"))
    );
    assert!(problems.iter().any(|p| p.starts_with("training.seed")));
    let fx = Fixture::new(ModelFamily::Flux, 1);
    assert!(b.render(&fx.inputs(ModelFamily::Flux, s)).is_err());
    // The families and the parts the cache must fetch.
    assert_eq!(b.families(), [ModelFamily::Flux, ModelFamily::Sdxl]);
    assert_eq!(
        b.parts(ModelFamily::Flux),
        ["transformer", "clip_l", "t5xxl", "ae"]
    );
    assert_eq!(b.parts(ModelFamily::Sdxl), ["checkpoint"]);
    assert!(
        trainyard_backends::check_settings(&settings(10, 0, HashMap::new()), ModelFamily::Wan)[0]
            .to_string()
            .contains("base_model: kohya does not train wan")
    );
}

fn touch(path: PathBuf) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A state's last file counts once written to its end (a pickle's STOP).
    let whole: &[u8] = if path.ends_with("random_states_0.pkl") {
        b"\x80\x04}\x94."
    } else {
        b"x"
    };
    std::fs::write(path, whole).unwrap();
}

fn out_inputs(fx: &Fixture) -> TrainInputs {
    fx.inputs(ModelFamily::Flux, settings(100, 10, HashMap::new()))
}

#[test]
fn the_newest_complete_state_is_the_checkpoint() {
    let fx = Fixture::new(ModelFamily::Flux, 1);
    let b = backend();
    let inputs = out_inputs(&fx);
    assert_eq!(b.latest_checkpoint(&inputs), None);
    let out = fx.path("out");
    for f in [
        "train_state.json",
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
    ] {
        touch(out.join("job123-step00000010-state").join(f));
    }
    touch(out.join("job123-step00000010.safetensors"));
    // Newer, but accelerate has not written its last file yet (created,
    // not written to its end).
    touch(out.join("job123-step00000020-state/model.safetensors"));
    touch(out.join("job123-step00000020.safetensors"));
    std::fs::write(
        out.join("job123-step00000020-state/random_states_0.pkl"),
        b"\x80\x04}",
    )
    .unwrap();
    // Another run's name, and the end-of-training state: neither counts.
    touch(out.join("other-step00000030-state/random_states_0.pkl"));
    touch(out.join("job123-state/random_states_0.pkl"));
    let found = b.latest_checkpoint(&inputs).unwrap();
    assert_eq!(found.step, 10);
    let files: Vec<_> = found.files.iter().map(|p| p.to_str().unwrap()).collect();
    assert_eq!(
        files,
        [
            "job123-step00000010-state/model.safetensors",
            "job123-step00000010-state/optimizer.bin",
            "job123-step00000010-state/random_states_0.pkl",
            "job123-step00000010-state/scheduler.bin",
            "job123-step00000010-state/train_state.json",
            "job123-step00000010.safetensors",
        ]
    );
    touch(out.join("job123-step00000020-state/random_states_0.pkl"));
    assert_eq!(b.latest_checkpoint(&inputs).unwrap().step, 20);
}

#[test]
fn final_adapter_and_stop() {
    let fx = Fixture::new(ModelFamily::Flux, 1);
    let b = backend();
    let inputs = out_inputs(&fx);
    assert_eq!(b.final_adapter(&inputs), None);
    touch(fx.path("out/job123-step00000100.safetensors"));
    assert_eq!(
        b.final_adapter(&inputs),
        None,
        "a step file is not the final adapter"
    );
    touch(fx.path("out/job123.safetensors"));
    assert_eq!(
        b.final_adapter(&inputs),
        Some(fx.path("out/job123.safetensors"))
    );
    assert_eq!(b.stop_request(&inputs), StopRequest::Unsupported);
}
