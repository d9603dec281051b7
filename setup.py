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


# csrc/ (see csrc/pool.h for what each file holds). Every .cpp is built into both
# extensions (pool_ops.cpp registers the CUDA kernels only under OUROBOROS_WITH_CUDA); the
# .cu only into the CUDA one.
CPP_SOURCES = [
    "csrc/pool_checks.cpp",  # argument checks shared by the CPU and CUDA entry points
    "csrc/pool_cpu.cpp",  # the CPU kernels and their entry points
    "csrc/pool_ops.cpp",  # op schemas, registration per device, the direct path's device choice
    "csrc/pool_module.cpp",  # the Python module _C: direct twins of the ops, build info
]
CUDA_SOURCES = [
    "csrc/pool_cuda.cu",  # the CUDA kernels and their entry points
]
HEADERS = ["csrc/pool.h"]  # the interface all of them share (rebuilds on change; in the sdist)


def _extension():
    listed = set(CPP_SOURCES + CUDA_SOURCES)
    found = set(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if listed != found:  # a source file added or removed without updating the lists above
        sys.exit(f"[ouroboros] setup.py source lists disagree with csrc/: listed but missing "
                 f"{sorted(listed - found)}, present but not listed {sorted(found - listed)}")
    cpp_sources, cuda_sources = CPP_SOURCES, CUDA_SOURCES
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
            depends=HEADERS,
            define_macros=[("OUROBOROS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    why = ("OUROBOROS_FORCE_CPU=1" if force_cpu else
           "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
    print(f"[ouroboros] building CppExtension (CPU only: {why})")
    return CppExtension("ouroboros_kernels._C", cpp_sources, depends=HEADERS,
                        extra_compile_args={"cxx": cxx_flags})


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
