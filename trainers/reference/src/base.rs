//! `make-base`: deterministically create the frozen base model that LoRA
//! jobs adapt.
//!
//! Weights get PyTorch-style default initialisation from the `(BaseInit,
//! seed, tensor index)` streams. Optionally (`--pretrain-steps N`, default 0)
//! a short full-parameter pretraining on synthetic textures turns the random
//! network into a generic denoiser first. The default is 0 on purpose: a
//! well-pretrained base already denoises the flat-shape demo datasets well, so
//! a 100-200 step LoRA then improves the (noisy, timestep-dominated) loss by
//! too little to show reliably; from the seeded init the loss falls to
//! ~0.5-0.75x in every configuration we tried. Everything is deterministic,
//! so the same arguments give a byte-identical file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::patchify;
use crate::diffusion;
use crate::error::{Result, TrainerError};
use crate::model::{Denoiser, ModelSpec, NoHook, Schedule};
use crate::optim::AdamW;
use crate::rng::{self, Purpose};
use crate::stfile;

/// Synthetic images per pretraining step.
pub const PRETRAIN_BATCH: usize = 8;
/// Pretraining learning rate.
pub const PRETRAIN_LR: f64 = 2e-3;

/// What `make-base` produced.
pub struct Summary {
    /// Absolute path of the written file.
    pub path: std::path::PathBuf,
    /// Seed used.
    pub seed: u64,
    /// Architecture.
    pub spec: ModelSpec,
    /// Pretraining steps run.
    pub pretrain_steps: u64,
    /// Number of parameters.
    pub params: usize,
    /// Mean pretraining loss over the first and last 10 steps (0 without pretraining).
    pub pretrain_loss: (f64, f64),
}

/// Builds the base model for `seed` / `resolution` (pretrained for
/// `pretrain_steps`) and writes it to `out`.
pub fn make_base(out: &Path, seed: u64, resolution: usize, pretrain_steps: u64) -> Result<Summary> {
    let spec = ModelSpec::new(resolution).map_err(TrainerError::Config)?;
    let device = Device::Cpu;
    let vars = init(&spec, seed, &device)?;
    let tensors: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let model = Denoiser::from_tensors(spec, tensors)?;
    let pretrain_loss = pretrain(&model, vars, seed, pretrain_steps, &device)?;
    let mut meta = spec.metadata();
    meta.insert("ty_seed".into(), seed.to_string());
    meta.insert("ty_pretrain_steps".into(), pretrain_steps.to_string());
    let map = model.to_tensor_map()?;
    let params = map.values().map(|t| t.data.len()).sum();
    stfile::write_atomic(out, &stfile::to_bytes(&map, &meta)?)?;
    let path = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    Ok(Summary {
        path,
        seed,
        spec,
        pretrain_steps,
        params,
        pretrain_loss,
    })
}

impl Summary {
    /// The `ty-base ...` line printed on stdout.
    pub fn line(&self) -> String {
        let mut line = format!(
            "ty-base path={} params={} seed={} resolution={} pretrain_steps={}",
            self.path.display(),
            self.params,
            self.seed,
            self.spec.resolution,
            self.pretrain_steps
        );
        if self.pretrain_steps > 0 {
            let (first, last) = self.pretrain_loss;
            line.push_str(&format!(
                " pretrain_loss_first={first:.6} pretrain_loss_last={last:.6}"
            ));
        }
        line
    }
}

/// PyTorch-default initialisation: linear weights and biases uniform in
/// `±1/sqrt(in)`, LayerNorm 1/0, positional embedding N(0, 0.02²).
fn init(spec: &ModelSpec, seed: u64, device: &Device) -> Result<Vec<(String, Var)>> {
    let fan_in: BTreeMap<String, usize> = spec
        .linear_layers()
        .into_iter()
        .map(|l| (l.name, l.in_dim))
        .collect();
    let mut out = Vec::new();
    for (i, (name, shape)) in spec.tensor_shapes().into_iter().enumerate() {
        let mut r = rng::stream(Purpose::BaseInit, seed, i as u64);
        let n: usize = shape.iter().product();
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(&name);
        let data: Vec<f32> = if name == "pos_embed" {
            (0..n).map(|_| 0.02 * rng::normal(&mut r)).collect()
        } else if let Some(&fi) = fan_in.get(module) {
            let bound = 1.0 / (fi as f32).sqrt();
            (0..n).map(|_| rng::uniform(&mut r, bound)).collect()
        } else if name.ends_with(".weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        out.push((name, Var::from_vec(data, shape, device)?));
    }
    Ok(out)
}

/// Trains all base parameters for `steps` on synthetic images; returns the
/// mean loss of the first and last 10 steps (0 when there were none).
fn pretrain(
    model: &Denoiser,
    vars: Vec<(String, Var)>,
    seed: u64,
    steps: u64,
    device: &Device,
) -> Result<(f64, f64)> {
    let mut opt = AdamW::new(vars)?;
    let schedule = Schedule::default();
    let spec = model.spec;
    let mut losses = Vec::new();
    for step in 0..steps {
        let mut r = rng::stream(Purpose::BasePretrain, seed, step);
        let images: Vec<Vec<f32>> = (0..PRETRAIN_BATCH)
            .map(|_| synthetic(&mut r, &spec))
            .collect();
        let refs: Vec<&[f32]> = images.iter().map(Vec::as_slice).collect();
        let batch = diffusion::noised_batch(&refs, spec.patch_dim(), &schedule, &mut r, device)?;
        let loss = diffusion::loss(model, &batch, &NoHook)?;
        losses.push(f64::from(loss.to_scalar::<f32>()?));
        opt.step(&loss.backward()?, PRETRAIN_LR)?;
    }
    let w = losses.len().min(10);
    let mean = |s: &[f64]| {
        if s.is_empty() {
            0.0
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        }
    };
    Ok((mean(&losses[..w]), mean(&losses[losses.len() - w..])))
}

/// A random texture: a mean colour plus three oriented sinusoidal gratings
/// (4-10 cycles per image) with random per-channel amplitudes.
fn synthetic(r: &mut ChaCha8Rng, spec: &ModelSpec) -> Vec<f32> {
    let res = spec.resolution as f32;
    let mean: [f32; 3] = [r.random(), r.random(), r.random()];
    let waves: Vec<(f32, f32, f32, f32, [f32; 3])> = (0..3)
        .map(|_| {
            let angle = r.random::<f32>() * std::f32::consts::TAU;
            let freq = 4.0 + r.random::<f32>() * 6.0;
            let phase = r.random::<f32>() * std::f32::consts::TAU;
            let amp = [
                r.random::<f32>() * 0.3,
                r.random::<f32>() * 0.3,
                r.random::<f32>() * 0.3,
            ];
            (angle.cos(), angle.sin(), freq, phase, amp)
        })
        .collect();
    let img = image::RgbImage::from_fn(spec.resolution as u32, spec.resolution as u32, |x, y| {
        let (u, v) = (x as f32 / res, y as f32 / res);
        let px = |c: usize| {
            let tex: f32 = waves
                .iter()
                .map(|(dx, dy, f, p, a)| {
                    a[c] * (std::f32::consts::TAU * f * (u * dx + v * dy) + p).sin()
                })
                .sum();
            ((mean[c] + tex).clamp(0.0, 1.0) * 255.0).round() as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    });
    patchify(&img, spec)
}
