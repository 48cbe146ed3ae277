"""Checkpoint naming, as in transformers' trainer_utils."""
import os
import re

PREFIX_CHECKPOINT_DIR = "checkpoint"
_checkpoint_name = re.compile(r"^" + PREFIX_CHECKPOINT_DIR + r"\-(\d+)$")


def get_last_checkpoint(folder):
    """The `checkpoint-N` folder with the largest N (complete or not), or None."""
    found = [
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := _checkpoint_name.search(name)) and os.path.isdir(os.path.join(folder, name))
    ]
    if not found:
        return None
    return os.path.join(folder, max(found)[1])
