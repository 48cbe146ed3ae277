//! AdamW, written out over candle tensors.
//!
//! candle-nn ships an AdamW, but its moment estimates are private, and a
//! resumed run must continue with *exactly* the optimizer state an
//! uninterrupted run would have had. Owning the update lets us save `m`, `v`
//! and the step count bit-for-bit and restore them.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Result, TrainerError};
use crate::stfile::{F32Tensor, Metadata, TensorMap};

/// Fixed hyper-parameters (the PyTorch AdamW defaults, weight decay 0.01).
pub const BETA1: f64 = 0.9;
/// See [`BETA1`].
pub const BETA2: f64 = 0.999;
/// Added to `sqrt(v_hat)`.
pub const EPS: f64 = 1e-8;
/// Decoupled weight decay.
pub const WEIGHT_DECAY: f64 = 0.01;

struct Slot {
    name: String,
    param: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a fixed, named list of parameters.
pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// Starts with zero moments for `params` (name, variable).
    pub fn new(params: Vec<(String, Var)>) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let m = param.as_tensor().zeros_like()?;
                let v = m.clone();
                Ok(Slot { name, param, m, v })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, step: 0 })
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update with learning rate `lr`. Parameters without a
    /// gradient are left untouched (as PyTorch does for `grad is None`).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.param.as_tensor()) else {
                continue;
            };
            slot.m = ((&slot.m * BETA1)? + (g * (1.0 - BETA1))?)?;
            slot.v = ((&slot.v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let m_hat = (&slot.m / bc1)?;
            let denom = ((&slot.v / bc2)?.sqrt()? + EPS)?;
            let update = (m_hat / denom)?;
            let p = slot.param.as_tensor();
            let next = ((p * (1.0 - lr * WEIGHT_DECAY))? - (update * lr)?)?;
            slot.param.set(&next)?;
        }
        Ok(())
    }

    /// The moments as `<param>.exp_avg` / `<param>.exp_avg_sq` tensors plus
    /// `ty_adam_step` metadata, for `optimizer.safetensors`.
    pub fn state(&self) -> Result<(TensorMap, Metadata)> {
        let mut map = TensorMap::new();
        for s in &self.slots {
            for (suffix, t) in [("exp_avg", &s.m), ("exp_avg_sq", &s.v)] {
                let data = t.flatten_all()?.to_vec1::<f32>()?;
                map.insert(
                    format!("{}.{suffix}", s.name),
                    F32Tensor {
                        shape: t.dims().to_vec(),
                        data,
                    },
                );
            }
        }
        let mut meta = Metadata::new();
        meta.insert("ty_adam_step".into(), self.step.to_string());
        meta.insert("ty_optimizer".into(), "AdamW".into());
        Ok((map, meta))
    }

    /// Restores moments and step count saved by [`AdamW::state`].
    pub fn restore(&mut self, map: &TensorMap, meta: &Metadata) -> Result<()> {
        let bad = |m: String| TrainerError::Config(format!("optimizer state: {m}"));
        self.step = meta
            .get("ty_adam_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("missing ty_adam_step".into()))?;
        for s in &mut self.slots {
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{}.{suffix}", s.name);
                let t = map.get(&key).ok_or_else(|| bad(format!("missing {key}")))?;
                if t.shape != s.m.dims() {
                    return Err(bad(format!(
                        "{key} has shape {:?}, expected {:?}",
                        t.shape,
                        s.m.dims()
                    )));
                }
                let restored = Tensor::from_vec(t.data.clone(), t.shape.clone(), s.m.device())?;
                if suffix == "exp_avg" {
                    s.m = restored;
                } else {
                    s.v = restored;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn minimises_a_quadratic() {
        let x = Var::from_vec(vec![3.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), x.clone())]).unwrap();
        for _ in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.05).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|a| a.abs() < 0.1), "{v:?}");
        let (map, meta) = opt.state().unwrap();
        let mut other = AdamW::new(vec![("x".into(), x.clone())]).unwrap();
        other.restore(&map, &meta).unwrap();
        assert_eq!(other.step_count(), 300);
        assert_eq!(other.state().unwrap().0, map);
    }
}
