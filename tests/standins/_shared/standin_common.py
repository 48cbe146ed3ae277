"""What the stand-in trainers print and write the same way: tqdm's progress
bar on a pipe, safetensors files (writing, and reading the header as
`safe_open` checks it), and a clip's frame count.

Each stand-in puts this folder on `sys.path` from its entry script (the
trl stand-in through `PYTHONPATH`, set by its `python3` wrapper).
"""
import json
import os
import struct
import subprocess
import sys
import time


# ---------------------------------------------------------------- faults


def fault():
    """`STANDIN_FAULT=<kind>@<step>` as `(kind, step)`, or `(None, None)`."""
    spec = os.environ.get("STANDIN_FAULT", "")
    if "@" not in spec:
        return None, None
    kind, step = spec.split("@", 1)
    return kind, int(step)


# The exceptions the real stacks raise, named as they print in a traceback.
class OutOfMemoryError(RuntimeError):
    pass


OutOfMemoryError.__module__ = "torch"


class HFValidationError(ValueError):
    pass


HFValidationError.__module__ = "huggingface_hub.errors"


# ---------------------------------------------------------------- clips


def count_frames(path):
    """A clip's frame count, counted by decoding it (ffprobe -count_frames;
    the real trainers count with imageio or cv2); None when it cannot be
    read. No torch, no cv2: the stand-ins need only ffmpeg's ffprobe."""
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", path],
        capture_output=True, text=True)
    try:
        return int(probe.stdout.strip().split(",")[0])
    except ValueError:
        return None


# ---------------------------------------------------------------- tqdm


def format_interval(seconds):
    """tqdm.format_interval: `MM:SS`, or `H:MM:SS` past an hour."""
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_num(n):
    """tqdm.format_num: the shorter of `{:.3g}` and `str`."""
    f = f"{n:.3g}".replace("+0", "+").replace("-0", "-")
    n = str(n)
    return f if len(f) < len(n) else n


class Bar:
    """tqdm's bar on a pipe: stderr, `\\r` before every refresh, no newline
    until it closes. `desc: 13%|█▎        | 250/2000 [06:12<43:01,  1.48s/it, postfix]`;
    without a desc the line starts at the percentage. update() refreshes
    at most every `min_interval` seconds; set_postfix() always."""

    def __init__(self, total, desc="", initial=0, min_interval=0.0):
        self.total, self.desc, self.n = total, desc, initial
        self.start_n, self.postfix, self.min_interval = initial, "", min_interval
        self.start = self.last = time.monotonic()
        self.shown = ""
        self.refresh()

    def text(self):
        elapsed = time.monotonic() - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        frac = self.n / self.total if self.total else 0
        full, partial = divmod(int(frac * 10 * 8), 8)
        bar = "█" * full + ((" ▏▎▍▌▋▊▉"[partial] + " " * (9 - full)) if full < 10 else "")
        if rate is None:
            rate_fmt, remaining = "?it/s", "?"
        else:
            rate_fmt = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
            remaining = format_interval((self.total - self.n) / rate)
        desc = f"{self.desc}: " if self.desc else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        return (f"{desc}{frac * 100:3.0f}%|{bar}| {self.n}/{self.total} "
                f"[{format_interval(elapsed)}<{remaining}, {rate_fmt}{postfix}]")

    def refresh(self):
        self.shown = self.text()
        sys.stderr.write("\r" + self.shown)
        sys.stderr.flush()
        self.last = time.monotonic()

    def update(self, k=1):
        self.n += k
        if time.monotonic() - self.last >= self.min_interval:
            self.refresh()

    def set_postfix(self, **kwargs):
        self.postfix = ", ".join(
            f"{k}={format_num(v) if isinstance(v, float) else v}" for k, v in sorted(kwargs.items()))
        self.refresh()

    def set_postfix_str(self, text):
        self.postfix = text
        self.refresh()

    def write(self, message):
        """tqdm.write: clear the bar, print the message on stdout, redraw the bar."""
        sys.stderr.write("\r" + " " * len(self.shown) + "\r")
        sys.stderr.flush()
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
        self.refresh()

    def close(self):
        self.refresh()
        sys.stderr.write("\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- safetensors


class SafetensorError(Exception):
    pass


SafetensorError.__module__ = "safetensors_rust"


def bf16(values):
    """bfloat16 bytes: the top half of each float32."""
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def write_safetensors(path, tensors, metadata=None):
    """A real safetensors file: 8-byte header length, JSON header padded to
    8 bytes, then the data. `tensors` maps a name to `(shape, float values)`
    (F32) or `(shape, bf16 bytes)` (BF16), in the order they are written."""
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, (shape, values) in tensors.items():
        if isinstance(values, bytes):
            dtype, blob = "BF16", values
        else:
            dtype, blob = "F32", struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def read_safetensors_header(path):
    """Like safe_open: FileNotFoundError for a missing file, SafetensorError for a bad one."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SafetensorError("Error while deserializing header: HeaderTooSmall")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise SafetensorError("Error while deserializing header: InvalidHeaderDeserialization") from None
    end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] or [0])
    if 8 + n + end != len(data):
        raise SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")
    return header
