#!/usr/bin/env python3
"""Stand-in for ostris/ai-toolkit's `run.py` with one `sd_trainer` process.

Run as the real one is (`python run.py <job.yaml>`, cwd the checkout), it
reads the YAML job file, checks it the way ai-toolkit does, and behaves
like ai-toolkit at the process level:

- `<training_folder>/<name>/<name>_<step:09>.safetensors` per save, with
  `training_info` (step, epoch) in the safetensors metadata, then
  `optimizer.pt` (a zip, as torch.save writes) overwritten at every save,
  old step files pruned to `max_step_saves_to_keep`, and
  `<name>/<name>.safetensors` at the end;
- the base model loaded as ai-toolkit loads it: a diffusers folder through
  `from_pretrained` with no variant (every component's plain weight file
  names must be there, `../_shared/model_files.py`), an SDXL `.safetensors`
  through `from_single_file` (an SDXL checkpoint, configured from
  stabilityai/stable-diffusion-xl-base-1.0's config files, which must be in
  the HF cache since the stand-in has no network);
- the bar on stderr, desc = name, initial = the resumed step:
  `name:  13%|...| 250/2000 [..., lr: 1.0e-04 loss: 4.123e-01]`;
- `Saving at step N`, `Saved checkpoint to ...`, `Saved optimizer to ...`;
- datasets read as toolkit/data_loader.py reads them: `num_frames` above 1
  makes a video dataset, which lists the video extensions and the image
  extensions of its folder (images as one-frame items); at 1 (the default)
  only images are listed and clips are left out; each clip gives
  `num_frames` frames evenly spaced over it (`shrink_video_to_frames`,
  default true, or a clip shorter than `num_frames`: frames repeat), else a
  run at `fps` from a random start; a line `stand-in: video <file> frames=N
  num_frames=M` (plus ` stretched` when frames repeat) says what each clip
  gave. Clips are counted with ffprobe (the real one asks cv2);
- automatic resume from the newest `<name>*.safetensors` and optimizer.pt
  (`#### IMPORTANT RESUMING FROM ... ####`, `Found step N in metadata,
  starting from there`);
- SIGINT: `Job stopped` and exit status 0, without saving; a failure:
  `Error running job: ...`, the Result block with ` - 1 failure`, the
  traceback, exit status 1.

Stand-in controls, from the environment:
  STANDIN_STEP_SECONDS  sleep per step (default 0.02)
  STANDIN_FAULT         oom@N (OOM at steps N..N+3: three skipped batches,
                        then the abort) | hang@N | exit0@N | crash@N
  STANDIN_NAN_FROM      N: the loss is nan from step N (ai-toolkit says
                        "loss is nan" and goes on)
"""
import argparse
import glob
import json
import math
import os
import random
import sys
import time
import traceback
import zipfile

# Keep the test tree free of __pycache__ folders.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "_shared"))

from standin_common import (  # noqa: E402
    Bar, HFValidationError, count_frames, fault, read_safetensors_header, write_safetensors)
from toolkit.yaml_subset import load as load_yaml  # noqa: E402
import model_files  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# toolkit/data_loader.py video_extensions.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".wmv", ".m4v", ".flv")
LORA_MODULES = {
    "flux": ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k"],
    "qwen_image": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj"],
    "wan21": ["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.cross_attn.k"],
}
# The default pipeline diffusers' from_single_file configures an SDXL
# checkpoint from (its model_index.json, component configs, tokenizers).
SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
# A key only SDXL base checkpoints hold (diffusers CHECKPOINT_KEY_NAMES["xl_base"]).
SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
SDXL_MODULES = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]


def print_end_message(jobs_completed, jobs_failed):
    failure_string = f"{jobs_failed} failure{'' if jobs_failed == 1 else 's'}" if jobs_failed > 0 else ""
    completed_string = f"{jobs_completed} completed job{'' if jobs_completed == 1 else 's'}"
    print("")
    print("========================================")
    print("Result:")
    if len(completed_string) > 0:
        print(f" - {completed_string}")
    if len(failure_string) > 0:
        print(f" - {failure_string}")
    print("========================================")


class ProgressBar(Bar):
    """toolkit/progress_bar.py's ToolkitProgressBar: after an update the
    postfix shows the rate, for the next refresh."""

    def update(self, k):
        if k > 0:
            self.n += k
            self.refresh()
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        self.postfix = f"it/s={rate:.3f}"


def load_metadata_from_safetensors(path):
    header = read_safetensors_header(path)
    meta = {}
    for key, value in header.get("__metadata__", {}).items():
        try:
            meta[key] = json.loads(value) if value[:1] in "{[" else value
        except ValueError:
            meta[key] = value
    return meta


class SDTrainer:
    def __init__(self, job, config):
        self.job, self.config = job, config
        self.name = job.name
        self.training_folder = config.get("training_folder", "output")
        self.save_root = os.path.join(self.training_folder, self.name)
        self.trigger_word = config.get("trigger_word")
        self.network = config.get("network") or {}
        self.train = config.get("train") or {}
        self.save_config = config.get("save") or {}
        self.model = config.get("model") or {}
        self.datasets = config.get("datasets") or []
        if self.model.get("name_or_path") is None:
            raise ValueError("name_or_path must be specified")
        if self.network.get("type", "lora") not in ("lora", "locon", "lokr"):
            raise ValueError(f"Unknown network type {self.network.get('type')}")
        self.steps = int(self.train.get("steps", 1000))
        self.lr = float(self.train.get("lr", 1e-6))
        self.rank = int(self.network.get("linear", 4))
        self.step_num = self.start_step = self.epoch_num = 0

    def arch(self):
        if self.model.get("is_flux"):
            return "flux"
        if self.model.get("is_xl"):
            return "sdxl"
        return self.model.get("arch", "sd1")

    def tensors(self, step):
        tensors = {}
        if self.arch() == "sdxl":
            for i, module in enumerate(SDXL_MODULES):
                tensors[f"{module}.lora_down.weight"] = ([self.rank, 8], [math.sin(step + i + j) * 0.01 for j in range(self.rank * 8)])
                tensors[f"{module}.lora_up.weight"] = ([8, self.rank], [math.cos(step + i + j) * 0.001 for j in range(self.rank * 8)])
                tensors[f"{module}.alpha"] = ([], [float(self.network.get("linear_alpha", self.rank))])
            return tensors
        for i, module in enumerate(LORA_MODULES.get(self.arch(), LORA_MODULES["flux"])):
            tensors[f"{module}.lora_A.weight"] = ([self.rank, 8], [math.sin(step + i + j) * 0.01 for j in range(self.rank * 8)])
            tensors[f"{module}.lora_B.weight"] = ([8, self.rank], [math.cos(step + i + j) * 0.001 for j in range(self.rank * 8)])
        return tensors

    def load_model(self):
        """StableDiffusion.load_model: a folder (or Hub id) through
        `from_pretrained` without a variant, an SDXL file through
        `from_single_file`."""
        path = str(self.model["name_or_path"])
        print(f"Loading {self.arch()} model")
        if path.startswith(("/", ".")) and not os.path.exists(path):
            raise HFValidationError(f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{path}'. "
                                    "Use `repo_type` argument if needed.")
        if os.path.isdir(path):
            self.load_folder(path)
        elif os.path.isfile(path) and self.arch() == "sdxl":
            self.load_single_file(path)
        elif model_files.is_hub_id(path):
            if model_files.cached_snapshot(path) is None:
                raise model_files.offline_error(path, "model_index.json")
            self.load_folder(model_files.cached_snapshot(path))
        if self.model.get("quantize"):
            print("Quantizing transformer")
        print("Model Loaded")

    def load_folder(self, path):
        """`from_pretrained(path)`: ai-toolkit passes no variant, so every
        component needs its plain weight file names."""
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise OSError(f"Error no file named model_index.json found in directory {path}.")
        components = dict(model_files.pipeline_components(path))
        components.setdefault("unet" if self.arch() == "sdxl" else "transformer", "diffusers")
        for name, library in sorted(components.items()):
            model_files.check_component(path, name, library)

    def load_single_file(self, path):
        """`StableDiffusionXLPipeline.from_single_file(path)`: the weights
        from the file, the pipeline's configs from the default repo on the
        Hub (or the HF cache)."""
        header = read_safetensors_header(path)
        if SDXL_KEY not in header:
            raise ValueError(f"{path} is not an SDXL base checkpoint: diffusers cannot infer an SDXL pipeline "
                             "from its keys")
        if model_files.cached_snapshot(SDXL_CONFIG_REPO) is None:
            raise model_files.offline_error(SDXL_CONFIG_REPO, "model_index.json")

    def get_latest_save_path(self):
        if not os.path.exists(self.save_root):
            return None
        paths = []
        for pattern in (f"{self.name}*.safetensors", f"{self.name}*.pt", f"{self.name}*"):
            paths.extend(glob.glob(os.path.join(glob.escape(self.save_root), pattern)))
        paths = [p for p in paths if os.path.exists(p)]
        for suffix in ("_LoRA", "_refiner", "_t2i", "_cn"):
            if suffix not in self.name:
                paths = [p for p in paths if suffix not in p]
        return max(paths, key=os.path.getctime) if paths else None

    def frames_to_extract(self, dataset, total, num_frames, fps=24.0):
        """dataloader_mixins.py load_and_process_video: the frame indices a
        clip of `total` frames gives."""
        last = total - 1
        if dataset.get("shrink_video_to_frames", True) or total < num_frames:
            interval = last / (num_frames - 1) if num_frames > 1 else 0
            return [min(int(round(i * interval)), last) for i in range(num_frames)]
        step = max(1, int(round(fps / float(dataset.get("fps", 24)))))
        if total // step < num_frames:
            interval = last / (num_frames - 1) if num_frames > 1 else 0
            return [min(int(round(i * interval)), last) for i in range(num_frames)]
        start = random.randint(0, max(0, last - (num_frames - 1) * step))
        return [start + i * step for i in range(num_frames)]

    def load_datasets(self):
        """toolkit/data_loader.py AiToolkitDataset, as far as files go."""
        count = 0
        for dataset in self.datasets:
            folder = dataset["folder_path"]
            caption_ext = dataset.get("caption_ext", "txt").lstrip(".")
            num_frames = int(dataset.get("num_frames", 1))
            is_video = num_frames > 1 or bool(dataset.get("auto_frame_count", False))
            extensions = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS if is_video else IMAGE_EXTENSIONS
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(extensions) and not f.startswith("."))
            files = files * max(1, int(dataset.get("num_repeats", 1)))
            print(f"Dataset: {folder}")
            print(f"  -  Preprocessing {'video' if is_video else 'image'} dimensions")
            items = []
            for name in files:
                path = os.path.join(folder, name)
                if not name.lower().endswith(VIDEO_EXTENSIONS):
                    items.append((name, 1))
                    continue
                if not dataset.get("buckets", True):
                    raise Exception("Buckets required for video processing")
                total = count_frames(path)
                if total is None:
                    print(f"Error processing video: {path}")
                    print(f"Error: Could not open video file {path}")
                    continue
                if (name, num_frames) not in items:
                    picked = self.frames_to_extract(dataset, total, num_frames)
                    stretched = " stretched" if len(set(picked)) < len(picked) else ""
                    # Not a line of the real trainer: what each clip gave.
                    print(f"stand-in: video {name} frames={total} num_frames={num_frames}{stretched}")
                items.append((name, num_frames))
            with open(os.path.join(folder, ".aitk_size.json"), "w") as handle:
                json.dump({"__version__": "0.1.2", **{f: [1024, 1024] for f, _ in items}}, handle)
            if is_video:
                videos = sum(1 for _, frames in items if frames > 1)
                images = len(items) - videos
                print(f"  -  Found {videos} videos and {images} images" if images else f"  -  Found {videos} videos")
                assert len(items) > 0, f"no videos found in {folder}"
            else:
                print(f"  -  Found {len(items)} images")
                assert len(items) > 0, f"no images found in {folder}"
            for name, _ in items:
                caption_file = os.path.join(folder, os.path.splitext(name)[0] + "." + caption_ext)
                if os.path.exists(caption_file):
                    with open(caption_file, encoding="utf-8") as handle:
                        handle.read()
            resolution = (dataset.get("resolution") or [512])[0]
            buckets = {}
            for _, frames in items:
                # Images and clips never share a bucket (`...x{num_frames}f`).
                key = f"{resolution}x{resolution}" + (f"x{frames}f" if is_video else "")
                buckets[key] = buckets.get(key, 0) + 1
            print(f"Bucket sizes for {folder}:")
            for key, n in buckets.items():
                print(f"{key}: {n} files")
            print(f"{len(buckets)} buckets made")
            if dataset.get("cache_latents_to_disk"):
                print(f"Caching latents for {folder}")
                print(" - Saving latents to disk")
                cache = os.path.join(folder, "_latent_cache")
                os.makedirs(cache, exist_ok=True)
                unique = sorted({name for name, _ in items})
                bar = ProgressBar(len(unique), "Caching latents to disk")
                for name in unique:
                    with open(os.path.join(cache, os.path.splitext(name)[0] + ".safetensors"), "wb") as handle:
                        handle.write(b"")
                    bar.update(1)
                bar.close()
            count += len(items)
        return count

    def save(self, step=None):
        os.makedirs(self.save_root, exist_ok=True)
        step_num = f"_{str(step).zfill(9)}" if step is not None else ""
        file_path = os.path.join(self.save_root, f"{self.name}{step_num}.safetensors")
        meta = {"name": self.name, "version": "1.0",
                "training_info": json.dumps({"step": self.step_num, "epoch": self.epoch_num}),
                "ss_output_name": self.name}
        write_safetensors(file_path, self.tensors(self.step_num), meta)
        print(f"Saved checkpoint to {file_path}")
        optimizer = os.path.join(self.save_root, "optimizer.pt")
        with zipfile.ZipFile(optimizer, "w") as archive:
            archive.writestr("optimizer/data.pkl", json.dumps({"step": self.step_num, "lr": self.lr}))
            archive.writestr("optimizer/version", "3\n")
        print(f"Saved optimizer to {optimizer}")
        keep = int(self.save_config.get("max_step_saves_to_keep", 4))
        saves = sorted(glob.glob(os.path.join(glob.escape(self.save_root), f"{self.name}_*.safetensors")),
                       key=os.path.getctime)
        for item in saves[:-keep] if keep > 0 else []:
            print(f"Removing old save: {item}")
            os.remove(item)

    def run(self):
        self.load_model()
        alpha = self.network.get("linear_alpha", self.rank)
        print(f"create LoRA network. base dim (rank): {self.rank}, alpha: {alpha}")
        latest = self.get_latest_save_path()
        if latest is not None:
            print(f"#### IMPORTANT RESUMING FROM {latest} ####")
            print(f"Loading from {latest}")
            meta = load_metadata_from_safetensors(latest)
            info = meta.get("training_info")
            if isinstance(info, dict) and "step" in info:
                self.step_num = self.start_step = int(info["step"])
                self.epoch_num = int(info.get("epoch", 0))
                print(f"Found step {self.step_num} in metadata, starting from there")
        optimizer = os.path.join(self.save_root, "optimizer.pt")
        if os.path.exists(optimizer):
            try:
                print(f"Loading optimizer state from {optimizer}")
                with zipfile.ZipFile(optimizer) as archive:
                    archive.read("optimizer/data.pkl")
            except Exception as e:
                print(f"Failed to load optimizer state from {optimizer}")
                print(e)
            print("Updating optimizer LR from params")
        samples = self.load_datasets()
        per_epoch = max(1, samples // max(1, int(self.train.get("batch_size", 1))))
        if self.train.get("disable_sampling"):
            print("Skipping first sample due to config setting")
        bar = ProgressBar(self.steps, self.name, initial=self.step_num)
        save_every = int(self.save_config.get("save_every", 1000) or 0)
        kind, at = fault()
        seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.02"))
        nan_from = os.environ.get("STANDIN_NAN_FROM")
        consecutive_oom = 0
        for step in range(self.start_step, self.steps):
            self.step_num = step
            if kind == "hang" and step == at:
                while True:
                    time.sleep(3600)
            if kind == "exit0" and step == at:
                sys.exit(0)
            time.sleep(seconds)
            try:
                if kind == "crash" and step == at:
                    raise RuntimeError(f"stand-in crash at step {step}")
                if kind == "oom" and at <= step <= at + 3:
                    consecutive_oom += 1
                    if consecutive_oom > 3:
                        raise RuntimeError("OOM during training step 3 times in a row, aborting training")
                    print(f"# OOM during training step, skipping batch {consecutive_oom}/3 #")
                    loss = None
                else:
                    consecutive_oom = 0
                    loss = 0.05 + 0.45 * math.exp(-3.0 * step / max(self.steps, 1)) + 0.01 * math.sin(step)
                    if nan_from and step >= int(nan_from):
                        print("loss is nan")
                        loss = float("nan")
            except Exception:
                traceback.print_exc()
                print("Batch Items:")
                for dataset in self.datasets:
                    print(f" - {os.path.join(dataset['folder_path'], 'img0.png')}")
                raise
            if loss is not None:
                bar.set_postfix_str(f"lr: {self.lr:.1e} loss: {loss:.3e}")
            if step != self.start_step and save_every and step % save_every == 0:
                print(f"\nSaving at step {step}")
                self.save(step)
            bar.update(step - bar.n)
            self.step_num = step + 1
            self.epoch_num = self.step_num // per_epoch
        bar.close()
        print("")
        self.save()


class ExtensionJob:
    def __init__(self, config):
        self.config = config["config"]
        if "name" not in self.config:
            raise ValueError('config file error. Missing "config.name" key')
        self.name = self.config["name"]
        if "process" not in self.config:
            raise ValueError('config file is invalid. Missing "config.process" key')
        if len(self.config["process"]) == 0:
            raise ValueError('config file is invalid. "config.process" must be a list of processes')
        self.process = []
        for i, process in enumerate(self.config["process"]):
            if "type" not in process:
                raise ValueError(f'config file is invalid. Missing "config.process[{i}].type" key')
            if process["type"] not in ("sd_trainer", "ui_trainer"):
                raise ValueError(f'config file is invalid. Unknown process type: {process["type"]}')
            self.process.append(SDTrainer(self, process))

    def run(self):
        print("")
        print("#############################################")
        print(f"# Running job: {self.name}")
        print("#############################################")
        print("")
        print(f"Running  {len(self.process)} process{'' if len(self.process) == 1 else 'es'}")
        for process in self.process:
            process.run()

    def cleanup(self):
        pass


def replace_name(value, name):
    if isinstance(value, dict):
        return {k: replace_name(v, name) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_name(v, name) for v in value]
    if isinstance(value, str):
        return value.replace("[name]", name)
    return value


def get_job(config_path, name=None):
    if not os.path.exists(config_path):
        raise ValueError(f"Could not find config file {config_path}")
    with open(config_path, encoding="utf-8") as handle:
        text = handle.read()
    config = json.loads(text) if config_path.endswith(".json") else load_yaml(text)
    if not isinstance(config, dict):
        raise ValueError(f"Config file {config_path} must be a mapping")
    job_name = name or (config.get("config") or {}).get("name")
    if job_name:
        config = replace_name(config, job_name)
    if not config.get("job"):
        raise ValueError('config file is invalid. Missing "job" key')
    if config["job"] != "extension":
        raise ValueError(f"Unknown job type {config['job']}")
    return ExtensionJob(config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config_file_list", nargs="+", type=str)
    parser.add_argument("-r", "--recover", action="store_true")
    parser.add_argument("-n", "--name", type=str, default=None)
    parser.add_argument("-l", "--log", type=str, default=None)
    args = parser.parse_args()
    jobs_completed = 0
    jobs_failed = 0
    print(f"Running {len(args.config_file_list)} job{'' if len(args.config_file_list) == 1 else 's'}")
    for config_file in args.config_file_list:
        try:
            job = get_job(config_file, args.name)
            job.run()
            job.cleanup()
            jobs_completed += 1
        except Exception as e:
            print(f"Error running job: {e}")
            jobs_failed += 1
            if not args.recover:
                print_end_message(jobs_completed, jobs_failed)
                raise e
        except KeyboardInterrupt:
            if not args.recover:
                print("")
                print("========================================")
                print("Job stopped")
                print("========================================")
                sys.exit(0)


if __name__ == "__main__":
    main()
