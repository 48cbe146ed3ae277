use super::*;
use crate::{LineEvent, Resume};
use serde_json::json;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use trainyard_core::config::TrainerPaths;
use trainyard_proto::v1::{ExtraValue, extra_value::Kind};

fn backend() -> SimpleTuner {
    SimpleTuner::new(&Tools {
        trainers: TrainerPaths {
            accelerate: "/venv/bin/accelerate".into(),
            simpletuner_dir: "/venv/lib/python3.11/site-packages/simpletuner".into(),
            ..Tools::default().trainers
        },
        ..Tools::default()
    })
}

fn inputs(family: ModelFamily) -> TrainInputs {
    TrainInputs {
        webhook_url: Some("http://127.0.0.1:40123/st".into()),
        ..crate::test_support::diffusers_run(NAME, family)
    }
}

fn file(launch: &Launch, name: &str) -> Value {
    let (_, body) = launch
        .files
        .iter()
        .find(|(p, _)| p.file_name().unwrap() == name)
        .unwrap_or_else(|| panic!("{name} not rendered"));
    serde_json::from_slice(body).unwrap()
}

#[test]
fn renders_the_documented_flux_run() {
    let launch = backend().render(&inputs(ModelFamily::Flux)).unwrap();
    assert_eq!(
        file(&launch, "config.json"),
        json!({
            "model_family": "flux", "model_type": "lora",
            "pretrained_model_name_or_path": "/models/diffusers", "output_dir": "/job/out",
            "pretrained_vae_model_name_or_path": "/models/diffusers",
            "data_backend_config": "/job/multidatabackend.json", "max_train_steps": 2000,
            "num_train_epochs": 0, "checkpoint_step_interval": 250, "checkpoints_total_limit": 3,
            "resume_from_checkpoint": "latest", "train_batch_size": 1, "gradient_checkpointing": true,
            "mixed_precision": "bf16", "optimizer": "adamw_bf16", "learning_rate": 1e-4,
            "lr_scheduler": "constant", "lora_rank": 16, "lora_alpha": 16.0, "seed": 42,
            "report_to": "none", "validation_disable": true, "disable_benchmark": true,
            "webhook_config": "[{\"webhook_type\":\"raw\",\"callback_url\":\"http://127.0.0.1:40123/st\",\"log_level\":\"info\"}]"
        })
    );
    assert_eq!(
        file(&launch, "multidatabackend.json"),
        json!([
            {"id": "subject", "type": "local", "dataset_type": "image", "instance_data_dir": "/job/img",
             "caption_strategy": "textfile", "resolution": 1024, "resolution_type": "pixel_area",
             "repeats": 9, "crop": false, "cache_dir_vae": "/job/cache/vae", "metadata_backend": "discovery"},
            {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": true,
             "cache_dir": "/job/cache/text"}
        ])
    );
    assert_eq!(file(&launch, "signal.json"), json!({}));
    let cmd = &launch.command;
    assert_eq!(cmd.program, Path::new("/venv/bin/accelerate"));
    let args: Vec<_> = cmd.args.iter().map(|a| a.to_str().unwrap()).collect();
    assert_eq!(
        args,
        [
            "launch",
            "--mixed_precision=bf16",
            "--num_processes=1",
            "--num_machines=1",
            "--dynamo_backend=no",
            "/venv/lib/python3.11/site-packages/simpletuner/train.py",
        ]
    );
    assert_eq!(cmd.cwd, Path::new("/job"));
    let env: HashMap<_, _> = cmd.env.iter().cloned().collect();
    assert_eq!(env["CONFIG_BACKEND"], "json");
    assert_eq!(env["CONFIG_PATH"], "/job/config.json");
    assert_eq!(env["SIMPLETUNER_JOB_ID"], "job123");
    assert_eq!(
        env["SIMPLETUNER_ACCELERATE_SIGNAL_FILE"],
        "/job/signal.json"
    );
    assert_eq!(env["TOKENIZERS_PARALLELISM"], "false");
}

#[test]
fn every_family_gets_its_model_family_and_the_diffusers_part() {
    let b = backend();
    for (family, name) in [
        (ModelFamily::Flux, "flux"),
        (ModelFamily::Sdxl, "sdxl"),
        (ModelFamily::Wan, "wan"),
        (ModelFamily::QwenImage, "qwen_image"),
    ] {
        assert!(b.families().contains(&family));
        assert_eq!(b.parts(family), [part::DIFFUSERS]);
        let config = file(&b.render(&inputs(family)).unwrap(), "config.json");
        assert_eq!(config["model_family"], name);
        assert_eq!(config["pretrained_model_name_or_path"], "/models/diffusers");
        assert_eq!(
            config["pretrained_vae_model_name_or_path"],
            "/models/diffusers"
        );
    }
    let mut no_diffusers = inputs(ModelFamily::Sdxl);
    no_diffusers.model.parts.clear();
    assert!(b.render(&no_diffusers).is_err());
    assert!(
        !b.check(&inputs(ModelFamily::Llm).settings, ModelFamily::Llm)
            .is_empty()
    );
}

fn extra(kind: Kind) -> ExtraValue {
    ExtraValue { kind: Some(kind) }
}

#[test]
fn extras_override_defaults_and_unknown_ones_are_refused() {
    let b = backend();
    let mut run = inputs(ModelFamily::Flux);
    run.webhook_url = None;
    run.settings.save_every = 0;
    run.settings.alpha = 8.0;
    let extras = &mut run.settings.extras;
    extras.insert("optimizer".into(), extra(Kind::Text("prodigy".into())));
    extras.insert("mixed_precision".into(), extra(Kind::Text("fp16".into())));
    extras.insert("flow_schedule_shift".into(), extra(Kind::Int(3)));
    extras.insert("gradient_checkpointing".into(), extra(Kind::Flag(false)));
    let launch = b.render(&run).unwrap();
    let config = file(&launch, "config.json");
    assert_eq!(config["optimizer"], "prodigy");
    assert_eq!(config["flow_schedule_shift"], 3.0);
    assert_eq!(config["gradient_checkpointing"], false);
    assert_eq!(config["lora_alpha"], 8.0);
    assert!(config.get("webhook_config").is_none());
    assert!(config.get("checkpoint_step_interval").is_none());
    assert_eq!(launch.command.args[1], "--mixed_precision=fp16");

    run.settings
        .extras
        .insert("mixed_precision".into(), extra(Kind::Text("fp64".into())));
    run.settings
        .extras
        .insert("lora_dim".into(), extra(Kind::Int(4)));
    let problems = b
        .check(&run.settings, ModelFamily::Flux)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("lora_dim: unknown key for simpletuner"));
    assert!(problems[1].contains("mixed_precision: \"fp64\" is not one of"));
    assert!(b.render(&run).is_err());
}

/// Wan on clips: a video dataset with its `video` block fitted to the
/// clips (8n+1 from the shortest, `max_frames` the longest), on the
/// dataset folder when it holds clips only, on folders of links beside an
/// image dataset when it holds both; the `num_frames` extra goes to the
/// block, not `config.json`, and preflight's need is what SimpleTuner
/// rounds it to. An image family with clips is refused.
#[test]
fn a_wan_video_dataset_gets_a_video_backend() {
    let b = backend();
    let clips_only = tempfile::tempdir().unwrap();
    crate::test_support::manifest_with_clips(
        clips_only.path(),
        &[],
        &[("walk.mp4", 16), ("run.mp4", 120)],
    );
    let dir = clips_only.path().to_str().unwrap();
    let mut run = inputs(ModelFamily::Wan);
    run.dataset_dir = clips_only.path().to_owned();
    let launch = b.render(&run).unwrap();
    assert_eq!(
        file(&launch, "multidatabackend.json"),
        json!([
            {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": dir,
             "caption_strategy": "textfile", "resolution": 1024, "resolution_type": "pixel_area",
             "repeats": 9, "crop": false, "cache_dir_vae": "/job/cache/vae-clips",
             "metadata_backend": "discovery",
             "video": {"num_frames": 9, "min_frames": 9, "max_frames": 120, "is_i2v": false}},
            {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": true,
             "cache_dir": "/job/cache/text"}
        ])
    );
    assert!(launch.links.is_empty());
    assert!(b.trains_video(ModelFamily::Wan));
    let need = b.clip_need(&run.settings, ModelFamily::Wan, &[16, 120]);
    assert_eq!(need.map(|n| n.frames), Some(Some(9)));

    let mixed = tempfile::tempdir().unwrap();
    crate::test_support::manifest_with_clips(mixed.path(), &["still.png"], &[("walk.mp4", 40)]);
    run.dataset_dir = mixed.path().to_owned();
    run.settings
        .extras
        .insert("num_frames".into(), extra(Kind::Int(23)));
    let launch = b.render(&run).unwrap();
    let backends = file(&launch, "multidatabackend.json");
    let ids: Vec<&str> = backends
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["subject", "clips", "text-embeds"]);
    assert_eq!(backends[0]["dataset_type"], "image");
    assert_eq!(backends[0]["instance_data_dir"], "/job/media/images");
    assert!(backends[0].get("video").is_none());
    assert_eq!(backends[1]["instance_data_dir"], "/job/media/clips");
    assert_eq!(
        backends[1]["video"],
        json!({"num_frames": 23, "min_frames": 23, "max_frames": 40, "is_i2v": false})
    );
    let data = mixed.path();
    assert_eq!(
        launch.links,
        [
            ("/job/media/images/still.png".into(), data.join("still.png")),
            ("/job/media/images/still.txt".into(), data.join("still.txt")),
            ("/job/media/clips/walk.mp4".into(), data.join("walk.mp4")),
            ("/job/media/clips/walk.txt".into(), data.join("walk.txt")),
        ]
    );
    assert!(file(&launch, "config.json").get("num_frames").is_none());
    let need = b.clip_need(&run.settings, ModelFamily::Wan, &[40]).unwrap();
    assert_eq!((need.frames, need.extra), (Some(17), "num_frames"));

    let mut flux = inputs(ModelFamily::Flux);
    flux.dataset_dir = mixed.path().to_owned();
    assert!(matches!(
        b.render(&flux),
        Err(BackendError::InvalidSettings(m)) if m.contains("holds 1 video clip;")
    ));
    assert_eq!(b.clip_need(&flux.settings, ModelFamily::Flux, &[16]), None);
    let problems = b.check(&run.settings, ModelFamily::Flux);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "training.extras.num_frames");
    run.settings
        .extras
        .insert("num_frames".into(), extra(Kind::Int(0)));
    let problems = b.check(&run.settings, ModelFamily::Wan);
    assert!(problems[0].problem.contains("at least 1"), "{problems:?}");
}

#[test]
fn a_stop_bumps_the_manual_checkpoint_count() {
    let run = inputs(ModelFamily::Flux);
    assert!(backend().wants_webhook());
    let count = |run: &TrainInputs| match backend().stop_request(run) {
        StopRequest::SaveAndContinue { path, body } => {
            assert_eq!(path, run.run_dir.join("signal.json"));
            serde_json::from_slice::<Value>(&body).unwrap()
        }
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(count(&run), json!({"manual_checkpoint": 1}));
    // Each request is one above the count the file holds.
    let dir = tempfile::tempdir().unwrap();
    let run = TrainInputs {
        run_dir: dir.path().to_path_buf(),
        ..run
    };
    let launch = backend().render(&run).unwrap();
    for (path, body) in &launch.files {
        std::fs::write(path, body).unwrap();
    }
    for expected in 1..=3 {
        let body = count(&run);
        assert_eq!(body, json!({ "manual_checkpoint": expected }));
        std::fs::write(signal_file(&run), body.to_string()).unwrap();
    }
}

fn parser() -> Box<dyn OutputParser> {
    let mut run = inputs(ModelFamily::Flux);
    run.settings.batch_size = 2;
    run.resume = Some(Resume {
        step: 50,
        files: vec![],
    });
    backend().parser(&run)
}

/// Step, total, loss, learning rate and epoch of the first progress event.
type Seen = (u32, u32, Option<f32>, Option<f64>, Option<f32>);

fn progress(events: &[LineEvent]) -> Option<Seen> {
    events.iter().find_map(|e| match e {
        LineEvent::Progress {
            step,
            total,
            loss,
            lr,
            epoch,
            ..
        } => Some((*step, *total, *loss, *lr, *epoch)),
        _ => None,
    })
}

#[test]
fn parses_the_step_bar_as_tqdm_writes_it() {
    let mut p = parser();
    // One stderr chunk: tqdm separates updates with `\r` only.
    let chunk = "\rEpoch 1/5 Steps:   0%|          | 0/100 [00:00<?, ?it/s]\
                 \rEpoch 1/5, Steps:  10%|█         | 10/100 [00:05<00:45,  1.98it/s, lr=0.0001, step_loss=0.123]\
                 \rEpoch 2/5, Steps:  30%|███       | 30/100 [01:05<02:31,  2.17s/it, lr=5e-5, step_loss=nan]";
    let parsed: Vec<_> = chunk
        .split('\r')
        .filter(|l| !l.is_empty())
        .map(|l| p.line(l))
        .collect();
    assert_eq!(progress(&parsed[0]), Some((0, 100, None, None, Some(1.0))));
    assert_eq!(
        progress(&parsed[1]),
        Some((10, 100, Some(0.123), Some(1e-4), Some(1.0)))
    );
    let (step, _, loss, lr, epoch) = progress(&parsed[2]).unwrap();
    assert_eq!((step, lr, epoch), (30, Some(5e-5), Some(2.0)));
    assert!(loss.unwrap().is_nan());
    match &parsed[1][0] {
        LineEvent::Progress {
            samples_per_sec, ..
        } => {
            assert!((samples_per_sec.unwrap() - 3.96).abs() < 1e-3)
        }
        other => panic!("{other:?}"),
    }
    // Caching bars are not training progress.
    assert!(
        p.line("Processing bucket 1.0: 100%|██████████| 10/10 [00:01<00:00,  9.80it/s]")
            .is_empty()
    );
}

#[test]
fn parses_the_startup_block_and_resume_lines() {
    let mut p = parser();
    let block = [
        "[RANK 0] 2026-02-16 10:00:00,000 [INFO] ",
        "***** Running training *****",
        "-  Num batches = 30",
        "-  Num Epochs = 4",
        "  - Current Epoch = 2",
        "-  Total optimization steps = 100",
        "  - Steps completed: 50",
        "-  Total optimization steps remaining = 50",
    ];
    let events: Vec<_> = block.iter().flat_map(|l| p.line(l)).collect();
    assert_eq!(events, [LineEvent::Resumed { step: 50 }]);
    // The same resume, logged again, is not a second event.
    assert!(
        p.line("[RANK 0] 2026-02-16 10:00:00,000 [INFO] Resuming from global_step 50.")
            .is_empty()
    );
    let mut fresh = parser();
    assert_eq!(
        fresh.line("[RANK 0] 2026-02-16 10:00:00,000 [INFO] Resuming from global_step 8."),
        [LineEvent::Resumed { step: 8 }]
    );
    assert!(fresh.line("  - Steps completed: 0").is_empty());
}

#[test]
fn parses_the_webhook_events() {
    let mut p = parser();
    let status = json!({
        "type": "training.status", "job_id": "job123", "title": "Running",
        "data": {"status": "running", "global_step": 12, "final_epoch": 4},
        "progress": {"current": 12, "total": 100, "percent": 12.0, "eta_seconds": 88.0,
                     "metrics": {"loss": 0.2345, "learning_rate": 0.0001, "epoch": 1, "grad_norm": 0.5}},
        "severity": "info", "timestamp": "2026-02-16T10:00:00+00:00"
    });
    let events = p.webhook(&status);
    assert_eq!(
        progress(&events),
        Some((12, 100, Some(0.2345), Some(1e-4), Some(1.0)))
    );
    assert_eq!(
        events[1],
        LineEvent::Metric {
            name: "grad_norm".into(),
            value: 0.5,
            step: 12
        }
    );
    let startup = json!({
        "type": "training.status", "job_id": "job123", "title": "Running", "message": "***** Running training *****",
        "data": {"status": "running", "global_step": 50},
        "progress": {"label": "Training initialisation", "current": 50, "total": 100, "percent": 50.0,
                     "metrics": {"loss": 0.0, "learning_rate": 0.0001, "epoch": 2, "total_epochs": 4}}
    });
    assert_eq!(
        progress(&p.webhook(&startup)),
        Some((50, 100, None, Some(1e-4), Some(2.0)))
    );
    let stage = |key: &str, status: &str, message: &str| {
        json!({"type": "lifecycle.stage", "severity": "info", "job_id": "job123",
               "stage": {"key": key, "label": "x", "status": status},
               "message": message, "title": message})
    };
    assert!(
        p.webhook(&stage(
            "checkpoint_save",
            "running",
            "Saving checkpoint to /job/out/checkpoint-250"
        ))
        .is_empty()
    );
    // Sent before the guard: the checkpoint is not complete yet.
    assert!(
        p.webhook(&stage(
            "checkpoint_save",
            "completed",
            "Saved checkpoint to /job/out/checkpoint-250"
        ))
        .is_empty()
    );
    let checkpoint = json!({"type": "training.checkpoint", "severity": "info", "job_id": "job123",
        "checkpoint": {"path": "/job/out/checkpoint-250", "label": "Checkpoint saved to /job/out/checkpoint-250",
                       "is_final": false}, "title": "Checkpoint saved"});
    assert_eq!(
        p.webhook(&checkpoint),
        [LineEvent::Saved { step: Some(250) }]
    );
    assert!(p.webhook(&checkpoint).is_empty(), "the same save twice");
    assert_eq!(
        p.webhook(&stage(
            "init_resume_checkpoint",
            "completed",
            "Resumed from global_step 40"
        )),
        [LineEvent::Resumed { step: 40 }]
    );
    assert_eq!(
        p.webhook(&stage(
            "training_complete",
            "completed",
            "Training run complete."
        )),
        [LineEvent::Done]
    );
    let error = json!({"type": "error", "title": "Training failed: RuntimeError",
        "message": "Non-finite training loss detected (loss=nan)", "traceback": "Traceback …",
        "severity": "error"});
    assert!(p.webhook(&error).is_empty());
    assert!(
        p.webhook(&json!({"status": "failed", "type": "training.status"}))
            .is_empty()
    );
    assert!(
        p.webhook(&json!({"message": "`(job123)` Checkpoint: `Step 12`", "images": []}))
            .is_empty()
    );
}

#[test]
fn latest_checkpoint_needs_the_guard_and_lists_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = inputs(ModelFamily::Flux);
    run.output_dir = dir.path().to_path_buf();
    let b = backend();
    assert_eq!(b.latest_checkpoint(&run), None);
    let write = |rel: &str| {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    };
    for step in [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30-tmp",
        "checkpoint-40-rolling",
    ] {
        write(&format!("{step}/training_state.json"));
        write(&format!("{step}/pytorch_lora_weights.safetensors"));
    }
    write("checkpoint-10/.guard");
    write("checkpoint-10/sampler/state.json");
    write("checkpoint-30-tmp/.guard");
    write("checkpoint-40-rolling/.guard");
    let found = b.latest_checkpoint(&run).unwrap();
    assert_eq!(found.step, 10);
    let files: Vec<_> = found.files.iter().map(|p| p.to_str().unwrap()).collect();
    assert_eq!(
        files,
        [
            "checkpoint-10/.guard",
            "checkpoint-10/pytorch_lora_weights.safetensors",
            "checkpoint-10/sampler/state.json",
            "checkpoint-10/training_state.json",
        ]
    );
    write("checkpoint-20/.guard");
    assert_eq!(b.latest_checkpoint(&run).unwrap().step, 20);
    assert_eq!(b.final_adapter(&run), None);
    write("pytorch_lora_weights.safetensors");
    assert_eq!(
        b.final_adapter(&run),
        Some(dir.path().join("pytorch_lora_weights.safetensors"))
    );
}

fn tail(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

#[test]
fn classifies_simpletuner_failures() {
    let failed = ExitStatus::from_raw(1 << 8);
    let cases: &[(&[&str], ErrorKind, bool, &str)] = &[
        (
            &[
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
                "[RANK 0] 2026-02-16 10:00:00,000 [ERROR] GPU circuit breaker triggered by CUDA error on GPU 0: CUDA out of memory. Tried to allocate 2.00 GiB.",
                "subprocess.CalledProcessError: Command '['python3', 'train.py']' returned non-zero exit status 1.",
            ],
            ErrorKind::Oom,
            true,
            "out of GPU memory",
        ),
        (
            &[
                "[RANK 0] 2026-02-16 10:00:00,000 [ERROR] GPU circuit breaker triggered by CUDA error on GPU 0: CUDA error: an illegal memory access was encountered",
            ],
            ErrorKind::Trainer,
            true,
            "GPU device error",
        ),
        (
            &["RuntimeError: Non-finite training loss detected (loss=nan)"],
            ErrorKind::Trainer,
            false,
            "training diverged",
        ),
        (
            &[
                "Exception: No images were discovered by the bucket manager in the dataset: subject.",
            ],
            ErrorKind::BadDataset,
            false,
            "no usable training data",
        ),
        (
            // What the real SimpleTuner prints for a dataset without images.
            &["ValueError: (id=subject) Dataset produced no usable samples."],
            ErrorKind::BadDataset,
            false,
            "no usable training data",
        ),
        (
            &[
                "ValueError: Must provide at least one text embed backend in the data backend config file.",
            ],
            ErrorKind::Internal,
            false,
            "data backend config",
        ),
        (
            &["OSError: Error no file named model_index.json found in directory /models/x."],
            ErrorKind::Model,
            false,
            "base model",
        ),
        (
            &["FileNotFoundError: [Errno 2] No such file or directory: '/job/img'"],
            ErrorKind::InvalidSpec,
            false,
            "missing file",
        ),
    ];
    for (lines, kind, retryable, what) in cases {
        let e = classify(failed, &tail(lines));
        assert_eq!((e.kind(), e.retryable), (*kind, *retryable), "{lines:?}");
        assert!(e.message.contains(what), "{}", e.message);
    }
    let e = classify(failed, &tail(&["something odd", ""]));
    assert_eq!(e.kind(), ErrorKind::Trainer);
    assert!(e.message.contains("simpletuner exited with") && e.message.contains("something odd"));
}
