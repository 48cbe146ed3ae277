"""Stand-in for `peft`: the LoRA config the trainers take."""
from dataclasses import asdict, dataclass, field


@dataclass
class PeftConfig:
    task_type: str = None

    def to_dict(self):
        return asdict(self)


@dataclass
class LoraConfig(PeftConfig):
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: object = None
    bias: str = "none"
    modules_to_save: list = None
    peft_type: str = field(default="LORA", init=False)

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
