//! End-to-end behaviour of `make-base` and `train`: determinism, learning,
//! the kohya adapter format, checkpoints, resume equality and signals.

mod common;

use common::{Fixture, fields, read_safetensors, run, train};
use nix::sys::signal::Signal;
use serde_json::json;
use std::os::unix::process::ExitStatusExt;

#[test]
fn make_base_is_deterministic_and_self_describing() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    for name in ["a", "b"] {
        let out = run(&["make-base", "--out", &path(name), "--seed", "7"]);
        assert!(out.status.success(), "{}", out.stderr);
        assert!(out.line("ty-base ").is_some(), "{:?}", out.lines);
    }
    assert!(
        run(&["make-base", "--out", &path("c"), "--seed", "8"])
            .status
            .success()
    );
    let bytes = |n: &str| std::fs::read(path(n)).unwrap();
    assert_eq!(
        bytes("a"),
        bytes("b"),
        "same seed must give identical bytes"
    );
    assert_ne!(
        bytes("a"),
        bytes("c"),
        "another seed must give other weights"
    );
    let (tensors, meta) = read_safetensors(dir.path().join("a").as_path());
    assert_eq!(meta["ty_model"], "reference-denoiser-v1");
    assert_eq!(meta["ty_resolution"], "32");
    assert_eq!(meta["ty_dim"], "64");
    assert_eq!(tensors["blocks.0.mlp.fc1.weight"].0, vec![256, 64]);
    let params: usize = tensors.values().map(|(_, d)| d.len()).sum();
    assert!(params < 300_000, "{params} params");
}

#[test]
fn short_run_learns_and_writes_a_kohya_adapter() {
    let fx = Fixture::new(4, 16);
    let cfg = fx.config("learn", json!({"steps": 40, "save_every": 20}));
    let out = train(&cfg).finish();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);

    // One progress line per step, in order, with every field.
    let progress: Vec<_> = out
        .lines
        .iter()
        .filter(|l| l.starts_with("ty-progress "))
        .collect();
    assert_eq!(progress.len(), 40);
    for (i, line) in progress.iter().enumerate() {
        let f = fields(line);
        assert_eq!(f["step"], (i + 1).to_string());
        assert_eq!(f["total"], "40");
        assert_eq!(f["lr"].parse::<f64>().unwrap(), 0.003);
        for key in ["loss", "samples_per_sec", "epoch"] {
            assert!(f[key].parse::<f64>().unwrap() >= 0.0, "{line}");
        }
    }
    assert_eq!(out.count("ty-checkpoint "), 2);

    let done = fields(out.line("ty-done ").expect("ty-done line"));
    let (first, last): (f64, f64) = (
        done["loss_first"].parse().unwrap(),
        done["loss_last"].parse().unwrap(),
    );
    assert!(last < first * 0.9, "loss did not fall: {first} -> {last}");
    assert_eq!(done["steps"], "40");
    let adapter = std::path::PathBuf::from(&done["adapter"]);
    assert_eq!(adapter, fx.out_dir("learn").join("lora.safetensors"));

    let (tensors, meta) = read_safetensors(&adapter);
    let dims = [
        ("patch_embed", 48, 64),
        ("time_embed_fc1", 64, 64),
        ("time_embed_fc2", 64, 64),
        ("blocks_0_token_mix", 16, 16),
        ("blocks_0_mlp_fc1", 64, 256),
        ("blocks_2_mlp_fc2", 256, 64),
        ("head", 64, 48),
    ];
    for (module, inp, outp) in dims {
        let stem = format!("lora_unet_{module}");
        assert_eq!(
            tensors[&format!("{stem}.lora_down.weight")].0,
            vec![4, inp],
            "{stem}"
        );
        assert_eq!(
            tensors[&format!("{stem}.lora_up.weight")].0,
            vec![outp, 4],
            "{stem}"
        );
        assert_eq!(
            tensors[&format!("{stem}.alpha")],
            (vec![], vec![4.0]),
            "{stem}"
        );
        let up = &tensors[&format!("{stem}.lora_up.weight")].1;
        assert!(up.iter().any(|&v| v != 0.0), "{stem} up was never trained");
    }
    assert_eq!(tensors.len(), 3 * 13, "13 linear layers, 3 tensors each");
    let expect = [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "4.0"),
        ("ss_steps", "40"),
        ("ss_max_train_steps", "40"),
        ("ss_base_model_version", "reference-denoiser-v1"),
        ("ss_sd_model_name", "base.safetensors"),
        ("ss_learning_rate", "0.003"),
        ("ss_resolution", "(16, 16)"),
        ("ss_num_train_images", "4"),
        ("ss_seed", "42"),
        ("ss_output_name", "lora"),
        ("ty_trigger_word", "tyzx"),
        ("modelspec.trigger_phrase", "tyzx"),
        ("ty_trainer", "trainyard-reference"),
    ];
    for (k, v) in expect {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "metadata {k}");
    }
    assert_eq!(meta["ty_loss_first"].parse::<f64>().unwrap(), first);
    assert_eq!(meta["ty_loss_last"].parse::<f64>().unwrap(), last);
    let freq: serde_json::Value = serde_json::from_str(&meta["ss_tag_frequency"]).unwrap();
    assert_eq!(freq["dataset"]["tyzx"], 4);
    assert_eq!(freq["dataset"]["shape 0"], 2);

    let ck = fx.out_dir("learn").join("checkpoints/step-00000020");
    for f in ["adapter.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(ck.join(f).is_file(), "missing {f}");
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 20);
    assert_eq!(state["loss_history"].as_array().unwrap().len(), 20);
}

#[test]
fn crash_and_resume_matches_an_uninterrupted_run_byte_for_byte() {
    let fx = Fixture::new(3, 16);
    let common = json!({"steps": 30, "save_every": 10});
    let mut a_cfg = common.clone();
    a_cfg["output_name"] = json!("a");
    let a = train(&fx.config("a", a_cfg.clone())).finish();
    assert_eq!(a.status.code(), Some(0), "{}", a.stderr);
    // Same config again: identical bytes (determinism).
    let a2 = train(&fx.config("a2", a_cfg)).finish();
    assert_eq!(a2.status.code(), Some(0), "{}", a2.stderr);
    let bytes_a = std::fs::read(fx.out_dir("a").join("a.safetensors")).unwrap();
    assert_eq!(
        bytes_a,
        std::fs::read(fx.out_dir("a2").join("a.safetensors")).unwrap()
    );

    // Run B aborts at step 14, after the step-10 checkpoint and before step 20.
    let mut b_cfg = common.clone();
    b_cfg["output_name"] = json!("a");
    b_cfg["fault"] = json!({"crash_at_step": 14});
    let b = train(&fx.config("b", b_cfg.clone())).finish();
    assert_eq!(
        b.status.signal(),
        Some(Signal::SIGABRT as i32),
        "expected an abort: {:?}",
        b.status
    );
    assert_eq!(
        fields(b.lines.last().unwrap())["step"],
        "14",
        "progress line printed before abort"
    );
    let checkpoints = fx.out_dir("b").join("checkpoints");
    let names: Vec<_> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec!["step-00000010"],
        "only the complete step-10 checkpoint exists"
    );
    assert!(!fx.out_dir("b").join("a.safetensors").exists());

    b_cfg["fault"] = json!(null);
    b_cfg["resume_from"] = json!(checkpoints.join("step-00000010"));
    let resumed = train(&fx.config("b", b_cfg)).finish();
    assert_eq!(resumed.status.code(), Some(0), "{}", resumed.stderr);
    assert_eq!(resumed.lines[0], "ty-resumed step=10");
    assert_eq!(fields(resumed.line("ty-progress").unwrap())["step"], "11");
    let bytes_b = std::fs::read(fx.out_dir("b").join("a.safetensors")).unwrap();
    assert!(
        bytes_a == bytes_b,
        "resumed adapter differs from the uninterrupted one"
    );
    let summary = |o: &common::Output| {
        let f = fields(o.line("ty-done").unwrap());
        (f["loss_first"].clone(), f["loss_last"].clone())
    };
    assert_eq!(summary(&a), summary(&resumed));
}

#[test]
fn sigterm_checkpoints_exits_143_and_resumes_exactly() {
    let fx = Fixture::new(3, 16);
    let cfg = json!({"steps": 1_000_000, "save_every": 0});
    let mut running = train(&fx.config("term", cfg));
    running.wait_line(|l| l.starts_with("ty-progress step=3 "));
    running.signal(Signal::SIGTERM);
    let out = running.finish();
    assert_eq!(out.status.code(), Some(143), "{}", out.stderr);
    let n = out.lines.len();
    let ck_line = &out.lines[n - 2];
    let int_line = &out.lines[n - 1];
    assert!(ck_line.starts_with("ty-checkpoint "), "{ck_line}");
    assert!(int_line.starts_with("ty-interrupted "), "{int_line}");
    let step: u64 = fields(int_line)["step"].parse().unwrap();
    assert_eq!(fields(ck_line)["step"], step.to_string());
    assert_eq!(
        out.count("ty-progress"),
        step as usize,
        "the current step was finished"
    );
    let dir = std::path::PathBuf::from(&fields(ck_line)["dir"]);
    assert_eq!(
        dir,
        fx.out_dir("term")
            .join(format!("checkpoints/step-{step:08}"))
    );
    assert!(dir.join("state.json").is_file());

    // Continue to step+3 and compare with a run that never stopped.
    let total = step + 3;
    let resumed = train(&fx.config("term", json!({"steps": total, "resume_from": dir}))).finish();
    assert_eq!(resumed.status.code(), Some(0), "{}", resumed.stderr);
    assert_eq!(resumed.lines[0], format!("ty-resumed step={step}"));
    let straight = train(&fx.config("straight", json!({"steps": total}))).finish();
    assert_eq!(straight.status.code(), Some(0), "{}", straight.stderr);
    let read = |name: &str| std::fs::read(fx.out_dir(name).join("lora.safetensors")).unwrap();
    assert!(
        read("term") == read("straight"),
        "resume after SIGTERM changed the result"
    );
}

#[test]
fn an_oom_run_resumes_with_a_smaller_batch_where_the_data_stopped() {
    let fx = Fixture::new(3, 16);
    // Out of memory at step 7, but only at batch size 4 and up.
    let fault = json!({"oom_at_step": 7, "oom_min_batch_size": 4});
    let heavy = json!({"steps": 12, "save_every": 5, "batch_size": 4, "fault": fault});
    let out = train(&fx.config("oom", heavy)).finish();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("CUDA out of memory"), "{}", out.stderr);
    let checkpoint = fx.out_dir("oom").join("checkpoints/step-00000005");
    let state = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(state(&checkpoint)["samples_seen"], 20);

    let lighter = json!({
        "steps": 12, "save_every": 5, "batch_size": 2, "fault": fault, "resume_from": checkpoint
    });
    let resumed = train(&fx.config("oom", lighter)).finish();
    assert_eq!(resumed.status.code(), Some(0), "{}", resumed.stderr);
    assert_eq!(resumed.lines[0], "ty-resumed step=5");
    assert_eq!(fields(resumed.line("ty-progress").unwrap())["step"], "6");
    assert_eq!(resumed.count("ty-progress"), 7);
    // Five steps of two samples after the twenty already seen.
    let later = fx.out_dir("oom").join("checkpoints/step-00000010");
    assert_eq!(state(&later)["samples_seen"], 30);
    assert!(fx.out_dir("oom").join("lora.safetensors").is_file());

    // What a checkpoint means still may not change.
    let other_seed = json!({"steps": 12, "batch_size": 2, "seed": 7, "resume_from": checkpoint});
    let refused = train(&fx.config("oom", other_seed)).finish();
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("differs"), "{}", refused.stderr);
}
