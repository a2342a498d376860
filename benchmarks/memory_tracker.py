"""Live tensor-storage bytes on any device, for memory measurements without a CUDA allocator.

``LiveTensorTracker`` is a ``TorchDispatchMode``: every storage that an op creates is counted
until the storage is freed (a finalizer on the preserved storage object). It sees the outputs
of each dispatched op, autograd's saved tensors and parameter gradients included (the
backward's ops run through the mode too), but not temporaries that a single kernel allocates
and frees internally (a fused C++ kernel's scratch buffers, oneDNN workspaces) — on CUDA
those are covered by ``torch.cuda.max_memory_allocated``; the two agree up to such
temporaries.

Outputs that share a storage with one of the op's inputs (views such as ``weight.t()``,
in-place ops such as the optimizer's ``param.add_``, ``out=`` variants, ``grad += new``) are
not new memory and are not counted again; only growth of such a storage (``resize_``,
``out=`` into a smaller tensor) is added.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t: torch.Tensor):
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, subclasses without storage
        return None


class LiveTensorTracker(TorchDispatchMode):
    """Tracks bytes of live storages created while active: ``current_bytes``, ``peak_bytes``.

    Storages that existed before entering (model weights, inputs) are not counted; pass them
    to ``track`` (or ``track_all``) to count them explicitly, as ``torch.cuda.memory_allocated``
    would. ``reset_peak`` starts a new peak window (per-phase readings).
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: Dict[int, int] = {}  # id(storage) -> bytes counted for it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {}  # id(storage) -> (storage, nbytes before the op); keeps the objects alive
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None:
                    inputs[id(s)] = (s, s.nbytes())
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track_output(t, inputs)
        # inputs resized in place without being returned
        for key, (s, before) in inputs.items():
            if s.nbytes() != before:
                self._grow(s, key, before)
        return out

    def _track_output(self, t: torch.Tensor, inputs) -> None:
        s = _storage(t)
        if s is None:
            return
        key = id(s)
        if key in inputs:  # a view of / in-place result on an input: not a new allocation
            if s.nbytes() != inputs[key][1]:
                self._grow(s, key, inputs[key][1])
            return
        self._add(s, key, s.nbytes())

    def _grow(self, s, key: int, before: int) -> None:
        if key in self._live:  # counted storage resized: follow its size
            self._adjust(key, s.nbytes() - self._live[key])
        elif s.nbytes() > before:  # storage from before entering grew: count the growth
            self._add(s, key, s.nbytes() - before)

    def _add(self, s, key: int, nbytes: int) -> None:
        if key in self._live:
            return
        self._live[key] = 0
        weakref.finalize(s, self._free, key)
        self._adjust(key, nbytes)

    def _adjust(self, key: int, delta: int) -> None:
        self._live[key] += delta
        self.current_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _free(self, key) -> None:
        nbytes = self._live.pop(key, 0)
        self.current_bytes -= nbytes

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage (once) from now until it is freed, e.g. weights and inputs
        that existed before entering."""
        s = _storage(t)
        if s is not None:
            self._add(s, id(s), s.nbytes())

    def track_all(self, tensors: Iterable[Optional[torch.Tensor]]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
