//! What SimpleTuner is told about the base model's diffusers folder.
//!
//! SimpleTuner loads each component with `from_pretrained(folder,
//! subfolder=…, variant=config.variant)`, and diffusers and transformers
//! look for exactly the file the variant names: the plain
//! `diffusion_pytorch_model.safetensors` without one, the
//! `diffusion_pytorch_model.fp16.safetensors` with `variant: fp16`. A folder
//! fetched with only the variant files (the `sdxl-base-1.0` preset) needs the
//! variant; a full snapshot needs none. The denoiser's folder tells which.
//!
//! The VAE defaults to the Hub id `madebyollin/sdxl-vae-fp16-fix` for SDXL
//! (`--pretrained_vae_model_name_or_path`), which a worker without Hub
//! access cannot fetch; the run is pointed at the base model's own VAE
//! (`vae/` in the same folder, loaded with the same variant) instead.

use std::path::Path;
use trainyard_models::ModelFamily;

/// The weight file stem of a diffusers component.
const WEIGHTS: &str = "diffusion_pytorch_model";

/// The subfolder holding the family's denoiser.
fn denoiser(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::Sdxl => "unet",
        _ => "transformer",
    }
}

/// The `variant` the base model's files need: none when the denoiser has
/// its plain weight file (or shard index), else the infix of its variant
/// file (`diffusion_pytorch_model.fp16.safetensors`,
/// `diffusion_pytorch_model.safetensors.index.fp16.json`). None as well
/// when the folder cannot be read: SimpleTuner then names the missing file.
pub(super) fn variant(folder: &Path, family: ModelFamily) -> Option<String> {
    let names: Vec<String> = std::fs::read_dir(folder.join(denoiser(family)))
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    let plain = [
        format!("{WEIGHTS}.safetensors"),
        format!("{WEIGHTS}.safetensors.index.json"),
    ];
    if names.iter().any(|n| plain.contains(n)) {
        return None;
    }
    let mut variants: Vec<&str> = names
        .iter()
        .filter_map(|name| {
            let rest = name.strip_prefix(WEIGHTS)?.strip_prefix('.')?;
            rest.strip_suffix(".safetensors").or_else(|| {
                rest.strip_prefix("safetensors.index.")?
                    .strip_suffix(".json")
            })
        })
        .filter(|v| !v.is_empty() && !v.contains('.'))
        .collect();
    variants.sort_unstable();
    variants.first().map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for file in files {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        dir
    }

    #[test]
    fn the_variant_is_what_the_denoiser_folder_holds() {
        let sdxl = ModelFamily::Sdxl;
        let fp16 = folder(&[
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ]);
        assert_eq!(variant(fp16.path(), sdxl).as_deref(), Some("fp16"));
        let both = folder(&[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ]);
        assert_eq!(variant(both.path(), sdxl), None);
        let sharded = folder(&[
            "transformer/diffusion_pytorch_model.safetensors.index.bf16.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.bf16.safetensors",
        ]);
        assert_eq!(
            variant(sharded.path(), ModelFamily::Flux).as_deref(),
            Some("bf16")
        );
        let plain_shards = folder(&["transformer/diffusion_pytorch_model.safetensors.index.json"]);
        assert_eq!(variant(plain_shards.path(), ModelFamily::Flux), None);
        assert_eq!(variant(Path::new("/no/such/folder"), sdxl), None);
    }
}
