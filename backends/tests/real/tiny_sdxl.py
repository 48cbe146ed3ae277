#!/usr/bin/env python3
"""Writes a tiny, randomly initialised SDXL pipeline to a folder, laid out as
the `sdxl-base-1.0` preset's `diffusers` part is (`model_index.json`, the
components' configs, tokenizers, and fp16-variant weights): the real
SimpleTuner tier trains LoRAs on it on a CPU, with no Hub access.

The components are SDXL's classes with tiny configs (the sizes diffusers'
own SDXL tests use): a UNet with SDXL's `text_time` conditioning, a
two-level VAE, and two CLIP text encoders (the second with a projection)
over a byte-level CLIP vocabulary written here, with no merges.
`--variant ''` writes plain weight files instead of `*.fp16.safetensors`.

`--dataset DIR --images N` also writes N captioned images of random noise
(`img<i>.png`, `img<i>.txt`), `--size` pixels square.
"""
import argparse
import json
import os
import tempfile

import torch
from PIL import Image
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte, as CLIP's vocabulary has."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer(folder, pad):
    """CLIP's tokenizer over single bytes: every byte alone and at a word's
    end, and the two special tokens."""
    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars] + [BOS, EOS]:
        vocab[token] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        pad_token=pad,
        model_max_length=77,
    )
    return tok


def text_config(tok, projection_dim):
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def dataset(folder, count, size):
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w", encoding="utf-8") as f:
            f.write(f"ohwx, a photo of noise number {i}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", default="fp16")
    parser.add_argument("--dataset")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if args.dataset:
        dataset(args.dataset, args.images, args.size)
    with tempfile.TemporaryDirectory() as scratch:
        tok1 = tokenizer(os.path.join(scratch, "tokenizer"), pad=EOS)
        tok2 = tokenizer(os.path.join(scratch, "tokenizer_2"), pad="!")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(tok1, 32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tok2, 32))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        # 6 time ids of 8 each, plus the second encoder's pooled projection.
        projection_class_embeddings_input_dim=6 * 8 + 32,
        # The two encoders' hidden states side by side.
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
    )
    if args.variant:
        pipe.to(torch.float16)
    pipe.save_pretrained(args.out, variant=args.variant or None, safe_serialization=True)


if __name__ == "__main__":
    main()
