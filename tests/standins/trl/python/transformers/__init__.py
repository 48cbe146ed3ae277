"""Stand-in for `transformers`: the Trainer loop, its callbacks and checkpoints."""
from .auto import AutoModelForCausalLM, AutoTokenizer
from .trainer import Trainer
from .trainer_callback import (
    DefaultFlowCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from .training_args import TrainingArguments

__all__ = [
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "DefaultFlowCallback",
    "ProgressCallback",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
]
