//! The SimpleTuner backend against the real SimpleTuner: `simpletuner` and
//! the libraries it trains with from PyPI (`scripts/install-simpletuner`,
//! pinned in `backends/drivers/requirements-simpletuner.txt`), on a CPU,
//! training a LoRA on a tiny random SDXL made here and laid out as the
//! `sdxl-base-1.0` preset's diffusers folder (`backends/tests/real/tiny_sdxl.py`).
//! Each run goes through `SimpleTuner::render`, is launched with the venv's
//! `accelerate` as rendered, is started as the worker starts trainers (one
//! process group, both pipes read line by line, the webhook received on
//! loopback), and is read back through the backend's `parser`,
//! `latest_checkpoint`, `final_adapter`, `stop_request` and `classify`.
//!
//! Two things are added that a GPU machine does not need: `HF_HUB_OFFLINE`,
//! so that a Hub lookup fails at once instead of waiting on the network, and
//! `backends/tests/real/cpu/sitecustomize.py`, which lets SimpleTuner's data
//! loader run without a GPU (it pins memory unconditionally).

use crate::session::{Finished, Session, max_progress, restore, webhook_listener, write_files};
use crate::support::{diffusers_model, run_inputs, safetensors_header};

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use trainyard_backends::simpletuner::SimpleTuner;
use trainyard_backends::{LineEvent, StopRequest, Tools, TrainInputs, TrainerBackend};
use trainyard_core::config::TrainerPaths;
use trainyard_models::ModelFamily;
use trainyard_proto::v1::TrainingSettings;

/// A real run imports torch, diffusers and SimpleTuner's model registry and
/// caches latents before its first step: on a busy two-core machine that
/// alone can take a minute or two.
const DEADLINE: Duration = Duration::from_secs(400);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The virtualenv `scripts/install-simpletuner` makes.
fn venv() -> PathBuf {
    let venv = root().join(".trainyard/tools/venv-simpletuner");
    assert!(
        venv.join("bin/accelerate").exists(),
        "{} is missing: run scripts/install-simpletuner (scripts/test does)",
        venv.display()
    );
    venv
}

/// The backend with the venv's `accelerate` and installed `simpletuner`
/// package, as a worker's `[worker.trainers]` would name them.
fn backend() -> SimpleTuner {
    let venv = venv();
    let python = venv.join("bin/python");
    let found = std::process::Command::new(&python)
        .args([
            "-c",
            "import importlib.util, os; \
             print(os.path.dirname(importlib.util.find_spec('simpletuner').origin))",
        ])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let dir = String::from_utf8(found.stdout).unwrap().trim().to_string();
    SimpleTuner::new(&Tools {
        trainers: TrainerPaths {
            python,
            accelerate: venv.join("bin/accelerate"),
            simpletuner_dir: dir.into(),
            ..Tools::default().trainers
        },
        ..Tools::default()
    })
}

/// A tiny SDXL in the preset's layout (fp16 weight files), a captioned
/// dataset of four 64-pixel images, and room for runs.
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    dataset: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let dataset = dir.path().join("dataset");
        let script = root().join("backends/tests/real/tiny_sdxl.py");
        let made = std::process::Command::new(venv().join("bin/python"))
            .arg(script)
            .arg("--out")
            .arg(&model)
            .arg("--dataset")
            .arg(&dataset)
            .args(["--images", "4", "--size", "64"])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "tiny_sdxl.py failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        Fixture {
            dir,
            model,
            dataset,
        }
    }

    fn inputs(&self, run: &str, steps: u32, save_every: u32) -> TrainInputs {
        let run_dir = self.dir.path().join(run);
        run_inputs(
            &format!("job-{run}"),
            &self.dataset,
            &run_dir,
            run_dir.join("out"),
            diffusers_model("sdxl-base-1.0", ModelFamily::Sdxl, &self.model),
            TrainingSettings {
                backend: "simpletuner".into(),
                steps,
                learning_rate: 1e-4,
                rank: 4,
                alpha: 4.0,
                resolution: 64,
                batch_size: 1,
                repeats: 1,
                save_every,
                seed: 7,
                ..Default::default()
            },
        )
    }
}

/// Renders and starts the run as the worker does. The backend itself must
/// point SimpleTuner at what the preset fetched, with no Hub access: the
/// VAE in the base folder (SimpleTuner's SDXL default is a Hub repository)
/// and the weight files' variant (the preset fetches only the fp16 ones).
async fn start(backend: &SimpleTuner, inputs: &TrainInputs, fixture: &Fixture) -> Session {
    let (url, hooks) = webhook_listener().await;
    let inputs = TrainInputs {
        webhook_url: Some(url),
        ..inputs.clone()
    };
    let launch = backend.render(&inputs).expect("render");
    let config_path = inputs.run_dir.join("config.json");
    let (_, body) = launch
        .files
        .iter()
        .find(|(path, _)| *path == config_path)
        .expect("a rendered config.json");
    let config: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(config["variant"], "fp16", "{config}");
    assert_eq!(
        config["pretrained_vae_model_name_or_path"],
        fixture.model.to_str().unwrap(),
        "{config}"
    );
    write_files(&launch);
    let shim = root().join("backends/tests/real/cpu");
    let env = [
        ("PYTHONPATH", shim.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
        ("OMP_NUM_THREADS", "1"),
        ("MKL_NUM_THREADS", "1"),
    ];
    Session::spawn(launch, backend.parser(&inputs), &inputs, &env, Some(hooks)).deadline(DEADLINE)
}

fn transcript(done: &Finished) -> String {
    done.tail.join("\n")
}

/// The steps of the progress events that carry a loss (from the bar and
/// the webhook alike), each once, in order.
fn steps_with_loss(events: &[LineEvent]) -> Vec<u32> {
    let steps: BTreeSet<u32> = events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress {
                step,
                loss: Some(_),
                ..
            } => Some(*step),
            _ => None,
        })
        .collect();
    steps.into_iter().collect()
}

fn has_lora_keys(adapter: &Path) -> bool {
    let header = safetensors_header(adapter);
    header
        .as_object()
        .unwrap()
        .keys()
        .any(|k| k.starts_with("unet.") && k.contains("lora_A"))
}

#[tokio::test]
async fn a_short_run_reports_progress_saves_checkpoints_and_the_adapter() {
    let fixture = Fixture::new();
    let b = backend();
    let inputs = fixture.inputs("short", 4, 2);
    let done = start(&b, &inputs, &fixture).await.finish().await;
    assert!(done.status.success(), "{}", transcript(&done));

    assert_eq!(
        steps_with_loss(&done.events),
        [1, 2, 3, 4],
        "{}",
        transcript(&done)
    );
    for step in [2, 4] {
        assert!(
            done.events.contains(&LineEvent::Saved { step: Some(step) }),
            "no save at {step}: {:?}",
            done.events
        );
    }
    assert!(done.events.contains(&LineEvent::Done), "{:?}", done.events);

    let found = b.latest_checkpoint(&inputs).expect("a checkpoint");
    assert_eq!(found.step, 4);
    for expected in [
        ".guard",
        "pytorch_lora_weights.safetensors",
        "optimizer.bin",
    ] {
        assert!(
            found.files.iter().any(|f| f.ends_with(expected)),
            "{:?}",
            found.files
        );
    }
    let adapter = b.final_adapter(&inputs).expect("the final adapter");
    assert!(has_lora_keys(&adapter), "{}", safetensors_header(&adapter));
}

/// The worker's stop: a save through the signal file, the save's
/// checkpoint found, the group killed; the resumed run goes on from it.
#[tokio::test]
async fn a_save_request_checkpoints_and_a_resume_goes_on_from_it() {
    let fixture = Fixture::new();
    let b = backend();
    // Long enough that the request lands well before the end: a step of
    // the tiny model takes a fraction of a second.
    let steps = 100;
    let stopped = fixture.inputs("stopped", steps, 0);
    let mut run = start(&b, &stopped, &fixture).await;
    assert!(
        run.until(|s| max_progress(&s.events).is_some_and(|step| step >= 1))
            .await,
        "no step before the output ended: {}",
        run.tail.join("\n")
    );
    assert_eq!(b.latest_checkpoint(&stopped), None, "no scheduled saves");
    let StopRequest::SaveAndContinue { path, body } = b.stop_request(&stopped) else {
        panic!("SimpleTuner saves on request");
    };
    std::fs::write(path, body).unwrap();
    let mut found = None;
    let saved = run
        .until(|s| {
            found = found.take().or_else(|| {
                s.events
                    .iter()
                    .any(|e| matches!(e, LineEvent::Saved { step: Some(_) }))
                    .then(|| b.latest_checkpoint(&stopped))
                    .flatten()
            });
            found.is_some()
        })
        .await;
    assert!(saved, "no save on request: {}", run.tail.join("\n"));
    let found = found.unwrap();
    assert!(
        run.events.contains(&LineEvent::Saved {
            step: Some(found.step)
        }),
        "{:?} {:?}",
        found,
        run.events
    );
    run.kill().await;
    assert!(
        (1..steps).contains(&found.step),
        "saved at {} of {steps}",
        found.step
    );

    // Its checkpoint alone, in a fresh output folder as on another machine.
    let mut resumed = fixture.inputs("resumed", steps, 0);
    resumed.resume = Some(restore(&found, &stopped.output_dir, &resumed.output_dir));
    let done = start(&b, &resumed, &fixture).await.finish().await;
    assert!(done.status.success(), "{}", transcript(&done));
    assert!(
        done.events
            .contains(&LineEvent::Resumed { step: found.step }),
        "{:?}\n{}",
        done.events,
        transcript(&done)
    );
    // tqdm skips redrawing fast steps, so not every step shows.
    let after = steps_with_loss(&done.events);
    assert!(
        after.first().is_some_and(|&first| first > found.step) && after.last() == Some(&steps),
        "resumed at {}: {after:?}\n{}",
        found.step,
        transcript(&done)
    );
    assert!(done.events.contains(&LineEvent::Done));
    let adapter = b.final_adapter(&resumed).expect("the final adapter");
    assert!(has_lora_keys(&adapter));
}
