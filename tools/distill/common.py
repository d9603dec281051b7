"""Small helpers shared by the stages of the distillation: a log line, atomic saves."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch


def log(message: str) -> None:
    """One timestamped progress line on stderr."""
    print(f"[distill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and a rename, so a reader
    (or a resumed run after a crash) never sees half a file. ``obj`` must hold only what
    ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, lists, dicts."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
