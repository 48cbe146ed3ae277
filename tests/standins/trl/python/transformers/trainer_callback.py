"""TrainerState/Control, the callback protocol, and the progress output of
transformers' ProgressCallback (a tqdm bar with no description on stderr, the
logs dict on stdout through `tqdm.write`)."""
import dataclasses
import json
import os
from dataclasses import dataclass, field

from standin_common import Bar


@dataclass
class TrainerState:
    epoch: float = None
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    save_steps: int = 500
    num_train_epochs: int = 0
    train_batch_size: int = None
    total_flos: float = 0
    log_history: list = field(default_factory=list)
    best_metric: float = None
    best_model_checkpoint: str = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str = None
    trial_params: dict = None
    stateful_callbacks: dict = field(default_factory=dict)

    def save_to_json(self, json_path):
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load_from_json(cls, json_path):
        with open(json_path, encoding="utf-8") as f:
            return cls(**json.load(f))


@dataclass
class TrainerControl:
    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False


class TrainerCallback:
    def on_init_end(self, args, state, control, **kwargs):
        pass

    def on_train_begin(self, args, state, control, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        pass

    def on_step_begin(self, args, state, control, **kwargs):
        pass

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_save(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, **kwargs):
        pass


class CallbackHandler:
    def __init__(self, callbacks):
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in callbacks]

    def add_callback(self, callback):
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def call(self, event, args, state, control, **kwargs):
        for callback in self.callbacks:
            result = getattr(callback, event)(args, state, control, **kwargs)
            if result is not None:
                control = result
        return control


class DefaultFlowCallback(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if state.global_step % state.logging_steps == 0:
            control.should_log = True
        if args.save_strategy == "steps" and state.save_steps > 0 and state.global_step % state.save_steps == 0:
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            if args.save_strategy not in ("no", "best"):
                control.should_save = True
        return control


class ProgressCallback(TrainerCallback):
    def __init__(self):
        self.training_bar = None
        self.current_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.training_bar = Bar(state.max_steps)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.training_bar.update(state.global_step - self.current_step)
        self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None:
            return
        shown = {}
        old_format = os.environ.get("STANDIN_LOG_FLOATS") == "1"
        for key, value in logs.items():
            if isinstance(value, float) and not old_format:
                shown[key] = f"{value:.4g}"
            else:
                shown[key] = value
        shown.pop("total_flos", None)
        if old_format and "epoch" in shown:
            shown["epoch"] = round(shown["epoch"], 2)
        self.training_bar.write(str(shown))

    def on_train_end(self, args, state, control, **kwargs):
        self.training_bar.close()
        self.training_bar = None
