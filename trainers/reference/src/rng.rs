//! Deterministic randomness.
//!
//! Every random draw in the trainer comes from a ChaCha8 stream whose 32-byte
//! seed is `sha256("trainyard-reference" | purpose | seed | index)`. Step `k`'s
//! noise and timesteps are therefore a pure function of `(seed, k)`, an
//! epoch's shuffle a pure function of `(seed, epoch)`: nothing has to be saved
//! in a checkpoint for a resumed run to draw exactly the same numbers as an
//! uninterrupted one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// What a stream is used for; keeps streams for different purposes disjoint.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// Base model weight initialisation (`make-base`).
    BaseInit,
    /// Synthetic data and noise for the base model's short pretraining.
    BasePretrain,
    /// LoRA `lora_down` initialisation.
    LoraInit,
    /// Per-epoch shuffle of the dataset.
    EpochShuffle,
    /// Per-step timesteps and noise.
    Step,
    /// `make-demo-dataset` drawings.
    Demo,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::BaseInit => b"base-init",
            Purpose::BasePretrain => b"base-pretrain",
            Purpose::LoraInit => b"lora-init",
            Purpose::EpochShuffle => b"epoch-shuffle",
            Purpose::Step => b"step",
            Purpose::Demo => b"demo",
        }
    }
}

/// A ChaCha8 generator for `(purpose, seed, index)`.
pub fn stream(purpose: Purpose, seed: u64, index: u64) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(b"trainyard-reference\0");
    hasher.update(purpose.tag());
    hasher.update([0u8]);
    hasher.update(seed.to_le_bytes());
    hasher.update(index.to_le_bytes());
    let digest: [u8; 32] = hasher.finalize().into();
    ChaCha8Rng::from_seed(digest)
}

/// One standard-normal sample (Box-Muller; the second value is discarded to
/// keep the draw count per sample fixed and simple).
pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // u1 in (0, 1] so ln(u1) is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Uniform sample in `[-bound, bound)`.
pub fn uniform(rng: &mut ChaCha8Rng, bound: f32) -> f32 {
    ((rng.random::<f64>() * 2.0 - 1.0) * f64::from(bound)) as f32
}

/// A Fisher-Yates permutation of `0..n`.
pub fn permutation(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_pure_functions_of_their_inputs() {
        let a: Vec<f32> = (0..4)
            .map(|_| normal(&mut stream(Purpose::Step, 1, 5)))
            .collect();
        let b: Vec<f32> = (0..4)
            .map(|_| normal(&mut stream(Purpose::Step, 1, 5)))
            .collect();
        assert_eq!(a, b);
        let mut c = stream(Purpose::Step, 1, 6);
        let mut d = stream(Purpose::Step, 1, 5);
        assert_ne!(normal(&mut c), normal(&mut d));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(&mut stream(Purpose::EpochShuffle, 3, 0), 10);
        p.sort_unstable();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
    }
}
