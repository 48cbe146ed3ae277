//! LoRA adapters on every linear layer, stored the way kohya's sd-scripts
//! stores them so existing tools recognise the file.
//!
//! For a base layer `blocks.0.mlp.fc1` (`W: [out, in]`) the adapter adds
//! `scale · up(down(x))` with `down: [rank, in]` (small uniform init, kohya's
//! kaiming-uniform bound `1/sqrt(in)`), `up: [out, rank]` (zero init, so the
//! adapted model starts identical to the base) and `scale = alpha / rank`.
//! Keys: `lora_unet_blocks_0_mlp_fc1.lora_down.weight`, `...lora_up.weight`,
//! `...alpha` (f32 scalar).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};

use crate::error::{Result, TrainerError};
use crate::model::{LinearHook, LinearSpec, ModelSpec};
use crate::rng::{self, Purpose};
use crate::stfile::{F32Tensor, TensorMap};

/// kohya's prefix for modules of the denoising network.
pub const KEY_PREFIX: &str = "lora_unet_";

/// kohya key stem for a dotted module name.
pub fn kohya_stem(module: &str) -> String {
    format!("{KEY_PREFIX}{}", module.replace('.', "_"))
}

struct Layer {
    spec: LinearSpec,
    down: Var,
    up: Var,
}

/// The set of adapters being trained.
pub struct LoraSet {
    rank: usize,
    alpha: f32,
    scale: f64,
    layers: BTreeMap<String, Layer>,
}

impl LoraSet {
    /// Fresh adapters for every linear layer of `spec`; `down` of layer `i`
    /// is drawn from the `(LoraInit, seed, i)` stream.
    pub fn new(
        spec: &ModelSpec,
        rank: usize,
        alpha: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let layers = spec.linear_layers();
        let smallest = layers
            .iter()
            .map(|l| l.in_dim.min(l.out_dim))
            .min()
            .unwrap_or(0);
        if rank == 0 || rank > smallest {
            return Err(TrainerError::Config(format!(
                "rank must be between 1 and {smallest} (the smallest layer dimension of this base model), got {rank}"
            )));
        }
        let mut out = BTreeMap::new();
        for (i, l) in layers.into_iter().enumerate() {
            let mut r = rng::stream(Purpose::LoraInit, seed, i as u64);
            let bound = 1.0 / (l.in_dim as f32).sqrt();
            let down: Vec<f32> = (0..rank * l.in_dim)
                .map(|_| rng::uniform(&mut r, bound))
                .collect();
            let down = Var::from_vec(down, (rank, l.in_dim), device)?;
            let up = Var::zeros((l.out_dim, rank), candle_core::DType::F32, device)?;
            out.insert(l.name.clone(), Layer { spec: l, down, up });
        }
        Ok(Self {
            rank,
            alpha,
            scale: f64::from(alpha) / rank as f64,
            layers: out,
        })
    }

    /// Trainable variables with their safetensors key, in a fixed order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (name, l) in &self.layers {
            let stem = kohya_stem(name);
            v.push((format!("{stem}.lora_down.weight"), l.down.clone()));
            v.push((format!("{stem}.lora_up.weight"), l.up.clone()));
        }
        v
    }

    /// All adapter tensors (including the `alpha` scalars), kohya layout.
    pub fn to_tensor_map(&self) -> Result<TensorMap> {
        let mut map = TensorMap::new();
        for (key, var) in self.named_vars() {
            let t = var.as_tensor();
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            map.insert(
                key,
                F32Tensor {
                    shape: t.dims().to_vec(),
                    data,
                },
            );
        }
        for name in self.layers.keys() {
            let t = F32Tensor {
                shape: vec![],
                data: vec![self.alpha],
            };
            map.insert(format!("{}.alpha", kohya_stem(name)), t);
        }
        Ok(map)
    }

    /// Overwrites the adapter weights from a map written by [`LoraSet::to_tensor_map`],
    /// checking that every key, shape and alpha matches this configuration.
    pub fn load_from(&mut self, map: &TensorMap) -> Result<()> {
        let bad = |m: String| TrainerError::Config(format!("checkpoint adapter: {m}"));
        let expected = 3 * self.layers.len();
        if map.len() != expected {
            return Err(bad(format!(
                "has {} tensors, expected {expected}",
                map.len()
            )));
        }
        for (name, l) in &self.layers {
            let stem = kohya_stem(name);
            let alpha = map.get(&format!("{stem}.alpha")).map(|t| t.data.as_slice());
            if alpha != Some(&[self.alpha][..]) {
                return Err(bad(format!(
                    "{stem}.alpha is {alpha:?}, config says {}",
                    self.alpha
                )));
            }
            let shapes = [
                ("lora_down", &l.down, [self.rank, l.spec.in_dim]),
                ("lora_up", &l.up, [l.spec.out_dim, self.rank]),
            ];
            for (part, var, shape) in shapes {
                let key = format!("{stem}.{part}.weight");
                let t = map.get(&key).ok_or_else(|| bad(format!("missing {key}")))?;
                if t.shape != shape {
                    return Err(bad(format!(
                        "{key} has shape {:?}, expected {shape:?}",
                        t.shape
                    )));
                }
                var.set(&Tensor::from_vec(
                    t.data.clone(),
                    t.shape.clone(),
                    var.device(),
                )?)?;
            }
        }
        Ok(())
    }
}

impl LinearHook for LoraSet {
    fn extra(&self, name: &str, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(l) = self.layers.get(name) else {
            return Ok(None);
        };
        let low = x.matmul(&l.down.as_tensor().t()?)?;
        Ok(Some((low.matmul(&l.up.as_tensor().t()?)? * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_kohya_convention() {
        assert_eq!(kohya_stem("blocks.0.mlp.fc1"), "lora_unet_blocks_0_mlp_fc1");
        let spec = ModelSpec::new(32).unwrap();
        let set = LoraSet::new(&spec, 4, 4.0, 1, &Device::Cpu).unwrap();
        let map = set.to_tensor_map().unwrap();
        assert_eq!(
            map["lora_unet_blocks_0_mlp_fc1.lora_down.weight"].shape,
            vec![4, 64]
        );
        assert_eq!(
            map["lora_unet_blocks_0_mlp_fc1.lora_up.weight"].shape,
            vec![256, 4]
        );
        assert_eq!(map["lora_unet_head.alpha"].data, vec![4.0]);
        assert_eq!(map.len(), 3 * spec.linear_layers().len());
        let mut other = LoraSet::new(&spec, 4, 4.0, 2, &Device::Cpu).unwrap();
        other.load_from(&map).unwrap();
        assert_eq!(other.to_tensor_map().unwrap(), map);
    }
}
