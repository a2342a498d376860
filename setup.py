"""Build script for tpswarp.

Builds ``tpswarp._C``:
- the C++ sources (csrc/*.cpp, csrc/ops, csrc/cpu) whenever torch is importable at build time;
- the CUDA sources (csrc/cuda/*.cu) too when a CUDA toolkit is found and torch is a CUDA
  build, or when TPSWARP_FORCE_CUDA=1 (no GPU is needed to compile);
- nothing with TPSWARP_NO_EXT=1: the package then runs on the reference and Triton.
TPSWARP_NO_CUDA=1 skips the CUDA sources. It prints what it builds.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"tpswarp setup: {msg}", file=sys.stderr)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else the toolkit behind `nvcc` on PATH (following wrapper scripts)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.insert(0, os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for word in head.split():
                if word.endswith("/bin/nvcc"):
                    candidates.insert(0, os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _extensions():
    if _env_flag("TPSWARP_NO_EXT"):
        _log("TPSWARP_NO_EXT=1: building no extension (reference and Triton backends only)")
        return [], {}
    try:
        import torch
    except ImportError:
        _log("torch is not importable at build time: building no extension "
             "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = not _env_flag("TPSWARP_NO_CUDA") and (
        _env_flag("TPSWARP_FORCE_CUDA") or (cuda_home is not None and torch.version.cuda is not None)
    )
    if want_cuda and cuda_home is None:
        raise RuntimeError("TPSWARP_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")

    cxx = ["-O3", "-fopenmp"]
    define_macros = [("TORCH_VERSION_BUILT", f'"{torch.__version__}"')]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a visible GPU torch would compile for every architecture it knows.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros += [("TPSWARP_WITH_CUDA", None), ("TPSWARP_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        _log(f"building C++ ({len(sources)} files) and CUDA ({len(cuda_sources)} files) kernels; "
             f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs or '(torch default)'}")
        ext = CUDAExtension("tpswarp._C", sources + cuda_sources, include_dirs=include_dirs,
                            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    else:
        why = "TPSWARP_NO_CUDA=1" if _env_flag("TPSWARP_NO_CUDA") else (
            "no CUDA toolkit found" if cuda_home is None else "torch is a CPU-only build")
        _log(f"building C++ kernels only ({len(sources)} files; {why})")
        ext = CppExtension("tpswarp._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["tpswarp", "tpswarp.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
