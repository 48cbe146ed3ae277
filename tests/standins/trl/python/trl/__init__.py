"""Stand-in for `trl`: SFT and DPO configs and trainers over the stand-in Trainer."""
from ._trainers import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "SFTConfig", "SFTTrainer"]
