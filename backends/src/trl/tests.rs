use super::*;
use crate::{LineEvent, ModelFiles, Resume};
use serde_json::json;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use trainyard_proto::v1::ErrorKind;
use trainyard_proto::v1::{ExtraValue, extra_value::Kind};

fn extras(pairs: &[(&str, Kind)]) -> HashMap<String, ExtraValue> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_string(),
                ExtraValue {
                    kind: Some(v.clone()),
                },
            )
        })
        .collect()
}

fn inputs(method: &str, save_every: u32, extras: HashMap<String, ExtraValue>) -> TrainInputs {
    TrainInputs {
        job_id: "job1".into(),
        dataset_dir: "/data/job1".into(),
        model: ModelFiles {
            reference: "qwen2.5-0.5b-instruct".into(),
            family: ModelFamily::Llm,
            parts: [(part::LLM.to_string(), PathBuf::from("/models/qwen"))].into(),
        },
        run_dir: "/run/job1".into(),
        output_dir: "/out/job1".into(),
        output_name: "job1".into(),
        settings: TrainingSettings {
            backend: "trl".into(),
            method: method.into(),
            steps: 100,
            learning_rate: 2e-4,
            rank: 16,
            alpha: 32.0,
            batch_size: 2,
            save_every,
            seed: 7,
            extras,
            ..Default::default()
        },
        trigger_word: String::new(),
        resume: None,
        webhook_url: None,
        slot: Default::default(),
    }
}

fn rendered(inputs: &TrainInputs) -> (serde_json::Value, Vec<String>) {
    let launch = Trl::new("/usr/bin/python3".into()).render(inputs).unwrap();
    assert_eq!(launch.files.len(), 2);
    assert_eq!(launch.files[1].0, PathBuf::from("/run/job1/trl_train.py"));
    assert_eq!(launch.files[1].1, DRIVER.as_bytes());
    assert_eq!(launch.files[0].0, PathBuf::from("/run/job1/trl.json"));
    assert_eq!(launch.command.cwd, PathBuf::from("/run/job1"));
    (
        serde_json::from_slice(&launch.files[0].1).unwrap(),
        crate::test_support::argv(&launch),
    )
}

const ARGV: [&str; 4] = [
    "/usr/bin/python3",
    "/run/job1/trl_train.py",
    "--config",
    "/run/job1/trl.json",
];

#[test]
fn renders_sft() {
    let (config, argv) = rendered(&inputs("", 25, HashMap::new()));
    assert_eq!(argv, ARGV);
    assert_eq!(
        config,
        json!({
            "method": "sft",
            "model": "/models/qwen",
            "dataset": "/data/job1/train.jsonl",
            "output_dir": "/out/job1",
            "stop_file": "/run/job1/stop",
            "args": {
                "max_steps": 100, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
                "save_strategy": "steps", "save_steps": 25, "seed": 7, "logging_steps": 1,
                "report_to": "none", "disable_tqdm": false
            },
            "lora": {
                "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                "task_type": "CAUSAL_LM", "bias": "none"
            }
        })
    );
}

#[test]
fn renders_dpo_with_extras() {
    let extras = extras(&[
        ("beta", Kind::Float(0.2)),
        ("gradient_accumulation_steps", Kind::Int(4)),
        ("lr_scheduler_type", Kind::Text("cosine".into())),
        ("bf16", Kind::Flag(true)),
        ("lora_target_modules", Kind::Text("q_proj, v_proj,".into())),
    ]);
    let (config, argv) = rendered(&inputs("dpo", 0, extras));
    assert_eq!(argv, ARGV);
    assert_eq!(
        config,
        json!({
            "method": "dpo",
            "model": "/models/qwen",
            "dataset": "/data/job1/train.jsonl",
            "output_dir": "/out/job1",
            "stop_file": "/run/job1/stop",
            "args": {
                "max_steps": 100, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
                "save_strategy": "steps", "save_steps": 10, "seed": 7, "logging_steps": 1,
                "report_to": "none", "disable_tqdm": false,
                "beta": 0.2, "gradient_accumulation_steps": 4, "lr_scheduler_type": "cosine", "bf16": true
            },
            "lora": {
                "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                "task_type": "CAUSAL_LM", "bias": "none"
            }
        })
    );
}

#[test]
fn renders_orpo() {
    let extras = extras(&[
        ("beta", Kind::Int(1)),
        ("max_length", Kind::Int(2048)),
        ("lora_dropout", Kind::Float(0.1)),
    ]);
    let mut inputs = inputs("orpo", 50, extras);
    inputs.settings.alpha = 8.5;
    let (config, argv) = rendered(&inputs);
    assert_eq!(argv, ARGV);
    assert_eq!(config["method"], "orpo");
    assert_eq!(
        config["args"],
        json!({
            "max_steps": 100, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
            "save_strategy": "steps", "save_steps": 50, "seed": 7, "logging_steps": 1,
            "report_to": "none", "disable_tqdm": false, "beta": 1.0, "max_length": 2048
        })
    );
    assert_eq!(
        config["lora"],
        json!({
            "r": 16, "lora_alpha": 8.5, "lora_dropout": 0.1, "target_modules": "all-linear",
            "task_type": "CAUSAL_LM", "bias": "none"
        })
    );
}

#[test]
fn check_names_every_problem() {
    let backend = Trl::new(PathBuf::new());
    let mut settings = inputs("ppo", 0, HashMap::new()).settings;
    let problems = backend.check(&settings, ModelFamily::Llm);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "training.method");
    let problems = problems.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert!(
        problems[0].starts_with("training.method: unknown method \"ppo\""),
        "{problems:?}"
    );

    settings.method = "sft".into();
    settings.extras = extras(&[
        ("beta", Kind::Float(0.1)),
        ("max_length", Kind::Text("long".into())),
        ("warmup_steps", Kind::Float(-1.0)),
        ("lr_scheduler_type", Kind::Text("cosnie".into())),
    ]);
    let problems = backend
        .check(&settings, ModelFamily::Llm)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(problems[0].starts_with("training.extras.beta: unknown key for trl sft; allowed: "));
    assert!(problems[1].starts_with("training.extras.max_length: must be a"));
    assert_eq!(
        problems[2..],
        [
            format!(
                "training.extras.lr_scheduler_type: unknown scheduler \"cosnie\"; known: {}",
                SCHEDULERS.join(", ")
            ),
            "training.extras.warmup_steps: must be a number of steps, or a fraction below 1 of the run"
                .to_string(),
        ]
    );
    settings.method = "dpo".into();
    settings.extras = extras(&[
        ("beta", Kind::Float(0.1)),
        ("loss_type", Kind::Text("ipo".into())),
    ]);
    assert!(backend.check(&settings, ModelFamily::Llm).is_empty());
    settings.method = "orpo".into();
    assert!(
        backend.check(&settings, ModelFamily::Llm)[0]
            .to_string()
            .contains("loss_type: unknown key for trl orpo")
    );
    settings.extras = extras(&[("bf16", Kind::Flag(true)), ("fp16", Kind::Flag(true))]);
    assert_eq!(
        backend.check(&settings, ModelFamily::Llm),
        [crate::SettingProblem::new(
            "training.extras",
            "bf16 and fp16 cannot both be true"
        )]
    );
}

fn problems(method: &str, pairs: &[(&str, Kind)]) -> Vec<crate::SettingProblem> {
    let settings = inputs(method, 0, extras(pairs)).settings;
    Trl::new(PathBuf::new()).check(&settings, ModelFamily::Llm)
}

#[test]
fn warmup_ratio_is_refused_and_warmup_steps_takes_a_ratio() {
    // transformers 5 has no warmup_ratio field: the run would die with a TypeError.
    let refused = problems("sft", &[("warmup_ratio", Kind::Float(0.1))]);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].field, "training.extras.warmup_ratio");
    assert!(
        refused[0]
            .problem
            .contains("set warmup_steps to a fraction below 1"),
        "{refused:?}"
    );
    assert!(
        !Method::Sft
            .extras()
            .iter()
            .any(|(k, _)| *k == "warmup_ratio")
    );

    // Below 1 it is the ratio (a float); from 1 on, a whole number of steps (an integer).
    let warmup = |value: Kind| {
        let (config, _) = rendered(&inputs("sft", 0, extras(&[("warmup_steps", value)])));
        config["args"]["warmup_steps"].clone()
    };
    assert_eq!(warmup(Kind::Float(0.1)), json!(0.1));
    assert_eq!(warmup(Kind::Int(10)), json!(10));
    assert_eq!(warmup(Kind::Float(10.0)), json!(10));
    for bad in [Kind::Float(1.5), Kind::Float(-0.1), Kind::Float(f64::NAN)] {
        let found = problems("dpo", &[("warmup_steps", bad.clone())]);
        assert_eq!(found.len(), 1, "{bad:?}: {found:?}");
        assert_eq!(found[0].field, "training.extras.warmup_steps");
    }
}

#[test]
fn schedulers_and_losses_the_libraries_refuse_are_refused() {
    for scheduler in [
        "reduce_lr_on_plateau",
        "greedy",
        "cosine_with_min_lr",
        "cosine_warmup_with_min_lr",
        "warmup_stable_decay",
    ] {
        let found = problems(
            "sft",
            &[("lr_scheduler_type", Kind::Text(scheduler.into()))],
        );
        assert_eq!(found.len(), 1, "{scheduler}");
        assert!(
            found[0]
                .problem
                .contains("needs an eval set or lr_scheduler_kwargs"),
            "{found:?}"
        );
    }
    assert!(problems("sft", &[("lr_scheduler_type", Kind::Text("cosine".into()))]).is_empty());

    // SFTTrainer takes nll and dft; DPOTrainer its own list (and fails only at the first step).
    let loss = |method: &str, name: &str| {
        problems(method, &[("loss_type", Kind::Text(name.into()))])
            .iter()
            .map(|p| p.field.clone())
            .collect::<Vec<_>>()
    };
    assert!(loss("sft", "dft").is_empty());
    assert!(loss("dpo", "ipo").is_empty());
    assert!(loss("dpo", "sigmoid_norm").is_empty());
    assert_eq!(loss("sft", "ipo"), ["training.extras.loss_type"]);
    assert_eq!(loss("dpo", "nll"), ["training.extras.loss_type"]);
    assert_eq!(loss("dpo", "sigmoid,ipo"), ["training.extras.loss_type"]);
}

/// Feeds raw output the way the run loop splits it (on `\r` and `\n`).
fn feed(parser: &mut dyn OutputParser, raw: &str) -> Vec<LineEvent> {
    raw.split(['\r', '\n'])
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| parser.line(l))
        .collect()
}

fn progress(events: &[LineEvent]) -> Vec<(u32, u32, Option<f32>)> {
    events
        .iter()
        .filter_map(|e| match e {
            LineEvent::Progress {
                step, total, loss, ..
            } => Some((*step, *total, *loss)),
            _ => None,
        })
        .collect()
}

fn metric(events: &[LineEvent], name: &str) -> Option<(f64, u32)> {
    events.iter().find_map(|e| match e {
        LineEvent::Metric {
            name: n,
            value,
            step,
        } if n == name => Some((*value, *step)),
        _ => None,
    })
}

#[test]
fn parses_sft_output_in_the_string_form() {
    let mut parser = Parser::new(0, 100, 2.0);
    // Dataset preparation bars have a description and another unit: not the training bar.
    assert!(
        feed(
            &mut parser,
            "\rTokenizing train dataset: 100%|██████████| 4/4 [00:00<00:00, 812.40 examples/s]\n"
        )
        .is_empty()
    );
    assert_eq!(parser.total, 100);
    let bar =
        "\r  0%|          | 0/5 [00:00<?, ?it/s]\r 20%|██        | 1/5 [00:01<00:04,  1.02s/it]";
    assert!(feed(&mut parser, bar).is_empty());
    assert_eq!(parser.total, 5);
    let events = feed(
        &mut parser,
        "{'loss': '2.305', 'grad_norm': '1.611', 'learning_rate': '0.00012', 'entropy': '2.225', 'num_tokens': '1.024e+04', 'mean_token_accuracy': '0.539', 'epoch': '0.5'}\n",
    );
    assert_eq!(
        events[0],
        LineEvent::Progress {
            step: 1,
            total: 5,
            loss: Some(2.305),
            lr: Some(0.00012),
            samples_per_sec: Some(2.0 / 1.02),
            epoch: Some(0.5),
        }
    );
    assert_eq!(metric(&events, "grad_norm"), Some((1.611, 1)));
    assert_eq!(metric(&events, "num_tokens"), Some((10240.0, 1)));
    assert_eq!(metric(&events, "mean_token_accuracy"), Some((0.539, 1)));
    assert_eq!(metric(&events, "learning_rate"), None);
    assert_eq!(events.len(), 5);
    // A bar redrawn after the dict does not move the step; the next dict does.
    feed(
        &mut parser,
        "\r                    \r 20%|██        | 1/5 [00:01<00:04,  1.02s/it]\r 40%|████      | 2/5 [00:02<00:03,  1.50it/s]",
    );
    let events = feed(
        &mut parser,
        "{'loss': '2.215', 'grad_norm': '1.569', 'learning_rate': '8e-05', 'epoch': '0.75'}",
    );
    assert_eq!(progress(&events), [(2, 5, Some(2.215))]);
    let LineEvent::Progress {
        samples_per_sec,
        lr,
        ..
    } = events[0]
    else {
        panic!()
    };
    assert_eq!((samples_per_sec, lr), (Some(3.0), Some(8e-5)));
    assert_eq!(
        feed(
            &mut parser,
            "💾 Checkpoint saved to /out/job1/checkpoint-2."
        ),
        [LineEvent::Saved { step: Some(2) }]
    );
    let events = feed(
        &mut parser,
        "{'train_runtime': '12.35', 'train_samples_per_second': '3.24', 'train_steps_per_second': '0.81', 'train_loss': '1.876', 'epoch': '1'}",
    );
    assert!(progress(&events).is_empty());
    assert_eq!(metric(&events, "train_loss"), Some((1.876, 2)));
    assert_eq!(metric(&events, "train_runtime"), Some((12.35, 2)));
    assert_eq!(metric(&events, "epoch"), None);
    assert_eq!(
        feed(&mut parser, "✅ Training completed."),
        [LineEvent::Done]
    );
    assert!(feed(&mut parser, "💾 Model saved to /out/job1.").is_empty());
}

#[test]
fn parses_dpo_output_in_the_float_form_and_resumes() {
    let mut parser = Parser::new(0, 100, 1.0);
    assert_eq!(
        feed(
            &mut parser,
            "Resuming training from checkpoint: /out/job1/checkpoint-40"
        ),
        [LineEvent::Resumed { step: 40 }]
    );
    // On resume the bar starts at 0 and jumps to the global step.
    feed(
        &mut parser,
        "\r  0%|          | 0/100 [00:00<?, ?it/s]\r 41%|████      | 41/100 [00:03<00:04, 13.50it/s]",
    );
    let line = "{'loss': 0.6894, 'grad_norm': 5.6234, 'learning_rate': 5e-07, 'rewards/chosen': 0.0, 'rewards/rejected': -0.0125, 'rewards/accuracies': 0.5, 'rewards/margins': 0.0125, 'logps/chosen': -178.21, 'logps/rejected': -181.9, 'logits/chosen': -2.61, 'logits/rejected': -2.59, 'epoch': 0.41}";
    let events = parser.line(line);
    assert_eq!(progress(&events), [(41, 100, Some(0.6894))]);
    assert_eq!(metric(&events, "rewards/margins"), Some((0.0125, 41)));
    assert_eq!(metric(&events, "logps/rejected"), Some((-181.9, 41)));
    assert_eq!(events.len(), 10);
    // The step of a resumed run counts from the restored checkpoint even with no resume line.
    let mut parser = Trl::new(PathBuf::new()).parser(&TrainInputs {
        resume: Some(Resume {
            step: 40,
            files: vec![],
        }),
        ..inputs("dpo", 0, HashMap::new())
    });
    assert_eq!(progress(&parser.line(line)), [(41, 100, Some(0.6894))]);
}

#[test]
fn nan_losses_are_reported_as_nan() {
    let mut parser = Parser::new(0, 10, 1.0);
    for line in [
        "{'loss': 'nan', 'grad_norm': 'nan', 'learning_rate': '1.6e-05', 'epoch': '0.3'}",
        "{'loss': nan, 'grad_norm': nan, 'learning_rate': 1.6e-05, 'epoch': 0.3}",
    ] {
        let events = parser.line(line);
        let LineEvent::Progress {
            loss: Some(loss), ..
        } = events[0]
        else {
            panic!("{events:?}")
        };
        assert!(loss.is_nan());
        assert!(metric(&events, "grad_norm").unwrap().0.is_nan());
    }
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(String::from).collect()
}

#[test]
fn classifies_failures() {
    let fail = ExitStatus::from_raw(1 << 8);
    let cases: &[(&str, ExitStatus, ErrorKind, bool)] = &[
        (
            "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
            fail,
            ErrorKind::Oom,
            true,
        ),
        (
            "ValueError: Either `datasets` or `dataset_name` must be provided.",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: Cannot use chat template functions because tokenizer.chat_template is not set and no template argument was passed!",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "OSError: Can't load tokenizer for '/models/qwen'.",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "OSError: /models/qwen does not appear to have a file named config.json. Checkout 'https://huggingface.co//models/qwen/tree/None' for available files.",
            fail,
            ErrorKind::Model,
            false,
        ),
        ("KeyError: 'chosen'", fail, ErrorKind::BadDataset, false),
        (
            "ValueError: Dataset /data/job1/train.jsonl has no rows",
            fail,
            ErrorKind::BadDataset,
            false,
        ),
        (
            "FileNotFoundError: Unable to find '/data/job1/train.jsonl'",
            fail,
            ErrorKind::BadDataset,
            false,
        ),
        (
            "TypeError: SFTConfig.__init__() got an unexpected keyword argument 'beta'",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: No valid checkpoint found in output directory (/out/job1)",
            fail,
            ErrorKind::Trainer,
            true,
        ),
        (
            "{'loss': '1.2', 'epoch': '0.1'}\n{'loss': 'nan', 'grad_norm': 'nan', 'epoch': '0.2'}",
            ExitStatus::from_raw(9),
            ErrorKind::Trainer,
            false,
        ),
        (
            "{'loss': '1.2', 'epoch': '0.1'}",
            ExitStatus::from_raw(9),
            ErrorKind::Oom,
            true,
        ),
        (
            "{'loss': '1.2', 'epoch': '0.1'}",
            ExitStatus::from_raw(0),
            ErrorKind::Trainer,
            true,
        ),
        (
            "RuntimeError: simulated crash at step 3",
            fail,
            ErrorKind::Trainer,
            true,
        ),
        // Failures that no retry on the same machine can fix.
        (
            "ValueError: Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU.",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "UnsupportedPrecision: training.extras.bf16 is true, but this machine has no CUDA GPU: set bf16 to false, or leave both unset so the precision is chosen for the machine",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: fp16 mixed precision requires a GPU (not 'cpu').",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: The chat template is not training-compatible (missing prefix-preservation or `{% generation %}` markers) and patching is not supported for this template. Please manually modify the chat template for training.",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "RuntimeError: You're using `assistant_only_loss=True`, but at least one example has no assistant tokens. This usually means the tokenizer's chat template doesn't generate assistant masks",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: You set `assistant_only_loss=True`, but the dataset is not conversational. This option is only supported for conversational datasets.",
            fail,
            ErrorKind::BadDataset,
            false,
        ),
        (
            "ValueError: Padding is enabled, but the tokenizer is not configured with a padding token. Explicitly set `tokenizer.pad_token` (e.g. `tokenizer.pad_token = tokenizer.eos_token`) before calling the trainer.",
            fail,
            ErrorKind::Model,
            false,
        ),
        (
            "ValueError: Dataset /data/job1/train.jsonl has no rows: the file is empty",
            fail,
            ErrorKind::BadDataset,
            false,
        ),
        (
            "ValueError: Unknown loss type: nll. Should be one of ['sigmoid', 'hinge']",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: Invalid `loss_type` ipo passed. Supported values are 'nll' and 'dft'.",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
        (
            "ValueError: lr_scheduler_type reduce_lr_on_plateau requires an eval strategy",
            fail,
            ErrorKind::InvalidSpec,
            false,
        ),
    ];
    for (tail, status, kind, retryable) in cases {
        let e = classify(*status, &lines(tail));
        assert_eq!(
            (e.kind(), e.retryable),
            (*kind, *retryable),
            "{tail}: {}",
            e.message
        );
    }
    assert!(
        classify(ExitStatus::from_raw(0), &[])
            .message
            .contains("without saving the adapter")
    );
    let template = classify(
        fail,
        &lines(
            "ValueError: The chat template is not training-compatible (missing prefix-preservation or `{% generation %}` markers)",
        ),
    );
    assert!(
        template
            .message
            .contains("has no {% generation %} markers, so assistant_only_loss cannot be used"),
        "{}",
        template.message
    );
    let precision = classify(
        fail,
        &lines("ValueError: Your setup doesn't support bf16/gpu. You need to assign use_cpu"),
    );
    assert!(
        precision
            .message
            .contains("set training.extras.bf16 and fp16 to false"),
        "{}",
        precision.message
    );
    assert!(
        classify(
            ExitStatus::from_raw(9),
            &lines("{'loss': nan, 'epoch': 0.2}")
        )
        .message
        .contains("loss is nan")
    );
}

#[test]
fn finds_the_newest_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = inputs("sft", 10, HashMap::new());
    inputs.output_dir = dir.path().to_path_buf();
    inputs.run_dir = dir.path().join("run");
    let backend = Trl::new(PathBuf::new());
    assert_eq!(backend.latest_checkpoint(&inputs), None);
    let write = |rel: &str| {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    };
    for f in [
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "trainer_state.json",
        "nested/extra.json",
    ] {
        write(&format!("checkpoint-10/{f}"));
    }
    // Being written: no trainer_state.json yet.
    for f in ["adapter_model.safetensors", "rng_state.pth"] {
        write(&format!("checkpoint-20/{f}"));
    }
    write("checkpoint-x9/trainer_state.json");
    let found = backend.latest_checkpoint(&inputs).unwrap();
    assert_eq!(found.step, 10);
    let files: Vec<_> = found
        .files
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        [
            "checkpoint-10/adapter_model.safetensors",
            "checkpoint-10/nested/extra.json",
            "checkpoint-10/optimizer.pt",
            "checkpoint-10/rng_state.pth",
            "checkpoint-10/trainer_state.json",
        ]
    );
    write("checkpoint-20/trainer_state.json");
    assert_eq!(backend.latest_checkpoint(&inputs).unwrap().step, 20);

    assert_eq!(backend.final_adapter(&inputs), None);
    write("adapter_model.safetensors");
    assert_eq!(
        backend.final_adapter(&inputs),
        Some(dir.path().join("adapter_model.safetensors"))
    );
    assert_eq!(
        backend.stop_request(&inputs),
        StopRequest::SaveAndExit {
            path: dir.path().join("run/stop"),
            body: b"stop\n".to_vec()
        }
    );
}

#[test]
fn registered_for_language_models_only() {
    let backend = crate::by_name("trl", &crate::Tools::default()).unwrap();
    assert_eq!(backend.families(), [ModelFamily::Llm]);
    assert_eq!(backend.parts(ModelFamily::Llm), [part::LLM]);
    let settings = TrainingSettings {
        backend: "trl".into(),
        ..Default::default()
    };
    assert!(
        crate::check_settings(&settings, ModelFamily::Flux)[0]
            .problem
            .contains("does not train flux")
    );
    assert!(crate::check_settings(&settings, ModelFamily::Llm).is_empty());
}
