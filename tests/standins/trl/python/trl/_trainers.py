"""The method trainers: model and tokenizer loading, dataset checks with TRL's
error texts, the loss curve and the metrics each method logs."""
import re
import sys
from dataclasses import dataclass

from peft import PeftConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments


@dataclass
class _BaseConfig(TrainingArguments):
    """TRL's base config: `bf16` defaults to `not fp16` (so to True), which
    transformers then refuses on a machine without bf16 support."""

    logging_steps: float = 10
    gradient_checkpointing: bool = True
    bf16: bool = None

    def __post_init__(self):
        self.bf16 = not (self.fp16) if self.bf16 is None else self.bf16
        super().__post_init__()


@dataclass
class SFTConfig(_BaseConfig):
    learning_rate: float = 2e-5
    model_init_kwargs: dict = None
    dataset_text_field: str = "text"
    max_length: int = 1024
    packing: bool = False
    completion_only_loss: bool = None
    assistant_only_loss: bool = False
    loss_type: str = "nll"
    pad_token: str = None


DPO_LOSSES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]


@dataclass
class DPOConfig(_BaseConfig):
    learning_rate: float = 1e-6
    model_init_kwargs: dict = None
    beta: float = 0.1
    loss_type: list = None
    max_length: int = 1024
    max_prompt_length: int = 512

    def __post_init__(self):
        if self.loss_type is None:
            self.loss_type = ["sigmoid"]
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        super().__post_init__()


def _map_bar(description, rows):
    """What a datasets `.map(desc=…)` leaves on stderr."""
    bar = "█" * 10
    sys.stderr.write(f"\r{description}: 100%|{bar}| {rows}/{rows} [00:00<00:00, 812.40 examples/s]\n")
    sys.stderr.flush()


def _conversational(value):
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


class MethodTrainer(Trainer):
    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, peft_config=None, **kwargs):
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.name_or_path)
        if peft_config is not None and not isinstance(peft_config, PeftConfig):
            raise TypeError(
                "`peft_config` must be a `peft.PeftConfig` instance (e.g. `peft.LoraConfig`), "
                f"got {type(peft_config).__name__}."
            )
        self.prepare_dataset(train_dataset, processing_class, args)
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config)

    def apply_template(self, tokenizer, row, keys):
        for key in keys:
            if _conversational(row.get(key)):
                tokenizer.apply_chat_template(row[key])


def _has_generation_markers(template):
    return re.search(r"\{%-?\s*generation\s*-?%\}", template or "") is not None


class SFTTrainer(MethodTrainer):
    def prepare_dataset(self, dataset, tokenizer, args):
        if args.loss_type not in ("nll", "dft"):
            raise ValueError(f"Invalid `loss_type` {args.loss_type} passed. Supported values are 'nll' and 'dft'.")
        # The collator's pad token: the config's, the tokenizer's, or its eos token.
        tokenizer.pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        columns = dataset.column_names
        first = dataset[0] if len(dataset) else {}
        conversational = any(_conversational(first.get(k)) for k in ("messages", "prompt", "completion"))
        if args.assistant_only_loss and not conversational:
            raise ValueError(
                "You set `assistant_only_loss=True`, but the dataset is not conversational. This option is only "
                "supported for conversational datasets."
            )
        # TRL swaps in a training template only for the model families it ships one for; the stand-in knows none.
        if args.assistant_only_loss and not _has_generation_markers(tokenizer.chat_template):
            raise ValueError(
                "The chat template is not training-compatible (missing prefix-preservation or `{% generation %}` "
                "markers) and patching is not supported for this template. Please manually modify the chat "
                "template for training."
            )
        if "messages" in columns:
            keys = ["messages"]
        elif "prompt" in columns and "completion" in columns:
            keys = ["prompt", "completion"]
        else:
            keys = [args.dataset_text_field]
        for row in dataset:
            self.apply_template(tokenizer, row, keys)
            for key in keys:
                row[key]  # the real tokenize step raises KeyError on a missing column
        _map_bar("Adding EOS to train dataset", len(dataset))
        _map_bar("Tokenizing train dataset", len(dataset))
        _map_bar("Truncating train dataset", len(dataset))

    def step_logs(self, step, loss, lr):
        logs = super().step_logs(step, loss, lr)
        logs.update({
            "entropy": 1.9 * 0.98**step + 0.4,
            "num_tokens": float(256 * step * self.args.per_device_train_batch_size),
            "mean_token_accuracy": 0.9 - 0.4 * 0.95**step,
        })
        return logs


class PreferenceTrainer(MethodTrainer):
    def prepare_dataset(self, dataset, tokenizer, args):
        self.pad_fallback(tokenizer)
        columns = dataset.column_names
        for key in ("chosen", "rejected"):
            if key not in columns:
                raise KeyError(key)
        _map_bar("Extracting prompt in train dataset", len(dataset))
        for row in dataset:
            self.apply_template(tokenizer, row, ["prompt", "chosen", "rejected"])
        _map_bar("Applying chat template to train dataset", len(dataset))
        _map_bar("Tokenizing train dataset", len(dataset))

    def reward_logs(self, step):
        chosen, rejected = 0.02 * step, -0.015 * step
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": min(1.0, 0.5 + 0.05 * step),
            "rewards/margins": chosen - rejected,
            "logps/chosen": -120.0 + step,
            "logps/rejected": -125.0 - step,
            "logits/chosen": -1.25,
            "logits/rejected": -1.3,
        }


class DPOTrainer(PreferenceTrainer):
    def __init__(self, model=None, ref_model=None, args=None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)

    def pad_fallback(self, tokenizer):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def collate(self, step):
        # The loss is chosen by name when the first batch's loss is computed.
        for loss_type in self.args.loss_type:
            if loss_type not in DPO_LOSSES:
                raise ValueError(f"Unknown loss type: {loss_type}. Should be one of {DPO_LOSSES}")

    def loss_at(self, step):
        return 0.6931 * 0.93**step + 0.05

    def step_logs(self, step, loss, lr):
        logs = super().step_logs(step, loss, lr)
        logs.update(self.reward_logs(step))
        return logs
