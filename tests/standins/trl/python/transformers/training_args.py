"""TrainingArguments (transformers 5.x): the fields the driver and the allowed
extras use, same names and defaults, and the checks of `__post_init__` that
they can trip. There is no `warmup_ratio` any more: `warmup_steps` below 1 is
the ratio."""
import math
from dataclasses import asdict, dataclass

import torch

SCHEDULERS = [
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
]
SAVE_STRATEGIES = ["no", "steps", "epoch", "best"]
OPTIMIZERS = [
    "adamw_torch", "adamw_torch_fused", "adafactor", "adamw_8bit", "adamw_bnb_8bit",
    "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adagrad", "lion_8bit", "lion_32bit",
]


def _one_of(value, choices, enum):
    if value not in choices:
        raise ValueError(f"{value} is not a valid {enum}, please select one of {choices}")


@dataclass
class TrainingArguments:
    output_dir: str = None
    max_steps: int = -1
    num_train_epochs: float = 3.0
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    bf16: bool = False
    fp16: bool = False
    use_cpu: bool = False
    eval_strategy: str = "no"
    gradient_checkpointing: bool = False
    logging_steps: float = 500
    logging_first_step: bool = False
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int = None
    save_only_model: bool = False
    seed: int = 42
    report_to: object = None
    disable_tqdm: bool = None

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        _one_of(self.save_strategy, SAVE_STRATEGIES, "SaveStrategy")
        _one_of(self.lr_scheduler_type, SCHEDULERS, "SchedulerType")
        _one_of(self.optim, OPTIMIZERS, "OptimizerNames")
        if self.bf16 and not self.use_cpu and not torch.cuda.is_bf16_supported():
            error_message = (
                "Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU."
            )
            if torch.cuda.is_available():
                error_message += " You need Ampere+ GPU with cuda>=11.0."
            raise ValueError(error_message)
        if self.bf16 and self.fp16:
            raise ValueError("At most one of fp16 and bf16 can be True, but not both")
        for needs_eval in ("reduce_lr_on_plateau", "greedy"):
            if self.lr_scheduler_type == needs_eval and self.eval_strategy == "no":
                raise ValueError(f"lr_scheduler_type {needs_eval} requires an eval strategy")
        if self.warmup_steps < 0:
            raise ValueError(f"Got warmup_steps = {self.warmup_steps}, Expected value warmup_steps >= 0")
        if self.save_strategy == "steps" and self.save_steps <= 0:
            raise ValueError(f"You have set `args.save_strategy` to steps but `args.save_steps` is {self.save_steps}")

    def get_warmup_steps(self, num_training_steps):
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)

    def to_dict(self):
        return asdict(self)
