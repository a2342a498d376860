"""Loads the compiled extension ``tpswarp._C`` if it was built; the package works without it."""
from __future__ import annotations

import importlib
import os
import warnings

import torch  # noqa: F401  (loads libtorch/libc10, which tpswarp._C links against)

_C = None
load_error = None

if os.environ.get("TPSWARP_NO_EXT", "0") == "1":
    load_error = "disabled by TPSWARP_NO_EXT=1"
else:
    try:
        # Importing registers the C++/CUDA kernels with the dispatcher.
        _C = importlib.import_module("tpswarp._C")
    except ModuleNotFoundError:
        load_error = "not built (installed with TPSWARP_NO_EXT=1 or without a compiler)"
    except ImportError as e:  # built for another torch, or a missing shared library
        load_error = str(e)
        warnings.warn(f"tpswarp: the compiled extension failed to load ({e}); using the reference "
                      "implementation. Reinstall tpswarp against this torch.")


def build_info() -> dict:
    """What the extension was built with: ``{"built", "cuda", "cuda_archs", "openmp", ...}``."""
    if _C is None:
        return {"built": False, "cuda": False, "error": load_error}
    info = dict(_C.build_info())
    info["built"] = True
    return info
