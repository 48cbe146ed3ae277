//! The diffusion-pipe backend driving the stand-in trainer
//! (`tests/standins/diffusion-pipe/train.py` under `tests/standins/bin/deepspeed`)
//! through `ChildGroup`, the way the worker's run loop does: a kill and a
//! resume from the checkpoint files alone, a graceful stop, faults, two
//! slots at once, and the Z-Image-Turbo adapter.
//!
//! The stand-in binds its rendezvous port on a loopback address standing
//! for the machine; each fixture gives its runs one of their own
//! (`STANDIN_LOOPBACK`), so tests running at once never share ports while
//! the runs of one test contend as on one worker.

use crate::support;

use nix::sys::signal::Signal;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;
use support::{
    captioned_dataset, diffusers_folder, diffusers_model, restore, run_inputs, small_run, standins,
    write_safetensors,
};
use tokio::sync::mpsc::Receiver;
use trainyard_backends::{
    FoundCheckpoint, LineEvent, ModelFiles, OutputParser, Slot, StopRequest, Tools, TrainInputs,
    TrainerBackend, by_name,
};
use trainyard_core::config::TrainerPaths;
use trainyard_core::process::{ChildGroup, OutputLine};
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, ExtraValue, TrainingSettings, extra_value::Kind};

const WAIT: Duration = Duration::from_secs(60);

fn backend() -> Box<dyn TrainerBackend> {
    let tools = Tools {
        trainers: TrainerPaths {
            deepspeed: standins().join("bin/deepspeed"),
            diffusion_pipe_dir: standins().join("diffusion-pipe"),
            ..Tools::default().trainers
        },
        ..Tools::default()
    };
    by_name("diffusion-pipe", &tools).expect("registered")
}

/// A captioned three-image dataset, a Flux diffusers folder, and the
/// loopback address that stands for the machine its runs share.
struct Fixture {
    root: tempfile::TempDir,
    loopback: String,
}

impl Fixture {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        captioned_dataset(
            &root.path().join("dataset"),
            ["a", "b", "c"].map(|stem| (stem, format!("ohwx {stem}"))),
        );
        diffusers_folder(&root.path().join("flux/diffusers"));
        // 127.128.0.0 and up: apart from the stand-in's own default range.
        let n = RandomState::new().hash_one(root.path());
        let loopback = format!(
            "127.{}.{}.{}",
            128 + n % 128,
            (n >> 8) & 255,
            (n >> 16) & 255
        );
        Self { root, loopback }
    }

    /// Starts a run on this fixture's machine.
    fn start(
        &self,
        backend: &dyn TrainerBackend,
        inputs: &TrainInputs,
        env: &[(&str, &str)],
    ) -> Run {
        self.start_edited(backend, inputs, env, |_| {})
    }

    /// Renders and writes the files, lets `edit` change them, and starts.
    fn start_edited(
        &self,
        backend: &dyn TrainerBackend,
        inputs: &TrainInputs,
        env: &[(&str, &str)],
        edit: impl FnOnce(&Path),
    ) -> Run {
        let mut env = env.to_vec();
        env.push(("STANDIN_LOOPBACK", &self.loopback));
        Run::start_edited(backend, inputs, &env, edit)
    }

    /// Inputs for a run with its own run and output folders under `name`.
    fn inputs(&self, name: &str, steps: u32, save_every: u32) -> TrainInputs {
        let run_dir = self.root.path().join(name).join("run");
        let output_dir = self.root.path().join(name).join("output");
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::create_dir_all(&output_dir).unwrap();
        TrainInputs {
            output_name: "lora".into(),
            ..run_inputs(
                name,
                self.root.path().join("dataset"),
                run_dir,
                output_dir,
                diffusers_model(
                    "flux1-dev",
                    ModelFamily::Flux,
                    self.root.path().join("flux/diffusers"),
                ),
                TrainingSettings {
                    seed: 1,
                    ..small_run("diffusion-pipe", steps, save_every)
                },
            )
        }
    }
}

fn with_extra(mut inputs: TrainInputs, key: &str, kind: Kind) -> TrainInputs {
    inputs
        .settings
        .extras
        .insert(key.into(), ExtraValue { kind: Some(kind) });
    inputs
}

/// A started trainer and everything it said so far.
struct Run {
    child: ChildGroup,
    lines_rx: Receiver<OutputLine>,
    parser: Box<dyn OutputParser>,
    lines: Vec<String>,
    events: Vec<LineEvent>,
}

impl Run {
    /// Renders and writes the files, lets `edit` change them, and starts.
    fn start_edited(
        backend: &dyn TrainerBackend,
        inputs: &TrainInputs,
        env: &[(&str, &str)],
        edit: impl FnOnce(&Path),
    ) -> Run {
        let problems = backend.check(&inputs.settings, inputs.model.family);
        assert!(problems.is_empty(), "{problems:?}");
        let launch = backend.render(inputs).expect("renders");
        for (path, body) in &launch.files {
            std::fs::write(path, body).unwrap();
        }
        edit(&inputs.run_dir);
        let mut spec = launch.command;
        spec.env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        spec.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let (child, lines_rx) = ChildGroup::spawn(&spec).expect("spawns");
        Run {
            child,
            lines_rx,
            parser: backend.parser(inputs),
            lines: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The next line, parsed; `None` once both pipes are closed.
    async fn next(&mut self) -> Option<Vec<LineEvent>> {
        let line = tokio::time::timeout(WAIT, self.lines_rx.recv())
            .await
            .expect("the trainer went quiet")?
            .line;
        let events = self.parser.line(&line);
        self.lines.push(line);
        self.events.extend(events.iter().cloned());
        Some(events)
    }

    /// Reads lines until `found` returns something.
    async fn until<T>(&mut self, mut found: impl FnMut(&[LineEvent]) -> Option<T>) -> T {
        loop {
            let events = self
                .next()
                .await
                .unwrap_or_else(|| panic!("the trainer ended first:\n{}", self.lines.join("\n")));
            if let Some(value) = found(&events) {
                return value;
            }
        }
    }

    /// Reads to the end of output, then the exit status.
    async fn finish(&mut self) -> ExitStatus {
        while self.next().await.is_some() {}
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the trainer did not exit")
            .unwrap()
    }

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

/// Waits (reading output) for a complete checkpoint at `min_step` or later.
async fn checkpoint_at_least(
    run: &mut Run,
    backend: &dyn TrainerBackend,
    inputs: &TrainInputs,
    min_step: u32,
) -> FoundCheckpoint {
    run.until(|_| {
        backend
            .latest_checkpoint(inputs)
            .filter(|c| c.step >= min_step)
    })
    .await
}

#[tokio::test]
async fn a_killed_run_resumes_from_the_checkpoint_files_alone() {
    let fx = Fixture::new();
    let b = backend();
    // 3 images, 2 micro-batches a step: a checkpoint at the end of every
    // epoch, which falls inside a step, so most are taken mid-epoch (step 8:
    // epoch 6, one micro-batch in).
    let settings = |name: &str| {
        let inputs = with_extra(
            fx.inputs(name, 40, 10),
            "checkpoint_every_n_epochs",
            Kind::Int(1),
        );
        with_extra(inputs, "gradient_accumulation_steps", Kind::Int(2))
    };
    let first = settings("first");
    let mut run = fx.start(b.as_ref(), &first, &[("STANDIN_STEP_SECONDS", "0.1")]);
    let found = checkpoint_at_least(&mut run, b.as_ref(), &first, 7).await;
    run.child.signal(Signal::SIGKILL);
    run.finish().await;
    assert!(found.step < 40, "killed before the end: {found:?}");
    assert!(
        found.files.iter().any(|f| f.ends_with("latest")),
        "{found:?}"
    );
    assert!(
        found
            .files
            .iter()
            .all(|f| !f.to_string_lossy().contains("events.out")),
        "only what a resume needs: {found:?}"
    );

    // Another machine: a fresh output folder holding only the checkpoint files.
    let mut second = settings("second");
    second.resume = Some(restore(&found, &first.output_dir, &second.output_dir));
    let mut resumed = fx.start(b.as_ref(), &second, &[("STANDIN_STEP_SECONDS", "0.005")]);
    let status = resumed.finish().await;
    assert!(status.success(), "{status}\n{}", resumed.lines.join("\n"));
    assert!(
        resumed
            .events
            .contains(&LineEvent::Resumed { step: found.step })
    );
    let steps = resumed.progress_steps();
    assert_eq!(
        steps.first(),
        Some(&(found.step + 1)),
        "continues the count"
    );
    assert_eq!(steps.last(), Some(&40));
    assert!(matches!(
        resumed
            .events
            .iter()
            .find(|e| matches!(e, LineEvent::Progress { .. })),
        Some(LineEvent::Progress { total: 40, .. })
    ));
    assert_eq!(resumed.events.last(), Some(&LineEvent::Done));
    let adapter = b.final_adapter(&second).expect("final adapter");
    assert!(
        adapter.ends_with("step40/pytorch_lora_weights.safetensors"),
        "{adapter:?}"
    );

    // Resuming restored the training state and the data position exactly:
    // the adapter matches an uninterrupted run's, byte for byte.
    let straight = settings("straight");
    let mut whole = fx.start(b.as_ref(), &straight, &[("STANDIN_STEP_SECONDS", "0.005")]);
    assert!(whole.finish().await.success());
    let expected = b.final_adapter(&straight).expect("final adapter");
    assert!(
        std::fs::read(&adapter).unwrap() == std::fs::read(&expected).unwrap(),
        "the resumed run's adapter differs from the uninterrupted run's"
    );
    safetensors_names(&adapter)
        .iter()
        .for_each(|k| assert!(k.starts_with("transformer.") && k.contains(".lora_"), "{k}"));
}

/// Tensor names in a safetensors file (8-byte header length, JSON header).
fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_stop_request_saves_a_checkpoint_and_the_trainer_exits_by_itself() {
    let fx = Fixture::new();
    let b = backend();
    // save_every = 0: no periodic checkpoints, so the only one is the stop's.
    let inputs = fx.inputs("stop", 100_000, 0);
    let mut run = fx.start(b.as_ref(), &inputs, &[("STANDIN_STEP_SECONDS", "0.02")]);
    let first = run
        .until(|events| {
            events.iter().find_map(|e| match e {
                LineEvent::Progress { step, .. } => Some(*step),
                _ => None,
            })
        })
        .await;
    assert!(b.latest_checkpoint(&inputs).is_none());
    let StopRequest::SaveAndExit { path, body } = b.stop_request(&inputs) else {
        panic!("diffusion-pipe saves and exits on save_quit")
    };
    std::fs::write(&path, body).unwrap();
    let status = run.finish().await;
    assert!(status.success(), "{status}\n{}", run.lines.join("\n"));
    assert!(run.lines.iter().any(|l| l == "Manually quitting"));
    let found = b
        .latest_checkpoint(&inputs)
        .expect("a checkpoint from the stop");
    // The trainer looks for the file after every step, so the checkpoint
    // is at the step it was in (or a later one) and it ran no step after.
    assert!(found.step >= first, "{found:?} after step {first}");
    assert_eq!(Some(&found.step), run.progress_steps().last());
    assert!(!path.exists(), "the trainer consumed the stop file");
    assert!(b.final_adapter(&inputs).is_none());
}

#[tokio::test]
async fn an_oom_is_retryable_and_quotes_the_line() {
    let fx = Fixture::new();
    let b = backend();
    let inputs = fx.inputs("oom", 20, 0);
    let mut run = fx.start(b.as_ref(), &inputs, &[("STANDIN_FAULT", "oom@3")]);
    let status = run.finish().await;
    assert!(!status.success());
    assert_eq!(run.progress_steps(), [1, 2]);
    let e = b.classify(status, &run.tail());
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
}

#[tokio::test]
async fn exit_zero_midway_leaves_no_final_adapter() {
    let fx = Fixture::new();
    let b = backend();
    let inputs = fx.inputs("exit0", 20, 5);
    let mut run = fx.start(b.as_ref(), &inputs, &[("STANDIN_FAULT", "exit0@8")]);
    assert!(run.finish().await.success());
    assert!(!run.events.contains(&LineEvent::Done));
    assert!(run.events.contains(&LineEvent::Saved { step: Some(5) }));
    assert!(
        b.final_adapter(&inputs).is_none(),
        "step5 is not the final adapter"
    );
}

#[tokio::test]
async fn a_crash_is_unclassified_and_nan_loss_is_reported() {
    let fx = Fixture::new();
    let b = backend();
    let inputs = fx.inputs("crash", 20, 0);
    let env = [("STANDIN_FAULT", "crash@4"), ("STANDIN_NAN_FROM", "2")];
    let mut run = fx.start(b.as_ref(), &inputs, &env);
    let status = run.finish().await;
    let losses: Vec<bool> = run
        .events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress { loss, .. } => loss.map(f32::is_nan),
            _ => None,
        })
        .collect();
    assert_eq!(losses, [false, true, true]);
    let e = b.classify(status, &run.tail());
    assert_eq!(
        (e.kind(), e.retryable),
        (ErrorKind::Trainer, true),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("RuntimeError: The size of tensor a"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_missing_model_folder_is_a_model_error() {
    let fx = Fixture::new();
    let b = backend();
    let mut inputs = fx.inputs("nomodel", 20, 0);
    inputs
        .model
        .parts
        .insert(part::DIFFUSERS.into(), fx.root.path().join("absent"));
    let mut run = fx.start(b.as_ref(), &inputs, &[]);
    let status = run.finish().await;
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("exits with return code = 1"))
    );
    let e = b.classify(status, &run.tail());
    assert_eq!(e.kind(), ErrorKind::Model, "{}", e.message);
    assert!(e.message.contains("absent"), "{}", e.message);
}

#[test]
fn alpha_other_than_rank_is_refused_before_anything_runs() {
    let fx = Fixture::new();
    let mut settings = fx.inputs("alpha", 20, 0).settings;
    settings.alpha = 8.0;
    let problems = backend()
        .check(&settings, ModelFamily::Flux)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert_eq!(
        problems,
        ["training.alpha: diffusion-pipe forces alpha = rank (4); got 8"]
    );
}

/// Rewrites one of the rendered TOMLs in the run folder.
fn edit_toml(run_dir: &Path, file: &str, edit: impl FnOnce(&mut toml::Table)) {
    let path = run_dir.join(file);
    let mut table: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut table);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
}

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.get_mut(key).and_then(toml::Value::as_table_mut).unwrap()
}

/// What the real train.py rejects, the stand-in rejects with the same text,
/// and classify names the cause.
#[tokio::test]
async fn config_mistakes_fail_as_the_real_trainer_fails_them() {
    let fx = Fixture::new();
    let b = backend();
    type Edit = fn(&mut toml::Table);
    let cases: &[(&str, Edit, &str)] = &[
        (
            "nosave",
            |c| drop(c.remove("save_every_n_steps")),
            "AssertionError",
        ),
        (
            "alpha",
            |c| drop(table(c, "adapter").insert("alpha".into(), 8.into())),
            "This script forces alpha=rank",
        ),
        (
            "type",
            |c| drop(table(c, "model").insert("type".into(), "flux2-dev".into())),
            "Model type flux2-dev is not implemented",
        ),
        (
            "dtype",
            |c| drop(table(c, "model").remove("dtype")),
            "KeyError: 'dtype'",
        ),
    ];
    for (name, edit, needle) in cases {
        let inputs = fx.inputs(name, 10, 0);
        let mut run = fx.start_edited(b.as_ref(), &inputs, &[], |dir| {
            edit_toml(dir, "config.toml", edit)
        });
        let status = run.finish().await;
        assert!(!status.success(), "{name}");
        let e = b.classify(status, &run.tail());
        assert_eq!(
            (e.kind(), e.retryable),
            (ErrorKind::InvalidSpec, false),
            "{name}: {}",
            e.message
        );
        assert!(e.message.contains(needle), "{name}: {}", e.message);
    }
}

#[tokio::test]
async fn dataset_mistakes_are_bad_datasets() {
    let fx = Fixture::new();
    let b = backend();
    // A folder with a caption and a manifest but no image.
    let empty = fx.root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("manifest.json"), "{}").unwrap();
    std::fs::write(empty.join("a.txt"), "ohwx").unwrap();
    // Images without captions are skipped, which leaves nothing to train on.
    let uncaptioned = fx.root.path().join("uncaptioned");
    std::fs::create_dir_all(&uncaptioned).unwrap();
    for stem in ["x", "y"] {
        std::fs::write(uncaptioned.join(format!("{stem}.png")), b"png").unwrap();
    }
    let cases = [
        (empty, "had no images/videos!"),
        (fx.root.path().join("absent"), "Invalid path"),
        (uncaptioned, "is being completely dropped"),
    ];
    for (i, (dataset, needle)) in cases.into_iter().enumerate() {
        let mut inputs = fx.inputs(&format!("dataset{i}"), 10, 0);
        inputs.dataset_dir = dataset;
        let mut run = fx.start(b.as_ref(), &inputs, &[]);
        let status = run.finish().await;
        let e = b.classify(status, &run.tail());
        assert_eq!(
            (e.kind(), e.retryable),
            (ErrorKind::BadDataset, false),
            "{}",
            e.message
        );
        assert!(e.message.contains(needle), "{}", e.message);
        // It failed before it made a run folder: nothing to save or stop.
        assert!(b.latest_checkpoint(&inputs).is_none());
        assert_eq!(b.stop_request(&inputs), StopRequest::Unsupported);
    }
}

fn in_slot(mut inputs: TrainInputs, index: u16) -> TrainInputs {
    inputs.slot = Slot {
        index,
        gpus: vec![u32::from(index)],
    };
    inputs
}

/// Waits for the first step, so the run holds its rendezvous port.
async fn first_step(run: &mut Run) {
    run.until(|events| {
        events
            .iter()
            .any(|e| matches!(e, LineEvent::Progress { .. }))
            .then_some(())
    })
    .await;
}

/// Two runs on one worker at once, in slots 0 and 1: each binds its own
/// rendezvous port (train.py's `--master_port`, not the runner's) and sees
/// only its own GPU, and both finish.
#[tokio::test]
async fn two_slots_train_at_once_on_their_own_ports() {
    let fx = Fixture::new();
    let b = backend();
    // Slot 0 runs until it is asked to stop, so it holds its port for as
    // long as slot 1 runs.
    let first = in_slot(fx.inputs("first", 100_000, 0), 0);
    let mut running = fx.start(b.as_ref(), &first, &[]);
    first_step(&mut running).await;

    let other = in_slot(fx.inputs("other", 3, 0), 1);
    let mut beside = fx.start(b.as_ref(), &other, &[]);
    let status = beside.finish().await;
    assert!(status.success(), "{status}\n{}", beside.lines.join("\n"));
    assert!(
        beside
            .lines
            .iter()
            .any(|l| l.contains("Setting CUDA_VISIBLE_DEVICES=1, MASTER_PORT=29501")),
        "{}",
        beside.lines.join("\n")
    );
    assert!(b.final_adapter(&other).is_some());

    let StopRequest::SaveAndExit { path, body } = b.stop_request(&first) else {
        panic!("diffusion-pipe saves and exits on save_quit")
    };
    std::fs::write(&path, body).unwrap();
    let status = running.finish().await;
    assert!(status.success(), "{status}\n{}", running.lines.join("\n"));
    assert!(running.lines.iter().any(|l| l == "Manually quitting"));
}

/// A second run in a slot that is in use cannot bind the port the first
/// holds, as torch.distributed fails it; that is worth another attempt.
#[tokio::test]
async fn a_second_run_in_a_busy_slot_fails_on_the_taken_port() {
    let fx = Fixture::new();
    let b = backend();
    let first = in_slot(fx.inputs("first", 20, 0), 0);
    let mut running = fx.start(b.as_ref(), &first, &[("STANDIN_FAULT", "hang@3")]);
    first_step(&mut running).await;

    let same = in_slot(fx.inputs("same", 3, 0), 0);
    let mut clash = fx.start(b.as_ref(), &same, &[]);
    let status = clash.finish().await;
    assert!(!status.success());
    let e = b.classify(status, &clash.tail());
    assert_eq!(
        (e.kind(), e.retryable),
        (ErrorKind::Trainer, true),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("port: 29500") && e.message.contains("EADDRINUSE"),
        "{}",
        e.message
    );

    running.child.signal(Signal::SIGKILL);
    running.finish().await;
}

/// Z-Image's ComfyUI files beside the fixture, Turbo's training adapter
/// among them.
fn z_image_turbo(fx: &Fixture) -> ModelFiles {
    let dir = fx.root.path().join("z-image");
    std::fs::create_dir_all(&dir).unwrap();
    let parts = [
        (part::TRANSFORMER, "z_image_turbo_bf16.safetensors"),
        (part::AE, "ae.safetensors"),
        (part::TEXT_ENCODER, "qwen_3_4b.safetensors"),
        (
            part::TRAINING_ADAPTER,
            "zimage_turbo_training_adapter_v1.safetensors",
        ),
    ];
    for (_, file) in parts {
        write_safetensors(&dir.join(file));
    }
    ModelFiles {
        reference: "z-image-turbo".into(),
        family: ModelFamily::ZImage,
        parts: parts
            .iter()
            .map(|(role, file)| (role.to_string(), dir.join(file)))
            .collect(),
    }
}

/// Z-Image-Turbo trains with its de-distill adapter merged; a config
/// without `merge_adapters` is refused by the stand-in (the real trainer
/// would train on the distilled weights and spoil them).
#[tokio::test]
async fn z_image_turbo_trains_with_its_training_adapter_merged() {
    let fx = Fixture::new();
    let b = backend();
    let model = z_image_turbo(&fx);
    let adapter = model.parts[part::TRAINING_ADAPTER].clone();
    let inputs = TrainInputs {
        model: model.clone(),
        ..fx.inputs("turbo", 3, 0)
    };
    let mut run = fx.start(b.as_ref(), &inputs, &[]);
    let status = run.finish().await;
    assert!(status.success(), "{status}\n{}", run.lines.join("\n"));
    let merging = format!("Merging adapter {}", adapter.display());
    assert!(run.lines.contains(&merging), "{}", run.lines.join("\n"));
    assert!(b.final_adapter(&inputs).is_some());

    let mut bare = TrainInputs {
        model,
        ..fx.inputs("bare", 3, 0)
    };
    bare.model.parts.remove(part::TRAINING_ADAPTER);
    let mut run = fx.start(b.as_ref(), &bare, &[]);
    assert!(!run.finish().await.success());
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains("has no merge_adapters")),
        "{}",
        run.lines.join("\n")
    );
}

/// `[optimizer]` keys are constructor arguments: SGD and Automagic get no
/// `betas` or single `eps`, which their constructors would refuse.
#[tokio::test]
async fn optimizers_get_only_the_arguments_they_take() {
    let fx = Fixture::new();
    let b = backend();
    for optimizer in ["sgd", "automagic", "AdamW8bitKahan"] {
        let inputs = with_extra(
            fx.inputs(optimizer, 2, 0),
            "optimizer_type",
            Kind::Text(optimizer.into()),
        );
        let mut run = fx.start(b.as_ref(), &inputs, &[]);
        let status = run.finish().await;
        assert!(
            status.success(),
            "{optimizer}: {status}\n{}",
            run.lines.join("\n")
        );
    }
}
