//! The diffusion-pipe backend without running anything: the rendered TOMLs
//! and argv for every model type (golden files), the checks, the output
//! parser on the lines diffusion-pipe and DeepSpeed print, and failure
//! classification.
//!
//! Golden files live in `tests/golden/diffusion-pipe/`; run with
//! `UPDATE_GOLDEN=1` to rewrite them after an intended change.

use crate::support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use trainyard_backends::{
    Launch, LineEvent, ModelFiles, Resume, Slot, StopRequest, Tools, TrainInputs, TrainerBackend,
    by_name,
};
use trainyard_core::config::TrainerPaths;
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, ExtraValue, TrainingSettings, extra_value::Kind};

fn backend() -> Box<dyn TrainerBackend> {
    let tools = Tools {
        trainers: TrainerPaths {
            deepspeed: "/opt/venv/bin/deepspeed".into(),
            diffusion_pipe_dir: "/opt/diffusion-pipe".into(),
            ..Tools::default().trainers
        },
        ..Tools::default()
    };
    by_name("diffusion-pipe", &tools).expect("registered")
}

fn settings() -> TrainingSettings {
    TrainingSettings {
        backend: "diffusion-pipe".into(),
        steps: 1200,
        learning_rate: 2e-4,
        rank: 16,
        alpha: 16.0,
        resolution: 1024,
        batch_size: 2,
        repeats: 10,
        save_every: 200,
        seed: 42,
        ..Default::default()
    }
}

fn model(family: ModelFamily, parts: &[(&str, &str)]) -> ModelFiles {
    ModelFiles {
        reference: format!("{family}-test"),
        family,
        parts: parts
            .iter()
            .map(|(role, path)| (role.to_string(), PathBuf::from(path)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn inputs(model: ModelFiles, settings: TrainingSettings) -> TrainInputs {
    TrainInputs {
        output_name: "lora".into(),
        ..support::run_inputs(
            "job-1",
            "/jobs/job-1/dataset",
            "/jobs/job-1/run",
            "/jobs/job-1/output",
            model,
            settings,
        )
    }
}

fn extra(kind: Kind) -> ExtraValue {
    ExtraValue { kind: Some(kind) }
}

/// Compares `actual` with the golden file, or rewrites it under `UPDATE_GOLDEN=1`.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/diffusion-pipe")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

fn render_golden(stem: &str, inputs: &TrainInputs) {
    let launch = backend().render(inputs).expect("renders");
    assert_eq!(launch.files.len(), 2);
    assert_eq!(launch.files[0].0, Path::new("/jobs/job-1/run/config.toml"));
    assert_eq!(launch.files[1].0, Path::new("/jobs/job-1/run/dataset.toml"));
    let text = |i: usize| String::from_utf8(launch.files[i].1.clone()).unwrap();
    // What the trainer will parse must be valid TOML.
    for i in 0..2 {
        toml::from_str::<toml::Table>(&text(i)).expect("valid TOML");
    }
    golden(&format!("{stem}.config.toml"), &text(0));
    golden(&format!("{stem}.dataset.toml"), &text(1));
    golden(&format!("{stem}.argv"), &command_text(&launch));
}

/// The working directory, the environment and the argv, a line each.
fn command_text(launch: &Launch) -> String {
    let c = &launch.command;
    let env: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "cwd={}\n{}\n{}\n",
        c.cwd.display(),
        env.join("\n"),
        support::argv(launch).join("\n")
    )
}

/// Two runs on one multi-GPU worker: each names its own GPU to the
/// DeepSpeed runner (`--include`, since `--num_gpus` would drop
/// `CUDA_VISIBLE_DEVICES`) and its own rendezvous port to train.py, whose
/// `--master_port` (default 29500) is the port torch.distributed binds
/// whatever the runner was told; the config files do not depend on the slot.
#[test]
fn each_slot_gets_its_own_gpu_and_rendezvous_port() {
    let m = model(
        ModelFamily::Flux,
        &[(part::DIFFUSERS, "/models/flux1-dev/diffusers")],
    );
    let unslotted = backend().render(&inputs(m.clone(), settings())).unwrap();
    let mut launches = Vec::new();
    for (index, gpu) in [(0u16, 0u32), (1, 1)] {
        let mut slotted = inputs(m.clone(), settings());
        slotted.slot = Slot {
            index,
            gpus: vec![gpu],
        };
        let launch = backend().render(&slotted).unwrap();
        assert_eq!(launch.files, unslotted.files);
        golden(&format!("flux.slot{index}.argv"), &command_text(&launch));
        launches.push(launch);
    }
    // train.py's own flag: the arguments after the script.
    let script_port = |l: &Launch| {
        let args: Vec<&str> = l.command.args.iter().filter_map(|a| a.to_str()).collect();
        let script = args.iter().position(|a| a.ends_with("/train.py")).unwrap();
        args[script..]
            .iter()
            .find_map(|a| a.strip_prefix("--master_port=")?.parse::<u16>().ok())
            .unwrap_or(29500)
    };
    assert_eq!(script_port(&launches[0]), 29500);
    assert_eq!(script_port(&launches[1]), 29501);
    for launch in &launches {
        assert!(!launch.command.args.iter().any(|a| a == "--num_gpus=1"));
    }
}

#[test]
fn flux_renders_diffusers_path_and_the_optional_transformer() {
    let m = model(
        ModelFamily::Flux,
        &[
            (part::DIFFUSERS, "/models/flux1-dev/diffusers"),
            (part::TRANSFORMER, "/models/flux1-dev/flux1-dev.safetensors"),
        ],
    );
    render_golden("flux", &inputs(m, settings()));
}

#[test]
fn sdxl_renders_checkpoint_path() {
    let m = model(
        ModelFamily::Sdxl,
        &[(part::CHECKPOINT, "/models/sdxl/sd_xl_base_1.0.safetensors")],
    );
    render_golden("sdxl", &inputs(m, settings()));
}

#[test]
fn wan_renders_ckpt_path_and_model_extras() {
    let m = model(
        ModelFamily::Wan,
        &[(part::CKPT_DIR, "/models/wan2.1-t2v-1.3b/ckpt")],
    );
    let mut s = settings();
    s.extras.insert(
        "transformer_dtype".into(),
        extra(Kind::Text("float8".into())),
    );
    s.extras.insert(
        "timestep_sample_method".into(),
        extra(Kind::Text("logit_normal".into())),
    );
    s.extras
        .insert("blocks_to_swap".into(), extra(Kind::Int(8)));
    s.extras
        .insert("gradient_accumulation_steps".into(), extra(Kind::Int(4)));
    s.extras.insert(
        "optimizer_type".into(),
        extra(Kind::Text("AdamW8bitKahan".into())),
    );
    s.extras.insert("weight_decay".into(), extra(Kind::Int(0)));
    s.extras
        .insert("checkpoint_every_n_epochs".into(), extra(Kind::Int(1)));
    s.extras
        .insert("num_ar_buckets".into(), extra(Kind::Int(9)));
    render_golden("wan", &inputs(m, s));
}

#[test]
fn qwen_image_renders_diffusers_path() {
    let m = model(
        ModelFamily::QwenImage,
        &[(part::DIFFUSERS, "/models/qwen-image/diffusers")],
    );
    let mut s = settings();
    s.save_every = 0;
    render_golden("qwen_image", &inputs(m, s));
}

#[test]
fn z_image_renders_comfy_file_paths_and_resumes_into_the_restored_run() {
    let m = model(
        ModelFamily::ZImage,
        &[
            (
                part::TRANSFORMER,
                "/models/z-image/z_image_turbo_bf16.safetensors",
            ),
            (part::AE, "/models/z-image/ae.safetensors"),
            (part::TEXT_ENCODER, "/models/z-image/qwen_3_4b.safetensors"),
            (
                part::TRAINING_ADAPTER,
                "/models/z-image/zimage_turbo_training_adapter_v1.safetensors",
            ),
        ],
    );
    let mut i = inputs(m, settings());
    i.resume = Some(Resume {
        step: 400,
        files: vec![
            "20260101_10-00-00/global_step400/layer_01-model_states.pt".into(),
            "20260101_10-00-00/global_step400/mp_rank_00_model_states.pt".into(),
            "20260101_10-00-00/latest".into(),
        ],
    });
    render_golden("z_image", &i);
}

/// Z-Image-Turbo's de-distill adapter is what diffusion-pipe merges before
/// training (`merge_adapters`, a list of files); a Z-Image model without
/// one gets no entry.
#[test]
fn z_image_merges_the_training_adapter_the_preset_provides() {
    let b = backend();
    assert!(
        b.parts(ModelFamily::ZImage)
            .contains(&part::TRAINING_ADAPTER)
    );
    let preset = trainyard_models::preset("z-image-turbo").expect("preset");
    for role in b.parts(ModelFamily::ZImage) {
        assert!(preset.part(role).is_some(), "the preset has no {role} part");
    }
    let model_table = |parts: &[(&str, &str)]| {
        let launch = b
            .render(&inputs(model(ModelFamily::ZImage, parts), settings()))
            .unwrap();
        let config: toml::Table =
            toml::from_str(std::str::from_utf8(&launch.files[0].1).unwrap()).unwrap();
        config["model"].as_table().unwrap().clone()
    };
    let base = [
        (part::TRANSFORMER, "/m/z_image_turbo_bf16.safetensors"),
        (part::AE, "/m/ae.safetensors"),
        (part::TEXT_ENCODER, "/m/qwen_3_4b.safetensors"),
    ];
    let with = model_table(
        &[
            &base[..],
            &[(part::TRAINING_ADAPTER, "/m/adapter.safetensors")],
        ]
        .concat(),
    );
    assert_eq!(
        with["merge_adapters"],
        toml::Value::Array(vec!["/m/adapter.safetensors".into()])
    );
    assert!(!model_table(&base).contains_key("merge_adapters"));
}

/// Every `[optimizer]` key but `type` is a constructor argument: SGD and
/// Automagic take no `betas` and no single `eps`.
#[test]
fn optimizer_keys_are_the_ones_its_constructor_takes() {
    let b = backend();
    let m = model(
        ModelFamily::Flux,
        &[(part::DIFFUSERS, "/models/flux1-dev/diffusers")],
    );
    let optimizer = |kind: &str| {
        let mut s = settings();
        s.extras
            .insert("optimizer_type".into(), extra(Kind::Text(kind.into())));
        let launch = b.render(&inputs(m.clone(), s)).unwrap();
        let config: toml::Table =
            toml::from_str(std::str::from_utf8(&launch.files[0].1).unwrap()).unwrap();
        let table = config["optimizer"].as_table().unwrap();
        let mut keys: Vec<String> = table.keys().cloned().collect();
        keys.sort();
        keys
    };
    for kind in ["sgd", "automagic", "Automagic"] {
        assert_eq!(optimizer(kind), ["lr", "type", "weight_decay"], "{kind}");
    }
    assert_eq!(
        optimizer("AdamW8bitKahan"),
        ["betas", "eps", "lr", "type", "weight_decay"]
    );
    let mut s = settings();
    s.extras.insert(
        "optimizer_type".into(),
        extra(Kind::Text("automagic".into())),
    );
    s.extras.insert("eps".into(), extra(Kind::Float(1e-6)));
    let problems = b.check(&s, ModelFamily::Flux);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "training.extras.eps");
}

#[test]
fn missing_model_parts_are_named() {
    let m = model(
        ModelFamily::ZImage,
        &[(part::TRANSFORMER, "/m/t.safetensors")],
    );
    let err = backend().render(&inputs(m, settings())).unwrap_err();
    assert!(err.to_string().contains("has no ae part"), "{err}");
}

#[test]
fn check_rejects_alpha_other_than_rank_and_bad_extras() {
    let b = backend();
    let mut s = settings();
    s.alpha = 8.0;
    s.extras
        .insert("lr_scheduler".into(), extra(Kind::Text("linear".into())));
    s.extras.insert(
        "timestep_sample_method".into(),
        extra(Kind::Text("sigmoid".into())),
    );
    let problems = b.check(&s, ModelFamily::Flux);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[1].field, "training.extras.lr_scheduler");
    let problems = problems.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        problems[0],
        "training.alpha: diffusion-pipe forces alpha = rank (16); got 8"
    );
    assert!(
        problems[1].contains("lr_scheduler: unknown key"),
        "{problems:?}"
    );
    // Types are checked per key; values after the types are right.
    s.extras.remove("lr_scheduler");
    let problems = b
        .check(&s, ModelFamily::Flux)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert!(
        problems[1].contains("must be logit_normal or uniform"),
        "{problems:?}"
    );
    // Family-specific keys are refused for the other families.
    let mut s = settings();
    s.extras.insert("min_t".into(), extra(Kind::Float(0.0)));
    assert!(b.check(&s, ModelFamily::Wan).is_empty());
    assert!(
        b.check(&s, ModelFamily::Flux)[0]
            .to_string()
            .contains("min_t: unknown key")
    );
    s.extras
        .insert("checkpoint_every_n_minutes".into(), extra(Kind::Int(5)));
    s.extras
        .insert("checkpoint_every_n_epochs".into(), extra(Kind::Int(1)));
    assert!(
        b.check(&s, ModelFamily::Wan)[0]
            .problem
            .contains("set only one of")
    );
    // alpha 0 means "= rank" and passes, and render refuses what check refuses.
    let mut s = settings();
    s.alpha = 0.0;
    assert!(b.check(&s, ModelFamily::Sdxl).is_empty());
    s.alpha = 4.0;
    let m = model(
        ModelFamily::Sdxl,
        &[(part::CHECKPOINT, "/m/sdxl.safetensors")],
    );
    assert!(b.render(&inputs(m, s)).is_err());
}

fn parse(lines: &[&str]) -> Vec<LineEvent> {
    let m = model(ModelFamily::Flux, &[(part::DIFFUSERS, "/m")]);
    let mut parser = backend().parser(&inputs(m, settings()));
    lines.iter().flat_map(|l| parser.line(l)).collect()
}

#[test]
fn parses_deepspeed_steps_and_diffusion_pipe_lines() {
    let events = parse(&[
        "caching latents: (1.0, 1)",
        "caching text embeddings: (1.0, 1)",
        "Global batch size = 2",
        "steps: 120 loss: 0.1234 iter time (s): 3.210 samples/sec: 0.311",
        "Started new epoch: 2",
        "steps: 121 loss: nan iter time (s): 3.198 samples/sec: 0.313",
        "steps: 122 loss: 0.2500 mse_loss: 0.2000 iter time (s): 1.000 samples/sec: 2.000",
        "Saving model to directory step200",
        "Saving model to directory epoch3",
        "TRAINING COMPLETE!",
        "[2026-02-16 10:00:00,000] [INFO] [logging.py:107:log_dist] [Rank 0] step=120, skipped=0, lr=[0.0002], mom=[(0.9, 0.99)]",
    ]);
    let LineEvent::Progress {
        step,
        total,
        loss,
        lr,
        samples_per_sec,
        epoch,
    } = events[0].clone()
    else {
        panic!("{events:?}")
    };
    assert_eq!((step, total, lr, epoch), (120, 1200, None, Some(1.0)));
    assert_eq!(loss, Some(0.1234));
    assert_eq!(samples_per_sec, Some(0.311));
    let LineEvent::Progress {
        step, loss, epoch, ..
    } = events[1].clone()
    else {
        panic!("{events:?}")
    };
    assert_eq!((step, epoch), (121, Some(2.0)));
    assert!(loss.unwrap().is_nan());
    assert!(matches!(events[2], LineEvent::Progress { step: 122, .. }));
    assert_eq!(
        events[3],
        LineEvent::Metric {
            name: "mse_loss".into(),
            value: 0.2,
            step: 122
        }
    );
    assert_eq!(events[4], LineEvent::Saved { step: Some(200) });
    assert_eq!(events[5], LineEvent::Saved { step: None });
    assert_eq!(events[6], LineEvent::Done);
    assert_eq!(events.len(), 7, "{events:?}");
}

#[test]
fn a_resumed_run_reports_the_checkpoint_step_and_its_epoch() {
    let m = model(ModelFamily::Flux, &[(part::DIFFUSERS, "/m")]);
    let mut i = inputs(m, settings());
    i.resume = Some(Resume {
        step: 40,
        files: vec![],
    });
    let mut parser = backend().parser(&i);
    assert_eq!(
        parser.line("Resuming training from checkpoint. Resuming at epoch: 3, step: 41"),
        vec![LineEvent::Resumed { step: 40 }]
    );
    let events = parser.line("steps: 41 loss: 0.1000 iter time (s): 1.000 samples/sec: 1.000");
    assert!(
        matches!(
            events[0],
            LineEvent::Progress {
                step: 41,
                epoch: Some(3.0),
                ..
            }
        ),
        "{events:?}"
    );
}

fn failed(code: i32) -> ExitStatus {
    ExitStatus::from_raw(code << 8)
}

fn tail(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

#[test]
fn classifies_diffusion_pipe_failures() {
    let b = backend();
    let cases: &[(&[&str], ErrorKind, bool, &str)] = &[
        (
            &[
                "  File \"/opt/diffusion-pipe/train.py\", line 261, in <module>",
                "    set_config_defaults(config)",
                "  File \"/opt/diffusion-pipe/train.py\", line 91, in set_config_defaults",
                "    assert 'save_every_n_epochs' in config or 'save_every_n_steps' in config or 'save_every_n_examples' in config",
                "AssertionError",
                "[2026-02-16 10:00:00,000] [ERROR] [launch.py:341:sigkill_handler] exits with return code = 1",
            ],
            ErrorKind::InvalidSpec,
            false,
            "AssertionError",
        ),
        (
            &[
                "NotImplementedError: This script forces alpha=rank to make the saved LoRA format simpler and more predictable with downstream inference programs. Please remove alpha from the config.",
            ],
            ErrorKind::InvalidSpec,
            false,
            "forces alpha=rank",
        ),
        (
            &["NotImplementedError: Model type flux2-dev is not implemented"],
            ErrorKind::InvalidSpec,
            false,
            "Model type flux2-dev",
        ),
        (
            &["AssertionError: Directory /jobs/job-1/dataset had no images/videos!"],
            ErrorKind::BadDataset,
            false,
            "had no images",
        ),
        (
            &[
                "[2026-02-16 10:00:00,000] [WARNING] [dataset.py:226:_make_divisible_by] size bucket (1024, 1024, 1) is being completely dropped because it doesn't have enough images",
                "ZeroDivisionError: integer division or modulo by zero",
            ],
            ErrorKind::BadDataset,
            false,
            "completely dropped",
        ),
        (
            &[
                "torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use",
            ],
            ErrorKind::Trainer,
            true,
            "rendezvous port",
        ),
        (
            &[
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB",
            ],
            ErrorKind::Oom,
            true,
            "CUDA out of memory",
        ),
    ];
    for (lines, kind, retryable, needle) in cases {
        let e = b.classify(failed(1), &tail(lines));
        assert_eq!(
            (e.kind(), e.retryable),
            (*kind, *retryable),
            "{}",
            e.message
        );
        assert!(e.message.contains(needle), "{}", e.message);
    }
}

#[test]
fn a_child_killed_under_the_launcher_is_a_host_oom() {
    // The runner exits 1 and reports the child's negative return code.
    let b = backend();
    let e = b.classify(
        failed(1),
        &tail(&[
            "steps: 10 loss: 0.1 iter time (s): 1.0 samples/sec: 1.0",
            "[ERROR] [launch.py] exits with return code = -9",
        ]),
    );
    assert_eq!(
        (e.kind(), e.retryable),
        (ErrorKind::Oom, true),
        "{}",
        e.message
    );
    let e = b.classify(
        failed(1),
        &tail(&["[ERROR] [launch.py] exits with return code = -11"]),
    );
    assert_eq!(e.kind(), ErrorKind::Trainer);
    assert!(e.message.contains("signal: 11"), "{}", e.message);
    let e = b.classify(
        failed(3),
        &tail(&[
            "something odd",
            "[ERROR] [launch.py] exits with return code = 3",
        ]),
    );
    assert!(
        e.message.contains("last line: something odd"),
        "{}",
        e.message
    );
}

#[test]
fn output_folder_lookups_follow_the_newest_run_folder() {
    let out = tempfile::tempdir().unwrap();
    let m = model(
        ModelFamily::Sdxl,
        &[(part::CHECKPOINT, "/m/sdxl.safetensors")],
    );
    let mut i = inputs(m, settings());
    i.output_dir = out.path().to_path_buf();
    let b = backend();
    assert_eq!(b.stop_request(&i), StopRequest::Unsupported);
    assert!(b.latest_checkpoint(&i).is_none());
    let old = out.path().join("20260101_09-00-00");
    let run = out.path().join("20260101_10-00-00");
    for dir in [&old, &run] {
        std::fs::create_dir_all(dir.join("global_step10")).unwrap();
        std::fs::write(dir.join("global_step10/mp_rank_00_model_states.pt"), b"x").unwrap();
        std::fs::write(dir.join("latest"), "global_step10").unwrap();
    }
    std::fs::write(run.join("config.toml"), "").unwrap();
    std::fs::write(run.join("events.out.tfevents.1.host.1.0"), "").unwrap();
    // A checkpoint being written (no `latest` update yet) is not reported.
    std::fs::create_dir_all(run.join("global_step20")).unwrap();
    std::fs::write(run.join("global_step20/layer_01-model_states.pt"), b"x").unwrap();
    let found = b.latest_checkpoint(&i).unwrap();
    assert_eq!(found.step, 10);
    let files: Vec<&str> = found.files.iter().map(|p| p.to_str().unwrap()).collect();
    assert_eq!(
        files,
        [
            "20260101_10-00-00/global_step10/mp_rank_00_model_states.pt",
            "20260101_10-00-00/latest",
            "20260101_10-00-00/config.toml",
        ]
    );
    assert_eq!(
        b.stop_request(&i),
        StopRequest::SaveAndExit {
            path: run.join("save_quit"),
            body: vec![]
        }
    );
    // The final adapter is step{steps}/ with the family's file name; an
    // intermediate save is not it.
    std::fs::create_dir_all(run.join("step200")).unwrap();
    std::fs::write(run.join("step200/lora.safetensors"), b"x").unwrap();
    assert!(b.final_adapter(&i).is_none());
    std::fs::create_dir_all(run.join("step1200")).unwrap();
    std::fs::write(run.join("step1200/adapter_model.safetensors"), b"x").unwrap();
    assert!(b.final_adapter(&i).is_none(), "sdxl saves lora.safetensors");
    std::fs::write(run.join("step1200/lora.safetensors"), b"x").unwrap();
    assert_eq!(
        b.final_adapter(&i),
        Some(run.join("step1200/lora.safetensors"))
    );
    // Resumed from the checkpoint written just before the final save, the
    // trainer runs one more step and saves that.
    std::fs::create_dir_all(run.join("step1201")).unwrap();
    std::fs::write(run.join("step1201/lora.safetensors"), b"x").unwrap();
    assert_eq!(
        b.final_adapter(&i),
        Some(run.join("step1201/lora.safetensors"))
    );
}

fn dataset_with_clips(dir: &Path, clips: &[(&str, u64)]) {
    support::manifest_with_clips(dir, &["still.png"], clips);
}

fn dataset_toml(inputs: &TrainInputs) -> Result<toml::Table, trainyard_backends::BackendError> {
    let launch = backend().render(inputs)?;
    Ok(toml::from_str(std::str::from_utf8(&launch.files[1].1).unwrap()).unwrap())
}

/// Wan with clips: frame buckets from the shortest clip, or the extra's,
/// and `video_clip_mode` passed on; an image family with clips is refused.
#[test]
fn a_wan_video_dataset_gets_frame_buckets() {
    let tmp = tempfile::tempdir().unwrap();
    dataset_with_clips(tmp.path(), &[("walk.mp4", 16), ("run.mp4", 120)]);
    let wan = || model(ModelFamily::Wan, &[(part::CKPT_DIR, "/models/wan/ckpt")]);
    let mut run = inputs(wan(), settings());
    run.dataset_dir = tmp.path().to_owned();
    let table = dataset_toml(&run).unwrap();
    assert_eq!(
        table["frame_buckets"],
        toml::Value::Array(vec![1.into(), 13.into()])
    );
    assert_eq!(
        table["directory"][0]["path"].as_str(),
        Some(tmp.path().to_str().unwrap())
    );

    let mut s = settings();
    s.extras
        .insert("frame_buckets".into(), extra(Kind::Text("33, 65".into())));
    s.extras.insert(
        "video_clip_mode".into(),
        extra(Kind::Text("multiple_overlapping".into())),
    );
    let mut run = inputs(wan(), s);
    run.dataset_dir = tmp.path().to_owned();
    let table = dataset_toml(&run).unwrap();
    assert_eq!(
        table["frame_buckets"],
        toml::Value::Array(vec![1.into(), 33.into(), 65.into()])
    );
    assert_eq!(
        table["video_clip_mode"].as_str(),
        Some("multiple_overlapping")
    );

    let mut s = settings();
    s.extras
        .insert("video_clip_mode".into(), extra(Kind::Text("middle".into())));
    s.extras
        .insert("frame_buckets".into(), extra(Kind::Text("1, x".into())));
    let problems = backend().check(&s, ModelFamily::Wan);
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "training.extras.frame_buckets",
            "training.extras.video_clip_mode"
        ]
    );
    assert!(!backend().check(&s, ModelFamily::Sdxl).is_empty());

    let mut run = inputs(
        model(
            ModelFamily::Sdxl,
            &[(part::CHECKPOINT, "/models/sdxl.safetensors")],
        ),
        settings(),
    );
    run.dataset_dir = tmp.path().to_owned();
    assert!(matches!(
        dataset_toml(&run),
        Err(trainyard_backends::BackendError::InvalidSettings(_))
    ));
    assert!(backend().trains_video(ModelFamily::Wan));
    assert!(!backend().trains_video(ModelFamily::Flux));
}
