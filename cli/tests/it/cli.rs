//! The `yard` binary as a user meets it: help, and argument errors that
//! fail fast with a clear message and a non-zero exit, no server needed.

use std::process::{Command, Output};

fn yard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(args)
        // Nothing listens here: a command that reaches the network fails fast.
        .env("TY_SERVER", "http://127.0.0.1:9")
        .env("TY_TOKEN", "ty_unused")
        .output()
        .expect("yard runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_lists_every_command() {
    let output = yard(&["--help"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for command in [
        "dev", "demo", "submit", "validate", "watch", "list", "get", "cancel", "fetch", "metrics",
        "webhooks", "token",
    ] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
    let output = yard(&["submit", "--help"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("--save-every"));
}

#[test]
fn submitting_a_missing_path_fails_before_any_network() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dataset");
    let output = yard(&["submit", missing.to_str().unwrap()]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.starts_with("error: dataset "), "{err}");
    assert!(err.contains("no-such-dataset"), "{err}");
    assert!(err.contains("cannot be read"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn submitting_a_file_that_is_not_a_zip_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    let output = yard(&["submit", file.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("neither a folder nor a .zip"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn mixing_image_urls_with_other_sources_is_refused() {
    let output = yard(&["submit", "https://x.test/a.png", "https://x.test/b.zip"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("not an image or clip URL"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let output = yard(&["submit"]);
    assert_eq!(output.status.code(), Some(2));
    let output = yard(&["list", "--state", "sleeping"]);
    assert_eq!(output.status.code(), Some(2));
    let output = yard(&["submit", "x", "--label", "novalue"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("key=value"));
}

#[test]
fn an_unreachable_coordinator_is_a_clear_error() {
    let output = yard(&["get", "j-1"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: cannot reach the coordinator at http://127.0.0.1:9"),
        "{err}"
    );
}

#[test]
fn no_token_is_a_clear_error_and_token_new_prints_a_hashed_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_yard"))
        .args(["list"])
        .current_dir(dir.path())
        .env("TY_SERVER", "http://127.0.0.1:9")
        .env_remove("TY_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("no token"), "{}", stderr(&output));

    let output = yard(&["token", "new", "--tenant", "acme"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token  "))
        .expect("a token line");
    let key = trainyard_core::auth::token_key(token);
    assert!(text.contains(&format!("{key:?} = \"acme\"")), "{text}");
    // The config line loads, and lets exactly that token in.
    let config = trainyard_core::Config::load_from(
        None,
        &[(
            "TY_COORDINATOR__TOKENS".into(),
            format!("{{ {key:?} = \"acme\" }}"),
        )],
        &[],
    )
    .unwrap();
    assert_eq!(config.coordinator.tokens[&key], "acme");
    assert!(
        !yard(&["token", "new", "--tenant", "no such"])
            .status
            .success()
    );
}
