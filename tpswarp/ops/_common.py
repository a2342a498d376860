"""Helpers shared by the op modules: schema definition, empty gradients, reference VJPs, the
student's gradient computed in the forward of the KL ops, and their statistics kept for the backward."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch

from .._backend import selected, serves_helper
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


# ------------------------------------------------------------------------------------------------
# The KL ops' student gradient from the forward pass (C++ CPU kernels: `_<op>_with_grad`)
# ------------------------------------------------------------------------------------------------
def gradient_in_forward(op: str, student_logits: torch.Tensor, others: Sequence, reduction: str,
                        size=None) -> bool:
    """True where ``_<op>_with_grad`` serves the call: a gradient wanted for the student alone
    (``others``: the other inputs, None allowed), a reduced loss, no tracing (torch.compile,
    functorch: it would keep the graph's state in a compiled backward), and the C++ kernels: on the
    CPU; on CUDA (``warped_kl_div`` without ``size``) only with ``TPSWARP_CUDA_GRAD_IN_FORWARD=1``
    (tested on an H100, where it was no faster than the plain backward)."""
    if reduction == "none" or torch.compiler.is_compiling() or not _student_gradient_alone(student_logits, others):
        return False
    device = student_logits.device.type
    if device == "cpu":
        return selected(op, "cpu") == "cpp"
    return (device == "cuda" and size is None and os.environ.get("TPSWARP_CUDA_GRAD_IN_FORWARD") == "1"
            and selected(op, "cuda") == "cpp"
            and serves_helper(f"_{op}_with_grad", "cuda"))


def _student_gradient_alone(student_logits: torch.Tensor, others: Sequence) -> bool:
    """A gradient is wanted for ``student_logits`` and none of ``others`` (None allowed), outside
    functorch transforms (they have no rule for the private ops)."""
    return (torch.is_grad_enabled() and student_logits.requires_grad
            and not any(x is not None and x.requires_grad for x in others)
            and not torch._C._are_functorch_transforms_active())


# ------------------------------------------------------------------------------------------------
# The KL ops' per-pixel statistics kept by the forward for the backward (`_<op>_with_stats`)
# ------------------------------------------------------------------------------------------------
def statistics_in_forward(op: str, student_logits: torch.Tensor, others: Sequence, size=None) -> bool:
    """True where ``_<op>_with_stats`` serves the call: a gradient wanted for the student alone, no
    ``size``, and the CUDA or Triton kernels (the C++ CPU kernels compute the gradient in the forward
    instead, see :func:`gradient_in_forward`). ``TPSWARP_KL_STATS=0`` turns it off (for comparisons)."""
    if size is not None or os.environ.get("TPSWARP_KL_STATS", "1") == "0":
        return False
    if not _student_gradient_alone(student_logits, others):
        return False
    device = student_logits.device.type
    backend = selected(op, device)
    # The C++ CPU kernels of the statistics ops are the scalar twin of the CUDA ones (for the tests), slower
    # than the CPU's blocked kernels.
    return ((backend == "triton" or (backend == "cpp" and device == "cuda"))
            and serves_helper(f"_{op}_with_stats", device) and serves_helper(f"_{op}_backward_stats", device))


def register_gradient_in_forward(op: str, setup_context: Callable, num_grads: int, num_inputs: int) -> None:
    """Autograd of ``tpswarp::_<op>_with_grad`` (outputs: the loss, and its gradient w.r.t. the
    student for an upstream gradient of 1). ``setup_context`` is the plain op's (it saves the
    inputs and ``ctx.options`` for ``_<op>_backward``); the first ``num_grads`` inputs are
    differentiable.

    The first backward hands out the forward's gradient (scaled in place by the upstream gradient
    unless that is 1; autograd takes it without a copy); a later backward of a retained graph, and
    any other input's gradient, go through ``_<op>_backward``."""
    backward_op = getattr(torch.ops.tpswarp, f"_{op}_backward")

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output[0])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros for the gradient output's (unused) gradient
        ctx.student_grad = output[1].detach()

    def backward(ctx, grad_loss, _):
        if grad_loss is None:  # not materialized: the loss took no part in what is differentiated
            return (None,) * num_inputs
        needs = [bool(n) for n in ctx.needs_input_grad[:num_grads]]
        grad_student = None
        if needs[0] and ctx.student_grad is not None:
            grad_student, ctx.student_grad = ctx.student_grad, None
            if type(grad_loss) is not torch.Tensor:  # traced (opcheck, AOT): no data-dependent branch, no mutation
                grad_student = grad_student * grad_loss
            elif grad_loss.device.type != "cpu":  # no host synchronization
                grad_student.mul_(grad_loss)
            elif grad_loss.item() != 1:
                grad_student.mul_(grad_loss)
            needs[0] = False
        grads = [None] * num_grads
        if any(needs):
            computed = backward_op(grad_loss, *ctx.saved_tensors, *ctx.options, needs)
            grads = [gradient_or_none(g, n) for g, n in zip(computed, needs)]
        if grad_student is not None:
            grads[0] = grad_student
        return (*grads, *([None] * (num_inputs - num_grads)))

    torch.library.register_autograd(f"tpswarp::_{op}_with_grad", backward, setup_context=setup)
