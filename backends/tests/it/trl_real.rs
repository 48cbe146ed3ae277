//! The TRL backend against the real libraries: torch, transformers, trl,
//! peft, datasets and accelerate from PyPI (`scripts/install-trl`, pinned in
//! `backends/drivers/requirements-trl.txt`), on a CPU, training a LoRA on a
//! tiny random Llama made here (`backends/tests/real/tiny_llama.py`). Each run
//! goes through `Trl::render`, is started as the worker starts trainers (one
//! process group, both pipes read line by line), and is read back through the
//! backend's `parser`, `latest_checkpoint`, `final_adapter`, `stop_request`
//! and `classify`.

use crate::session::{Finished, Session};
use crate::support::{restore, run_inputs};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use trainyard_backends::trl::Trl;
use trainyard_backends::{LineEvent, StopRequest, TrainInputs, TrainerBackend};
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::{ErrorKind, ExtraValue, TrainingSettings, extra_value::Kind};

/// A real run imports torch and transformers before its first step: on a
/// busy two-core machine that alone can take most of a minute.
const DEADLINE: Duration = Duration::from_secs(300);

/// The virtualenv `scripts/install-trl` makes.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".trainyard/tools/venv-trl/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-trl (scripts/test does)",
        python.display()
    );
    python
}

const SFT_ROW: &str = r#"{"messages": [{"role": "user", "content": "hi how are you"}, {"role": "assistant", "content": "I am fine, thank you."}]}"#;
const PREFERENCE_ROW: &str =
    r#"{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}"#;

/// A tiny Llama (no pad token, like Llama's tokenizers), a dataset of
/// `rows`, and room for runs.
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    dataset: PathBuf,
}

impl Fixture {
    fn new(template: &str, rows: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        let dataset = dir.path().join("dataset");
        std::fs::create_dir_all(&dataset).unwrap();
        std::fs::write(dataset.join("train.jsonl"), rows).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/real/tiny_llama.py");
        let made = std::process::Command::new(python())
            .arg(script)
            .arg("--out")
            .arg(&model)
            .args(["--template", template])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "tiny_llama.py failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        Fixture {
            dir,
            model,
            dataset,
        }
    }

    fn inputs(&self, run: &str, method: &str, steps: u32, save_every: u32) -> TrainInputs {
        let run_dir = self.dir.path().join(run);
        let output_dir = run_dir.join("output");
        std::fs::create_dir_all(&output_dir).unwrap();
        let model = trainyard_backends::ModelFiles {
            reference: "hf://tiny/llama".into(),
            family: ModelFamily::Llm,
            parts: [(part::LLM.to_string(), self.model.clone())].into(),
        };
        TrainInputs {
            trigger_word: String::new(),
            ..run_inputs(
                "job1",
                &self.dataset,
                run_dir,
                output_dir,
                model,
                TrainingSettings {
                    backend: "trl".into(),
                    method: method.into(),
                    steps,
                    learning_rate: 1e-3,
                    rank: 4,
                    alpha: 8.0,
                    batch_size: 2,
                    save_every,
                    seed: 7,
                    extras: HashMap::new(),
                    ..Default::default()
                },
            )
        }
    }
}

fn rows(row: &str, n: usize) -> String {
    format!("{row}\n").repeat(n)
}

fn extra(kind: Kind) -> ExtraValue {
    ExtraValue { kind: Some(kind) }
}

/// One thread per run: the tests run side by side on few cores.
const ENV: &[(&str, &str)] = &[("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1")];

fn start(backend: &Trl, inputs: &TrainInputs) -> Session {
    Session::start(backend, inputs, ENV, None).deadline(DEADLINE)
}

/// `(step, loss)` of every progress event.
fn losses(events: &[LineEvent]) -> Vec<(u32, f32)> {
    events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress {
                step,
                loss: Some(loss),
                ..
            } => Some((*step, *loss)),
            _ => None,
        })
        .collect()
}

fn transcript(done: &Finished) -> String {
    done.tail.join("\n")
}

/// Runs to the end and checks what every method leaves behind.
async fn runs_to_the_end(backend: &Trl, inputs: &TrainInputs) -> Finished {
    let done = start(backend, inputs).finish().await;
    assert!(done.status.success(), "{}", transcript(&done));
    let steps = inputs.settings.steps;
    let seen: Vec<u32> = losses(&done.events).iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seen,
        (1..=steps).collect::<Vec<_>>(),
        "{}",
        transcript(&done)
    );
    assert!(
        done.events.contains(&LineEvent::Done),
        "{}",
        transcript(&done)
    );
    let found = backend.latest_checkpoint(inputs).expect("a checkpoint");
    assert_eq!(found.step, steps);
    let adapter = backend.final_adapter(inputs).expect("the final adapter");
    let header = crate::support::safetensors_header(&adapter);
    assert!(
        header
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.contains("lora_A")),
        "{header}"
    );
    done
}

#[tokio::test]
async fn sft_stops_on_request_and_resumes_to_the_same_losses() {
    let fixture = Fixture::new("plain", &rows(SFT_ROW, 16));
    let backend = Trl::new(python());

    // The whole run, uninterrupted: its losses are the reference.
    let whole = fixture.inputs("whole", "sft", 6, 2);
    let reference = losses(&runs_to_the_end(&backend, &whole).await.events);

    // The same run, asked to stop after its first step: it saves and exits.
    let stopped = fixture.inputs("stopped", "sft", 6, 2);
    let mut run = start(&backend, &stopped);
    assert!(
        run.until(|s| !losses(&s.events).is_empty()).await,
        "no step before the output ended: {}",
        run.tail.join("\n")
    );
    let StopRequest::SaveAndExit { path, body } = backend.stop_request(&stopped) else {
        panic!("trl stops through its sentinel file");
    };
    std::fs::write(path, body).unwrap();
    let done = run.finish().await;
    assert!(done.status.success(), "{}", transcript(&done));
    let found = backend
        .latest_checkpoint(&stopped)
        .expect("a checkpoint at the stop");
    let last = losses(&done.events).last().unwrap().0;
    assert_eq!(found.step, last);
    assert!(last < 6, "ran to the end instead of stopping");
    assert_eq!(backend.final_adapter(&stopped), None);

    // Its checkpoint alone, in a fresh output folder as on another machine.
    let mut resumed = fixture.inputs("resumed", "sft", 6, 2);
    resumed.resume = Some(restore(&found, &stopped.output_dir, &resumed.output_dir));
    let done = runs_to_the_end_from(&backend, &resumed, found.step).await;
    let after: Vec<_> = reference
        .iter()
        .filter(|(step, _)| *step > found.step)
        .copied()
        .collect();
    assert_eq!(losses(&done.events), after, "{}", transcript(&done));
}

/// Runs a resumed run to the end: it starts after `from`.
async fn runs_to_the_end_from(backend: &Trl, inputs: &TrainInputs, from: u32) -> Finished {
    let done = start(backend, inputs).finish().await;
    assert!(done.status.success(), "{}", transcript(&done));
    assert!(
        done.events.contains(&LineEvent::Resumed { step: from }),
        "{}",
        transcript(&done)
    );
    assert!(done.events.contains(&LineEvent::Done));
    assert!(backend.final_adapter(inputs).is_some());
    done
}

#[tokio::test]
async fn dpo_runs_to_the_end() {
    let fixture = Fixture::new("plain", &rows(PREFERENCE_ROW, 8));
    let backend = Trl::new(python());
    let done = runs_to_the_end(&backend, &fixture.inputs("dpo", "dpo", 3, 2)).await;
    assert!(
        done.events
            .iter()
            .any(|e| matches!(e, LineEvent::Metric { name, .. } if name == "rewards/margins")),
        "{}",
        transcript(&done)
    );
}

/// Llama's tokenizers have no pad token; ORPO must still run.
#[tokio::test]
async fn orpo_runs_to_the_end_on_a_tokenizer_without_a_pad_token() {
    let fixture = Fixture::new("plain", &rows(PREFERENCE_ROW, 8));
    let backend = Trl::new(python());
    let done = runs_to_the_end(&backend, &fixture.inputs("orpo", "orpo", 3, 2)).await;
    assert!(
        done.events
            .iter()
            .any(|e| matches!(e, LineEvent::Metric { name, .. } if name == "log_odds_ratio")),
        "{}",
        transcript(&done)
    );
}

/// Runs that can never succeed on this machine fail for good, saying what
/// to change, instead of burning every attempt.
#[tokio::test]
async fn runs_that_cannot_succeed_are_not_retried() {
    let fixture = Fixture::new("plain", &rows(SFT_ROW, 8));
    let backend = Trl::new(python());
    let cases: [(&str, Kind, &str); 2] = [
        ("bf16", Kind::Flag(true), "bf16"),
        ("assistant_only_loss", Kind::Flag(true), "generation"),
    ];
    for (key, value, says) in cases {
        let mut inputs = fixture.inputs(key, "sft", 2, 0);
        inputs.settings.extras.insert(key.into(), extra(value));
        let done = start(&backend, &inputs).finish().await;
        assert!(!done.status.success(), "{key}: {}", transcript(&done));
        let error = backend.classify(done.status, done.last_lines());
        assert!(!error.retryable, "{key}: {error:?}\n{}", transcript(&done));
        assert!(
            error.message.contains(says),
            "{key}: {}\n{}",
            error.message,
            transcript(&done)
        );
    }

    // An empty dataset file.
    std::fs::write(fixture.dataset.join("train.jsonl"), "").unwrap();
    let inputs = fixture.inputs("empty", "sft", 2, 0);
    let done = start(&backend, &inputs).finish().await;
    assert!(!done.status.success(), "{}", transcript(&done));
    let error = backend.classify(done.status, done.last_lines());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::BadDataset, false),
        "{}\n{}",
        error.message,
        transcript(&done)
    );
}

/// Checkpoints of a longer run keep their step in their name, and the
/// newest complete one is what a resume gets.
#[tokio::test]
async fn checkpoints_are_found_as_the_run_saves_them() {
    let fixture = Fixture::new("generation", &rows(SFT_ROW, 8));
    let backend = Trl::new(python());
    let mut inputs = fixture.inputs("assistant", "sft", 4, 2);
    // With generation markers in the template, assistant-only loss works.
    inputs
        .settings
        .extras
        .insert("assistant_only_loss".into(), extra(Kind::Flag(true)));
    let mut run = start(&backend, &inputs);
    assert!(
        run.until(|s| s
            .events
            .iter()
            .any(|e| matches!(e, LineEvent::Saved { step: Some(2) })))
            .await,
        "no save at step 2: {}",
        run.tail.join("\n")
    );
    let found = backend.latest_checkpoint(&inputs).expect("checkpoint-2");
    assert_eq!(found.step, 2);
    assert!(
        found
            .files
            .iter()
            .any(|f| f.ends_with("adapter_model.safetensors")),
        "{:?}",
        found.files
    );
    let done = run.finish().await;
    assert!(done.status.success(), "{}", transcript(&done));
    assert_eq!(backend.latest_checkpoint(&inputs).unwrap().step, 4);
}
