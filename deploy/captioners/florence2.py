#!/usr/bin/env python3
"""A Florence-2 caption program for Trainyard's `command` caption backend.

Florence-2 does not run under current vLLM (vllm#24907, #31819), so it runs
here under transformers, one file per run, as the contract in
captioner/src/caption/command.rs asks:

    florence2.py --media image|video --file PATH --prompt "<DETAILED_CAPTION>"

prints one caption on stdout and exits 0; exit 3 refuses a file (videos:
Florence-2 reads images only). Configure it in trainyard.toml:

    [captioner.caption.commands.florence2]
    argv = ["/opt/florence/venv/bin/python", "/opt/trainyard/deploy/captioners/florence2.py"]
    model = "microsoft/Florence-2-large"
    timeout_secs = 120
    concurrency = 1

This is documentation and an example: loading the model per file is slow;
a production program would keep a small server warm and answer from it.
Needs: torch, transformers (with trust_remote_code), pillow.
"""
import argparse
import os
import sys

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--media", required=True, choices=["image", "video"])
    parser.add_argument("--file", required=True)
    parser.add_argument("--prompt", default="<DETAILED_CAPTION>")
    args = parser.parse_args()
    if args.media != "image":
        print("florence-2 reads images only", file=sys.stderr)
        return 3
    task = args.prompt if args.prompt in TASKS else "<DETAILED_CAPTION>"
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    model_id = os.environ.get("TY_CAPTION_MODEL") or "microsoft/Florence-2-large"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_id, torch_dtype=dtype, trust_remote_code=True
    ).to(device)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    image = Image.open(args.file).convert("RGB")
    inputs = processor(text=task, images=image, return_tensors="pt").to(device, dtype)
    ids = model.generate(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        max_new_tokens=1024,
        num_beams=3,
    )
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task=task, image_size=image.size)
    # One line; Trainyard strips "The image shows" and adds the trigger word.
    print(" ".join(str(parsed[task]).split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
