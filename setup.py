"""Build of qlora_kernels and its optional compiled extension ``qlora_kernels._C``.

Install after torch: ``pip install --no-build-isolation -e ".[dev]"``.

* C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built when torch is importable.
* CUDA kernels (csrc/cuda/) are built whenever torch has CUDA and nvcc is found, with or without
  a GPU present. Targets: TORCH_CUDA_ARCH_LIST, by default "8.0;9.0a" (A100, H100/H200 with the
  Hopper-only instructions). QLORA_KERNELS_SKIP_CUDA=1 skips them.
* Without torch at build time (an isolated build), the package installs as pure Python and runs
  on its reference and Triton backends.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"qlora_kernels setup: {msg}", file=sys.stderr)


def _cuda_home() -> str | None:
    # nvcc may be a wrapper script on PATH (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0);
    # torch would then guess CUDA_HOME=/usr/local, which has no CUDA headers.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _nvidia_include_dirs() -> list[str]:
    # torch's CUDA headers include cusparse.h and friends; pip's torch brings them in
    # site-packages/nvidia/<pkg>/include rather than with nvcc.
    dirs: list[str] = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return dirs


def _extensions():
    cuda_home = _cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable at build time: installing without the compiled extension")
        return [], {}

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))  # noqa: E731
    cpp_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    # The C++ standard is left to torch (C++17 up to torch 2.9, C++20 from there).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]

    skip = os.environ.get("QLORA_KERNELS_SKIP_CUDA", "0") == "1"
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if skip:
        _log("QLORA_KERNELS_SKIP_CUDA=1: building the CPU kernels only")
    elif torch.version.cuda is None:
        _log("torch has no CUDA: building the CPU kernels only")
    elif not nvcc:
        _log("nvcc not found (set CUDA_HOME): building the CPU kernels only")
    if skip or torch.version.cuda is None or not nvcc:
        ext = CppExtension(
            "qlora_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
        return [ext], {"build_ext": BuildExtension}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    _log(f"building CUDA kernels with {CUDA_HOME} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    ext = CUDAExtension(
        "qlora_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=_nvidia_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DQLORA_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
