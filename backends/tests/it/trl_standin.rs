//! The TRL backend against its stand-in: the shipped driver runs unchanged on
//! minimal `trl`/`transformers`/`peft`/`datasets` packages
//! (`tests/standins/trl/python`), started through the one subprocess
//! constructor the worker uses.

use crate::support;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use support::{run_inputs, standins, write_safetensors};
use tokio::sync::mpsc;
use trainyard_backends::trl::Trl;
use trainyard_backends::{
    FoundCheckpoint, LineEvent, ModelFiles, OutputParser, Resume, StopRequest, TrainInputs,
    TrainerBackend,
};
use trainyard_core::process::{ChildGroup, OutputLine};
use trainyard_models::{ModelFamily, part};
use trainyard_proto::v1::extra_value::Kind;
use trainyard_proto::v1::{ErrorKind, ExtraValue, JobError, TrainingSettings};

const TIMEOUT: Duration = Duration::from_secs(60);

fn python_wrapper() -> PathBuf {
    standins().join("trl/python3")
}

/// A model folder, a dataset and an empty output folder in `root`.
struct Fixture {
    _root: tempfile::TempDir,
    model: PathBuf,
    dataset: PathBuf,
    root: PathBuf,
}

impl Fixture {
    fn new(method: &str) -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        let dataset = root.path().join("dataset");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&dataset).unwrap();
        let config = r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}"#;
        std::fs::write(model.join("config.json"), config).unwrap();
        // As Llama tokenizers are: an eos token, no pad token.
        let tokenizer = r#"{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "eos_token": "<|eot_id|>"}"#;
        std::fs::write(model.join("tokenizer_config.json"), tokenizer).unwrap();
        write_safetensors(&model.join("model.safetensors"));
        let row = match method {
            "sft" | "" => {
                r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#
            }
            _ => r#"{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}"#,
        };
        std::fs::write(dataset.join("train.jsonl"), format!("{row}\n").repeat(8)).unwrap();
        Fixture {
            model,
            dataset,
            root: root.path().to_path_buf(),
            _root: root,
        }
    }

    /// Inputs for a run with its own run and output folders.
    fn inputs(&self, run: &str, method: &str, steps: u32, save_every: u32) -> TrainInputs {
        let run_dir = self.root.join(run);
        let output_dir = run_dir.join("output");
        std::fs::create_dir_all(&output_dir).unwrap();
        let model = ModelFiles {
            reference: "hf://tiny/llm".into(),
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
                    learning_rate: 2e-4,
                    rank: 4,
                    alpha: 8.0,
                    batch_size: 1,
                    save_every,
                    seed: 1,
                    extras: HashMap::new(),
                    ..Default::default()
                },
            )
        }
    }

    /// Like `inputs`, with extras.
    fn inputs_with(
        &self,
        run: &str,
        method: &str,
        steps: u32,
        extras: &[(&str, Kind)],
    ) -> TrainInputs {
        let mut inputs = self.inputs(run, method, steps, 0);
        inputs.settings.extras = extras
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    ExtraValue {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect();
        inputs
    }
}

/// A running trainer: its lines go through the backend's parser as the run loop feeds them.
struct Run {
    child: ChildGroup,
    rx: mpsc::Receiver<OutputLine>,
    parser: Box<dyn OutputParser>,
    lines: Vec<String>,
    events: Vec<LineEvent>,
}

impl Run {
    fn start(backend: &Trl, inputs: &TrainInputs, faults: &[(&str, &str)]) -> Run {
        let launch = backend.render(inputs).unwrap();
        for (path, body) in &launch.files {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        let mut command = launch.command;
        command.env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        command
            .env
            .push(("PYTHONIOENCODING".into(), "utf-8".into()));
        command
            .env
            .push(("STANDIN_STEP_SECONDS".into(), "0.03".into()));
        for (k, v) in faults {
            command.env.push(((*k).into(), (*v).into()));
        }
        let (child, rx) = ChildGroup::spawn(&command).unwrap();
        Run {
            child,
            rx,
            parser: backend.parser(inputs),
            lines: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Feeds lines until an event matches; panics at end of output or after the timeout.
    async fn until(&mut self, what: &str, wanted: impl Fn(&LineEvent) -> bool) -> LineEvent {
        let wait = async {
            while let Some(line) = self.rx.recv().await {
                let events = self.parser.line(&line.line);
                self.lines.push(line.line);
                for event in events {
                    self.events.push(event.clone());
                    if wanted(&event) {
                        return Some(event);
                    }
                }
            }
            None
        };
        match tokio::time::timeout(TIMEOUT, wait).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("output ended before {what}:\n{}", self.lines.join("\n")),
            Err(_) => panic!("no {what} within {TIMEOUT:?}:\n{}", self.lines.join("\n")),
        }
    }

    /// Reads the rest of the output and the exit status.
    async fn finish(mut self) -> Finished {
        let wait = async {
            while let Some(line) = self.rx.recv().await {
                self.events.extend(self.parser.line(&line.line));
                self.lines.push(line.line);
            }
            self.child.wait().await.unwrap()
        };
        let status = tokio::time::timeout(TIMEOUT, wait)
            .await
            .expect("trainer did not exit");
        Finished {
            status,
            lines: self.lines,
            events: self.events,
        }
    }

    /// SIGKILL to the whole group (what dropping the handle does), then
    /// waits until its pipes close.
    async fn kill(self) {
        let Run { child, mut rx, .. } = self;
        drop(child);
        tokio::time::timeout(TIMEOUT, async { while rx.recv().await.is_some() {} })
            .await
            .expect("killed trainer kept its pipes open");
    }
}

struct Finished {
    status: ExitStatus,
    lines: Vec<String>,
    events: Vec<LineEvent>,
}

impl Finished {
    fn steps(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|e| match e {
                LineEvent::Progress { step, .. } => Some(*step),
                _ => None,
            })
            .collect()
    }

    fn tail(&self) -> &[String] {
        &self.lines[self.lines.len().saturating_sub(40)..]
    }

    fn transcript(&self) -> String {
        self.lines.join("\n")
    }

    /// The driver's `Mixed precision: …` line.
    fn precision(&self) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix("Mixed precision: "))
    }

    /// The failure as the backend classifies it, checking that the run failed.
    fn error(&self, backend: &Trl) -> JobError {
        assert!(!self.status.success(), "{}", self.transcript());
        backend.classify(self.status, self.tail())
    }
}

/// The tensor names of a safetensors file, checking its layout.
fn safetensors_keys(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let size = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + size]).unwrap();
    let mut end = 0;
    let mut keys = Vec::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        end = end.max(info["data_offsets"][1].as_u64().unwrap() as usize);
        keys.push(name.clone());
    }
    assert_eq!(
        bytes.len(),
        8 + size + end,
        "{} is not fully covered",
        path.display()
    );
    keys
}

#[tokio::test]
async fn killed_run_resumes_from_its_copied_checkpoint() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    let first = fixture.inputs("first", "sft", 12, 3);
    let mut run = Run::start(&backend, &first, &[]);
    run.until("a saved checkpoint", |e| {
        matches!(e, LineEvent::Saved { .. })
    })
    .await;
    let FoundCheckpoint { step, files } = backend.latest_checkpoint(&first).unwrap();
    assert!(step >= 3 && step % 3 == 0, "checkpoint at step {step}");
    run.kill().await;

    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for needed in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} missing from {names:?}"
        );
    }

    // Only the checkpoint's files, into a fresh output folder, as on another machine.
    let mut second = fixture.inputs("second", "sft", 12, 3);
    for file in &files {
        let to = second.output_dir.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(first.output_dir.join(file), to).unwrap();
    }
    second.resume = Some(Resume { step, files });
    let done = Run::start(&backend, &second, &[]).finish().await;
    assert!(done.status.success(), "{}", done.transcript());
    assert!(done.events.contains(&LineEvent::Resumed { step }));
    let steps = done.steps();
    assert_eq!(steps.first(), Some(&(step + 1)), "{}", done.transcript());
    assert_eq!(steps, ((step + 1)..=12).collect::<Vec<_>>());
    assert!(done.events.contains(&LineEvent::Done));
    let adapter = backend.final_adapter(&second).expect("final adapter");
    let keys = safetensors_keys(&adapter);
    assert!(
        keys.iter()
            .any(|k| k.ends_with("self_attn.q_proj.lora_A.weight")),
        "{keys:?}"
    );
    assert_eq!(backend.latest_checkpoint(&second).unwrap().step, 12);
}

#[tokio::test]
async fn the_stop_file_saves_a_checkpoint_and_exits() {
    let fixture = Fixture::new("dpo");
    let backend = Trl::new(python_wrapper());
    let inputs = fixture.inputs("stop", "dpo", 500, 0);
    let mut run = Run::start(&backend, &inputs, &[]);
    run.until("progress", |e| matches!(e, LineEvent::Progress { .. }))
        .await;
    let StopRequest::SaveAndExit { path, body } = backend.stop_request(&inputs) else {
        panic!("trl stops through its sentinel file");
    };
    std::fs::write(path, body).unwrap();
    let done = run.finish().await;
    assert!(done.status.success(), "{}", done.transcript());
    let last = *done.steps().last().unwrap();
    assert!(last < 500, "ran to the end instead of stopping");
    assert!(
        done.events.contains(&LineEvent::Saved { step: Some(last) }),
        "{}",
        done.transcript()
    );
    assert_eq!(backend.latest_checkpoint(&inputs).unwrap().step, last);
    assert_eq!(backend.final_adapter(&inputs), None);
    assert!(!done.events.contains(&LineEvent::Done));
    assert!(
        done.lines
            .iter()
            .any(|l| l.starts_with("🛑 Stopped on request"))
    );
}

/// ORPO, unlike SFT and DPO, sets no pad token; the fixture's tokenizer has
/// none (as Llama's), so this fails unless the driver gives it one.
#[tokio::test]
async fn orpo_runs_to_the_end() {
    let fixture = Fixture::new("orpo");
    let backend = Trl::new(python_wrapper());
    let inputs = fixture.inputs("orpo", "orpo", 4, 2);
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    assert!(done.status.success(), "{}", done.transcript());
    assert_eq!(done.steps(), [1, 2, 3, 4]);
    assert!(
        done.events.iter().any(
            |e| matches!(e, LineEvent::Metric { name, step: 4, .. } if name == "log_odds_ratio")
        )
    );
    assert!(done.events.contains(&LineEvent::Done));
    assert!(backend.final_adapter(&inputs).is_some());

    // A tokenizer with neither a pad nor an eos token cannot pad a batch.
    let template = r#"{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#;
    std::fs::write(fixture.model.join("tokenizer_config.json"), template).unwrap();
    let inputs = fixture.inputs("no-eos", "orpo", 4, 2);
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    let error = done.error(&backend);
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::Model, false),
        "{}",
        error.message
    );
    assert!(error.message.contains("no pad token"), "{}", error.message);
}

#[tokio::test]
async fn faults_are_classified() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    let cases: &[(&str, &str, ErrorKind, bool)] = &[
        ("STANDIN_FAULT", "oom@3", ErrorKind::Oom, true),
        ("STANDIN_FAULT", "exit0@3", ErrorKind::Trainer, true),
        ("STANDIN_FAULT", "crash@2", ErrorKind::Trainer, true),
    ];
    for (i, (key, value, kind, retryable)) in cases.iter().enumerate() {
        let inputs = fixture.inputs(&format!("fault{i}"), "sft", 6, 2);
        let done = Run::start(&backend, &inputs, &[(key, value)])
            .finish()
            .await;
        assert_eq!(done.status.success(), value.starts_with("exit0"), "{value}");
        assert_eq!(backend.final_adapter(&inputs), None, "{value}");
        let error = backend.classify(done.status, done.tail());
        assert_eq!(
            (error.kind(), error.retryable),
            (*kind, *retryable),
            "{value}: {}\n{}",
            error.message,
            done.transcript()
        );
    }
}

#[tokio::test]
async fn nan_losses_and_bad_inputs_are_recognised() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());

    let inputs = fixture.inputs("nan", "sft", 5, 0);
    let done = Run::start(&backend, &inputs, &[("STANDIN_NAN_FROM", "3")])
        .finish()
        .await;
    let losses: Vec<bool> = done
        .events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress { loss, .. } => loss.map(f32::is_nan),
            _ => None,
        })
        .collect();
    assert_eq!(losses, [false, false, true, true, true]);
    // As if the run loop had stopped it for its NaN losses.
    let error = backend.classify(ExitStatus::from_raw(9), done.tail());
    assert_eq!((error.kind(), error.retryable), (ErrorKind::Trainer, false));
    assert!(error.message.contains("loss is nan"), "{}", error.message);

    // A conversational dataset and a model without a chat template.
    std::fs::remove_file(fixture.model.join("tokenizer_config.json")).unwrap();
    std::fs::write(fixture.model.join("tokenizer.json"), "{}").unwrap();
    let inputs = fixture.inputs("template", "sft", 5, 0);
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    let error = backend.classify(done.status, done.tail());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::InvalidSpec, false),
        "{}",
        error.message
    );
    assert!(error.message.contains("chat template"), "{}", error.message);

    // The model folder has no config.json.
    std::fs::remove_file(fixture.model.join("config.json")).unwrap();
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    let error = backend.classify(done.status, done.tail());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::Model, false),
        "{}",
        error.message
    );

    // An empty dataset.
    std::fs::write(fixture.dataset.join("train.jsonl"), "").unwrap();
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    let error = backend.classify(done.status, done.tail());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::BadDataset, false),
        "{}",
        error.message
    );
    assert!(error.message.contains("has no rows"), "{}", error.message);

    // No dataset file.
    std::fs::remove_file(fixture.dataset.join("train.jsonl")).unwrap();
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    let error = backend.classify(done.status, done.tail());
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::BadDataset, false),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_hung_run_prints_nothing_more_until_killed() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    let inputs = fixture.inputs("hang", "sft", 6, 0);
    let mut run = Run::start(&backend, &inputs, &[("STANDIN_FAULT", "hang@3")]);
    run.until("step 2", |e| {
        matches!(e, LineEvent::Progress { step: 2, .. })
    })
    .await;
    // Whatever step 2 still prints, then silence: no step 3 and no exit.
    let quiet = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(line) = run.rx.recv().await {
            run.events.extend(run.parser.line(&line.line));
        }
    })
    .await;
    assert!(quiet.is_err(), "the hung trainer closed its output");
    assert!(
        !run.events
            .iter()
            .any(|e| matches!(e, LineEvent::Progress { step: 3.., .. }))
    );
    run.kill().await;
}

#[tokio::test]
async fn the_precision_is_chosen_for_the_machine() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    // TRL defaults bf16 to true; transformers refuses it without a bf16 GPU.
    let cases = [("", "no"), ("7.5", "fp16"), ("8.0", "bf16")];
    for (i, (gpu, chosen)) in cases.into_iter().enumerate() {
        let inputs = fixture.inputs(&format!("gpu{i}"), "sft", 2, 0);
        let done = Run::start(&backend, &inputs, &[("STANDIN_GPU", gpu)])
            .finish()
            .await;
        assert!(done.status.success(), "{gpu}: {}", done.transcript());
        assert_eq!(done.precision(), Some(chosen), "{gpu}");
        assert!(backend.final_adapter(&inputs).is_some(), "{gpu}");
    }
}

#[tokio::test]
async fn a_precision_the_machine_lacks_fails_for_good() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    // No CUDA device. (On any CUDA device torch counts emulated bf16 as support.)
    let cases = [("bf16", ""), ("fp16", "")];
    for (i, (flag, gpu)) in cases.into_iter().enumerate() {
        let inputs = fixture.inputs_with(&format!("ask{i}"), "sft", 2, &[(flag, Kind::Flag(true))]);
        let done = Run::start(&backend, &inputs, &[("STANDIN_GPU", gpu)])
            .finish()
            .await;
        let error = done.error(&backend);
        assert_eq!(
            (error.kind(), error.retryable),
            (ErrorKind::InvalidSpec, false),
            "{flag} on {gpu:?}: {}\n{}",
            error.message,
            done.transcript()
        );
        assert!(
            error.message.contains(&format!("{flag} to false")),
            "{}",
            error.message
        );
    }
    // Asked for where the machine has it: kept.
    let inputs = fixture.inputs_with("fp16", "sft", 2, &[("fp16", Kind::Flag(true))]);
    let done = Run::start(&backend, &inputs, &[("STANDIN_GPU", "8.6")])
        .finish()
        .await;
    assert!(done.status.success(), "{}", done.transcript());
    assert_eq!(done.precision(), Some("fp16"));
}

#[tokio::test]
async fn warmup_steps_below_one_is_a_ratio() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    let inputs = fixture.inputs_with("warmup", "sft", 4, &[("warmup_steps", Kind::Float(0.5))]);
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    assert!(done.status.success(), "{}", done.transcript());
    // Two warmup steps of four: the rate rises, then falls.
    let rates: Vec<f64> = done
        .events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress { lr, .. } => *lr,
            _ => None,
        })
        .collect();
    assert_eq!(rates.len(), 4, "{}", done.transcript());
    assert!(rates[0] < rates[1] && rates[2] < rates[1], "{rates:?}");
}

#[tokio::test]
async fn assistant_only_loss_needs_generation_markers_in_the_template() {
    let fixture = Fixture::new("sft");
    let backend = Trl::new(python_wrapper());
    let asked = [("assistant_only_loss", Kind::Flag(true))];
    let inputs = fixture.inputs_with("plain", "sft", 2, &asked);
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    let error = done.error(&backend);
    assert_eq!(
        (error.kind(), error.retryable),
        (ErrorKind::InvalidSpec, false),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("no {% generation %} markers"),
        "{}",
        error.message
    );

    let marked = r#"{"chat_template": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}", "eos_token": "<|eot_id|>"}"#;
    std::fs::write(fixture.model.join("tokenizer_config.json"), marked).unwrap();
    let inputs = fixture.inputs_with("marked", "sft", 2, &asked);
    let done = Run::start(&backend, &inputs, &[]).finish().await;
    assert!(done.status.success(), "{}", done.transcript());
}
