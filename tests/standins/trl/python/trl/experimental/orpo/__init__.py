"""Stand-in for `trl.experimental.orpo`: ORPOConfig and ORPOTrainer."""
from dataclasses import dataclass

from transformers import TrainingArguments

from ..._trainers import PreferenceTrainer


@dataclass
class ORPOConfig(TrainingArguments):
    learning_rate: float = 1e-6
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    model_init_kwargs: dict = None
    beta: float = 0.1
    max_length: int = 1024
    max_prompt_length: int = 512
    max_completion_length: int = None


class ORPOTrainer(PreferenceTrainer):
    def loss_at(self, step):
        return 1.8 * 0.95**step + 0.4

    def step_logs(self, step, loss, lr):
        logs = super().step_logs(step, loss, lr)
        logs.update(self.reward_logs(step))
        logs.update({
            "nll_loss": loss * 0.9,
            "log_odds_ratio": -0.7 + 0.01 * step,
            "log_odds_chosen": 0.05 * step,
        })
        return logs


__all__ = ["ORPOConfig", "ORPOTrainer"]
