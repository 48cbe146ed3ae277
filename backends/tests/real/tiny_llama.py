#!/usr/bin/env python3
"""Writes a tiny, randomly initialised Llama and its tokenizer to a folder, as
`save_pretrained` lays out a Hub model: the real-TRL tier trains LoRAs on it
on a CPU, with no Hub access.

The tokenizer is a byte-level BPE trained here on a few sentences. Like
Llama's, it has BOS and EOS tokens and no pad token. `--template plain` gives
a chat template without `{% generation %}` markers (as most models ship),
`--template generation` one with them (what `assistant_only_loss` needs).
"""
import argparse

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The sky is blue. The grass is green. The sun is bright.",
    "hi hello how are you today? I am fine, thank you.",
    "user assistant system: answer briefly and politely.",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]

PLAIN = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

GENERATION = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}assistant: {% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def tokenizer(template):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = GENERATION if template == "generation" else PLAIN
    return tok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--template", choices=["plain", "generation"], default="plain")
    args = parser.parse_args()

    tok = tokenizer(args.template)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
