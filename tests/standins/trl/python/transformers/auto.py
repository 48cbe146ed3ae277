"""from_pretrained on a local model folder, with transformers' error texts."""
import json
import os
import struct

from standin_common import SafetensorError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _config(path):
    if not os.path.isdir(path):
        raise OSError(
            f"Incorrect path_or_model_id: '{path}'. Please provide either the path to a local folder "
            "or the repo_id of a model on the Hub."
        )
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise OSError(
            f"{path} does not appear to have a file named config.json. Checkout "
            f"'https://huggingface.co/{path}/tree/None' for available files."
        )
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if "model_type" not in config:
        raise ValueError(
            f"Unrecognized model in {path}. Should have a `model_type` key in its config.json."
        )
    return config


def _check_safetensors(file):
    with open(file, "rb") as f:
        data = f.read()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        if 8 + size > len(data):
            raise ValueError
        json.loads(data[8 : 8 + size])
    except (struct.error, ValueError):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge") from None


class Model:
    def __init__(self, path, config):
        self.name_or_path = path
        self.config = config


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path, **kwargs):
        config = _config(path)
        found = [w for w in WEIGHTS if os.path.isfile(os.path.join(path, w))]
        if not found:
            raise OSError(
                f"Error no file named pytorch_model.bin, model.safetensors, tf_model.h5, model.ckpt.index "
                f"or flax_model.msgpack found in directory {path}."
            )
        if found[0] == "model.safetensors":
            _check_safetensors(os.path.join(path, found[0]))
        return Model(path, config)


class Tokenizer:
    FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja")

    def __init__(self, path, chat_template, special_tokens=None):
        self.name_or_path = path
        self.chat_template = chat_template
        special = special_tokens or {}
        # Llama tokenizers ship an eos token and no pad token.
        self.eos_token = special.get("eos_token")
        self.pad_token = special.get("pad_token")

    @property
    def pad_token_id(self):
        """None while there is no pad token, as in transformers."""
        return None if self.pad_token is None else self._token_id(self.pad_token)

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self._token_id(self.eos_token)

    @staticmethod
    def _token_id(token):
        return 32000 + sum(token.encode("utf-8")) % 256

    def save_pretrained(self, directory):
        for name in self.FILES:
            source = os.path.join(self.name_or_path, name)
            if os.path.isfile(source):
                with open(source, "rb") as f, open(os.path.join(directory, name), "wb") as out:
                    out.write(f.read())

    def apply_chat_template(self, messages, **kwargs):
        if not self.chat_template:
            raise ValueError(
                "Cannot use chat template functions because tokenizer.chat_template is not set and no "
                "template argument was passed! For information about writing templates and setting the "
                "tokenizer.chat_template attribute, please see the documentation at "
                "https://huggingface.co/docs/transformers/main/en/chat_templating"
            )
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path, **kwargs):
        _config(path)
        config_file = os.path.join(path, "tokenizer_config.json")
        if not (os.path.isfile(config_file) or os.path.isfile(os.path.join(path, "tokenizer.json"))):
            raise OSError(
                f"Can't load tokenizer for '{path}'. If you were trying to load it from "
                "'https://huggingface.co/models', make sure you don't have a local directory with the same "
                f"name. Otherwise, make sure '{path}' is the correct path to a directory containing all "
                "relevant files for a PreTrainedTokenizerFast tokenizer."
            )
        template = None
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                continue
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            for key in ("eos_token", "pad_token"):
                value = data.get(key)
                # A token is a string or an AddedToken dict ({"content": ...}).
                value = value.get("content") if isinstance(value, dict) else value
                if value is not None:
                    special[key] = value
            if name == "tokenizer_config.json":
                template = data.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        return Tokenizer(path, template, special)
