"""Backend choice: which implementation serves each op on each device.

The compiled extension registers its kernels with the dispatcher (``TORCH_LIBRARY_IMPL``).
Wherever it has none, or where a backend is forced, Python kernels (reference or Triton)
are registered in one override library that is rebuilt whenever the choice changes.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ._schemas import PUBLIC_OPS, SCHEMAS

BACKENDS = ("reference", "triton", "cpp")
DEVICES = {"cpu": "CPU", "cuda": "CUDA"}

_python_kernels: Dict[Tuple[str, str], Tuple[Callable, Callable]] = {}
_python_helpers: Dict[Tuple[str, str], Dict[str, Callable]] = {}
_native: Optional[Dict[Tuple[str, str], bool]] = None
_override_lib: Optional[torch.library.Library] = None
_forced: Optional[str] = None
_selected: Dict[str, Dict[str, str]] = {}
_helpers: Dict[str, frozenset] = {}  # device -> the private ops (besides backwards) served there now


def register_python_backend(op: str, backend: str, forward: Callable, backward: Callable,
                            helpers: Optional[Dict[str, Callable]] = None) -> None:
    """Make ``forward`` and ``backward`` (kernels of ``op`` and ``_op_backward``) available as ``backend``;
    ``helpers`` maps other private ops of ``op`` (such as ``_masked_kl_div_with_stats``) to their kernels."""
    _python_kernels[(op, backend)] = (forward, backward)
    _python_helpers[(op, backend)] = dict(helpers or {})


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _native_kernels() -> Dict[Tuple[str, str], bool]:
    # Read once, before any Python kernel is registered, so it reflects the extension alone.
    global _native
    if _native is None:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        _native = {(op, dev): has(f"tpswarp::{op}", key) for op in SCHEMAS for dev, key in DEVICES.items()}
    return _native


def _helper_names(op: str) -> list:
    """The private ops of ``op`` besides its backward (``_masked_kl_div_with_stats``, ...)."""
    return [name for name in SCHEMAS if name.startswith(f"_{op}_") and name != f"_{op}_backward"]


def _choose(op: str, device: str, forced: Optional[str]) -> str:
    native = _native_kernels()[(op, device)]
    triton_ok = (op, "triton") in _python_kernels and triton_available()
    if device == "cpu":
        triton_ok = triton_ok and os.environ.get("TRITON_INTERPRET") == "1"
    if forced == "reference":
        return "reference"
    if forced == "cpp":
        if native:
            return "cpp"
        if device == "cpu" or torch.cuda.is_available():
            warnings.warn(f"tpswarp: backend 'cpp' forced but the extension has no {device} kernel for {op}; "
                          "using the reference")
        return "reference"
    if forced == "triton":
        if triton_ok:
            return "triton"
        if (device == "cuda" and torch.cuda.is_available()) or (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            warnings.warn(f"tpswarp: backend 'triton' forced but no Triton kernel for {op} on {device}; "
                          "using the reference")
        return "reference"
    if native:
        return "cpp"
    if device == "cuda" and triton_ok:
        return "triton"
    return "reference"


def set_backend(backend: Optional[str] = None) -> None:
    """Force a backend for every op and device (``"reference"``, ``"triton"``, ``"cpp"``), or
    restore the default choice with ``None``. ``TPSWARP_BACKEND`` sets it at import."""
    global _override_lib, _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"tpswarp: unknown backend {backend!r}; expected one of {list(BACKENDS)} or None")
    _native_kernels()
    if _override_lib is not None:
        _override_lib._destroy()
    lib = torch.library.Library("tpswarp", "IMPL")
    selected: Dict[str, Dict[str, str]] = {}
    helpers: Dict[str, frozenset] = {}
    for device, key in DEVICES.items():
        selected[device] = {}
        served = set()
        for op in PUBLIC_OPS:
            choice = _choose(op, device, backend)
            if choice != "cpp":
                forward, backward = _python_kernels[(op, choice)]
                lib.impl(op, forward, key)
                lib.impl(f"_{op}_backward", backward, key)
                for name, kernel in _python_helpers.get((op, choice), {}).items():
                    lib.impl(name, kernel, key)
                    served.add(name)
            else:
                served.update(name for name in _helper_names(op) if _native[(name, device)])
            selected[device][op] = choice
        helpers[device] = frozenset(served)
    _override_lib, _forced = lib, backend
    _selected.clear()
    _selected.update(selected)
    _helpers.clear()
    _helpers.update(helpers)


def serves_helper(name: str, device: str) -> bool:
    """True when the backend serving ``name``'s public op on ``device`` has a kernel for the private op
    ``name`` (a plain lookup: callable while torch.compile traces)."""
    return name in _helpers.get(device, ())


def selected(op: str, device: str) -> Optional[str]:
    """The backend serving ``op`` on ``device`` ("cpu" or "cuda") now, or None before any choice."""
    return _selected.get(device, {}).get(op)


def get_backend() -> Optional[str]:
    """The forced backend, or None for the default choice."""
    return _forced


@contextlib.contextmanager
def use_backend(backend: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    previous = _forced
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def backends() -> dict:
    """What is built and which backend serves each op on each device.

    Returns ``{"extension": build info, "triton": bool, "forced": str | None,
    "selected": {"cpu": {op: backend}, "cuda": {op: backend}}}``.
    """
    from ._extension import build_info

    return {
        "extension": build_info(),
        "triton": triton_available(),
        "forced": _forced,
        "selected": {dev: dict(ops) for dev, ops in _selected.items()},
    }


def initial_backend() -> Optional[str]:
    value = os.environ.get("TPSWARP_BACKEND", "").strip() or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"TPSWARP_BACKEND must be one of {list(BACKENDS)}, got {value!r}")
    return value
