"""Builds ``ouroboros_kernels._C``: the candidate-pool ops.

A ``CUDAExtension`` (C++ and ``.cu``) is built when the installed torch has CUDA and
nvcc is found; otherwise a ``CppExtension`` (CPU only). ``TORCH_CUDA_ARCH_LIST`` is
honoured by torch's build helper. ``OUROBOROS_FORCE_CPU=1`` forces the CPU build.
"""

import glob
import os
import sys

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # most often: pip's isolated build environment has no torch
    sys.exit(
        f"\n[ouroboros] cannot build the extension: torch is not importable here ({error}).\n"
        "ouroboros-decoding compiles against the torch you run it with, so torch is not a build\n"
        "requirement (an isolated build would download another, multi-GB torch). Install torch\n"
        "first, then build without isolation:\n"
        "    pip install torch          # e.g. torch==2.13.0, the build you will use\n"
        "    pip install --no-build-isolation <this directory or sdist>\n"
    )
from setuptools import setup


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    # No -std flag: torch's build helper picks the standard its headers need (C++20 for
    # torch >= 2.10, which warns under -std=c++17).
    cxx_flags = ["-O3"]
    force_cpu = os.environ.get("OUROBOROS_FORCE_CPU", "0") == "1"
    if torch.version.cuda is not None and CUDA_HOME is not None and not force_cpu:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default)")
        print(f"[ouroboros] building CUDAExtension (CUDA {torch.version.cuda}, nvcc at "
              f"{CUDA_HOME}, TORCH_CUDA_ARCH_LIST={arch})")
        return CUDAExtension(
            "ouroboros_kernels._C",
            cpp_sources + cuda_sources,
            define_macros=[("OUROBOROS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    why = ("OUROBOROS_FORCE_CPU=1" if force_cpu else
           "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
    print(f"[ouroboros] building CppExtension (CPU only: {why})")
    return CppExtension("ouroboros_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
