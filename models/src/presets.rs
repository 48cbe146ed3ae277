//! Base-model references: what a job's `base_model.uri` may say, the model
//! families trainers know, and the named presets.
//!
//! A reference is one of
//! - a preset name (`flux1-dev`, `sdxl-base-1.0`, …): a family plus, for each
//!   *part* a backend may need (`transformer`, `clip_l`, `diffusers`, …),
//!   where on the Hugging Face Hub it lives;
//! - `hf://org/repo@revision/path/in/repo` (one file) or `hf://org/repo@revision`
//!   (a whole repository snapshot); the revision defaults to `main`;
//! - an artifact-store URI (`file:///…`, `s3://…`) of a `.safetensors` file.
//!
//! Non-preset references name their family in `base_model.family`.

use std::fmt;

/// The model families trainers are configured for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelFamily {
    /// The reference trainer's own denoiser.
    Reference,
    Flux,
    Sdxl,
    Wan,
    QwenImage,
    ZImage,
    /// A causal language model (TRL).
    Llm,
}

impl ModelFamily {
    pub const ALL: &[ModelFamily] = &[
        ModelFamily::Reference,
        ModelFamily::Flux,
        ModelFamily::Sdxl,
        ModelFamily::Wan,
        ModelFamily::QwenImage,
        ModelFamily::ZImage,
        ModelFamily::Llm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::Reference => "reference",
            ModelFamily::Flux => "flux",
            ModelFamily::Sdxl => "sdxl",
            ModelFamily::Wan => "wan",
            ModelFamily::QwenImage => "qwen_image",
            ModelFamily::ZImage => "z_image",
            ModelFamily::Llm => "llm",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|f| f.name() == name)
    }

    /// Image/video families train on captioned images; `Llm` on JSONL text.
    pub fn is_text(self) -> bool {
        self == ModelFamily::Llm
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of model parts, shared by presets, the cache and the backends.
pub mod part {
    /// A single-file diffusion transformer / UNet (kohya's `--pretrained_model_name_or_path` for FLUX).
    pub const TRANSFORMER: &str = "transformer";
    /// A single-file all-in-one checkpoint (SDXL `.safetensors`).
    pub const CHECKPOINT: &str = "checkpoint";
    pub const CLIP_L: &str = "clip_l";
    pub const T5XXL: &str = "t5xxl";
    /// The autoencoder (`ae.safetensors` for FLUX, a VAE file elsewhere).
    pub const AE: &str = "ae";
    /// A text encoder file (Z-Image's Qwen3 encoder, …).
    pub const TEXT_ENCODER: &str = "text_encoder";
    /// A LoRA merged into the base weights before training and left out of
    /// the result (Z-Image-Turbo's de-distill adapter).
    pub const TRAINING_ADAPTER: &str = "training_adapter";
    /// A diffusers-layout folder (model_index.json at its root).
    pub const DIFFUSERS: &str = "diffusers";
    /// The original-layout checkpoint folder (Wan's `ckpt_path`).
    pub const CKPT_DIR: &str = "ckpt_dir";
    /// A transformers-layout language model folder.
    pub const LLM: &str = "llm";
    /// A single-file model from a non-preset reference.
    pub const FILE: &str = "file";
}

/// Where one part of a preset lives on the Hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HubPart {
    pub role: &'static str,
    pub repo: &'static str,
    pub revision: &'static str,
    /// One file (`Some`) or the files matching `include` (`None`).
    pub file: Option<&'static str>,
    /// Glob patterns (`*` within a path segment, `**` across) for folder parts.
    pub include: &'static [&'static str],
}

/// A named base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub family: ModelFamily,
    /// Needs a Hub token that has accepted the model's licence.
    pub gated: bool,
    pub parts: &'static [HubPart],
}

impl Preset {
    pub fn part(&self, role: &str) -> Option<&HubPart> {
        self.parts.iter().find(|p| p.role == role)
    }
}

const fn file(role: &'static str, repo: &'static str, path: &'static str) -> HubPart {
    HubPart {
        role,
        repo,
        revision: "main",
        file: Some(path),
        include: &[],
    }
}

const fn folder(
    role: &'static str,
    repo: &'static str,
    include: &'static [&'static str],
) -> HubPart {
    HubPart {
        role,
        repo,
        revision: "main",
        file: None,
        include,
    }
}

/// What a diffusers snapshot needs (no duplicate single-file weights, no images).
const DIFFUSERS_FILES: &[&str] = &[
    "model_index.json",
    "*/*.json",
    "*/*.safetensors",
    "*/*.txt",
    "*/*.model",
];

const FLUX_ENCODERS: &str = "comfyanonymous/flux_text_encoders";
const Z_IMAGE_COMFY: &str = "Comfy-Org/z_image_turbo";
/// The LoRA that undoes Turbo's distillation while a LoRA trains on it.
const Z_IMAGE_TURBO_ADAPTER: &str = "ostris/zimage_turbo_training_adapter";

/// The presets every worker knows.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "reference-denoiser-v1",
        family: ModelFamily::Reference,
        gated: false,
        parts: &[],
    },
    Preset {
        name: "flux1-dev",
        family: ModelFamily::Flux,
        gated: true,
        parts: &[
            file(
                part::TRANSFORMER,
                "black-forest-labs/FLUX.1-dev",
                "flux1-dev.safetensors",
            ),
            file(part::AE, "black-forest-labs/FLUX.1-dev", "ae.safetensors"),
            file(part::CLIP_L, FLUX_ENCODERS, "clip_l.safetensors"),
            file(part::T5XXL, FLUX_ENCODERS, "t5xxl_fp16.safetensors"),
            folder(
                part::DIFFUSERS,
                "black-forest-labs/FLUX.1-dev",
                DIFFUSERS_FILES,
            ),
        ],
    },
    Preset {
        name: "flux1-schnell",
        family: ModelFamily::Flux,
        gated: false,
        parts: &[
            file(
                part::TRANSFORMER,
                "black-forest-labs/FLUX.1-schnell",
                "flux1-schnell.safetensors",
            ),
            file(
                part::AE,
                "black-forest-labs/FLUX.1-schnell",
                "ae.safetensors",
            ),
            file(part::CLIP_L, FLUX_ENCODERS, "clip_l.safetensors"),
            file(part::T5XXL, FLUX_ENCODERS, "t5xxl_fp16.safetensors"),
            folder(
                part::DIFFUSERS,
                "black-forest-labs/FLUX.1-schnell",
                DIFFUSERS_FILES,
            ),
        ],
    },
    Preset {
        name: "sdxl-base-1.0",
        family: ModelFamily::Sdxl,
        gated: false,
        parts: &[
            file(
                part::CHECKPOINT,
                "stabilityai/stable-diffusion-xl-base-1.0",
                "sd_xl_base_1.0.safetensors",
            ),
            // Only the fp16 weights: a loader of this folder passes
            // `variant: fp16` (SimpleTuner), or uses the checkpoint above.
            folder(
                part::DIFFUSERS,
                "stabilityai/stable-diffusion-xl-base-1.0",
                &[
                    "model_index.json",
                    "*/*.json",
                    "*/*.txt",
                    "unet/diffusion_pytorch_model.fp16.safetensors",
                    "vae/diffusion_pytorch_model.fp16.safetensors",
                    "text_encoder/model.fp16.safetensors",
                    "text_encoder_2/model.fp16.safetensors",
                ],
            ),
        ],
    },
    Preset {
        name: "wan2.1-t2v-14b",
        family: ModelFamily::Wan,
        gated: false,
        parts: &[
            folder(
                part::CKPT_DIR,
                "Wan-AI/Wan2.1-T2V-14B",
                &["*.json", "*.safetensors", "*.pth", "google/umt5-xxl/*"],
            ),
            folder(
                part::DIFFUSERS,
                "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                DIFFUSERS_FILES,
            ),
        ],
    },
    Preset {
        name: "wan2.1-t2v-1.3b",
        family: ModelFamily::Wan,
        gated: false,
        parts: &[
            folder(
                part::CKPT_DIR,
                "Wan-AI/Wan2.1-T2V-1.3B",
                &["*.json", "*.safetensors", "*.pth", "google/umt5-xxl/*"],
            ),
            folder(
                part::DIFFUSERS,
                "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                DIFFUSERS_FILES,
            ),
        ],
    },
    Preset {
        name: "qwen-image",
        family: ModelFamily::QwenImage,
        gated: false,
        parts: &[folder(part::DIFFUSERS, "Qwen/Qwen-Image", DIFFUSERS_FILES)],
    },
    Preset {
        name: "z-image-turbo",
        family: ModelFamily::ZImage,
        gated: false,
        // diffusion-pipe loads each Z-Image part as one ComfyUI-format file.
        parts: &[
            file(
                part::TRANSFORMER,
                Z_IMAGE_COMFY,
                "split_files/diffusion_models/z_image_turbo_bf16.safetensors",
            ),
            file(part::AE, Z_IMAGE_COMFY, "split_files/vae/ae.safetensors"),
            file(
                part::TEXT_ENCODER,
                Z_IMAGE_COMFY,
                "split_files/text_encoders/qwen_3_4b.safetensors",
            ),
            // Turbo is step-distilled: a LoRA trained on it directly breaks
            // the distillation, so diffusion-pipe merges this adapter first
            // (`merge_adapters`, the file its supported_models.md names).
            file(
                part::TRAINING_ADAPTER,
                Z_IMAGE_TURBO_ADAPTER,
                "zimage_turbo_training_adapter_v1.safetensors",
            ),
            folder(part::DIFFUSERS, "Tongyi-MAI/Z-Image-Turbo", DIFFUSERS_FILES),
        ],
    },
    Preset {
        name: "qwen2.5-0.5b-instruct",
        family: ModelFamily::Llm,
        gated: false,
        parts: &[folder(
            part::LLM,
            "Qwen/Qwen2.5-0.5B-Instruct",
            &["*.json", "*.safetensors", "*.txt", "*.model"],
        )],
    },
    Preset {
        name: "llama-3.2-1b-instruct",
        family: ModelFamily::Llm,
        gated: true,
        parts: &[folder(
            part::LLM,
            "meta-llama/Llama-3.2-1B-Instruct",
            &["*.json", "*.safetensors"],
        )],
    },
];

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// A file or snapshot on the Hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
    /// A file in the repository, or the whole repository when `None`.
    pub path: Option<String>,
}

/// A parsed `base_model.uri`.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    Preset(&'static Preset),
    Hub(HubRef),
    /// An artifact-store URI of a `.safetensors` file.
    Store(String),
}

/// The field of a spec's `base_model` a [`ModelRefError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelField {
    Uri,
    Family,
}

impl ModelField {
    /// The field's path in a job spec.
    pub fn path(self) -> &'static str {
        match self {
            ModelField::Uri => "base_model.uri",
            ModelField::Family => "base_model.family",
        }
    }
}

/// Why a `base_model` reference is refused: the field and, for people,
/// what is wrong with it and what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", field.path())]
pub struct ModelRefError {
    pub field: ModelField,
    pub problem: String,
}

impl ModelRefError {
    fn uri(problem: String) -> Self {
        Self {
            field: ModelField::Uri,
            problem,
        }
    }

    fn family(problem: String) -> Self {
        Self {
            field: ModelField::Family,
            problem,
        }
    }
}

impl ModelSource {
    /// Parses a reference; the error says what forms are accepted.
    pub fn parse(uri: &str) -> Result<Self, ModelRefError> {
        if let Some(p) = preset(uri) {
            return Ok(ModelSource::Preset(p));
        }
        if let Some(rest) = uri.strip_prefix("hf://") {
            return parse_hub(rest)
                .map(ModelSource::Hub)
                .map_err(ModelRefError::uri);
        }
        if uri.starts_with("file:///") || uri.starts_with("s3://") || uri.starts_with('/') {
            if !uri.ends_with(".safetensors") {
                return Err(ModelRefError::uri(format!(
                    "{uri:?}: an artifact-store model must be a .safetensors file"
                )));
            }
            return Ok(ModelSource::Store(uri.to_string()));
        }
        Err(ModelRefError::uri(format!(
            "unknown model {uri:?}: use a preset ({}), hf://org/repo@revision/file, or a .safetensors URI in the artifact store",
            PRESETS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// The family: the preset's, else the one the spec names.
    pub fn family(&self, named: &str) -> Result<ModelFamily, ModelRefError> {
        match self {
            ModelSource::Preset(p) => {
                if !named.is_empty() && named != p.family.name() {
                    return Err(ModelRefError::family(format!(
                        "preset {} is {}, not {named}",
                        p.name, p.family
                    )));
                }
                Ok(p.family)
            }
            _ => ModelFamily::from_name(named).ok_or_else(|| {
                ModelRefError::family(format!(
                    "{named:?} is not a model family; use one of {}",
                    ModelFamily::ALL
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
        }
    }
}

fn valid_repo_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_hub(rest: &str) -> Result<HubRef, String> {
    let bad = |why: &str| format!("hf://{rest}: {why}; expected hf://org/repo@revision/path");
    let mut segments = rest.splitn(3, '/');
    let org = segments.next().unwrap_or_default();
    let name_rev = segments.next().ok_or_else(|| bad("no repository name"))?;
    let path = segments.next();
    let (name, revision) = match name_rev.split_once('@') {
        Some((n, r)) => (n, r),
        None => (name_rev, "main"),
    };
    if !valid_repo_segment(org) || !valid_repo_segment(name) {
        return Err(bad("invalid organisation or repository name"));
    }
    // A revision holding '/' (a branch `exp/run-1`, `refs/pr/1`) is written
    // `%2F` after `@`, as huggingface_hub's `HfFileSystem` writes it, and
    // as the uploader's manifests name a copy on such a branch.
    let revision = trainyard_core::percent_decode(revision)
        .ok_or_else(|| bad("invalid revision (write '/' as %2F)"))?;
    if revision.is_empty()
        || !revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        || revision
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == ".." || s.starts_with('.'))
    {
        return Err(bad("invalid revision"));
    }
    let path = match path {
        None | Some("") => None,
        Some(p) => {
            if p.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
                return Err(bad("invalid path in repository"));
            }
            Some(p.to_string())
        }
    };
    Ok(HubRef {
        repo: format!("{org}/{name}"),
        revision,
        path,
    })
}

/// `*` matches within one path segment, `**` across segments.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => {
                let rest = rest.strip_prefix(b"/").unwrap_or(rest);
                (0..=s.len()).any(|i| go(rest, &s[i..]))
            }
            [b'*', rest @ ..] => {
                let mut i = 0;
                loop {
                    if go(rest, &s[i..]) {
                        return true;
                    }
                    if i == s.len() || s[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            [c, rest @ ..] => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reference_form() {
        assert!(matches!(
            ModelSource::parse("flux1-dev"),
            Ok(ModelSource::Preset(p)) if p.family == ModelFamily::Flux && p.gated
        ));
        assert_eq!(
            ModelSource::parse("hf://org/repo@v1.0/sub/model.safetensors"),
            Ok(ModelSource::Hub(HubRef {
                repo: "org/repo".into(),
                revision: "v1.0".into(),
                path: Some("sub/model.safetensors".into()),
            }))
        );
        assert_eq!(
            ModelSource::parse("hf://org/repo"),
            Ok(ModelSource::Hub(HubRef {
                repo: "org/repo".into(),
                revision: "main".into(),
                path: None,
            }))
        );
        // A revision holding '/' is written %2F (HfFileSystem's form).
        assert_eq!(
            ModelSource::parse("hf://org/repo@refs%2Fpr%2F1/x.safetensors"),
            Ok(ModelSource::Hub(HubRef {
                repo: "org/repo".into(),
                revision: "refs/pr/1".into(),
                path: Some("x.safetensors".into()),
            }))
        );
        for bad in [
            "hf://org",
            "hf://../x/y",
            "hf://org/repo@/f",
            "hf://org/repo@a%2F..%2Fb/f",
            "hf://org/repo@%2Fmain/f",
            "hf://org/repo@%ZZ/f",
            "hf://org/repo@main/../etc/passwd",
            "file:///models/x.bin",
            "llama",
        ] {
            assert!(ModelSource::parse(bad).is_err(), "{bad} was accepted");
        }
        let error = ModelSource::parse("llama").unwrap_err();
        assert_eq!(error.field, ModelField::Uri);
        assert!(error.problem.contains("flux1-dev"), "{error}");
    }

    #[test]
    fn family_comes_from_the_preset_or_the_spec() {
        let flux = ModelSource::parse("flux1-dev").unwrap();
        assert_eq!(flux.family(""), Ok(ModelFamily::Flux));
        assert!(flux.family("sdxl").is_err());
        let hub = ModelSource::parse("hf://a/b@main/x.safetensors").unwrap();
        assert_eq!(hub.family("sdxl"), Ok(ModelFamily::Sdxl));
        let error = hub.family("").unwrap_err();
        assert_eq!(error.field, ModelField::Family);
        assert!(error.problem.contains("qwen_image"));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*/*.json", "vae/config.json"));
        assert!(!glob_match("*/*.json", "a/b/config.json"));
        assert!(glob_match("**/*.json", "a/b/config.json"));
        assert!(glob_match("*.safetensors", "model.safetensors"));
        assert!(!glob_match("*.safetensors", "sub/model.safetensors"));
        assert!(glob_match(
            "google/umt5-xxl/*",
            "google/umt5-xxl/spiece.model"
        ));
    }

    #[test]
    fn every_preset_is_well_formed() {
        for p in PRESETS {
            assert!(ModelSource::parse(p.name).is_ok());
            for part in p.parts {
                assert!(part.repo.contains('/'), "{}: {}", p.name, part.repo);
                assert_eq!(part.file.is_some(), part.include.is_empty());
            }
        }
    }
}
