//! Shared helpers for the integration tests: every test drives the real
//! `ty-reference-trainer` binary as a child process, exactly as the worker
//! does, on a tiny dataset drawn here with the `image` crate.
//!
//! Nothing sleeps: helpers wait on a stdout line or on process exit, each
//! with a deadline, and kill the child if the deadline passes.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ty-reference-trainer");

/// Generous per-run deadline (a 40-step run takes well under a second).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A temp directory holding a dataset and a base model.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub dataset: PathBuf,
    pub base: PathBuf,
    pub resolution: usize,
}

impl Fixture {
    /// `count` drawn shapes (non-square, so cropping is exercised) with
    /// captions, plus a base model at `resolution`.
    pub fn new(count: usize, resolution: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let dataset = dir.path().join("dataset");
        std::fs::create_dir(&dataset).unwrap();
        for i in 0..count {
            draw_shape(i)
                .save(dataset.join(format!("img{i}.png")))
                .unwrap();
            std::fs::write(
                dataset.join(format!("img{i}.txt")),
                format!("tyzx, shape {}, plain", i % 2),
            )
            .unwrap();
        }
        let base = dir.path().join("base.safetensors");
        let out = run(&[
            "make-base",
            "--out",
            base.to_str().unwrap(),
            "--resolution",
            &resolution.to_string(),
        ]);
        assert!(out.status.success(), "make-base failed: {}", out.stderr);
        Fixture {
            dir,
            dataset,
            base,
            resolution,
        }
    }

    /// Writes a config with sensible small defaults, then `overrides`
    /// (a JSON object; `null` values remove a key), and returns its path.
    pub fn config(&self, name: &str, overrides: Value) -> PathBuf {
        let mut cfg = json!({
            "dataset_dir": self.dataset, "base_model": self.base,
            "base_model_name": "reference-denoiser-v1",
            "output_dir": self.dir.path().join(format!("out-{name}")), "output_name": "lora",
            "steps": 20, "learning_rate": 0.003, "rank": 4, "alpha": 4.0,
            "resolution": self.resolution, "batch_size": 2, "repeats": 1, "save_every": 0,
            "seed": 42, "trigger_word": "tyzx", "resume_from": null, "fault": null
        });
        let obj = cfg.as_object_mut().unwrap();
        for (k, v) in overrides.as_object().expect("overrides must be an object") {
            if v.is_null() && k != "resume_from" && k != "fault" {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        path
    }

    pub fn out_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("out-{name}"))
    }
}

/// A shape picture: a disc or a square on a light background, 40x36 px.
pub fn draw_shape(i: usize) -> image::RgbImage {
    let colors = [[200u8, 30, 30], [30, 60, 200], [20, 20, 20]];
    let c = colors[i % colors.len()];
    let (cx, cy, r) = (
        16.0 + (i % 3) as f32 * 4.0,
        18.0,
        8.0 + (i % 2) as f32 * 3.0,
    );
    image::RgbImage::from_fn(40, 36, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let inside = if i.is_multiple_of(2) {
            dx * dx + dy * dy < r * r
        } else {
            dx.abs() < r && dy.abs() < r
        };
        image::Rgb(if inside { c } else { [235, 230, 220] })
    })
}

/// Result of a finished run.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Output {
    /// The first stdout line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .map(String::as_str)
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.lines.iter().filter(|l| l.starts_with(prefix)).count()
    }
}

/// `key=value` fields of a protocol line (after its first word).
pub fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// A running trainer whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    rx: Receiver<String>,
    pub lines: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
    deadline: Instant,
}

pub fn spawn(args: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn trainer");
    let stdout = child.stdout.take().unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    Running {
        child,
        rx,
        lines: Vec::new(),
        stderr,
        deadline: Instant::now() + TIMEOUT,
    }
}

pub fn train(config: &Path) -> Running {
    spawn(&["train", "--config", config.to_str().unwrap()])
}

impl Running {
    /// Waits for (and returns) the next stdout line satisfying `pred`;
    /// panics (after killing the child) if stdout closes or time runs out.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.lines.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let why = if e == RecvTimeoutError::Timeout {
                        "timed out"
                    } else {
                        "stdout closed"
                    };
                    panic!("{why} waiting for a line; got {:#?}", self.lines);
                }
            }
        }
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    /// Collects the remaining output and waits for exit.
    pub fn finish(mut self) -> Output {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("trainer did not exit in time; got {:#?}", self.lines);
                }
            }
        }
        let status = self.child.wait().expect("wait");
        let stderr = self.stderr.join().unwrap_or_default();
        Output {
            status,
            lines: self.lines,
            stderr,
        }
    }
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> Output {
    spawn(args).finish()
}

/// Tensors (name → (shape, f32 data)) and metadata of a safetensors file.
pub type Loaded = (
    BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    BTreeMap<String, String>,
);

pub fn read_safetensors(path: &Path) -> Loaded {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    let meta = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    (tensors, meta)
}
