"""Stand-in for kohya-ss/sd-scripts' LoRA trainers, shared by
`flux_train_network.py` and `sdxl_train_network.py` (stdlib only).

What it reproduces from upstream (`train_network.py`, `library/train_util.py`,
`library/config_util.py`, accelerate's `checkpointing.py`):

- argparse with kohya's option names, types and choices; `--config_file`
  merged like `train_util.read_config_from_file` (sections flattened, values
  become namespace defaults, the command line wins);
- the dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`),
  DreamBooth-style `image_dir` with `<stem><caption_extension>` captions and
  `class_tokens` for images without one; `No data found …` and exit 0 when
  there is no image;
- model files checked like the loaders do (missing → FileNotFoundError,
  unreadable header → SafetensorError);
- the startup block, `epoch E/N`, the `steps` tqdm bar on stderr with `\\r`
  refreshes and `avr_loss=` postfix, `saving checkpoint: …`,
  `saving state at step N`, accelerate's state-save lines, `model saved.`;
- `<name>-stepNNNNNNNN.safetensors` and `<name>-stepNNNNNNNN-state/`
  (train_state.json, model.safetensors, optimizer.bin, scheduler.bin,
  random_states_0.pkl last), `<name>-state/` and `<name>.safetensors` at the end;
- `--resume` with `load train state from …` and upstream's step arithmetic,
  including its quirk: with `--skip_until_initial_step`, skipping whole epochs
  sets global_step to the step within the epoch; without it, global_step
  restarts at 0. The bar always restarts at 0.

Stricter than kohya in one way: unknown keys and mistyped values in
`--config_file` are refused (kohya silently keeps them), so a typo in a
rendered config fails loudly instead of being ignored.

Environment: STANDIN_STEP_SECONDS (default 0.02), STANDIN_FAULT = oom@N |
hang@N | exit0@N | crash@N (at kohya's step N), STANDIN_NAN_FROM = N (loss is
nan from step N on).
"""
import argparse
import json
import math
import os
import pickle
import random
import sys
import time

sys.dont_write_bytecode = True  # keep the test tree free of __pycache__
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "_shared"))
from standin_common import (  # noqa: E402
    Bar, OutOfMemoryError, fault, read_safetensors_header, write_safetensors)  # noqa: E402

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

STEP_FILE_NAME = "{}-step{:08d}"
STEP_STATE_NAME = "{}-step{:08d}-state"
LAST_STATE_NAME = "{}-state"
IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]
NO_DATA = (
    "No data found. Please verify arguments (train_data_dir must be the parent of folders with images)"
    " / 画像がありません。引数指定を確認してください（train_data_dirには画像があるフォルダではなく、"
    "画像があるフォルダの親フォルダを指定する必要があります）"
)


class MultipleInvalid(Exception):
    pass


MultipleInvalid.__module__ = "voluptuous.error"

# ---------------------------------------------------------------- logging

SIMPLE = False


def log(msg, level="INFO"):
    """kohya's logger: plain `%(message)s` on stdout with --console_log_simple,
    rich-style lines on stderr otherwise."""
    if SIMPLE:
        print(msg, flush=True)
    else:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} {level:<8} {msg}", file=sys.stderr, flush=True)


def aprint(*parts):
    """accelerator.print: stdout."""
    print(*parts, flush=True)


# ---------------------------------------------------------------- argparse


def setup_parser(family):
    p = argparse.ArgumentParser()
    a = p.add_argument
    flag = lambda name: a(name, action="store_true")  # noqa: E731
    # library/utils.py add_logging_arguments
    a("--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    a("--console_log_file", type=str, default=None)
    flag("--console_log_simple")
    # train_util: models, dataset, training, optimizer, config
    a("--pretrained_model_name_or_path", type=str, default=None)
    a("--train_data_dir", type=str, default=None)
    a("--dataset_config", type=str, default=None)
    a("--caption_extension", type=str, default=".caption")
    a("--resolution", type=str, default=None)
    a("--train_batch_size", type=int, default=1)
    flag("--shuffle_caption")
    a("--keep_tokens", type=int, default=0)
    flag("--enable_bucket")
    a("--output_dir", type=str, default=None)
    a("--output_name", type=str, default=None)
    a("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    a("--save_every_n_epochs", type=int, default=None)
    a("--save_every_n_steps", type=int, default=None)
    a("--save_last_n_steps", type=int, default=None)
    a("--save_last_n_steps_state", type=int, default=None)
    flag("--save_state")
    flag("--save_state_on_train_end")
    a("--resume", type=str, default=None)
    a("--max_train_steps", type=int, default=1600)
    a("--max_train_epochs", type=int, default=None)
    a("--max_data_loader_n_workers", type=int, default=8)
    flag("--persistent_data_loader_workers")
    a("--seed", type=int, default=None)
    flag("--gradient_checkpointing")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    flag("--full_fp16")
    flag("--full_bf16")
    flag("--fp8_base")
    flag("--mem_eff_attn")
    flag("--xformers")
    flag("--sdpa")
    flag("--highvram")
    flag("--lowram")
    flag("--cache_latents")
    flag("--cache_latents_to_disk")
    flag("--cache_text_encoder_outputs")
    flag("--cache_text_encoder_outputs_to_disk")
    flag("--disable_mmap_load_safetensors")
    a("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"])
    a("--huber_c", type=float, default=0.1)
    a("--noise_offset", type=float, default=None)
    a("--min_snr_gamma", type=float, default=None)
    a("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    a("--logging_dir", type=str, default=None)
    a("--sample_prompts", type=str, default=None)
    a("--sample_every_n_steps", type=int, default=None)
    a("--optimizer_type", type=str, default="")
    a("--optimizer_args", type=str, default=None, nargs="*")
    a("--learning_rate", type=float, default=2.0e-6)
    a("--max_grad_norm", type=float, default=1.0)
    a("--lr_scheduler", type=str, default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1)
    a("--config_file", type=str, default=None)
    flag("--output_config")
    # train_network.py setup_parser
    flag("--cpu_offload_checkpointing")
    flag("--no_metadata")
    a("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"])
    a("--unet_lr", type=float, default=None)
    a("--text_encoder_lr", type=float, default=None, nargs="*")
    flag("--fp8_base_unet")
    a("--network_weights", type=str, default=None)
    a("--network_module", type=str, default=None)
    a("--network_dim", type=int, default=None)
    a("--network_alpha", type=float, default=1)
    a("--network_dropout", type=float, default=None)
    a("--network_args", type=str, default=None, nargs="*")
    flag("--network_train_unet_only")
    flag("--network_train_text_encoder_only")
    a("--training_comment", type=str, default=None)
    flag("--dim_from_weights")
    a("--scale_weight_norms", type=float, default=None)
    flag("--no_half_vae")
    flag("--skip_until_initial_step")
    a("--initial_epoch", type=int, default=None)
    a("--initial_step", type=int, default=None)
    if family == "flux":
        # train_util.add_dit_training_arguments, flux_train_utils.add_flux_train_arguments
        a("--blocks_to_swap", type=int, default=None)
        a("--clip_l", type=str)
        a("--t5xxl", type=str)
        a("--ae", type=str)
        a("--t5xxl_max_token_length", type=int, default=None)
        flag("--apply_t5_attn_mask")
        a("--guidance_scale", type=float, default=3.5)
        a("--timestep_sampling", choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"], default="sigma")
        a("--sigmoid_scale", type=float, default=1.0)
        a("--model_prediction_type", choices=["raw", "additive", "sigma_scaled"], default="sigma_scaled")
        a("--discrete_flow_shift", type=float, default=3.0)
        flag("--split_mode")
    return p


def fail_config(msg):
    print(f"kohya stand-in: {msg} (kohya would keep it silently)", file=sys.stderr, flush=True)
    sys.exit(2)


def check_config_value(parser, key, value, where):
    action = next((x for x in parser._actions if x.dest == key), None)
    if action is None or key == "help":
        fail_config(f"{where}: unknown config key {key!r}")
    if isinstance(action, argparse._StoreTrueAction):
        ok = isinstance(value, bool)
    elif action.nargs == "*":
        t = action.type or str
        ok = isinstance(value, list) and all(isinstance(v, (int, float) if t is float else t) for v in value)
    else:
        t = action.type or str
        ok = isinstance(value, (int, float) if t is float else t) and not isinstance(value, bool)
    if not ok:
        fail_config(f"{where}: {key} = {value!r} has the wrong type")
    if action.choices is not None and value not in action.choices:
        fail_config(f"{where}: {key} = {value!r} is not one of {action.choices}")


def read_config_from_file(args, parser):
    if not args.config_file:
        return args
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if not os.path.exists(path):
        log(f"{path} not found.")
        sys.exit(1)
    log(f"Loading settings from {path}...")
    config = load_toml(path)
    flat = {}
    for section, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[section] = value
    for key, value in flat.items():
        check_config_value(parser, key, value, path)
    args = parser.parse_args(namespace=argparse.Namespace(**flat))
    args.config_file = os.path.splitext(args.config_file)[0]
    return args


# ---------------------------------------------------------------- TOML


def load_toml(path):
    with open(path, "rb") as f:
        data = f.read()
    if tomllib is not None:
        return tomllib.loads(data.decode("utf-8"))
    return mini_toml(data.decode("utf-8"))


def mini_toml(text):
    """The TOML subset Trainyard writes, for Pythons without tomllib."""
    root, table = {}, None
    table = root
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            path = line[2:-2].strip().split(".")
            parent = root
            for part in path[:-1]:
                parent = parent[part][-1] if isinstance(parent[part], list) else parent[part]
            table = {}
            parent.setdefault(path[-1], []).append(table)
        elif line.startswith("["):
            table = root.setdefault(line[1:-1].strip(), {})
        else:
            key, value = line.split("=", 1)
            table[key.strip().strip('"')] = toml_value(value.strip())
    return root


def toml_value(v):
    if v.startswith("[") and v.endswith("]"):
        inner = v[1:-1].strip()
        return [toml_value(x.strip()) for x in split_top(inner)] if inner else []
    if v.startswith('"') or v.startswith("'"):
        return json.loads(v) if v[0] == '"' else v[1:-1]
    if v in ("true", "false"):
        return v == "true"
    if v in ("nan", "inf", "-inf", "+inf"):
        return float(v)
    return float(v) if any(c in v for c in ".eE") else int(v)


def split_top(s):
    parts, cur, quote = [], "", None
    for c in s:
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == ",":
            parts.append(cur)
            cur = ""
            continue
        cur += c
    if cur.strip():
        parts.append(cur)
    return parts


# ---------------------------------------------------------------- safetensors


# ---------------------------------------------------------------- dataset

GENERAL_KEYS = {"shuffle_caption", "caption_extension", "keep_tokens", "enable_bucket", "min_bucket_reso",
                "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "resolution", "batch_size",
                "num_repeats", "class_tokens", "caption_prefix", "caption_suffix", "flip_aug", "color_aug",
                "random_crop", "caption_dropout_rate", "cache_info"}
DATASET_KEYS = GENERAL_KEYS | {"subsets"}
SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "caption_extension", "is_reg", "shuffle_caption",
               "keep_tokens", "caption_prefix", "caption_suffix", "flip_aug", "color_aug", "random_crop",
               "caption_dropout_rate", "cache_info"}


def invalid_config(where):
    log("Invalid user config / ユーザ設定の形式が正しくないようです", "ERROR")
    raise MultipleInvalid(f"extra keys not allowed @ data{where}")


def load_dataset(args):
    path = args.dataset_config
    log(f"Load dataset config from {path}")
    if not os.path.exists(path):
        raise ValueError(f"file not found / ファイルが見つかりません: {path}")
    config = load_toml(path)
    for k in config:
        if k not in ("general", "datasets"):
            invalid_config(f"['{k}']")
    general = config.get("general", {})
    for k in general:
        if k not in GENERAL_KEYS:
            invalid_config(f"['general']['{k}']")
    subsets = []
    for i, ds in enumerate(config.get("datasets", [])):
        for k in ds:
            if k not in DATASET_KEYS:
                invalid_config(f"['datasets'][{i}]['{k}']")
        for j, sub in enumerate(ds.get("subsets", [])):
            for k in sub:
                if k not in SUBSET_KEYS:
                    invalid_config(f"['datasets'][{i}]['subsets'][{j}]['{k}']")

            def param(key, default, sub=sub, ds=ds):
                # config_util's fallbacks: subset, dataset, general, argparse.
                for level in (sub, ds, general):
                    if key in level:
                        return level[key]
                return getattr(args, key, default) if default is not None else default

            subsets.append(
                {
                    "image_dir": sub.get("image_dir"),
                    "num_repeats": param("num_repeats", 1) or 1,
                    "class_tokens": param("class_tokens", None),
                    "caption_extension": param("caption_extension", args.caption_extension),
                    "batch_size": ds.get("batch_size", general.get("batch_size", args.train_batch_size)),
                    "resolution": ds.get("resolution", general.get("resolution")),
                }
            )
    return subsets


def load_subset_images(subset):
    image_dir = subset["image_dir"]
    if not image_dir or not os.path.isdir(image_dir):
        log(f"not directory: {image_dir}", "WARNING")
        return 0
    images = sorted(f for f in os.listdir(image_dir) if os.path.splitext(f)[1] in IMAGE_EXTENSIONS)
    log(f"found directory {image_dir} contains {len(images)} image files")
    missing = []
    for img in images:
        cap = os.path.join(image_dir, os.path.splitext(img)[0] + subset["caption_extension"])
        if os.path.isfile(cap):
            with open(cap, "rt", encoding="utf-8") as f:
                try:
                    lines = f.readlines()
                except UnicodeDecodeError:
                    log(f"illegal char in file (not UTF-8) / ファイルにUTF-8以外の文字があります: {cap}", "ERROR")
                    raise
            assert len(lines) > 0, f"caption file is empty / キャプションファイルが空です: {cap}"
        else:
            missing.append(img)
    if missing:
        log(
            f"No caption file found for {len(missing)} images. Training will continue without captions for these"
            f" images. If class token exists, it will be used. / {len(missing)}枚の画像にキャプションファイルが"
            f"見つかりませんでした。これらの画像についてはキャプションなしで学習を続行します。class tokenが存在する"
            f"場合はそれを使います。",
            "WARNING",
        )
        for img in missing[:3]:
            log(os.path.join(image_dir, img), "WARNING")
    if not images:
        log(f"ignore subset with image_dir='{image_dir}': no images found / 画像が見つからないためサブセットを無視します",
            "WARNING")
    return len(images)


# ---------------------------------------------------------------- model files


def check_model(path, what):
    if path is None:
        raise TypeError(f"expected str, bytes or os.PathLike object, not NoneType ({what})")
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    read_safetensors_header(path)


def lora_keys(family, train_te):
    if family == "flux":
        names = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                 "lora_unet_single_blocks_0_linear1"]
        if train_te:
            names.append("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    else:
        names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k"]
        if train_te:
            names += ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    return names


# ---------------------------------------------------------------- training


class LossRecorder:
    """train_util.LossRecorder: the mean over the current epoch's steps."""

    def __init__(self):
        self.loss_list, self.loss_total = [], 0.0

    def add(self, *, epoch, step, loss):
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self):
        return self.loss_total / len(self.loss_list) if self.loss_list else 0.0


def oom():
    raise OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which"
        " 1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in use. Of the"
        " allocated memory 20.87 GiB is allocated by PyTorch, and 1.17 GiB is reserved by PyTorch but"
        " unallocated. If reserved but unallocated memory is large try setting"
        " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for"
        " Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )


class Trainer:
    def __init__(self, family, args):
        self.family, self.args = family, args
        self.rank = args.network_dim or 4
        self.train_te = not args.network_train_unet_only
        self.metadata = {}

    def weights(self, step):
        """Deterministic LoRA weights that move with the step."""
        grow = 1.0 - math.exp(-step / 50.0)
        tensors = {}
        for i, name in enumerate(lora_keys(self.family, self.train_te)):
            r = self.rank
            tensors[f"{name}.lora_down.weight"] = ([r, 8], [0.01 * (i + 1) * grow * ((k % 7) - 3) for k in range(r * 8)])
            tensors[f"{name}.lora_up.weight"] = ([8, r], [0.001 * (i + 1) * grow * ((k % 5) - 2) for k in range(8 * r)])
            tensors[f"{name}.alpha"] = ([], [float(self.args.network_alpha)])
        return tensors

    def save_model(self, ckpt_name, step, epoch):
        a = self.args
        os.makedirs(a.output_dir, exist_ok=True)
        ckpt_file = os.path.join(a.output_dir, ckpt_name)
        aprint(f"\nsaving checkpoint: {ckpt_file}")
        meta = dict(self.metadata, ss_steps=str(step), ss_epoch=str(epoch), ss_training_finished_at=str(time.time()))
        write_safetensors(ckpt_file, self.weights(step), meta)

    def save_state(self, state_dir, step, epoch, current_step):
        log(f"Saving current state to {state_dir}")
        os.makedirs(state_dir, exist_ok=True)
        # The pre-hook (save_model_hook) runs before accelerate writes anything.
        train_state = os.path.join(state_dir, "train_state.json")
        log(f"save train state to {train_state} at epoch {epoch} step {current_step + 1}")
        with open(train_state, "w", encoding="utf-8") as f:
            json.dump({"current_epoch": epoch, "current_step": current_step + 1}, f)
        model = os.path.join(state_dir, "model.safetensors")
        write_safetensors(model, self.weights(step), {"format": "pt"})
        log(f"Model weights saved in {model}")
        optimizer = os.path.join(state_dir, "optimizer.bin")
        with open(optimizer, "wb") as f:
            pickle.dump({"state": {"step": step}, "param_groups": [{"lr": self.args.learning_rate}]}, f)
        log(f"Optimizer state saved in {optimizer}")
        scheduler = os.path.join(state_dir, "scheduler.bin")
        with open(scheduler, "wb") as f:
            pickle.dump({"last_epoch": step, "base_lrs": [self.args.learning_rate]}, f)
        log(f"Scheduler state saved in {scheduler}")
        rng = os.path.join(state_dir, "random_states_0.pkl")
        with open(rng, "wb") as f:
            pickle.dump({"random_state": random.getstate(), "step": step}, f)
        log(f"Random states saved in {rng}")

    def load_state(self, input_dir):
        log(f"resume training from local state: {input_dir}")
        if not os.path.isdir(input_dir):
            raise ValueError(f"Tried to find {input_dir} but folder does not exist")
        log(f"Loading states from {input_dir}")
        steps = None
        train_state = os.path.join(input_dir, "train_state.json")
        if os.path.exists(train_state):
            with open(train_state, "r", encoding="utf-8") as f:
                data = json.load(f)
            steps = data["current_step"]
            log(f"load train state from {train_state}: {data}")
        read_safetensors_header(os.path.join(input_dir, "model.safetensors"))
        log("All model weights loaded successfully")
        for name, what in (("optimizer.bin", "optimizer"), ("scheduler.bin", "scheduler")):
            with open(os.path.join(input_dir, name), "rb") as f:
                pickle.load(f)
            log(f"All {what} states loaded successfully")
        with open(os.path.join(input_dir, "random_states_0.pkl"), "rb") as f:
            pickle.load(f)
        log("All random states loaded successfully")
        return steps

    def train(self):
        a, family = self.args, self.family
        if a.seed is not None:
            random.seed(a.seed)
        subsets = load_dataset(a)
        counts = [load_subset_images(s) for s in subsets]
        num_train_images = sum(c * s["num_repeats"] for c, s in zip(counts, subsets))
        log(f"{num_train_images} train images with repeating.")
        if num_train_images == 0:
            log(NO_DATA, "ERROR")
            return
        batches_per_epoch = sum(math.ceil(c * s["num_repeats"] / s["batch_size"]) for c, s in zip(counts, subsets))
        batch_size = subsets[0]["batch_size"]

        log("preparing accelerator")
        if a.fp8_base or a.fp8_base_unet:
            assert a.mixed_precision != "no", (
                "fp8_base requires mixed precision='fp16' or 'bf16' / fp8を使う場合はmixed_precision='fp16'または'bf16'が必要です。"
            )
        if family == "flux":
            log("Checking the state dict: Diffusers or BFL, dev or schnell")
            check_model(a.pretrained_model_name_or_path, "pretrained_model_name_or_path")
            for what in ("clip_l", "t5xxl", "ae"):
                check_model(getattr(a, what), what)
            expected = {"networks.lora_flux", "networks.oft_flux"}
        else:
            log("load StableDiffusion checkpoint")
            check_model(a.pretrained_model_name_or_path, "pretrained_model_name_or_path")
            expected = {"networks.lora", "networks.dylora", "networks.oft"}
        aprint("import network module:", a.network_module)
        if a.network_module not in expected:
            raise ModuleNotFoundError(f"No module named '{a.network_module}'")
        aprint("prepare optimizer, data loader etc.")

        if a.max_train_epochs is not None:
            a.max_train_steps = a.max_train_epochs * math.ceil(batches_per_epoch / a.gradient_accumulation_steps)
            aprint(f"override steps. steps for {a.max_train_epochs} epochs is / 指定エポックまでのステップ数: {a.max_train_steps}")

        self.metadata = {
            "ss_network_module": a.network_module, "ss_network_dim": str(a.network_dim),
            "ss_network_alpha": str(a.network_alpha), "ss_output_name": str(a.output_name),
            "ss_learning_rate": str(a.learning_rate), "ss_max_train_steps": str(a.max_train_steps),
            "ss_num_train_images": str(num_train_images), "ss_seed": str(a.seed),
            "ss_base_model_version": "flux1" if family == "flux" else "sdxl_base_v1-0",
            "modelspec.architecture": "flux-1-dev/lora" if family == "flux" else "stable-diffusion-xl-v1-base/lora",
        }

        steps_from_state = self.load_state(a.resume) if a.resume else None

        steps_per_epoch = math.ceil(batches_per_epoch / a.gradient_accumulation_steps)
        num_train_epochs = math.ceil(a.max_train_steps / steps_per_epoch)
        aprint("running training / 学習開始")
        aprint(f"  num train images * repeats / 学習画像の数×繰り返し回数: {num_train_images}")
        aprint("  num validation images * repeats / 学習画像の数×繰り返し回数: 0")
        aprint("  num reg images / 正則化画像の数: 0")
        aprint(f"  num batches per epoch / 1epochのバッチ数: {batches_per_epoch}")
        aprint(f"  num epochs / epoch数: {num_train_epochs}")
        aprint(f"  batch size per device / バッチサイズ: {batch_size}")
        aprint(f"  gradient accumulation steps / 勾配を合計するステップ数 = {a.gradient_accumulation_steps}")
        aprint(f"  total optimization steps / 学習ステップ数: {a.max_train_steps}")

        # train_network.py: initial step, epoch to start, global_step.
        initial_step = 0
        if a.initial_epoch is not None or a.initial_step is not None:
            if steps_from_state is not None:
                log("steps from the state is ignored because initial_step is specified", "WARNING")
            if a.initial_step is not None:
                initial_step = a.initial_step
            else:
                initial_step = (a.initial_epoch - 1) * steps_per_epoch
        elif steps_from_state is not None:
            initial_step = steps_from_state
        if initial_step > 0:
            assert a.max_train_steps > initial_step, (
                "max_train_steps should be greater than initial step / max_train_stepsは初期ステップより大きい必要があります:"
                f" {a.max_train_steps} vs {initial_step}"
            )
        epoch_to_start = 0
        if initial_step > 0:
            if a.skip_until_initial_step:
                log(f"skipping {initial_step} steps / {initial_step}ステップをスキップします")
                initial_step *= a.gradient_accumulation_steps
                epoch_to_start = initial_step // steps_per_epoch
            else:
                epoch_to_start = initial_step // steps_per_epoch
                initial_step = 0
        global_step = 0
        if initial_step > 0:
            for skip_epoch in range(epoch_to_start):
                log(f"skipping epoch {skip_epoch + 1} because initial_step (multiplied) is {initial_step}")
                initial_step -= batches_per_epoch
            global_step = initial_step

        kind, at = fault()
        nan_from = int(os.environ.get("STANDIN_NAN_FROM", "0") or 0)
        step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.02"))
        loss_recorder = LossRecorder()
        bar = Bar(a.max_train_steps - initial_step, "steps", min_interval=0.1)
        name = a.output_name
        epoch = epoch_to_start
        for epoch in range(epoch_to_start, num_train_epochs):
            aprint(f"\nepoch {epoch + 1}/{num_train_epochs}\n")
            current_epoch = epoch + 1
            # accelerator.skip_first_batches(loader, initial_step - 1), then one
            # more batch dropped by `continue` inside the loop.
            skipping = initial_step > 0
            batches = batches_per_epoch - (initial_step - 1) if skipping else batches_per_epoch
            initial_step = 1 if skipping else 0
            for step in range(batches):
                current_step = global_step
                if initial_step > 0:
                    initial_step -= 1
                    continue
                training = global_step + 1
                if kind and training == at:
                    if kind == "oom":
                        oom()
                    if kind == "crash":
                        raise RuntimeError(f"stand-in crash at step {training}")
                    if kind == "exit0":
                        sys.stdout.flush()
                        os._exit(0)
                    if kind == "hang":
                        while True:
                            time.sleep(3600)
                time.sleep(step_seconds)
                loss = 0.05 + 0.45 * math.exp(-training / 25.0)
                if nan_from and training >= nan_from:
                    loss = float("nan")
                bar.update(1)
                global_step += 1
                if a.save_every_n_steps is not None and global_step % a.save_every_n_steps == 0:
                    self.save_model(STEP_FILE_NAME.format(name, global_step) + ".safetensors", global_step, epoch)
                    if a.save_state:
                        log("")
                        log(f"saving state at step {global_step}")
                        state_dir = os.path.join(a.output_dir, STEP_STATE_NAME.format(name, global_step))
                        self.save_state(state_dir, global_step, current_epoch, current_step)
                loss_recorder.add(epoch=epoch, step=step, loss=loss)
                bar.set_postfix(avr_loss=loss_recorder.moving_average)
                if global_step >= a.max_train_steps:
                    break
        if a.save_state or a.save_state_on_train_end:
            log("")
            log("saving last state.")
            self.save_state(os.path.join(a.output_dir, LAST_STATE_NAME.format(name)), global_step, epoch + 1,
                            global_step - 1)
        self.save_model(f"{name}.safetensors", global_step, num_train_epochs)
        log("model saved.")
        bar.close()


def main(family):
    global SIMPLE
    parser = setup_parser(family)
    args = parser.parse_args()
    args = read_config_from_file(args, parser)
    SIMPLE = bool(args.console_log_simple)
    Trainer(family, args).train()
