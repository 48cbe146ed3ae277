"""Stand-in for `trl.experimental.orpo`: ORPOConfig and ORPOTrainer.

Unlike SFT and DPO, ORPO sets no pad-token fallback: its collator
(`DPODataCollatorWithPadding`) takes the tokenizer's `pad_token_id` as it is
and raises on the first batch when that is None, as it is for Llama
tokenizers unless the caller sets one."""
from dataclasses import dataclass

from ..._trainers import PreferenceTrainer, _BaseConfig


@dataclass
class ORPOConfig(_BaseConfig):
    learning_rate: float = 1e-6
    model_init_kwargs: dict = None
    beta: float = 0.1
    max_length: int = 1024
    max_prompt_length: int = 512
    max_completion_length: int = None
    padding_value: int = None


class ORPOTrainer(PreferenceTrainer):
    def pad_fallback(self, tokenizer):
        self.pad_token_id = tokenizer.pad_token_id

    def collate(self, step):
        if self.pad_token_id is None:
            raise ValueError(
                "Padding is enabled, but the tokenizer is not configured with a padding token."
                " Explicitly set `tokenizer.pad_token` (e.g. `tokenizer.pad_token = tokenizer.eos_token`)"
                " before calling the trainer."
            )

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
