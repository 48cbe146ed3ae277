"""How the real stacks find a model's files on local disk, for the stand-ins
that load a base model the way diffusers and transformers do:

- a component of a diffusers folder (`from_pretrained(folder,
  subfolder=..., variant=...)`): its `config.json`, and the weights under
  the name the variant gives. diffusers and transformers look for exactly
  that name: without a variant the plain `diffusion_pytorch_model.safetensors`
  (`model.safetensors`), with `variant="fp16"` the
  `diffusion_pytorch_model.fp16.safetensors` (`model.fp16.safetensors`); a
  local folder has no fallback from one to the other;
- a Hub id (`org/name`): the stand-ins have no network, so like an offline
  load it is found only in the Hugging Face cache (`HF_HUB_CACHE`, else
  `HF_HOME/hub`, else `~/.cache/huggingface/hub`) and fails otherwise with
  the error diffusers raises when it cannot reach the Hub.
"""
import json
import os
import re

# The weight file stems per library.
WEIGHTS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
# Pipeline components that hold no weights (configs and vocabularies only).
NO_WEIGHTS = ("Tokenizer", "Scheduler", "Processor", "FeatureExtractor")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB = "https://huggingface.co"


def weight_names(library, variant):
    """The single-file and sharded-index names `from_pretrained` looks for."""
    stem = WEIGHTS[library]
    if variant:
        return [f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"]
    return [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]


def check_component(folder, subfolder, library, variant=None):
    """Raises the OSError `from_pretrained` raises when `folder/subfolder`
    lacks its config or the weights the variant names."""
    directory = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise OSError(f"Error no file named config.json found in directory {directory}.")
    names = weight_names(library, variant)
    if any(os.path.isfile(os.path.join(directory, name)) for name in names):
        return
    if library == "diffusers":
        raise OSError(f"Error no file named {names[0]} found in directory {directory}.")
    bin_name = f"pytorch_model.{variant}.bin" if variant else "pytorch_model.bin"
    raise OSError(f"Error no file named {bin_name}, {names[0]} found in directory {directory}.")


def pipeline_components(folder):
    """`(name, library)` of each component with weights that
    `model_index.json` lists, as `DiffusionPipeline.from_pretrained` loads them."""
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        library, cls = value
        if library in WEIGHTS and not any(word in cls for word in NO_WEIGHTS):
            yield name, library


def is_hub_id(path):
    return isinstance(path, str) and bool(HUB_ID.match(path)) and not os.path.exists(path)


def hub_cache():
    cache = os.environ.get("HF_HUB_CACHE")
    if cache:
        return cache
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_snapshot(repo_id):
    """The cached snapshot folder of a Hub repository, or None."""
    snapshots = os.path.join(hub_cache(), "models--" + repo_id.replace("/", "--"), "snapshots")
    found = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    return os.path.join(snapshots, found[0]) if found else None


def offline_error(repo_id, filename):
    """What diffusers raises for a Hub id it can neither download nor find cached."""
    return OSError(
        f"We couldn't connect to '{HUB}' to load this model, couldn't find it in the cached files and it "
        f"looks like {repo_id} is not the path to a directory containing a file named {filename}.\n"
        "Checkout your internet connection or see how to run the library in offline mode at "
        "'https://huggingface.co/docs/diffusers/installation#offline-mode'."
    )
