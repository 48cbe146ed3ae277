#!/usr/bin/env python3
"""Stand-in for SimpleTuner's `simpletuner/train.py` (bghira/SimpleTuner).

Launched the way the real one is (`accelerate launch ... train.py`, cwd the
run folder, CONFIG_BACKEND=json CONFIG_PATH=config.json), it reads
config.json and the multidatabackend.json it names, checks them the way
SimpleTuner does, and behaves like SimpleTuner at the process level:

- log lines `[RANK 0] <time> [LEVEL] message` on stdout, the startup block
  (`-  Total optimization steps = N`, `  - Steps completed: N`);
- the step bar on stderr, `\\r`-updated: `Epoch 1/4, Steps:  10%|...| 10/100
  [..., lr=0.0001, step_loss=0.123]`, with absolute steps;
- the base model loaded as SimpleTuner loads it: the text encoders and the
  VAE (`pretrained_vae_model_name_or_path`, by default the Hub id
  madebyollin/sdxl-vae-fp16-fix for SDXL) before the data backends, the
  denoiser after, each with `variant`: the files the variant names must be
  there (`../_shared/model_files.py`), and a Hub id must be in the HF cache;
- JSON events POSTed to every `raw` entry of `webhook_config`
  (training.status, lifecycle.stage, training.checkpoint, error);
- `output_dir/checkpoint-<step>/` with the accelerate state, the LoRA
  weights, training_state.json, the manifest and `.guard` written last;
  `checkpoint_save completed` is sent after the accelerate state, before
  the guard; `training.checkpoint` once the folder is complete;
- `resume_from_checkpoint: latest`, and a checkpoint at the next step when
  `manual_checkpoint` grows in SIMPLETUNER_ACCELERATE_SIGNAL_FILE;
- datasets as helpers/data_backend/factory.py and the discovery metadata
  backend read them: `dataset_type` image or video (plus text_embeds); a
  video dataset's `video` block completed and checked as factory.py does
  (num_frames defaults to framerate x 5 with a warning, min_frames to
  num_frames, min_frames < num_frames refused, Wan's counts rounded down
  to 8n+1); each clip (counted with ffprobe) trimmed to 8n+1 for Wan,
  skipped below min_frames or above max_frames, else cut to its first
  num_frames frames, and a line `stand-in: video <file> frames=N
  num_frames=M` says so. Every media file of a dataset's folder is listed
  (images and clips alike, as upstream lists them); a clip in an image
  dataset or an image in a video dataset fails (DATALOADER.md: "Don't
  combine images and video in a single dataset");
- `output_dir/pytorch_lora_weights.safetensors` at the end; SIGINT is caught
  (webhook "interrupted", exit 0, no save); SIGTERM is not handled.

Stand-in controls, from the environment:
  STANDIN_STEP_SECONDS  sleep per step (default 0.02)
  STANDIN_SAVE_SECONDS  how long a checkpoint save takes between the
                        `checkpoint_save completed` event and `.guard`
                        (default 0)
  STANDIN_FAULT         oom@N | hang@N | exit0@N | crash@N
  STANDIN_NAN_FROM      N: the loss is nan from step N (SimpleTuner then
                        stops with "Non-finite training loss detected")
"""
import datetime
import json
import math
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

sys.dont_write_bytecode = True  # keep the test tree free of __pycache__
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "_shared"))
from standin_common import (  # noqa: E402
    Bar, HFValidationError, OutOfMemoryError, count_frames, fault, read_safetensors_header,
    write_safetensors)
import model_files  # noqa: E402

MODEL_FAMILIES = [
    "sd1x", "sd2x", "sd3", "deepfloyd", "sana", "sdxl", "kolors", "flux", "wan",
    "ltxvideo", "pixart_sigma", "omnigen", "hidream", "auraflow", "lumina2",
    "cosmos2image", "qwen_image", "hunyuanvideo", "chroma",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# helpers/training/__init__.py video_file_extensions.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v", ".mpeg", ".mpg", ".3gp", ".ogv")
DATASET_TYPES = ["image", "video", "audio", "text_embeds", "image_embeds", "conditioning_image_embeds",
                 "conditioning"]
CAPTION_STRATEGIES = ["filename", "textfile", "instance_prompt", "instanceprompt", "parquet", "huggingface"]
OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.57 GiB "
    "of which 1.12 GiB is free. Including non-PyTorch memory, this process has 22.44 GiB memory "
    "in use. Of the allocated memory 21.80 GiB is allocated by PyTorch, and 312.45 MiB is reserved "
    "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation "
    "for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
# Weight names per family, in diffusers/PEFT form.
LORA_MODULES = {
    "flux": ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k"],
    "sdxl": ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"],
    "wan": ["transformer.blocks.0.attn1.to_q", "transformer.blocks.0.attn2.to_k"],
    "qwen_image": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj"],
}
# The `--pretrained_vae_model_name_or_path` default (the field registry's
# second, overriding, registration); cmd_args drops it for the families
# that do not use the SDXL VAE.
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"
SDXL_VAE_FAMILIES = ("sdxl", "pixart_sigma", "kolors")
# What each family loads from the base model folder: its text encoders
# (transformers) and its denoiser (diffusers).
TEXT_ENCODERS = {"sdxl": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder", "text_encoder_2"],
                 "wan": ["text_encoder"], "qwen_image": ["text_encoder"]}
DENOISER = {"sdxl": "unet"}


def log(level, message):
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    print(f"[RANK 0] {stamp} [{level}] {message}", flush=True)


class Webhooks:
    """The `raw` webhook backends of `webhook_config` (helpers/webhooks)."""

    def __init__(self, raw=None, job_id=None):
        self.urls = []
        self.job_id = job_id
        if raw in (None, "", "None"):
            return
        configs = json.loads(raw) if isinstance(raw, str) else raw
        if isinstance(configs, dict):
            configs = [configs]
        for config in configs:
            if config.get("webhook_type") not in ("discord", "raw"):
                raise ValueError("Invalid webhook type specified in config. Supported values: ['discord', 'raw']")
            if config["webhook_type"] == "raw":
                if not config.get("callback_url"):
                    raise ValueError("Missing fields on webhook config: ['callback_url']")
                self.urls.append(config["callback_url"])

    def _post(self, payload):
        try:
            # requests refuses NaN in json=, so such an event is not sent.
            body = json.dumps(payload, allow_nan=False).encode()
        except ValueError:
            return
        for url in self.urls:
            request = urllib.request.Request(
                url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
            except (urllib.error.URLError, OSError):
                pass  # connection problems are ignored, as SimpleTuner does

    def send(self, message):
        self._post({"message": message, "images": []})

    def send_raw(self, payload, message_type=None, level="info"):
        payload = dict(payload)
        if message_type and "type" not in payload:
            payload["type"] = message_type
        if self.job_id and payload.get("job_id") is None:
            payload["job_id"] = self.job_id
        payload.setdefault("severity", level)
        payload.setdefault("timestamp", datetime.datetime.now(tz=datetime.timezone.utc).isoformat())
        self._post(payload)

    def stage(self, key, label, status, message, level="info", **progress):
        event = {"type": "lifecycle.stage", "severity": level, "job_id": self.job_id,
                 "stage": {"key": key, "label": label, "status": status},
                 "message": message, "title": message.splitlines()[0]}
        if progress:
            event["stage"]["progress"] = dict(progress, label=label)
        self.send_raw(event, level=level)

    def status(self, status, current, total, metrics, message=None, label=None):
        progress = {"current": current, "total": total, "percent": current / total * 100 if total else None,
                    "metrics": metrics}
        if label:
            progress["label"] = label
        event = {"type": "training.status", "job_id": self.job_id,
                 "title": status.replace("_", " ").title(), "data": {"status": status, "global_step": current},
                 "progress": progress}
        if message:
            event["message"] = message
        self.send_raw(event)


def lora_tensors(family, rank, step):
    tensors = {}
    for i, module in enumerate(LORA_MODULES.get(family, LORA_MODULES["flux"])):
        down = [math.sin(step * 0.01 + i + j) * 0.01 for j in range(rank * 8)]
        up = [math.cos(step * 0.01 + i + j) * 0.001 for j in range(8 * rank)]
        tensors[f"{module}.lora_A.weight"] = ([rank, 8], down)
        tensors[f"{module}.lora_B.weight"] = ([8, rank], up)
    return tensors


def loss_at(step, total):
    nan_from = os.environ.get("STANDIN_NAN_FROM")
    if nan_from and step >= int(nan_from):
        return float("nan")
    return 0.05 + 0.45 * math.exp(-3.0 * step / max(total, 1)) + 0.01 * math.sin(step)


def usage_error(message):
    print("usage: train.py [-h] --model_family {" + ",".join(MODEL_FAMILIES) + "} [--model_type {full,lora}] ...",
          file=sys.stderr)
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_config():
    if os.environ.get("CONFIG_BACKEND", "env") != "json":
        raise ValueError("this stand-in reads CONFIG_BACKEND=json only")
    path = os.environ.get("CONFIG_PATH") or "config/config.json"
    tried = [path] if path.endswith(".json") else [path, path + ".json"]
    found = next((p for p in tried if os.path.isfile(p)), None)
    if found is None:
        raise ValueError(f"JSON configuration file not found. Paths tried: {', '.join(tried)}")
    with open(found) as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as e:
            raise ValueError(f"Failed to parse JSON file {found}: {e}")
    log("INFO", f"[CONFIG.JSON] Loaded configuration from {found}")
    config = {k.lstrip("-"): v for k, v in raw.items()}
    missing = [f"--{k}" for k in ("model_family", "data_backend_config") if config.get(k) in (None, "")]
    if missing:
        usage_error(f"the following arguments are required: {', '.join(missing)}")
    if config["model_family"] not in MODEL_FAMILIES:
        choices = ", ".join(f"'{f}'" for f in MODEL_FAMILIES)
        usage_error(f"argument --model_family: invalid choice: '{config['model_family']}' (choose from {choices})")
    for key, kind in (("max_train_steps", int), ("train_batch_size", int), ("lora_rank", int),
                      ("checkpoint_step_interval", int), ("checkpoints_total_limit", int),
                      ("learning_rate", float), ("lora_alpha", float)):
        if config.get(key) is not None:
            try:
                config[key] = kind(config[key])
            except (TypeError, ValueError):
                usage_error(f"argument --{key}: invalid {kind.__name__} value: '{config[key]}'")
    return config


def check_model(path):
    if path in (None, ""):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.")
    if path.startswith(("/", ".")) and not os.path.exists(path):
        raise HFValidationError(f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{path}'. "
                                "Use `repo_type` argument if needed.")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise OSError(f"Error no file named model_index.json found in directory {path}.")


def vae_path(config):
    """cmd_args: the VAE option, its default, and `vae_path`."""
    vae = config.get("pretrained_vae_model_name_or_path", DEFAULT_VAE)
    if vae in ("", "''") or (vae and config["model_family"] not in SDXL_VAE_FAMILIES and "sdxl" in vae):
        vae = None
    path = vae or config.get("pretrained_model_name_or_path")
    log("INFO", f"VAE Model: {path}")
    return path


def load_vae(path, variant):
    """ModelFoundation.load_vae: `subfolder="vae"` first, then the folder itself."""
    if model_files.is_hub_id(path):
        snapshot = model_files.cached_snapshot(path)
        if snapshot is None:
            raise model_files.offline_error(path, "config.json")
        path = snapshot
    try:
        model_files.check_component(path, "vae", "diffusers", variant)
    except OSError:
        model_files.check_component(path, None, "diffusers", variant)


def load_text_encoders(config):
    """init_preprocessing_models: the text encoders, then the VAE."""
    path, variant = config["pretrained_model_name_or_path"], config.get("variant")
    for subfolder in TEXT_ENCODERS.get(config["model_family"], []):
        model_files.check_component(path, subfolder, "transformers", variant)
    load_vae(vae_path(config), variant)


def load_base_model(config):
    """init_load_base_model: the denoiser, with `variant` and `use_safetensors=True`."""
    path, family = config["pretrained_model_name_or_path"], config["model_family"]
    model_files.check_component(path, DENOISER.get(family, "transformer"), "diffusers", config.get("variant"))


def adjust_video_frames(family, frames):
    """Wan.adjust_video_frames (helpers/models/wan/model.py): 8n+1, rounded down."""
    if family != "wan" or frames % 8 == 1:
        return frames
    return max(((frames - 1) // 8) * 8 + 1, 1)


def video_config(backend, config):
    """factory.py: a video dataset's `video` block, completed and checked."""
    video = dict(backend.get("video") or {})
    if "num_frames" not in video:
        framerate = int(config.get("framerate") or 30)
        log("WARNING", f"No `num_frames` was provided for video backend. Defaulting to {framerate * 5} "
                       f"(5 seconds @ {framerate}fps) to avoid memory implosion/explosion. Reduce value further "
                       "for lower memory use.")
        video["num_frames"] = framerate * 5
    if "min_frames" not in video:
        log("WARNING", f"No `min_frames` was provided for video backend. Defaulting to {video['num_frames']} "
                       "frames (num_frames). Reduce num_frames further for lower memory use.")
        video["min_frames"] = video["num_frames"]
    if "max_frames" not in video:
        log("WARNING", "No `max_frames` was provided for video backend. Set this value to avoid scanning huge "
                       "video files.")
    flavour = str(config.get("model_flavour") or "").lower()
    if config["model_family"] == "wan" and flavour.startswith("i2v-"):
        video["is_i2v"] = True
    elif "is_i2v" not in video:
        log("WARNING", "No value for is_i2v was supplied for your dataset. Assuming it is disabled.")
        video["is_i2v"] = False
    min_frames, num_frames = video["min_frames"], video["num_frames"]
    if not any([isinstance(min_frames, int), isinstance(num_frames, int)]):
        raise ValueError(f"video->min_frames and video->num_frames must be integers. Received "
                         f"min_frames={min_frames} and num_frames={num_frames}.")
    if min_frames < 1 or num_frames < 1:
        raise ValueError(f"video->min_frames and video->num_frames must be greater than 0. Received "
                         f"min_frames={min_frames} and num_frames={num_frames}.")
    if min_frames < num_frames:
        raise ValueError(f"video->min_frames must be greater than or equal to video->num_frames. Received "
                         f"min_frames={min_frames} and num_frames={num_frames}.")
    for key in ("min_frames", "num_frames"):
        adjusted = adjust_video_frames(config["model_family"], video[key])
        if adjusted != video[key]:
            log("WARNING", f"(id={backend['id']}) Adjusted video->{key} from {video[key]} to {adjusted} to "
                           "satisfy Wan model constraints.")
            video[key] = adjusted
    return video


def media_files(backend, folder):
    """LocalDataBackend.list_files with every media extension, links followed."""
    if not folder:
        raise ValueError("instance_data_dir must be specified.")
    found = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))
    kind = backend.get("dataset_type", "image")
    wrong = [os.path.basename(f) for f in found
             if f.lower().endswith(VIDEO_EXTENSIONS) != (kind == "video")]
    if wrong:
        # Upstream reads them into the wrong kind of dataset; the stand-in says so.
        raise ValueError(f"(id={backend['id']}) {kind} dataset holds {', '.join(sorted(wrong))}: don't combine "
                         "images and video in a single dataset (documentation/DATALOADER.md)")
    return sorted(found)


def configure_data_backends(config, hooks):
    """helpers/data_backend/factory.py: the image and video datasets and the text embed cache."""
    path = config["data_backend_config"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data backend config file {path} not found.")
    with open(path) as handle:
        backends = json.load(handle)
    if not isinstance(backends, list):
        raise ValueError("Data backend config must be a list of backends.")
    text_embeds, media = [], []
    for backend in backends:
        if not backend.get("id"):
            raise ValueError("Backend configuration must have a non-empty 'id' field.")
        if backend.get("disabled"):
            continue
        kind = backend.get("dataset_type", "image")
        if kind not in DATASET_TYPES:
            raise ValueError(f"(id={backend['id']}) dataset_type must be one of {DATASET_TYPES}.")
        if kind == "text_embeds":
            os.makedirs(backend.get("cache_dir", "cache/text"), exist_ok=True)
            text_embeds.append(backend)
        elif kind in ("image", "video"):
            media.append(backend)
        else:
            raise ValueError(f"(id={backend['id']}) this stand-in reads image, video and text_embeds datasets only")
    if not text_embeds:
        raise ValueError("Must provide at least one text embed backend in the data backend config file.")
    if len(text_embeds) > 1 and not any(b.get("default") for b in text_embeds):
        raise ValueError("Must provide a default text embed backend in the data backend config file. "
                         "It requires 'default':true.")
    samples = 0
    for backend in media:
        bid = backend["id"]
        if backend.get("type", "local") != "local":
            raise ValueError(f"(id={bid}) this stand-in reads type=local backends only")
        strategy = backend.get("caption_strategy", "filename")
        if strategy not in CAPTION_STRATEGIES:
            raise ValueError(f"(id={bid}) caption_strategy must be one of {CAPTION_STRATEGIES}.")
        if backend.get("resolution_type", "pixel") not in ("pixel", "area", "pixel_area"):
            raise ValueError(f"(id={bid}) resolution_type must be one of ['pixel', 'area', 'pixel_area'].")
        is_video = backend.get("dataset_type", "image") == "video"
        video = video_config(backend, config) if is_video else None
        folder = backend.get("instance_data_dir")
        files = media_files(backend, folder)
        log("INFO", f"Configured backend: {{'id': '{bid}', 'instance_data_dir': '{folder}', 'files': {len(files)}}}")
        kept = []
        for path in files:
            if not is_video:
                kept.append(path)
                continue
            name = os.path.basename(path)
            frames = count_frames(path)
            if frames is None:
                log("ERROR", f"Error processing image: could not read {path}")
                continue
            adjusted = adjust_video_frames(config["model_family"], frames)
            if adjusted != frames:
                log("INFO", f"(id={bid}) Adjusted video {path} from {frames} to {adjusted} frames to satisfy "
                            "model constraints.")
                if adjusted < video["min_frames"]:
                    log("WARNING", f"(id={bid}) Skipping video {path}: after adjusting from {frames} to {adjusted} "
                                   f"frames, it is below minimum required {video['min_frames']} frames.")
                    continue
            if adjusted < video["min_frames"] or (video.get("max_frames") and adjusted > video["max_frames"]):
                continue  # meets_resolution_requirements, at debug level upstream
            # Not a line of the real trainer: what each clip gave (the VAE
            # cache keeps its first num_frames frames).
            print(f"stand-in: video {name} frames={frames} num_frames={video['num_frames']}", flush=True)
            kept.append(path)
        if not kept:
            raise Exception(f"No images were discovered by the bucket manager in the dataset: {bid}.")
        cache = backend.get("cache_dir_vae", f"cache/vae/{bid}")
        os.makedirs(cache, exist_ok=True)
        for path in kept:
            stem = os.path.splitext(path)[0]
            caption = os.path.basename(stem)
            if strategy == "textfile":
                with open(stem + ".txt", encoding="utf-8") as handle:
                    caption = handle.read().strip()
            with open(os.path.join(cache, os.path.basename(stem) + ".pt"), "w", encoding="utf-8") as handle:
                handle.write(caption)
        label = "Video Count" if is_video else "Image Count"
        print(f"(Rank: 0) | Bucket     | {label}\n------------------------------\n(Rank: 0) | 1.0        | {len(kept)}")
        samples += len(kept) * (int(backend.get("repeats", 0)) + 1)
    log("INFO", f"Collected the following data backends: {[b['id'] for b in media + text_embeds]}")
    return samples


def signal_consumer(path, key):
    """train.py::_build_signal_consumer: True once per increase of the count."""
    if not path:
        return lambda: False
    state = {"seen": 0, "pending": 0, "mtime": None, "warned": False}

    def consume():
        try:
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            if not state["warned"]:
                log("WARNING", f"Accelerate trigger file missing at {path}")
                state["warned"] = True
            return False
        if state["mtime"] is None or mtime > state["mtime"]:
            state["mtime"] = mtime
            try:
                with open(path, encoding="utf-8") as handle:
                    payload = json.load(handle)
                count = int(payload.get(key, 0))
            except (ValueError, OSError, AttributeError):
                return False
            if count > state["seen"]:
                state["pending"] += count - state["seen"]
                state["seen"] = count
        if state["pending"] > 0:
            state["pending"] -= 1
            return True
        return False

    return consume


class Run:
    def __init__(self, config, hooks):
        self.config, self.hooks = config, hooks
        self.output_dir = config.get("output_dir", "simpletuner-results")
        self.family = config["model_family"]
        self.rank = int(config.get("lora_rank", 16))
        self.lr = float(config.get("learning_rate", 1e-4))

    def checkpoint_dirs(self):
        if not os.path.isdir(self.output_dir):
            return []
        names = [d for d in os.listdir(self.output_dir) if d.startswith("checkpoint") and not d.endswith("tmp")]
        return sorted(names, key=lambda d: int(d.split("-")[1]))

    def resume(self):
        """Trainer.init_resume_checkpoint with resume_from_checkpoint=latest."""
        if not self.config.get("resume_from_checkpoint"):
            log("INFO", "Not resuming from checkpoint.")
            return 0, 1
        value = str(self.config["resume_from_checkpoint"])
        if value == "latest":
            found = self.checkpoint_dirs()
            path = found[-1] if found else None
            log("INFO", f"Checking {path} for latest checkpoint.")
        else:
            path = os.path.basename(value.rstrip("/"))
        if path is None or not os.path.isdir(os.path.join(self.output_dir, path)):
            log("INFO", f"Checkpoint '{value}' does not exist. Starting a new training run.")
            self.hooks.stage("init_resume_checkpoint", "Resume Checkpoint", "completed",
                             "No model to resume. Beginning fresh training run.")
            return 0, 1
        directory = os.path.join(self.output_dir, path)
        log("INFO", f"Resuming from checkpoint {directory}")
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            with open(os.path.join(directory, name), "rb") as handle:
                handle.read()
        read_safetensors_header(os.path.join(directory, "pytorch_lora_weights.safetensors"))
        self.hooks.stage("init_resume_checkpoint", "Resume Checkpoint", "running", f"Resuming model: {path}")
        with open(os.path.join(directory, "training_state.json")) as handle:
            state = json.load(handle)
        step = int(state["global_step"])
        self.hooks.stage("init_resume_checkpoint", "Resume Checkpoint", "completed",
                         f"Resumed from global_step {step}")
        log("INFO", f"Resuming from global_step {step}.")
        return step, int(state.get("epoch", 1))

    def save_checkpoint(self, step, epoch, loss):
        """Trainer.checkpoint_state_save, in its order: the accelerate state,
        the `checkpoint_save completed` event, then the sampler state, the
        manifest and `.guard`, the rename out of `-tmp`, and only then the
        `training.checkpoint` event."""
        print("\n", flush=True)
        save_path = os.path.join(self.output_dir, f"checkpoint-{step}")
        work = save_path + "-tmp" if self.config.get("checkpointing_use_tempdir") else save_path
        self.hooks.stage("checkpoint_save", "Saving Checkpoint", "running", f"Saving checkpoint to {save_path}")
        limit = self.config.get("checkpoints_total_limit")
        if limit:
            existing = [d for d in self.checkpoint_dirs() if len(d.split("-")) == 2]
            for old in existing[:max(0, len(existing) - int(limit) + 1)]:
                for root, dirs, files in os.walk(os.path.join(self.output_dir, old), topdown=False):
                    for name in files:
                        os.remove(os.path.join(root, name))
                    os.rmdir(root)
        os.makedirs(work, exist_ok=True)
        if os.path.exists(os.path.join(work, ".guard")):
            os.remove(os.path.join(work, ".guard"))
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            with open(os.path.join(work, name), "wb") as handle:
                handle.write(json.dumps({"step": step, "file": name}).encode())
        write_safetensors(os.path.join(work, "pytorch_lora_weights.safetensors"),
                          lora_tensors(self.family, self.rank, step), {"format": "pt"})
        self.hooks.stage("checkpoint_save", "Saving Checkpoint", "completed", f"Saved checkpoint to {save_path}")
        time.sleep(float(os.environ.get("STANDIN_SAVE_SECONDS", "0")))
        with open(os.path.join(work, "training_state.json"), "w") as handle:
            json.dump({"global_step": step, "epoch": epoch, "epoch_step": step, "loss": loss,
                       "learning_rate": self.lr}, handle, allow_nan=True)
        files = sorted(os.listdir(work))
        with open(os.path.join(work, "checkpoint_manifest.json"), "w") as handle:
            json.dump({"version": 1, "checkpoint": os.path.basename(save_path), "files": files,
                       "metadata": {"model_family": self.family, "model_type": "lora"}}, handle, indent=2)
        with open(os.path.join(work, ".guard.tmp"), "w") as handle:
            handle.write("complete\n")
        os.replace(os.path.join(work, ".guard.tmp"), os.path.join(work, ".guard"))
        if work != save_path:
            os.rename(work, save_path)
        self.hooks.send_raw({"type": "training.checkpoint", "checkpoint": {
            "path": save_path, "label": f"Checkpoint saved to {save_path}", "is_final": False},
            "title": f"Checkpoint saved to {save_path}"})

    def train(self, samples):
        config, hooks = self.config, self.hooks
        batch = max(1, int(config.get("train_batch_size", 1)))
        accumulation = max(1, int(config.get("gradient_accumulation_steps", 1)))
        per_epoch = max(1, math.ceil(samples / batch / accumulation))
        total = int(config.get("max_train_steps") or 0) or per_epoch * int(config.get("num_train_epochs", 1))
        epochs = math.ceil(total / per_epoch)
        interval = int(config.get("checkpoint_step_interval") or config.get("checkpointing_steps") or 0)
        os.makedirs(self.output_dir, exist_ok=True)
        global_step, first_epoch = self.resume()
        block = ["", "***** Running training *****",
                 f"-  Trainable parameters: {self.rank * 8 * 2 * 2}",
                 f"-  Num batches = {math.ceil(samples / batch)}",
                 f"-  Num Epochs = {epochs}", f"  - Current Epoch = {first_epoch}",
                 f"-  Total train batch size (w. parallel, distributed & accumulation) = {batch * accumulation}",
                 f"  - Instantaneous batch size per device = {batch}",
                 f"  - Gradient Accumulation steps = {accumulation}",
                 f"-  Total optimization steps = {total}"]
        if global_step > 1:
            block.append(f"  - Steps completed: {global_step}")
        block.append(f"-  Total optimization steps remaining = {max(0, total - global_step)}")
        log("INFO", "\n".join(block))
        hooks.status("running", global_step, total, {"epoch": first_epoch, "total_epochs": epochs},
                     message="\n".join(block), label="Training initialisation")
        manual_checkpoint = signal_consumer(os.environ.get("SIMPLETUNER_ACCELERATE_SIGNAL_FILE"),
                                            "manual_checkpoint")
        bar = Bar(total, f"Epoch {first_epoch}/{epochs} Steps", initial=global_step)
        kind, at = fault()
        seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.02"))
        epoch = first_epoch
        for step in range(global_step + 1, total + 1):
            if step == at:
                if kind == "oom":
                    raise OutOfMemoryError(OOM_TEXT)
                if kind == "crash":
                    raise RuntimeError(f"stand-in crash at step {step}")
                if kind == "exit0":
                    sys.exit(0)
                if kind == "hang":
                    while True:
                        time.sleep(3600)
            time.sleep(seconds)
            epoch = (step - 1) // per_epoch + 1
            loss = loss_at(step, total)
            bar.desc = f"Epoch {epoch}/{epochs}, Steps"
            bar.update(1)
            metrics = {"loss": loss, "learning_rate": self.lr, "epoch": epoch, "grad_norm": 0.5 + 0.1 * math.cos(step)}
            hooks.status("running", step, total, metrics)
            if manual_checkpoint() or (interval and step % interval == 0):
                self.save_checkpoint(step, epoch, loss)
            bar.set_postfix(lr=self.lr, step_loss=loss)
            if math.isnan(loss):
                raise RuntimeError(f"Non-finite training loss detected (loss={loss})")
        bar.close()
        log("INFO", f"Training has completed.\n -> global_step = {total}, max_train_steps = {total}, "
                    f"epoch = {epoch}, num_train_epochs = {epochs}")
        log("INFO", f"Exiting training loop. Beginning model unwind at epoch {epoch}, step {total}")
        hooks.stage("model_save", "Saving Final Model", "running",
                    f"Finalizing model and saving to {self.output_dir}")
        write_safetensors(os.path.join(self.output_dir, "pytorch_lora_weights.safetensors"),
                          lora_tensors(self.family, self.rank, total), {"format": "pt"})
        hooks.stage("model_save", "Saving Final Model", "completed", f"Model saved to {self.output_dir}")
        hooks.stage("training_complete", "Training Complete", "completed", "Training run complete.",
                    percent=100)


def is_cuda_error(error):
    text = str(error).lower()
    return "cuda" in type(error).__name__.lower() or any(
        word in text for word in ("cuda", "cudnn", "cublas", "nccl", "device-side assert", "out of memory",
                                  "illegal memory access"))


def main():
    hooks = Webhooks()
    try:
        config = load_config()
        hooks = Webhooks(config.get("webhook_config"), os.environ.get("SIMPLETUNER_JOB_ID"))
        hooks.send_raw({"type": "notification", "message": "Training job has started, configuration has begun.",
                        "title": "Training job has started, configuration has begun."})
        check_model(config.get("pretrained_model_name_or_path"))
        load_text_encoders(config)
        hooks.stage("init_data_backend", "Configuring data backends", "running",
                    "Configuring data backends... (this may take a while!)")
        try:
            samples = configure_data_backends(config, hooks)
        except Exception as e:
            log("ERROR", f"{e}, traceback: {traceback.format_exc()}")
            hooks.send(f"Failed to load data backends: {e}")
            hooks.stage("init_data_backend", "Configuring data backends", "failed",
                        f"Failed to load data backends: {e}", level="critical")
            raise
        hooks.stage("init_data_backend", "Configuring data backends", "completed",
                    "Completed configuring data backends.")
        load_base_model(config)
        Run(config, hooks).train(samples)
    except KeyboardInterrupt:
        hooks.send("Training has been interrupted by user action (lost terminal, or ctrl+C).")
        hooks.send_raw({"status": "interrupted"}, "training.status")
    except Exception as e:
        if is_cuda_error(e):
            log("ERROR", f"GPU circuit breaker OPEN: cuda_error - {e} (GPU 0)")
            log("ERROR", f"GPU circuit breaker triggered by CUDA error on GPU 0: {e}")
        hooks.send(f"Training has failed. Please check the logs for more information: {e}")
        hooks.send_raw({"title": f"Training failed: {type(e).__name__}", "message": str(e),
                        "traceback": traceback.format_exc()}, "error", level="error")
        hooks.send_raw({"status": "failed"}, "training.status", level="error")
        raise


if __name__ == "__main__":
    main()
