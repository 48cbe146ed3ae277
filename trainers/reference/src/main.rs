//! `ty-reference-trainer`: a small but real LoRA trainer (candle, CPU) that
//! the Trainyard worker launches as a child process exactly like it would
//! launch kohya or diffusion-pipe. `make-base` creates a deterministic base
//! model; `train --config job.json` trains a kohya-format LoRA on it and
//! speaks the `ty-*` line protocol on stdout.

mod base;
mod checkpoint;
mod config;
mod data;
mod demo;
mod diffusion;
mod error;
mod lora;
mod meta;
mod model;
mod optim;
mod rng;
mod stfile;
mod train;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::TrainerError;

#[derive(Parser)]
#[command(
    name = "ty-reference-trainer",
    version,
    about = "Trainyard's reference LoRA trainer (CPU)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic reference-denoiser-v1 base model.
    MakeBase {
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights; the same seed gives a byte-identical file.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Image resolution (multiple of 4, 8..=64).
        #[arg(long, default_value_t = 32)]
        resolution: usize,
        /// Full-parameter pretraining steps on synthetic textures (0 = plain seeded init).
        #[arg(long, default_value_t = 0)]
        pretrain_steps: u64,
    },
    /// Write a small deterministic dataset of drawn shapes with captions.
    MakeDemoDataset {
        /// Directory to fill (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Number of images.
        #[arg(long, default_value_t = 6)]
        count: usize,
        /// Side of the square PNGs in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Seed of the drawings.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Trigger word put first in every caption ("" for none).
        #[arg(long, default_value = "tyzx")]
        trigger: String,
    },
    /// Train a LoRA as described by a JSON config.
    Train {
        /// Path of the job config (see config.rs for the fields).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    single_threaded_math();
    let result = match cli.command {
        Command::MakeBase {
            out,
            seed,
            resolution,
            pretrain_steps,
        } => base::make_base(&out, seed, resolution, pretrain_steps).map(|summary| {
            train::emit(&summary.line());
            0
        }),
        Command::MakeDemoDataset {
            out,
            count,
            size,
            seed,
            trigger,
        } => demo::make_demo_dataset(&out, count, size, seed, &trigger).map(|()| {
            let dir = std::path::absolute(&out).unwrap_or(out);
            train::emit(&format!(
                "ty-demo-dataset dir={} images={count}",
                dir.display()
            ));
            0
        }),
        Command::Train { config } => train::run(&config).map(|outcome| match outcome {
            train::Outcome::Done => 0,
            train::Outcome::Interrupted => train::EXIT_INTERRUPTED,
        }),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            report(&e);
            std::process::exit(e.exit_code());
        }
    }
}

/// Re-executes this process (same pid, same arguments) with
/// `RAYON_NUM_THREADS=1` unless the caller set it.
///
/// candle sizes gemm's thread pool from that variable only, and our matrices
/// are so small that two threads run ~2x *slower* than one on a 2-core box.
/// Results do not depend on it (gemm never splits the reduction dimension;
/// the tests compare bytes), so an explicit `RAYON_NUM_THREADS` is honoured.
/// Setting the variable in-process would need `unsafe` (edition 2024), hence
/// the `exec`, which only returns if it failed.
fn single_threaded_math() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .exec();
    eprintln!(
        "ty-warning could not re-exec with RAYON_NUM_THREADS=1 ({err}); continuing multi-threaded"
    );
}

/// Prints the machine-readable error line (single line, whatever the message).
fn report(e: &TrainerError) {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    let message = message.replace(['\n', '\r'], " ");
    eprintln!("ty-error kind={} message={message}", e.kind());
}
