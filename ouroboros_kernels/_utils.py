"""Small shared helpers for the kernel wrappers: dispatch and argument checks."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: without it every kernel falls back to its reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is installed wherever the tests run
    HAS_TRITON = False

# Triton decides at decoration time whether `@triton.jit` functions are interpreted, so the
# flag that matters is the one in force when this package was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run: tensors on CUDA, or the interpreter is on."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


def check_tensor(name: str, value: object, *, ndim: int | tuple[int, ...] | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """Raise a TypeError/ValueError naming ``name`` unless ``value`` is a fitting tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape "
                             f"{tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(value.dtype).replace("torch.", "")
        raise TypeError(f"{name} must have dtype {want}, got {got}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Raise a ValueError naming the arguments unless all tensors share one device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on the same device")
    return first.device


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
