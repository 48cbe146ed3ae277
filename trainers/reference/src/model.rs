//! The `reference-denoiser-v1` architecture: a tiny MLP-Mixer-style
//! noise predictor, small enough to train on two CPU cores at many steps/s
//! yet built from the same pieces (patch embedding, timestep embedding,
//! residual blocks of named linear layers) that real diffusion models and
//! their LoRA tooling expect.
//!
//! Data flow for a batch of `B` images at resolution `R` (patch 4):
//! `x_t` as patches `[B*N, 48]` → `patch_embed` → `+ pos_embed + time_embed(t)`
//! → `DEPTH` × (token-mixing linear over the `N` tokens, channel MLP) with
//! pre-LayerNorm residuals → `final_norm` → `head` → predicted noise
//! `[B*N, 48]`. Patch layout inside a 48-vector is `(py, px, channel)`; the
//! loss is computed in patch space, so training never needs to unpatchify.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{D, Device, Tensor};

use crate::error::{Result, TrainerError};
use crate::stfile::{self, F32Tensor, Metadata, TensorMap};

/// Value of the `ty_model` metadata key of a base model file.
pub const MODEL_ID: &str = "reference-denoiser-v1";
/// Side of a square patch, in pixels.
pub const PATCH: usize = 4;
/// Token (channel) width.
pub const DIM: usize = 64;
/// Number of residual blocks.
pub const DEPTH: usize = 3;
/// Hidden width of the channel MLP.
pub const MLP_HIDDEN: usize = 4 * DIM;
/// Number of diffusion timesteps of the fixed schedule.
pub const TIMESTEPS: usize = 1000;
/// Linear beta schedule endpoints (as in DDPM).
pub const BETA_START: f64 = 1e-4;
/// See [`BETA_START`].
pub const BETA_END: f64 = 0.02;
/// Supported resolutions: multiples of [`PATCH`] in this range (bounded so
/// the token-mixing layers, which are `N×N`, stay small).
pub const MIN_RESOLUTION: usize = 8;
/// See [`MIN_RESOLUTION`].
pub const MAX_RESOLUTION: usize = 64;
const LN_EPS: f32 = 1e-5;

/// Shape of one linear layer, by its kohya-friendly dotted name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// Dotted module name, e.g. `blocks.0.mlp.fc1`.
    pub name: String,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
}

/// The only free hyper-parameter of the architecture is its resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Image side in pixels.
    pub resolution: usize,
}

impl ModelSpec {
    /// Checks the resolution is supported.
    pub fn new(resolution: usize) -> std::result::Result<Self, String> {
        if !resolution.is_multiple_of(PATCH)
            || !(MIN_RESOLUTION..=MAX_RESOLUTION).contains(&resolution)
        {
            return Err(format!(
                "resolution must be a multiple of {PATCH} between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {resolution}"
            ));
        }
        Ok(Self { resolution })
    }

    /// Number of tokens (patches) per image.
    pub fn tokens(&self) -> usize {
        (self.resolution / PATCH).pow(2)
    }

    /// Values per patch (RGB).
    pub fn patch_dim(&self) -> usize {
        3 * PATCH * PATCH
    }

    /// Every linear layer, in a fixed order.
    pub fn linear_layers(&self) -> Vec<LinearSpec> {
        let l = |name: String, in_dim, out_dim| LinearSpec {
            name,
            in_dim,
            out_dim,
        };
        let mut v = vec![
            l("patch_embed".into(), self.patch_dim(), DIM),
            l("time_embed.fc1".into(), DIM, DIM),
            l("time_embed.fc2".into(), DIM, DIM),
        ];
        for i in 0..DEPTH {
            v.push(l(
                format!("blocks.{i}.token_mix"),
                self.tokens(),
                self.tokens(),
            ));
            v.push(l(format!("blocks.{i}.mlp.fc1"), DIM, MLP_HIDDEN));
            v.push(l(format!("blocks.{i}.mlp.fc2"), MLP_HIDDEN, DIM));
        }
        v.push(l("head".into(), DIM, self.patch_dim()));
        v
    }

    /// Names of the LayerNorms (each has `.weight` and `.bias` of size [`DIM`]).
    pub fn norms(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..DEPTH)
            .flat_map(|i| [format!("blocks.{i}.norm1"), format!("blocks.{i}.norm2")])
            .collect();
        v.push("final_norm".into());
        v
    }

    /// Every tensor of a base model file with its shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![("pos_embed".to_owned(), vec![self.tokens(), DIM])];
        for l in self.linear_layers() {
            v.push((format!("{}.weight", l.name), vec![l.out_dim, l.in_dim]));
            v.push((format!("{}.bias", l.name), vec![l.out_dim]));
        }
        for n in self.norms() {
            v.push((format!("{n}.weight"), vec![DIM]));
            v.push((format!("{n}.bias"), vec![DIM]));
        }
        v
    }

    /// Metadata describing the architecture, stored in the base model file.
    pub fn metadata(&self) -> Metadata {
        let params: usize = self
            .tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        [
            ("ty_model", MODEL_ID.to_owned()),
            ("ty_resolution", self.resolution.to_string()),
            ("ty_patch_size", PATCH.to_string()),
            ("ty_dim", DIM.to_string()),
            ("ty_depth", DEPTH.to_string()),
            ("ty_mlp_hidden", MLP_HIDDEN.to_string()),
            ("ty_timesteps", TIMESTEPS.to_string()),
            (
                "ty_beta_schedule",
                format!("linear:{BETA_START}:{BETA_END}"),
            ),
            ("ty_params", params.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Lets a caller add a term to a linear layer's output (this is how LoRA
/// adapters plug in without the model knowing about them).
pub trait LinearHook {
    /// Extra output for layer `name` given its input `x` `[M, in]`, if any.
    fn extra(&self, name: &str, x: &Tensor) -> candle_core::Result<Option<Tensor>>;
}

/// No adapters: the plain base model.
pub struct NoHook;

impl LinearHook for NoHook {
    fn extra(&self, _: &str, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// The base model's weights as tensors (frozen, or `Var`-backed when `make-base`
/// pretrains them).
pub struct Denoiser {
    /// The architecture.
    pub spec: ModelSpec,
    tensors: BTreeMap<String, Tensor>,
}

impl Denoiser {
    /// Wraps already-built tensors; every name from [`ModelSpec::tensor_shapes`] must be present.
    pub fn from_tensors(spec: ModelSpec, tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        for (name, shape) in spec.tensor_shapes() {
            match tensors.get(&name) {
                Some(t) if t.dims() == shape.as_slice() => {}
                Some(t) => {
                    return Err(TrainerError::Model(format!(
                        "base tensor {name} has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                None => {
                    return Err(TrainerError::Model(format!(
                        "base model lacks tensor {name}"
                    )));
                }
            }
        }
        Ok(Self { spec, tensors })
    }

    /// Loads a base model file written by `make-base`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (map, meta) = stfile::read(path)?;
        let want = |k: &str| meta.get(k).map(String::as_str);
        if want("ty_model") != Some(MODEL_ID) {
            return Err(TrainerError::Model(format!(
                "{} is not a {MODEL_ID} base model (ty_model = {:?})",
                path.display(),
                want("ty_model")
            )));
        }
        let resolution = want("ty_resolution")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let spec = ModelSpec::new(resolution)
            .map_err(|e| TrainerError::Model(format!("{}: {e}", path.display())))?;
        let expected = spec.metadata();
        for key in [
            "ty_patch_size",
            "ty_dim",
            "ty_depth",
            "ty_mlp_hidden",
            "ty_timesteps",
            "ty_beta_schedule",
        ] {
            if meta.get(key) != expected.get(key) {
                return Err(TrainerError::Model(format!(
                    "{}: unsupported {key} {:?} (this trainer implements {:?})",
                    path.display(),
                    meta.get(key),
                    expected.get(key)
                )));
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, t) in map {
            tensors.insert(name, Tensor::from_vec(t.data, t.shape, device)?);
        }
        Self::from_tensors(spec, tensors)
    }

    /// The tensors as plain data, for writing a base model file.
    pub fn to_tensor_map(&self) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (name, t) in &self.tensors {
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            out.insert(
                name.clone(),
                F32Tensor {
                    shape: t.dims().to_vec(),
                    data,
                },
            );
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))
    }

    fn linear(&self, name: &str, x: &Tensor, hook: &dyn LinearHook) -> candle_core::Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let b = self.get(&format!("{name}.bias"))?;
        let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
        match hook.extra(name, x)? {
            Some(extra) => y + extra,
            None => Ok(y),
        }
    }

    fn norm(&self, name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.get(&format!("{name}.weight"))?;
        let b = self.get(&format!("{name}.bias"))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(var + f64::from(LN_EPS))?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    /// Predicts the noise in `xt` (`[B*N, patch_dim]`) at integer timesteps `t` (`B` of them).
    pub fn forward(
        &self,
        xt: &Tensor,
        t: &[u32],
        hook: &dyn LinearHook,
    ) -> candle_core::Result<Tensor> {
        let (b, n, d) = (t.len(), self.spec.tokens(), DIM);
        let temb = timestep_embedding(t, xt.device())?;
        let temb = self.linear("time_embed.fc1", &temb, hook)?.silu()?;
        let temb = self.linear("time_embed.fc2", &temb, hook)?;
        let mut h = self
            .linear("patch_embed", xt, hook)?
            .reshape((b, n, d))?
            .broadcast_add(self.get("pos_embed")?)?
            .broadcast_add(&temb.unsqueeze(1)?)?;
        for i in 0..DEPTH {
            let x = self.norm(&format!("blocks.{i}.norm1"), &h)?;
            let x = x.transpose(1, 2)?.contiguous()?.reshape((b * d, n))?;
            let x = self
                .linear(&format!("blocks.{i}.token_mix"), &x, hook)?
                .gelu()?;
            h = (h + x.reshape((b, d, n))?.transpose(1, 2)?)?;
            let x = self
                .norm(&format!("blocks.{i}.norm2"), &h)?
                .reshape((b * n, d))?;
            let x = self
                .linear(&format!("blocks.{i}.mlp.fc1"), &x, hook)?
                .gelu()?;
            let x = self.linear(&format!("blocks.{i}.mlp.fc2"), &x, hook)?;
            h = (h + x.reshape((b, n, d))?)?;
        }
        let x = self.norm("final_norm", &h)?.reshape((b * n, d))?;
        self.linear("head", &x, hook)
    }
}

/// Sinusoidal embedding of integer timesteps, `[B, DIM]` (sin half, cos half).
pub fn timestep_embedding(t: &[u32], device: &Device) -> candle_core::Result<Tensor> {
    let half = DIM / 2;
    let mut v = Vec::with_capacity(t.len() * DIM);
    for &step in t {
        let ang: Vec<f64> = (0..half)
            .map(|i| f64::from(step) * (-(10_000f64).ln() * i as f64 / half as f64).exp())
            .collect();
        v.extend(ang.iter().map(|a| a.sin() as f32));
        v.extend(ang.iter().map(|a| a.cos() as f32));
    }
    Tensor::from_vec(v, (t.len(), DIM), device)
}

/// The fixed DDPM noise schedule: `x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// `sqrt(alpha_bar_t)` for each t.
    pub sqrt_ab: Vec<f32>,
    /// `sqrt(1 - alpha_bar_t)` for each t.
    pub sqrt_one_minus_ab: Vec<f32>,
}

impl Default for Schedule {
    fn default() -> Self {
        let mut ab = 1.0f64;
        let (mut s, mut s1) = (Vec::with_capacity(TIMESTEPS), Vec::with_capacity(TIMESTEPS));
        for i in 0..TIMESTEPS {
            let beta = BETA_START + (BETA_END - BETA_START) * i as f64 / (TIMESTEPS - 1) as f64;
            ab *= 1.0 - beta;
            s.push(ab.sqrt() as f32);
            s1.push((1.0 - ab).sqrt() as f32);
        }
        Self {
            sqrt_ab: s,
            sqrt_one_minus_ab: s1,
        }
    }
}
