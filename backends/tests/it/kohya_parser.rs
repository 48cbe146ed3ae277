//! The kohya parser and failure classes on verbatim upstream lines
//! (`train_network.py`, `library/train_util.py`, accelerate, tqdm).

use crate::common;

use common::{Fixture, settings};
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use trainyard_backends::{LineEvent, OutputParser, Tools, TrainerBackend, by_name};
use trainyard_models::ModelFamily;
use trainyard_proto::v1::ErrorKind;

fn backend() -> Box<dyn TrainerBackend> {
    by_name("kohya", &Tools::default()).unwrap()
}

fn parser(steps: u32, batch_size: u32) -> Box<dyn OutputParser> {
    let fx = Fixture::new(ModelFamily::Flux, 1);
    let mut s = settings(steps, 0, HashMap::new());
    s.batch_size = batch_size;
    backend().parser(&fx.inputs(ModelFamily::Flux, s))
}

fn progress(e: &LineEvent) -> (u32, u32, Option<f32>, Option<f32>, Option<f32>) {
    match e {
        LineEvent::Progress {
            step,
            total,
            loss,
            samples_per_sec,
            epoch,
            lr,
        } => {
            assert_eq!(*lr, None, "kohya does not print the learning rate");
            (*step, *total, *loss, *samples_per_sec, *epoch)
        }
        other => panic!("not progress: {other:?}"),
    }
}

#[test]
fn a_fresh_run() {
    let mut p = parser(100, 1);
    assert!(p.line("running training / 学習開始").is_empty());
    assert!(
        p.line("  total optimization steps / 学習ステップ数: 2000")
            .is_empty()
    );
    assert!(p.line("").is_empty());
    assert!(p.line("epoch 1/16").is_empty());
    let e = p.line("steps:   0%|          | 0/2000 [00:00<?, ?it/s]");
    assert_eq!(progress(&e[0]), (0, 2000, None, None, Some(1.0)));
    // Two refreshes of one step in one piece of output: update() and set_postfix().
    let e = p.line(
        "steps:   0%|          | 1/2000 [00:02<1:10:00,  2.10s/it]\rsteps:   0%|          | 1/2000 [00:02<1:10:00,  2.10s/it, avr_loss=0.412]",
    );
    assert_eq!(e.len(), 2, "{e:?}");
    let (step, _, loss, sps, _) = progress(&e[1]);
    assert_eq!((step, loss), (1, Some(0.412)));
    assert!((sps.unwrap() - 1.0 / 2.1).abs() < 1e-4);
    // tqdm prints the same state again: nothing new.
    assert!(
        p.line("steps:   0%|          | 1/2000 [00:02<1:10:00,  2.10s/it, avr_loss=0.412]")
            .is_empty()
    );
    let e = p.line("steps: 100%|██████████| 2000/2000 [3:17:44<00:00,  1.19s/it, avr_loss=0.109]");
    assert_eq!(progress(&e[0]).0, 2000);
    assert_eq!(
        p.line("saving checkpoint: /o/job123-step00002000.safetensors"),
        []
    );
    assert_eq!(
        p.line("saving state at step 2000"),
        [LineEvent::Saved { step: Some(2000) }]
    );
    assert_eq!(
        p.line("Random states saved in /o/job123-step00002000-state/random_states_0.pkl"),
        [LineEvent::Saved { step: Some(2000) }]
    );
    assert_eq!(
        p.line("Model weights saved in /o/job123-step00002000-state/model.safetensors"),
        []
    );
    assert_eq!(p.line("saving last state."), []);
    assert_eq!(p.line("model saved."), [LineEvent::Done]);
}

#[test]
fn rates_in_both_units_and_nan_losses() {
    let mut p = parser(10, 2);
    let e = p.line("steps:  50%|█████     | 5/10 [00:01<00:01,  4.50it/s, avr_loss=0.2]");
    let (step, total, loss, sps, _) = progress(&e[0]);
    assert_eq!((step, total, loss), (5, 10, Some(0.2)));
    assert_eq!(sps, Some(9.0), "4.5 steps/s of batch 2");
    let e = p.line("steps:  60%|██████    | 6/10 [00:01<00:01,  4.40it/s, avr_loss=nan]");
    assert!(progress(&e[0]).2.unwrap().is_nan());
    let e = p.line("steps:  60%|██████    | 6/10 [00:01<00:01,  4.40it/s, avr_loss=nan]");
    assert!(e.is_empty(), "nan is compared by its bits");
    // Other bars of the run are not training progress.
    for line in [
        "validation steps:  50%|█████     | 2/4 [00:01<00:01,  2.00it/s, timestep=400, val_avg_loss=0.3]",
        "100%|██████████| 3/3 [00:00<00:00, 12.31it/s]",
        "caching latents: 100%|██████████| 3/3 [00:00<00:00, 12.31it/s]",
    ] {
        assert_eq!(p.line(line), [], "{line}");
    }
    assert!(
        p.line("override steps. steps for 16 epochs is / 指定エポックまでのステップ数: 3200")
            .is_empty()
    );
    let e = p.line("steps:  70%|███████   | 7/3200 [00:01<00:01,  4.40it/s, avr_loss=0.1]");
    assert_eq!(progress(&e[0]).1, 3200);
}

#[test]
fn a_resumed_run_counts_on_from_the_train_state() {
    let mut p = parser(2000, 1);
    assert!(
        p.line("resume training from local state: /o/job123-step00000250-state")
            .is_empty()
    );
    assert_eq!(
        p.line("load train state from /o/job123-step00000250-state/train_state.json: {'current_epoch': 1, 'current_step': 250}"),
        [LineEvent::Resumed { step: 250 }]
    );
    assert!(
        p.line("  total optimization steps / 学習ステップ数: 2000")
            .is_empty()
    );
    assert!(
        p.line("skipping 250 steps / 250ステップをスキップします")
            .is_empty()
    );
    // The bar counts the remaining 1750 steps from 0.
    let e = p.line("steps:   0%|          | 0/1750 [00:00<?, ?it/s]");
    assert_eq!(progress(&e[0]).0, 250);
    let e = p.line("steps:   0%|          | 1/1750 [00:01<31:10,  1.07s/it, avr_loss=0.0912]");
    assert_eq!(progress(&e[0]).0, 251);
    assert_eq!(progress(&e[0]).1, 2000);
    // kohya's own step numbers are already absolute.
    assert_eq!(
        p.line("saving state at step 500"),
        [LineEvent::Saved { step: Some(500) }]
    );
}

fn classify(status: ExitStatus, tail: &[&str]) -> trainyard_proto::v1::JobError {
    let tail: Vec<String> = tail.iter().map(|s| s.to_string()).collect();
    backend().classify(status, &tail)
}

#[test]
fn failures() {
    let exit1 = ExitStatus::from_raw(1 << 8);
    let exit0 = ExitStatus::from_raw(0);
    let oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which 1.06 GiB is free.";
    let cases: &[(ExitStatus, &[&str], ErrorKind, bool, &str)] = &[
        (
            exit1,
            &[
                "    accelerator.backward(loss)",
                oom,
                "subprocess.CalledProcessError: Command '['/usr/bin/python3', 'flux_train_network.py']' returned non-zero exit status 1.",
            ],
            ErrorKind::Oom,
            true,
            "CUDA out of memory",
        ),
        (
            exit0,
            &[
                "ignore subset with image_dir='/d': no images found / 画像が見つからないためサブセットを無視します",
                "No data found. Please verify arguments (train_data_dir must be the parent of folders with images) / 画像がありません。",
            ],
            ErrorKind::BadDataset,
            false,
            "No data found",
        ),
        (
            exit0,
            &[
                "not directory: /job/dataset",
                "No data found. Please verify arguments (train_data_dir …)",
            ],
            ErrorKind::BadDataset,
            false,
            "dataset folder missing: not directory: /job/dataset",
        ),
        (
            exit1,
            &["RuntimeError: NaN detected in latents: /job/dataset/img3.png"],
            ErrorKind::BadDataset,
            false,
            "img3.png",
        ),
        (
            exit1,
            &[
                "AssertionError: max_train_steps should be greater than initial step / max_train_stepsは初期ステップより大きい必要があります: 100 vs 100",
            ],
            ErrorKind::InvalidSpec,
            false,
            "100 vs 100",
        ),
        (
            exit1,
            &["ValueError: Unsupported fp8 model dtype: torch.float8_e5m2"],
            ErrorKind::Model,
            false,
            "float8_e5m2",
        ),
        (
            ExitStatus::from_raw(2 << 8),
            &["flux_train_network.py: error: unrecognized arguments: --optimiser adamw"],
            ErrorKind::InvalidSpec,
            false,
            "--optimiser",
        ),
        (
            exit1,
            &["FileNotFoundError: [Errno 2] No such file or directory: '/models/ae.safetensors'"],
            ErrorKind::InvalidSpec,
            false,
            "ae.safetensors",
        ),
        (
            exit1,
            &[
                "steps:  10%|█         | 10/100",
                "died with <Signals.SIGKILL: 9>.",
            ],
            ErrorKind::Oom,
            true,
            "signal 9",
        ),
        (
            exit1,
            &["RuntimeError: something else"],
            ErrorKind::Trainer,
            true,
            "something else",
        ),
    ];
    for (status, tail, kind, retryable, needle) in cases {
        let e = classify(*status, tail);
        assert_eq!(
            (e.kind(), e.retryable),
            (*kind, *retryable),
            "{tail:?}: {}",
            e.message
        );
        assert!(
            e.message.contains(needle),
            "{:?} lacks {needle:?}",
            e.message
        );
    }
}
