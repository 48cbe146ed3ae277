//! `train --config`: the LoRA training loop and the line protocol the worker
//! reads from stdout (`ty-progress`, `ty-checkpoint`, `ty-resumed`,
//! `ty-interrupted`, `ty-done`).
//!
//! Determinism: step `k`'s batch order, timesteps and noise derive from
//! `(seed, k)` (see `rng`), the optimizer state is saved exactly, and CPU
//! matmuls are deterministic even with several threads (gemm splits work
//! over output tiles, never over the reduction dimension, and our matrices
//! are mostly below its threading threshold), so no thread pinning is
//! needed. The integration tests check byte-identical adapters across runs
//! and across a kill + resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, State};
use crate::config::{FaultAction, TrainConfig};
use crate::data::{Dataset, Order};
use crate::diffusion;
use crate::error::{Result, TrainerError};
use crate::lora::LoraSet;
use crate::meta::{self, Inputs};
use crate::model::{Denoiser, Schedule};
use crate::optim::AdamW;
use crate::rng::{self, Purpose};
use crate::stfile;

/// Exit code after a graceful SIGTERM/SIGINT (128 + SIGTERM).
pub const EXIT_INTERRUPTED: i32 = 143;

/// How a training run ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All steps done, final adapter written.
    Done,
    /// Stopped by a signal after saving a checkpoint.
    Interrupted,
}

/// Prints one protocol line on stdout and flushes it. Write errors (the
/// worker closed our stdout) are ignored: training results still land on disk.
pub fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// SIGTERM/SIGINT only set a flag; the loop checks it after each step,
/// checkpoints and exits [`EXIT_INTERRUPTED`]. Repeated signals do not force
/// an early exit (a supervisor signalling both the process and its group
/// must not cost us the checkpoint); SIGKILL is the way to force one.
fn install_signal_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).map_err(|e| TrainerError::Io {
            context: "cannot install signal handler".into(),
            source: e,
        })?;
    }
    Ok(flag)
}

struct Run {
    cfg: TrainConfig,
    output_dir: PathBuf,
    base: Denoiser,
    base_sha256: String,
    dataset: Dataset,
    lora: LoraSet,
    opt: AdamW,
    order: Order,
    schedule: Schedule,
    history: Vec<f32>,
    device: Device,
    /// Steps done before this process started (the resumed step), and the
    /// data-stream position after them: a resume with another batch size
    /// continues the stream where it stopped.
    resumed_step: u64,
    resumed_samples: u64,
}

/// Runs the job described by the config file at `config_path`.
pub fn run(config_path: &Path) -> Result<Outcome> {
    let interrupted = install_signal_flag()?;
    let mut run = Run::prepare(TrainConfig::load(config_path)?)?;
    let start = run.history.len() as u64;
    let mut last_checkpoint = start;
    for step in start + 1..=run.cfg.steps {
        let began = Instant::now();
        let (loss, epoch) = run.step(step)?;
        let secs = began.elapsed().as_secs_f64().max(1e-9);
        emit(&format!(
            "ty-progress step={step} total={} loss={loss:.6} lr={} samples_per_sec={:.2} epoch={epoch}",
            run.cfg.steps,
            run.cfg.learning_rate,
            run.cfg.batch_size as f64 / secs
        ));
        if let Some(bytes) = run
            .cfg
            .fault
            .as_ref()
            .and_then(|f| f.chatter_bytes_per_step)
        {
            chatter(step, bytes);
        }
        if let Some(action) = run
            .cfg
            .fault
            .as_ref()
            .and_then(|f| f.at(step, run.cfg.batch_size))
        {
            fire(action, step);
        }
        if run.cfg.save_every > 0 && step % run.cfg.save_every == 0 {
            run.checkpoint(step)?;
            last_checkpoint = step;
        }
        if interrupted.load(Ordering::SeqCst) {
            if last_checkpoint != step {
                run.checkpoint(step)?;
            }
            emit(&format!("ty-interrupted step={step}"));
            return Ok(Outcome::Interrupted);
        }
    }
    run.finish()?;
    Ok(Outcome::Done)
}

/// Prints about `bytes` of noise after a step (see
/// `config::Fault::chatter_bytes_per_step`), in lines of up to 100 bytes.
fn chatter(step: u64, bytes: u64) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut left = bytes;
    while left > 0 {
        let len = left.min(100) as usize;
        let prefix = format!("chatter step={step} ");
        let fill = len.saturating_sub(prefix.len() + 1);
        let _ = writeln!(out, "{prefix}{}", ".".repeat(fill));
        left -= len as u64;
    }
    let _ = out.flush();
}

/// Executes a fault-injection hook (see `config::Fault`).
fn fire(action: FaultAction, step: u64) {
    match action {
        FaultAction::Crash => std::process::abort(),
        FaultAction::Hang => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        FaultAction::ExitZero => std::process::exit(0),
        FaultAction::Oom => {
            eprintln!("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB");
            eprintln!("(fault injected by trainyard-reference at step {step})");
            std::process::exit(1);
        }
    }
}

impl Run {
    fn prepare(cfg: TrainConfig) -> Result<Self> {
        let device = Device::Cpu;
        let base = Denoiser::load(&cfg.base_model, &device)?;
        if base.spec.resolution != cfg.resolution {
            return Err(TrainerError::Config(format!(
                "resolution {} does not match the base model's {}",
                cfg.resolution, base.spec.resolution
            )));
        }
        let base_bytes = std::fs::read(&cfg.base_model).map_err(|e| {
            TrainerError::Model(format!("cannot read {}: {e}", cfg.base_model.display()))
        })?;
        let base_sha256 = hex::encode(Sha256::digest(&base_bytes));
        let dataset = Dataset::load(&cfg.dataset_dir, &base.spec)?;
        let output_dir = std::path::absolute(&cfg.output_dir)
            .map_err(|e| TrainerError::io("cannot resolve", &cfg.output_dir, e))?;
        std::fs::create_dir_all(&output_dir)
            .map_err(|e| TrainerError::io("cannot create", &output_dir, e))?;
        let lora = LoraSet::new(&base.spec, cfg.rank, cfg.alpha as f32, cfg.seed, &device)?;
        let opt = AdamW::new(lora.named_vars())?;
        let order = Order::new(dataset.samples.len(), cfg.repeats, cfg.seed);
        let mut run = Run {
            output_dir,
            base,
            base_sha256,
            dataset,
            lora,
            opt,
            order,
            schedule: Schedule::default(),
            history: Vec::new(),
            device,
            cfg,
            resumed_step: 0,
            resumed_samples: 0,
        };
        if let Some(dir) = run.cfg.resume_from.clone() {
            run.resume(&dir)?;
        }
        Ok(run)
    }

    fn resume(&mut self, dir: &Path) -> Result<()> {
        let ck = checkpoint::load(dir)?;
        let s = &ck.state;
        let mismatch = |what: &str| {
            TrainerError::Config(format!(
                "resume_from {}: {what} differs from this run's",
                dir.display()
            ))
        };
        if s.config_hash != self.cfg.hash() && s.config_hash != self.cfg.hash_with_batch_size() {
            return Err(mismatch(
                "config (learning_rate/rank/alpha/resolution/repeats/seed)",
            ));
        }
        if s.base_model_sha256 != self.base_sha256 {
            return Err(mismatch("base model"));
        }
        if s.step > self.cfg.steps {
            return Err(TrainerError::Config(format!(
                "resume_from is at step {} but steps is {}",
                s.step, self.cfg.steps
            )));
        }
        if s.dataset_fingerprint != self.dataset.fingerprint {
            eprintln!(
                "ty-warning dataset changed since the checkpoint; results will differ from an uninterrupted run"
            );
        }
        self.lora.load_from(&ck.adapter)?;
        self.opt.restore(&ck.optimizer, &ck.optimizer_meta)?;
        if self.opt.step_count() != s.adam_step {
            return Err(TrainerError::Config(format!(
                "resume_from {}: optimizer step mismatch",
                dir.display()
            )));
        }
        // Older checkpoints have no position: they were written by a run
        // with this batch size (their hash includes it).
        self.resumed_samples = s
            .samples_seen
            .unwrap_or(s.step * self.cfg.batch_size as u64);
        self.resumed_step = s.step;
        self.history = ck.state.loss_history;
        emit(&format!("ty-resumed step={}", self.history.len()));
        Ok(())
    }

    /// The data-stream position of the first sample of (1-based) `step`;
    /// for a step before this process's first, where that first starts.
    fn position(&self, step: u64) -> u64 {
        let b = self.cfg.batch_size as u64;
        self.resumed_samples + step.saturating_sub(self.resumed_step + 1) * b
    }

    /// One optimizer step (1-based `step`); returns its loss and epoch.
    fn step(&mut self, step: u64) -> Result<(f32, u64)> {
        let k = step - 1;
        let b = self.cfg.batch_size as u64;
        let start = self.position(step);
        let mut r = rng::stream(Purpose::Step, self.cfg.seed, k);
        let indices: Vec<usize> = (0..b).map(|i| self.order.image_at(start + i)).collect();
        let x0: Vec<&[f32]> = indices
            .iter()
            .map(|&i| self.dataset.samples[i].patches.as_slice())
            .collect();
        let patch_dim = self.base.spec.patch_dim();
        let batch = diffusion::noised_batch(&x0, patch_dim, &self.schedule, &mut r, &self.device)?;
        let loss = diffusion::loss(&self.base, &batch, &self.lora)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainerError::Training(format!(
                "loss is {value} at step {step}; lower learning_rate"
            )));
        }
        self.opt.step(&loss.backward()?, self.cfg.learning_rate)?;
        self.history.push(value);
        Ok((value, self.order.epoch_of(start)))
    }

    fn adapter_bytes(&self) -> Result<Vec<u8>> {
        let step = self.history.len() as u64;
        let metadata = meta::adapter_metadata(&Inputs {
            cfg: &self.cfg,
            dataset: &self.dataset,
            step,
            epoch: self.order.epoch_of(self.position(step)),
            history: &self.history,
            base_sha256: &self.base_sha256,
        });
        stfile::to_bytes(&self.lora.to_tensor_map()?, &metadata)
    }

    fn checkpoint(&self, step: u64) -> Result<()> {
        let (opt_map, opt_meta) = self.opt.state()?;
        let state = State {
            format: checkpoint::STATE_FORMAT,
            step,
            total_steps: self.cfg.steps,
            seed: self.cfg.seed,
            rng: "derived: every draw comes from ChaCha8 seeded by sha256(purpose, seed, step or epoch)".into(),
            config_hash: self.cfg.hash(),
            base_model_sha256: self.base_sha256.clone(),
            dataset_fingerprint: self.dataset.fingerprint.clone(),
            adam_step: self.opt.step_count(),
            loss_history: self.history.clone(),
            samples_seen: Some(self.position(step + 1)),
        };
        let optimizer = stfile::to_bytes(&opt_map, &opt_meta)?;
        let dir = checkpoint::save(&self.output_dir, &self.adapter_bytes()?, &optimizer, &state)?;
        emit(&format!("ty-checkpoint step={step} dir={}", dir.display()));
        Ok(())
    }

    fn finish(&self) -> Result<()> {
        let path = self
            .output_dir
            .join(format!("{}.safetensors", self.cfg.output_name));
        stfile::write_atomic(&path, &self.adapter_bytes()?)?;
        let (first, last) = meta::loss_summary(&self.history, self.cfg.steps);
        emit(&format!(
            "ty-done adapter={} steps={} loss_first={first:.6} loss_last={last:.6}",
            path.display(),
            self.history.len()
        ));
        Ok(())
    }
}
