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
"""
import argparse
import json
import os
import sys

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
    dataset = load_dataset("json", data_files=config["dataset"], split="train")
    if len(dataset) == 0:
        raise ValueError(f"Dataset {config['dataset']} has no rows")

    training_args = config_class(output_dir=config["output_dir"], **config["args"])
    stop = StopOnSentinel(config["stop_file"])
    trainer = trainer_class(
        model=config["model"],
        args=training_args,
        train_dataset=dataset,
        peft_config=LoraConfig(**config["lora"]),
        callbacks=[stop, AnnounceCheckpoints()],
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
