//! Bad inputs fail fast with exit 2 and a `ty-error kind=...` line; the
//! `fault` test hooks misbehave exactly as documented.

mod common;

use common::{Fixture, fields, train};
use nix::sys::signal::Signal;
use serde_json::json;
use std::os::unix::process::ExitStatusExt;

fn expect_error(out: &common::Output, kind: &str) {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", out.stderr);
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("ty-error "))
        .unwrap_or_else(|| panic!("no ty-error line in {:?}", out.stderr));
    assert!(
        line.starts_with(&format!("ty-error kind={kind} message=")),
        "{line}"
    );
    assert!(out.line("ty-progress").is_none());
}

#[test]
fn bad_configs_exit_2_with_a_typed_error() {
    let fx = Fixture::new(2, 16);
    let cases = [
        ("steps0", json!({"steps": 0}), "config"),
        ("unknown", json!({"learning_rat": 0.1}), "config"),
        ("missing", json!({"seed": null}), "config"),
        ("badfault", json!({"fault": {"crash_at": 3}}), "config"),
        ("slash", json!({"output_name": "a/b"}), "config"),
        ("resolution", json!({"resolution": 32}), "config"),
        ("rank", json!({"rank": 17}), "config"),
        (
            "nobase",
            json!({"base_model": fx.dir.path().join("nope.safetensors")}),
            "model",
        ),
        (
            "nodir",
            json!({"dataset_dir": fx.dir.path().join("nope")}),
            "dataset",
        ),
        (
            "resume",
            json!({"resume_from": fx.dir.path().join("nope")}),
            "config",
        ),
    ];
    for (name, overrides, kind) in cases {
        let out = train(&fx.config(name, overrides)).finish();
        expect_error(&out, kind);
    }
    let out = common::run(&["train", "--config", "/nonexistent/config.json"]);
    expect_error(&out, "config");

    // A base model that is not a safetensors file at all.
    let junk = fx.dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    expect_error(
        &train(&fx.config("junk", json!({"base_model": junk}))).finish(),
        "model",
    );
}

#[test]
fn a_dataset_of_broken_images_is_a_dataset_error() {
    let fx = Fixture::new(1, 16);
    let broken = fx.dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("a.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(broken.join("b.jpg"), b"").unwrap();
    std::fs::write(broken.join("notes.txt"), b"just text").unwrap();
    let out = train(&fx.config("broken", json!({"dataset_dir": broken}))).finish();
    expect_error(&out, "dataset");
    assert!(out.stderr.contains("no usable image"), "{}", out.stderr);

    // One good image among broken ones is enough.
    common::draw_shape(0).save(broken.join("good.png")).unwrap();
    let out = train(&fx.config("broken", json!({"dataset_dir": broken, "steps": 2}))).finish();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("skipping"), "{}", out.stderr);
}

#[test]
fn oom_fault_prints_the_cuda_message_and_exits_1() {
    let fx = Fixture::new(2, 16);
    let out = train(&fx.config("oom", json!({"fault": {"oom_at_step": 2}}))).finish();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .contains("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        "{}",
        out.stderr
    );
    assert_eq!(out.count("ty-progress"), 2);
}

#[test]
fn exit_zero_fault_leaves_no_adapter() {
    let fx = Fixture::new(2, 16);
    let out = train(&fx.config(
        "zero",
        json!({"fault": {"exit_zero_without_output_at_step": 3}}),
    ))
    .finish();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.count("ty-progress"), 3);
    assert!(out.line("ty-done").is_none());
    assert!(!fx.out_dir("zero").join("lora.safetensors").exists());
}

#[test]
fn hang_fault_goes_silent_until_killed() {
    let fx = Fixture::new(2, 16);
    let mut running =
        train(&fx.config("hang", json!({"steps": 1000, "fault": {"hang_at_step": 2}})));
    running.wait_line(|l| l.starts_with("ty-progress step=2 "));
    running.signal(Signal::SIGTERM); // ignored by a wedged trainer
    running.signal(Signal::SIGKILL);
    let out = running.finish();
    assert_eq!(
        out.status.signal(),
        Some(Signal::SIGKILL as i32),
        "{:?}",
        out.status
    );
    assert!(out.line("ty-checkpoint").is_none() && out.line("ty-interrupted").is_none());
    let last = out.lines.last().unwrap();
    assert_eq!(
        fields(last)["step"],
        "2",
        "nothing after the hang: {:?}",
        out.lines
    );
}
