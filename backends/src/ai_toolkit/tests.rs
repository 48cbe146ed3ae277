use super::*;
use crate::LineEvent;
use std::os::unix::process::ExitStatusExt;
use trainyard_core::config::TrainerPaths;
use trainyard_proto::v1::{ExtraValue, extra_value::Kind};

fn backend() -> AiToolkit {
    AiToolkit::new(&Tools {
        trainers: TrainerPaths {
            python: "/venv/bin/python".into(),
            ai_toolkit_dir: "/opt/ai-toolkit".into(),
            ..Tools::default().trainers
        },
        ..Tools::default()
    })
}

fn inputs(family: ModelFamily) -> TrainInputs {
    crate::test_support::diffusers_run(NAME, family)
}

const FLUX_JOB: &str = "\
job: extension
config:
  name: job123
  process:
  - type: sd_trainer
    training_folder: /job/out
    device: cuda:0
    trigger_word: ohwx
    network:
      type: lora
      linear: 16
      linear_alpha: 16.0
    save:
      dtype: float16
      save_every: 250
      max_step_saves_to_keep: 3
    datasets:
    - folder_path: /job/img
      caption_ext: txt
      resolution:
      - 1024
      num_repeats: 10
      cache_latents_to_disk: true
    train:
      batch_size: 1
      steps: 2000
      lr: 0.0001
      train_unet: true
      train_text_encoder: false
      disable_sampling: true
      dtype: bf16
      gradient_checkpointing: true
      noise_scheduler: flowmatch
      optimizer: adamw8bit
    model:
      name_or_path: /models/diffusers
      is_flux: true
      quantize: true
meta:
  name: '[name]'
  version: '1.0'
";

fn job(launch: &Launch) -> serde_yaml::Value {
    assert_eq!(launch.files.len(), 1);
    assert_eq!(launch.files[0].0, Path::new("/job/job.yaml"));
    serde_yaml::from_slice(&launch.files[0].1).unwrap()
}

#[test]
fn renders_the_documented_flux_job() {
    let launch = backend().render(&inputs(ModelFamily::Flux)).unwrap();
    assert_eq!(
        String::from_utf8(launch.files[0].1.clone()).unwrap(),
        FLUX_JOB
    );
    let cmd = &launch.command;
    assert_eq!(cmd.program, Path::new("/venv/bin/python"));
    let args: Vec<_> = cmd.args.iter().map(|a| a.to_str().unwrap()).collect();
    assert_eq!(args, ["run.py", "/job/job.yaml"]);
    assert_eq!(cmd.cwd, Path::new("/opt/ai-toolkit"));
    assert_eq!(cmd.env, [("SEED".to_string(), "42".to_string())]);
}

#[test]
fn every_family_gets_its_model_flag() {
    let b = backend();
    let cases: [(ModelFamily, &str, serde_yaml::Value, &str, bool); 4] = [
        (ModelFamily::Flux, "is_flux", true.into(), "flowmatch", true),
        (ModelFamily::Sdxl, "is_xl", true.into(), "ddpm", false),
        (ModelFamily::Wan, "arch", "wan21".into(), "flowmatch", true),
        (
            ModelFamily::QwenImage,
            "arch",
            "qwen_image".into(),
            "flowmatch",
            true,
        ),
    ];
    for (family, key, value, scheduler, quantize) in cases {
        assert!(b.families().contains(&family));
        let mut run = inputs(family);
        // SDXL loads from its single-file checkpoint (ai-toolkit passes no
        // variant to a folder's from_pretrained).
        let (part, path) = match family {
            ModelFamily::Sdxl => (part::CHECKPOINT, "/models/sd_xl_base_1.0.safetensors"),
            _ => (part::DIFFUSERS, "/models/diffusers"),
        };
        assert_eq!(b.parts(family), [part]);
        run.model.parts.insert(part.into(), path.into());
        let job = job(&b.render(&run).unwrap());
        let process = &job["config"]["process"][0];
        let model = &process["model"];
        assert_eq!(model["name_or_path"], path);
        assert_eq!(model[key], value, "{family}");
        let flags = ["is_flux", "is_xl", "arch"]
            .iter()
            .filter(|k| model.get(**k).is_some())
            .count();
        assert_eq!(flags, 1, "{family}: {model:?}");
        assert_eq!(model["quantize"], quantize);
        assert_eq!(process["train"]["noise_scheduler"], scheduler);
    }
    // An SDXL model without the checkpoint part does not render.
    assert!(b.render(&inputs(ModelFamily::Sdxl)).is_err());
    assert!(
        !b.check(&TrainingSettings::default(), ModelFamily::ZImage)
            .is_empty()
    );
}

fn extra(kind: Kind) -> ExtraValue {
    ExtraValue { kind: Some(kind) }
}

#[test]
fn extras_go_to_their_section() {
    let b = backend();
    let mut run = inputs(ModelFamily::Wan);
    run.trigger_word.clear();
    run.settings.alpha = 4.0;
    run.settings.repeats = 0;
    let extras = &mut run.settings.extras;
    extras.insert("optimizer".into(), extra(Kind::Text("prodigy".into())));
    extras.insert("quantize".into(), extra(Kind::Flag(false)));
    extras.insert("low_vram".into(), extra(Kind::Flag(true)));
    extras.insert("caption_dropout_rate".into(), extra(Kind::Float(0.05)));
    extras.insert("max_step_saves_to_keep".into(), extra(Kind::Int(1)));
    let job = job(&b.render(&run).unwrap());
    let process = &job["config"]["process"][0];
    assert!(process.get("trigger_word").is_none());
    assert_eq!(process["network"]["linear_alpha"], 4.0);
    assert_eq!(process["train"]["optimizer"], "prodigy");
    assert_eq!(process["model"]["quantize"], false);
    assert_eq!(process["model"]["low_vram"], true);
    assert_eq!(process["datasets"][0]["caption_dropout_rate"], 0.05);
    assert_eq!(process["datasets"][0]["num_repeats"], 1);
    assert_eq!(process["save"]["max_step_saves_to_keep"], 1);
    assert!(process["train"].get("low_vram").is_none());

    run.settings
        .extras
        .insert("network_dim".into(), extra(Kind::Int(8)));
    run.settings
        .extras
        .insert("quantize".into(), extra(Kind::Text("yes".into())));
    let problems = b.check(&run.settings, ModelFamily::Wan);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0].field, "training.extras.network_dim");
    let problems = problems.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert!(problems[0].contains("network_dim: unknown key for ai-toolkit"));
    assert!(problems[1].contains("quantize: must be a boolean"));
    assert!(b.render(&run).is_err());
    assert_eq!(b.stop_request(&run), StopRequest::Unsupported);
}

/// Wan on clips: the dataset entry gets `num_frames` fitted to the
/// shortest clip (4n+1) and `shrink_video_to_frames`, the extras override
/// both, and preflight's need is the same number; an image family with
/// clips is refused, and the video extras are Wan's only.
#[test]
fn a_wan_video_dataset_gets_num_frames_from_its_clips() {
    let b = backend();
    let tmp = tempfile::tempdir().unwrap();
    crate::test_support::manifest_with_clips(
        tmp.path(),
        &["still.png"],
        &[("walk.mp4", 16), ("run.mp4", 120)],
    );
    let mut run = inputs(ModelFamily::Wan);
    run.dataset_dir = tmp.path().to_owned();
    let yaml = job(&b.render(&run).unwrap());
    let dataset = &yaml["config"]["process"][0]["datasets"][0];
    assert_eq!(dataset["folder_path"], tmp.path().to_str().unwrap());
    assert_eq!(dataset["num_frames"], 13);
    assert_eq!(dataset["shrink_video_to_frames"], true);
    assert_eq!(yaml["config"]["process"][0]["model"]["arch"], "wan21");
    assert!(b.trains_video(ModelFamily::Wan));
    let need = b.clip_need(&run.settings, ModelFamily::Wan, &[16, 120]);
    assert_eq!(need.map(|n| n.frames), Some(Some(13)));

    let extras = &mut run.settings.extras;
    extras.insert("num_frames".into(), extra(Kind::Int(33)));
    extras.insert("shrink_video_to_frames".into(), extra(Kind::Flag(false)));
    let yaml = job(&b.render(&run).unwrap());
    let dataset = &yaml["config"]["process"][0]["datasets"][0];
    assert_eq!(dataset["num_frames"], 33);
    assert_eq!(dataset["shrink_video_to_frames"], false);
    let need = b
        .clip_need(&run.settings, ModelFamily::Wan, &[16, 120])
        .unwrap();
    assert_eq!(need.frames, Some(33));
    assert_eq!(need.extra, "num_frames");

    // An image dataset keeps ai-toolkit's default of one frame.
    let yaml = job(&b.render(&inputs(ModelFamily::Wan)).unwrap());
    let dataset = &yaml["config"]["process"][0]["datasets"][0];
    assert!(dataset.get("num_frames").is_none());
    assert!(dataset.get("shrink_video_to_frames").is_none());

    let mut flux = inputs(ModelFamily::Flux);
    flux.dataset_dir = tmp.path().to_owned();
    assert!(matches!(
        b.render(&flux),
        Err(BackendError::InvalidSettings(m)) if m.contains("2 video clips")
    ));
    assert!(!b.trains_video(ModelFamily::Flux));
    assert_eq!(b.clip_need(&flux.settings, ModelFamily::Flux, &[16]), None);
    let problems = b.check(&run.settings, ModelFamily::Flux);
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "training.extras.num_frames",
            "training.extras.shrink_video_to_frames"
        ]
    );
    run.settings
        .extras
        .insert("num_frames".into(), extra(Kind::Int(1)));
    let problems = b.check(&run.settings, ModelFamily::Wan);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].problem.contains("at least 2"));
}

fn events(lines: &[&str]) -> Vec<LineEvent> {
    let mut run = inputs(ModelFamily::Flux);
    run.settings.batch_size = 2;
    let mut p = backend().parser(&run);
    lines.iter().flat_map(|l| p.line(l)).collect()
}

#[test]
fn parses_the_bar_as_tqdm_writes_it() {
    // One stderr chunk; the worker splits it on `\r`.
    let chunk = "\rjob123:   0%|          | 0/2000 [00:00<?, ?it/s]\
                 \rjob123:  13%|█▎        | 250/2000 [06:12<43:01,  1.48s/it, lr: 1.0e-04 loss: 4.123e-01]\
                 \rjob123:  13%|█▎        | 251/2000 [06:13<43:00,  2.10it/s, lr: 1.0e-04 loss: nan]\
                 \rjob123: 100%|█████████▉| 1999/2000 [49:59<00:01,  1.50s/it, it/s=0.667]";
    let lines: Vec<_> = chunk.split('\r').filter(|l| !l.is_empty()).collect();
    let got = events(&lines);
    assert_eq!(got.len(), 4, "{got:?}");
    let LineEvent::Progress {
        step,
        total,
        loss,
        lr,
        samples_per_sec,
        ..
    } = &got[1]
    else {
        panic!("{got:?}")
    };
    assert_eq!(
        (*step, *total, *loss, *lr),
        (250, 2000, Some(0.4123), Some(1e-4))
    );
    assert!((samples_per_sec.unwrap() - 2.0 / 1.48).abs() < 1e-4);
    let LineEvent::Progress {
        step,
        loss,
        samples_per_sec,
        ..
    } = &got[2]
    else {
        panic!()
    };
    assert_eq!((*step, *samples_per_sec), (251, Some(4.2)));
    assert!(loss.unwrap().is_nan());
    let LineEvent::Progress { step, loss, lr, .. } = &got[3] else {
        panic!()
    };
    assert_eq!((*step, *loss, *lr), (1999, None, None));
    // Other bars (latent caching, another job's name) are not training steps.
    assert!(events(&[
        "Caching latents to disk: 100%|██████████| 3/3 [00:00<00:00, 12.50it/s]",
        "job1234:  13%|█▎        | 250/2000 [06:12<43:01,  1.48s/it, lr: 1.0e-04 loss: 4.123e-01]",
    ])
    .is_empty());
}

#[test]
fn parses_saves_resumes_and_the_result() {
    let got = events(&[
        "",
        "Saving at step 250",
        "Saved checkpoint to /job/out/job123/job123_000000250.safetensors",
        "Saved optimizer to /job/out/job123/optimizer.pt",
        "#### IMPORTANT RESUMING FROM /job/out/job123/job123_000000250.safetensors ####",
        "Loading from /job/out/job123/job123_000000250.safetensors",
        "Found step 250 in metadata, starting from there",
        "Saved checkpoint to /job/out/job123/job123.safetensors",
        "Saved optimizer to /job/out/job123/optimizer.pt",
        "========================================",
        "Result:",
        " - 1 completed job",
        "========================================",
    ]);
    assert_eq!(
        got,
        [
            LineEvent::Saved { step: Some(250) },
            LineEvent::Saved { step: Some(250) },
            LineEvent::Resumed { step: 250 },
            LineEvent::Saved { step: None },
            LineEvent::Done,
            LineEvent::Saved { step: None },
            LineEvent::Done,
        ]
    );
    assert!(events(&["Result:", " - 0 completed jobs", " - 1 failure"]).is_empty());
    assert_eq!(
        events(&["Found step 1200 in metadata, starting from there"]),
        [LineEvent::Resumed { step: 1200 }]
    );
}

/// A real safetensors file: header length, JSON header, data.
fn safetensors(path: &Path, truncate: bool) {
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 8]);
    if truncate {
        bytes.truncate(bytes.len() - 3);
    }
    std::fs::write(path, bytes).unwrap();
}

/// An empty zip archive: its end of central directory record only.
fn zip(path: &Path) {
    let mut bytes = b"PK\x05\x06".to_vec();
    bytes.extend_from_slice(&[0u8; 18]);
    std::fs::write(path, bytes).unwrap();
}

/// Sets the file's modification time `secs` seconds in the past.
fn age(path: &Path, secs: u64) {
    let when = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

#[test]
fn latest_checkpoint_pairs_the_newest_weights_with_a_complete_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = inputs(ModelFamily::Flux);
    run.output_dir = dir.path().to_path_buf();
    let root = dir.path().join("job123");
    std::fs::create_dir_all(&root).unwrap();
    let b = backend();
    assert_eq!(b.latest_checkpoint(&run), None);
    safetensors(&root.join("job123_000000010.safetensors"), false);
    safetensors(&root.join("job123_000000020.safetensors"), false);
    assert_eq!(b.latest_checkpoint(&run), None, "no optimizer yet");
    std::fs::write(root.join("optimizer.pt"), b"PK\x03\x04 half written").unwrap();
    assert_eq!(b.latest_checkpoint(&run), None, "optimizer incomplete");
    zip(&root.join("optimizer.pt"));
    let found = b.latest_checkpoint(&run).unwrap();
    assert_eq!(found.step, 20);
    assert_eq!(
        found.files,
        [
            PathBuf::from("job123/job123_000000020.safetensors"),
            PathBuf::from("job123/optimizer.pt")
        ]
    );
    // A newer step being written: its weights are incomplete and the
    // optimizer on disk belongs to the older step.
    safetensors(&root.join("job123_000000030.safetensors"), true);
    assert_eq!(b.latest_checkpoint(&run), None);
    safetensors(&root.join("job123_000000030.safetensors"), false);
    // File times tick coarsely: set them rather than rely on write order.
    age(&root.join("optimizer.pt"), 10);
    assert_eq!(
        b.latest_checkpoint(&run),
        None,
        "optimizer older than the weights"
    );
    zip(&root.join("optimizer.pt"));
    age(&root.join("job123_000000030.safetensors"), 5);
    assert_eq!(b.latest_checkpoint(&run).unwrap().step, 30);
    // The final adapter and other stems are not checkpoints.
    safetensors(&root.join("job123.safetensors"), false);
    safetensors(&root.join("job123_LoRA_000000040.safetensors"), false);
    assert_eq!(b.latest_checkpoint(&run).unwrap().step, 30);
    assert_eq!(b.final_adapter(&run), Some(root.join("job123.safetensors")));
}

fn tail(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

#[test]
fn classifies_ai_toolkit_failures() {
    let failed = ExitStatus::from_raw(1 << 8);
    let summary = |error: &str| -> Vec<String> {
        tail(&[
            error,
            "",
            "========================================",
            "Result:",
            " - 0 completed jobs",
            " - 1 failure",
            "========================================",
            "Traceback (most recent call last):",
            "  File \"/opt/ai-toolkit/run.py\", line 120, in <module>",
        ])
    };
    let cases: Vec<(Vec<String>, ExitStatus, ErrorKind, bool, &str)> = vec![
        (
            summary(
                "Error running job: OOM during training step 3 times in a row, aborting training",
            ),
            failed,
            ErrorKind::Oom,
            true,
            "out of GPU memory",
        ),
        (
            tail(&[
                "",
                "========================================",
                "Job stopped",
                "========================================",
            ]),
            ExitStatus::from_raw(0),
            ErrorKind::Trainer,
            true,
            "interrupted",
        ),
        (
            summary("Error running job: no images found in /job/img"),
            failed,
            ErrorKind::BadDataset,
            false,
            "no usable training data",
        ),
        (
            summary("Error running job: CUDA error: an illegal memory access was encountered"),
            failed,
            ErrorKind::Trainer,
            true,
            "GPU device error",
        ),
        (
            summary("Error running job: something unforeseen"),
            failed,
            ErrorKind::Trainer,
            true,
            "ai-toolkit job failed: Error running job: something unforeseen",
        ),
        (
            summary("Error running job: config file error. Missing \"config.name\" key"),
            failed,
            ErrorKind::Internal,
            false,
            "rendered job file rejected",
        ),
    ];
    for (lines, status, kind, retryable, what) in cases {
        let e = classify(status, &lines);
        assert_eq!((e.kind(), e.retryable), (kind, retryable), "{lines:?}");
        assert!(e.message.contains(what), "{}", e.message);
    }
    let e = classify(
        ExitStatus::from_raw(0),
        &tail(&["job123:  10%|█ | 10/100 [00:01<00:09, 9.00it/s]"]),
    );
    assert!(
        e.message.contains("ai-toolkit exited with"),
        "{}",
        e.message
    );
}
