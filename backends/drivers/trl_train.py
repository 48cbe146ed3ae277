#!/usr/bin/env python3
"""Trainyard's TRL driver: one LoRA run of SFT, DPO or ORPO from a JSON config.

The `trl sft` / `trl dpo` commands cannot resume (they call `trainer.train()`
with no argument) and ORPO has no command at all, so the worker runs this
script instead. It resumes from the newest `checkpoint-N` in `output_dir` when
there is one, stops gracefully (save a checkpoint, then exit) when the file
named by `stop_file` appears, and saves the final adapter to `output_dir`.

Config keys: method (sft|dpo|orpo), model (a transformers model folder),
dataset (a JSONL file), output_dir, stop_file, args (keyword arguments of the
method's Config class, a TrainingArguments subclass), lora (keyword arguments
of peft.LoraConfig).

What the driver adds to `args`: `bf16` and `fp16` when the config leaves them
out (see `choose_precision`). What it checks before loading anything heavy:
the precision asked for, and that the dataset file has a row. For ORPO it
loads the tokenizer itself and gives it a pad token (ORPO sets none).
"""
import argparse
import json
import os
import sys

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint


def method_classes(method):
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise ValueError(f"unknown method {method!r}; expected sft, dpo or orpo")


class UnsupportedPrecision(ValueError):
    """The job asked for a mixed precision this machine cannot run."""


def choose_precision(args):
    """Sets `bf16` and `fp16` in `args` for this machine; returns the mixed precision (bf16, fp16 or no).

    TRL's configs default `bf16` to `not fp16`, and transformers refuses bf16
    where `torch.cuda.is_bf16_supported()` is False (every CPU-only machine),
    so a flag the job leaves out is chosen here: bf16 where the GPU has it
    natively (compute capability 8 or more), else fp16 on CUDA, else neither
    (fp32 on CPU); never one that contradicts a flag the job set (bf16 false
    alone gives fp16 on CUDA; both false give fp32). A flag the job set to
    true is checked against the machine: bf16 as transformers checks it,
    fp16 needs a CUDA device.
    """
    cuda = torch.cuda.is_available()
    if args.get("bf16") and not (cuda and torch.cuda.is_bf16_supported()):
        where = "this machine has no CUDA GPU" if not cuda else "this machine's GPU does not support it"
        raise UnsupportedPrecision(
            f"training.extras.bf16 is true, but {where}: set bf16 to false"
            + (" and fp16 to true" if cuda else "")
            + ", or leave both unset so the precision is chosen for the machine"
        )
    if args.get("fp16") and not cuda:
        raise UnsupportedPrecision(
            "training.extras.fp16 is true, but this machine has no CUDA GPU: set fp16 to false, "
            "or leave both unset so the precision is chosen for the machine"
        )
    # Emulated bf16 (below compute capability 8) counts for transformers, but is slow: choose fp16 there.
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if args.get("bf16") is None:
        args["bf16"] = native_bf16 and not args.get("fp16")
    if args.get("fp16") is None:
        args["fp16"] = cuda and not args["bf16"]
    return "bf16" if args["bf16"] else "fp16" if args["fp16"] else "no"


def require_rows(path):
    """Fails when the dataset file has no row. datasets' JSON loader reads the
    features off the file's first table with `next(iter(...))`, so on an
    empty file `load_dataset` dies with a bare StopIteration instead."""
    if not os.path.isfile(path):
        return  # load_dataset names the missing file
    with open(path, "rb") as f:
        if any(line.strip() for line in f):
            return
    raise ValueError(f"Dataset {path} has no rows: the file is empty")


def padded_tokenizer(model):
    """The model's tokenizer with a pad token: its own, else its eos token.

    SFTTrainer and DPOTrainer fall back to the eos token themselves; ORPO's
    collator raises on the first batch when the tokenizer has no pad token,
    which is the case for Llama tokenizers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {model} has no pad token and no eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class StopOnSentinel(TrainerCallback):
    """Saves a checkpoint and ends training once the sentinel file exists."""

    def __init__(self, path):
        self.path = path
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if os.path.exists(self.path):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control


class AnnounceCheckpoints(TrainerCallback):
    """Checkpoint saves are logged at INFO level, hidden by default: say so on stdout."""

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        print(f"💾 Checkpoint saved to {path}.", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    with open(parser.parse_args().config, encoding="utf-8") as f:
        config = json.load(f)

    config_class, trainer_class = method_classes(config["method"])
    args = dict(config["args"])
    precision = choose_precision(args)
    print(f"Mixed precision: {precision}", flush=True)
    require_rows(config["dataset"])
    dataset = load_dataset("json", data_files=config["dataset"], split="train")
    if len(dataset) == 0:
        raise ValueError(f"Dataset {config['dataset']} has no rows")

    training_args = config_class(output_dir=config["output_dir"], **args)
    extra = {}
    if config["method"] == "orpo":
        extra["processing_class"] = padded_tokenizer(config["model"])
    stop = StopOnSentinel(config["stop_file"])
    trainer = trainer_class(
        model=config["model"],
        args=training_args,
        train_dataset=dataset,
        peft_config=LoraConfig(**config["lora"]),
        callbacks=[stop, AnnounceCheckpoints()],
        **extra,
    )

    last = None
    if os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
    if last is not None:
        print(f"Resuming training from checkpoint: {last}", flush=True)
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer.train()

    if stop.requested and trainer.state.global_step < training_args.max_steps:
        print(
            f"🛑 Stopped on request at step {trainer.state.global_step}; "
            "the last checkpoint holds the progress.",
            flush=True,
        )
        return 0

    print("✅ Training completed.", flush=True)
    trainer.save_model(training_args.output_dir)
    print(f"💾 Model saved to {training_args.output_dir}.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
