"""`torch.cuda` device queries, answered for the GPU named by `STANDIN_GPU`:
a compute capability such as `7.5` (T4) or `8.0` (A100); unset or empty
means no CUDA device (CPU only), as on a machine without a GPU.

`is_bf16_supported` follows torch: capability 8 or more is native bf16;
below that, with `including_emulation=True` (the default) it answers True,
since a bf16 tensor can be created on any CUDA device.
"""
import os


def _capability():
    spec = os.environ.get("STANDIN_GPU", "").strip()
    if not spec:
        return None
    major, _, minor = spec.partition(".")
    return int(major), int(minor or 0)


def is_available():
    return _capability() is not None


def device_count():
    return 1 if is_available() else 0


def current_device():
    if not is_available():
        raise RuntimeError("Found no NVIDIA driver on your system.")
    return 0


def get_device_capability(device=None):
    current_device()
    return _capability()


def is_bf16_supported(including_emulation=True):
    if not is_available():
        return False
    if _capability()[0] >= 8:
        return True
    return bool(including_emulation)
