"""Loading of the compiled extension ``ouroboros_kernels._C`` and its build report.

Importing ``_C`` registers the pool ops as ``torch.ops.ouroboros_kernels.pool_*``.
The import is attempted once, lazily; a failure is re-raised as an ImportError that
says how to build the extension.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

_BUILD_HINT = (
    "The compiled extension ouroboros_kernels._C could not be imported ({err}). Build it "
    "from the repository root with `pip install --no-build-isolation -e .` or "
    "`python setup.py build_ext --inplace` (torch must be installed first, and the "
    "extension must be rebuilt after torch is upgraded)."
)

_module: ModuleType | None = None
_error: BaseException | None = None


def load_extension() -> ModuleType:
    """Import ``ouroboros_kernels._C`` (registering the pool ops) and return it.

    Raises ImportError with build instructions when the extension is missing or broken.
    """
    global _module, _error
    if _module is not None:
        return _module
    if _error is None:
        try:
            from ouroboros_kernels import _C  # noqa: PLC0415
        except (ImportError, OSError) as err:  # OSError: an unloadable shared library
            _error = err
        else:
            _register_fake_kernels()
            _module = _C
            return _module
    raise ImportError(_BUILD_HINT.format(err=_error)) from _error


# Shape-only ("fake") kernels of the registered ops, so that torch.compile / export can
# trace them: the mutating ops return nothing, the lookups new tensors of the result shapes.


def _fake_insert(phrases, stamps, clock, keys, new_phrases):
    return None


def _fake_lookup(phrases, stamps, keys, k):
    M, L = keys.shape[0], phrases.shape[2]
    return phrases.new_empty((M, k, L)), phrases.new_empty((M,)), phrases.new_empty((M, k))


def _fake_refine(phrases, stamps, keys, slots, new_phrases):
    return None


def _fake_insert_packed(record, clock, capacity, phrase_len, keys, new_phrases):
    return None


def _fake_lookup_packed(record, capacity, phrase_len, keys, k):
    M = keys.shape[0]
    return (record.new_empty((M, k, phrase_len)), record.new_empty((M,)),
            record.new_empty((M, k)))


def _fake_refine_packed(record, capacity, phrase_len, keys, slots, new_phrases):
    return None


# Every op of csrc/pool_ops.cpp with its fake kernel. The extension also has a direct twin
# of each (``_C.<name>``, same positional arguments; see csrc/pool_module.cpp).
_FAKE_KERNELS = {
    "pool_insert": _fake_insert,
    "pool_lookup": _fake_lookup,
    "pool_refine": _fake_refine,
    "pool_insert_packed": _fake_insert_packed,
    "pool_lookup_packed": _fake_lookup_packed,
    "pool_refine_packed": _fake_refine_packed,
}
_OP_NAMES = tuple(_FAKE_KERNELS)


def _register_fake_kernels() -> None:
    for name, fn in _FAKE_KERNELS.items():
        torch.library.register_fake(f"ouroboros_kernels::{name}", fn)


def extension_info() -> dict[str, Any]:
    """What was compiled into ``ouroboros_kernels._C``.

    Returns a dict with keys:
      ``built_with_cuda`` (bool), ``cuda_version`` (str or None: the CUDA runtime the
      extension was compiled against), ``torch_version`` (the torch it was compiled
      against), ``torch_runtime_version`` (the torch imported now), ``ops`` (op name ->
      list of devices with a kernel, e.g. ``{"pool_lookup": ["cpu", "cuda"]}``),
      ``module_path`` (the shared library's file).
    Raises ImportError (with build instructions) when the extension is not built.
    """
    module = load_extension()
    ops = {}
    for name in _OP_NAMES:
        qualified = f"ouroboros_kernels::{name}"
        ops[name] = [
            device
            for device, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key)
        ]
    return {
        "built_with_cuda": bool(module.built_with_cuda),
        "cuda_version": module.cuda_version,
        "torch_version": module.torch_version,
        "torch_runtime_version": torch.__version__,
        "ops": ops,
        "module_path": getattr(module, "__file__", None),
    }
