"""The Trainer loop: steps, logs, checkpoints and resume as transformers does
them, plus the STANDIN_* faults. Subclasses (the trl stand-ins) give the loss
curve and their extra logged metrics."""
import json
import math
import os
import pickle
import shutil
import sys
import time
import zipfile

from standin_common import OutOfMemoryError, write_safetensors
from standin_common import fault as _fault

from .trainer_callback import (
    CallbackHandler,
    DefaultFlowCallback,
    ProgressCallback,
    TrainerControl,
    TrainerState,
)
from .trainer_utils import PREFIX_CHECKPOINT_DIR, _checkpoint_name, get_last_checkpoint


OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which "
    "1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in use. Of the "
    "allocated memory 21.90 GiB is allocated by PyTorch, and 153.24 MiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
    "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def torch_save(path, obj):
    """A torch.save-shaped file: a zip holding `archive/data.pkl`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj))
        z.writestr("archive/version", "3\n")


def torch_load(path):
    try:
        with zipfile.ZipFile(path) as z:
            return pickle.loads(z.read("archive/data.pkl"))
    except (zipfile.BadZipFile, KeyError):
        raise RuntimeError(
            "PytorchStreamReader failed reading zip archive: failed finding central directory"
        ) from None


class Trainer:
    def __init__(self, model=None, args=None, train_dataset=None, processing_class=None,
                 callbacks=None, peft_config=None, **kwargs):
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.processing_class = processing_class
        self.peft_config = peft_config
        self.callback_handler = CallbackHandler(
            [DefaultFlowCallback, ProgressCallback] + list(callbacks or [])
        )
        self.state = TrainerState()
        self.control = TrainerControl()

    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    # What the subclasses change.
    def loss_at(self, step):
        return 2.0 * 0.95**step + 0.5

    def step_logs(self, step, loss, lr):
        grad_norm = float("nan") if math.isnan(loss) else 1.5 * 0.97**step + 0.2
        return {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr}

    def _event(self, name, **kwargs):
        self.control = self.callback_handler.call(name, self.args, self.state, self.control, **kwargs)

    def log(self, logs):
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._event("on_log", logs=logs)

    def collate(self, step):
        """Where the data collator pads a batch; the ORPO stand-in checks its pad token here."""

    def create_scheduler(self, total):
        """transformers' get_scheduler: the schedulers that need `lr_scheduler_kwargs` fail without them."""
        name = self.args.lr_scheduler_type
        if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            raise ValueError("One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`")
        if name == "warmup_stable_decay":
            raise TypeError("get_wsd_schedule() missing 1 required positional argument: 'num_decay_steps'")

    def _learning_rate(self, step, total):
        args = self.args
        warmup = args.get_warmup_steps(total)
        if step < warmup:
            return args.learning_rate * step / max(1, warmup)
        if args.lr_scheduler_type in ("constant", "constant_with_warmup"):
            return args.learning_rate
        return args.learning_rate * max(0.0, (total - step) / max(1, total - warmup))

    def train(self, resume_from_checkpoint=None, **kwargs):
        args = self.args
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({args.output_dir})")
        start = 0
        if resume_from_checkpoint is not None:
            if not os.path.isfile(os.path.join(resume_from_checkpoint, "adapter_model.safetensors")):
                raise ValueError(f"Can't find a valid checkpoint at {resume_from_checkpoint}")
            saved = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
                if os.path.isfile(os.path.join(resume_from_checkpoint, name)):
                    torch_load(os.path.join(resume_from_checkpoint, name))
            start = saved.global_step

        rows = len(self.train_dataset)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(rows / per_step)) if rows else 1
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        self.state = TrainerState(
            global_step=start,
            max_steps=max_steps,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            train_batch_size=args.per_device_train_batch_size,
            epoch=start / steps_per_epoch,
        )
        self.control = TrainerControl()
        self.create_scheduler(max_steps)
        self._event("on_train_begin")
        began = time.time()
        seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.02"))
        nan_from = int(os.environ.get("STANDIN_NAN_FROM", "0") or 0)
        fault, fault_step = _fault()
        losses = []
        if rows == 0:
            print("There seems not to be a single sample in your epoch_iterator, stopping training at step "
                  f"{start}!", file=sys.stderr, flush=True)
            self.control.should_training_stop = True
        for step in range(start + 1, max_steps + 1):
            if self.control.should_training_stop:
                break
            if step == fault_step:
                self._fault(fault, step)
            self.collate(step)
            self.control.should_log = self.control.should_save = False
            self._event("on_step_begin")
            time.sleep(seconds)
            loss = float("nan") if nan_from and step >= nan_from else self.loss_at(step)
            losses.append(loss)
            self.state.global_step = step
            self.state.epoch = step / steps_per_epoch
            self._event("on_step_end")
            if self.control.should_log:
                self.log(self.step_logs(step, loss, self._learning_rate(step, max_steps)))
            if self.control.should_save:
                self._save_checkpoint()
                self.control.should_save = False
                self._event("on_save")

        runtime = max(time.time() - began, 1e-4)
        done = self.state.global_step - start
        self.log({
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(done * per_step / runtime, 3),
            "train_steps_per_second": round(done / runtime, 3),
            "total_flos": 0.0,
            "train_loss": sum(losses) / len(losses) if losses else 0.0,
        })
        self._event("on_train_end")
        return self.state

    def _fault(self, kind, step):
        if kind == "oom":
            raise OutOfMemoryError(OOM_MESSAGE)
        if kind == "crash":
            raise RuntimeError(f"simulated crash at step {step}")
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "exit0":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def _save_checkpoint(self):
        directory = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(directory, exist_ok=True)
        self.save_model(directory)
        if not self.args.save_only_model:
            step = self.state.global_step
            torch_save(os.path.join(directory, "optimizer.pt"), {"state": {"step": step}, "param_groups": []})
            torch_save(os.path.join(directory, "scheduler.pt"), {"last_epoch": step})
            torch_save(os.path.join(directory, "rng_state.pth"), {"python": step, "cpu": [step]})
        self.state.save_to_json(os.path.join(directory, "trainer_state.json"))
        self._rotate_checkpoints()

    def _rotate_checkpoints(self):
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        found = sorted(
            int(m.group(1))
            for name in os.listdir(self.args.output_dir)
            if (m := _checkpoint_name.search(name))
        )
        for step in found[: max(0, len(found) - limit)]:
            shutil.rmtree(os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}"), ignore_errors=True)

    def save_model(self, output_dir=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self.peft_config is not None:
            self._save_adapter(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch_save(os.path.join(output_dir, "training_args.bin"), self.args.to_dict())

    def _save_adapter(self, output_dir):
        lora, config = self.peft_config, getattr(self.model, "config", {})
        hidden = min(int(config.get("hidden_size", 16)), 64)
        layers = min(int(config.get("num_hidden_layers", 2)), 4)
        modules = ALL_LINEAR if lora.target_modules == "all-linear" else sorted(lora.target_modules or [])
        scale = 1.0 + 0.001 * self.state.global_step
        tensors = {}
        for layer in range(layers):
            for module in modules:
                parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = (
                    [lora.r, hidden], [0.01 * scale * ((i % 7) - 3) for i in range(lora.r * hidden)])
                tensors[f"{prefix}.lora_B.weight"] = (
                    [hidden, lora.r], [0.001 * scale * ((i % 5) - 2) for i in range(lora.r * hidden)])
        write_safetensors(os.path.join(output_dir, "adapter_model.safetensors"),
                          dict(sorted(tensors.items())), {"format": "pt"})
        adapter_config = {
            "base_model_name_or_path": getattr(self.model, "name_or_path", None),
            "bias": lora.bias,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "modules_to_save": lora.modules_to_save,
            "peft_type": "LORA",
            "r": lora.r,
            "target_modules": modules,
            "task_type": lora.task_type,
            "use_dora": False,
            "use_rslora": False,
        }
        with open(os.path.join(output_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(f"---\nbase_model: {adapter_config['base_model_name_or_path']}\nlibrary_name: peft\n---\n")
