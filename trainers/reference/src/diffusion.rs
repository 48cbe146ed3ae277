//! The DDPM training objective shared by `make-base` pretraining and LoRA
//! training: pick a timestep per sample, noise the clean patches with the
//! fixed schedule, and regress the noise with an MSE loss.

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::model::{Denoiser, LinearHook, Schedule, TIMESTEPS};
use crate::rng;

/// One noised batch in patch layout.
pub struct Batch {
    /// `x_t`, `[B*N, patch_dim]`.
    pub xt: Tensor,
    /// The noise that was added, same shape (the regression target).
    pub eps: Tensor,
    /// Timestep of each sample.
    pub t: Vec<u32>,
}

/// Builds `x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps` for each clean sample in
/// `x0` (each `N*patch_dim` values). Draws, in order: per sample one uniform
/// timestep, then its noise values.
pub fn noised_batch(
    x0: &[&[f32]],
    patch_dim: usize,
    schedule: &Schedule,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> candle_core::Result<Batch> {
    let total: usize = x0.iter().map(|s| s.len()).sum();
    let (mut xt, mut eps, mut t) = (
        Vec::with_capacity(total),
        Vec::with_capacity(total),
        Vec::new(),
    );
    for sample in x0 {
        let step = rng.random_range(0..TIMESTEPS);
        let (a, s) = (schedule.sqrt_ab[step], schedule.sqrt_one_minus_ab[step]);
        for &x in *sample {
            let e = rng::normal(rng);
            xt.push(a * x + s * e);
            eps.push(e);
        }
        t.push(step as u32);
    }
    let rows = total / patch_dim;
    Ok(Batch {
        xt: Tensor::from_vec(xt, (rows, patch_dim), device)?,
        eps: Tensor::from_vec(eps, (rows, patch_dim), device)?,
        t,
    })
}

/// Mean squared error between predicted and true noise (a scalar tensor).
pub fn loss(model: &Denoiser, batch: &Batch, hook: &dyn LinearHook) -> candle_core::Result<Tensor> {
    let pred = model.forward(&batch.xt, &batch.t, hook)?;
    (pred - &batch.eps)?.sqr()?.mean_all()
}
