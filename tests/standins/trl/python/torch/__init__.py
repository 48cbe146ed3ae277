"""Stand-in for `torch`: only the device queries the driver and transformers
make before training (`torch.cuda`)."""
from . import cuda

__all__ = ["cuda"]
