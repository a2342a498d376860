"""Live tensor-storage bytes on any device, for memory measurements without a CUDA allocator.

``LiveTensorTracker`` is a ``TorchDispatchMode``: every tensor an op returns has its storage
counted until the storage is freed (a finalizer on the preserved storage object). It sees
the outputs of each dispatched op, autograd's saved tensors and gradients included, but not
temporaries that a single kernel allocates and frees internally — on CUDA those are covered
by ``torch.cuda.max_memory_allocated``; the two agree up to such temporaries.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    """Tracks bytes of live storages created while active: ``current_bytes``, ``peak_bytes``.

    Storages that existed before entering (model weights, inputs) are not counted; use
    ``baseline`` tensors in ``track`` to add them explicitly.
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        nbytes = self._live.pop(key, 0)
        self.current_bytes -= nbytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
