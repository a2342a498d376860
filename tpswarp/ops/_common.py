"""Helpers shared by the op modules: schema definition, empty gradients, reference VJPs."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

from .._extension import _C
from .._schemas import SCHEMAS

# The extension defines the schemas in C++; without it they are defined here.
_schema_lib = None
if _C is None:
    _schema_lib = torch.library.Library("tpswarp", "FRAGMENT")
    for _schema in SCHEMAS.values():
        _schema_lib.define(_schema)


def keeps_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` is 4-D channels_last and not also plain contiguous (outputs follow it)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def empty_like_format(t: torch.Tensor, shape: Sequence[int], dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if keeps_channels_last(t) else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def no_grad_placeholder(t: torch.Tensor) -> torch.Tensor:
    """What a backward op returns for an input whose gradient was not requested."""
    return t.new_empty(0)


_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView,
                  torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_dispatch() -> Iterator[None]:
    """Re-enable autograd dispatch for the reference's own autograd pass.

    Inside a ``TorchDispatchMode`` (a memory tracker, a FLOP counter, ...) the backward op is
    reached below the autograd keys, which are then excluded for everything it calls; the
    reference backward differentiates its forward with autograd and needs them back.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    if not any(exclude.has(k) for k in _AUTOGRAD_KEYS):
        yield
        return
    for k in _AUTOGRAD_KEYS:
        exclude = exclude.remove(k)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def reference_vjp(fn: Callable, inputs: Sequence, grad: torch.Tensor, output_mask: Sequence[bool]) -> tuple:
    """Gradients of ``fn(*inputs)`` against ``grad`` by autograd through the reference.

    Returns one tensor per input: the gradient where ``output_mask`` asks for it, else an
    empty placeholder. Inputs that are None stay None.
    """
    leaves = []
    for x, need in zip(inputs, output_mask):
        if x is None:
            leaves.append(None)
        elif need:
            leaves.append(x.detach().requires_grad_(True))
        else:
            leaves.append(x.detach())
    wanted = [leaf for leaf, need in zip(leaves, output_mask) if need and leaf is not None]
    with torch.enable_grad(), _autograd_dispatch():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ()
    grads = iter(grads)
    result = []
    for leaf, need in zip(leaves, output_mask):
        if leaf is None:
            result.append(None)
        elif need:
            g = next(grads)
            result.append(torch.zeros_like(leaf) if g is None else g)
        else:
            result.append(no_grad_placeholder(leaf))
    return tuple(result)


def keep_layout(g: torch.Tensor, x: torch.Tensor, needed: bool) -> torch.Tensor:
    """The gradient ``g`` of input ``x`` with ``torch.empty_like(x)``'s strides (what the fake kernels
    and the compiled kernels return: channels_last is kept), copying only when they differ."""
    if not needed or g.stride() == x.stride() or g.shape != x.shape:
        return g
    like = torch.empty_like(x)
    return g if g.stride() == like.stride() else like.copy_(g)


def gradient_or_none(g: torch.Tensor, needed: bool):
    return g if needed else None
