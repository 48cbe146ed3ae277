"""Lets SimpleTuner's data loader run on a machine without a GPU: imported
at start-up by every Python of the real-SimpleTuner tier (PYTHONPATH), it
makes `Tensor.pin_memory` a no-op when there is no CUDA device.

SimpleTuner pins each cached latent and text embed unless the machine has
Apple's MPS (`helpers/training/collate.py`, `fetch_latent` and the text
embed collation), and PyPI's torch raises "Found no NVIDIA driver" for that
without a GPU. Pinning only speeds up copies to a GPU, so skipping it
changes nothing else. Nothing else is patched.
"""
import torch

if not torch.cuda.is_available():
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
