"""The student's gradient computed in warped_kl_div's forward (C++ CPU kernels, one-way
consistency): when the path is taken, that loss and gradient equal the plain op's and the
reference's (dtypes, logits/probabilities, mean/sum, with and without ``size``, layouts,
upstream gradients that are not 1), retained graphs and accumulation, empty validity, gradcheck,
opcheck, torch.compile, and the ``reduction="none"`` error of the private op."""
from __future__ import annotations

import pytest
import torch

import tpswarp
from tpswarp.testing import assert_close, non_contiguous, random_tps, to_channels_last

pytestmark = pytest.mark.skipif(not tpswarp.backends()["extension"]["built"], reason="C++ extension not built")
WITH_GRAD = "_warped_kl_div_with_grad"


def _inputs(B=2, C=5, H=7, W=9, teacher_hw=None, *, logits=False, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Ht, Wt = teacher_hw or (H, W)
    student = 2 * torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    t = 2 * torch.randn(B, C, Ht, Wt, generator=gen, dtype=torch.float64)
    teacher = t if logits else t.softmax(1)
    src, _, params = random_tps(B, scale=0.3, generator=gen, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype), src.to(dtype), params.to(dtype)


def _plain(student, teacher, src, params, logits, reduction, size, grad_loss):
    """Loss and student gradient through the plain op and its separate backward."""
    s = student.detach().clone().requires_grad_(True)
    loss = torch.ops.tpswarp.warped_kl_div(s, teacher, src, params, logits, False, reduction,
                                           None if size is None else list(size))
    assert WITH_GRAD not in loss.grad_fn.name()
    return loss, torch.autograd.grad(loss, s, grad_loss)[0]


def _fused(student, teacher, src, params, logits, reduction, size, grad_loss):
    s = student.detach().clone().requires_grad_(True)
    with tpswarp.use_backend("cpp"):
        loss = tpswarp.warped_kl_div(s, teacher, src, params, teacher_is_logits=logits, reduction=reduction,
                                     size=size)
    assert WITH_GRAD in loss.grad_fn.name()
    return loss, torch.autograd.grad(loss, s, grad_loss)[0]


@pytest.mark.parametrize("size", [None, (7, 9)], ids=["full", "size"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_plain_op(dtype, logits, reduction, size):
    """Upstream gradient 1: the same kernels' values, bit for bit; other upstream gradients: the
    product rounded once more."""
    student, teacher, src, params = _inputs(logits=logits, dtype=dtype, seed=1)
    if size is not None:  # stride-2 student, larger teacher, as the trainer's logits
        student = student[..., ::2, ::2].contiguous()
        teacher = torch.nn.functional.interpolate(teacher, size=(9, 11), mode="bilinear", align_corners=False)
    one = torch.ones((), dtype=dtype)
    loss, grad = _fused(student, teacher, src, params, logits, reduction, size, one)
    loss_p, grad_p = _plain(student, teacher, src, params, logits, reduction, size, one)
    assert torch.equal(loss, loss_p)
    assert torch.equal(grad, grad_p)
    assert grad.abs().sum() > 0
    upstream = torch.tensor(2.75, dtype=dtype)
    _, grad = _fused(student, teacher, src, params, logits, reduction, size, upstream)
    _, grad_p = _plain(student, teacher, src, params, logits, reduction, size, upstream)
    assert_close(grad, grad_p, grad=True)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype, layout):
    student, teacher, src, params = _inputs(3, 4, 6, 11, (8, 5), logits=True, seed=2)
    student = to_channels_last(student) if layout == "channels_last" else non_contiguous(student)
    student, teacher = student.to(dtype), teacher.to(dtype)
    upstream = torch.tensor(0.6)
    loss, grad = _fused(student, teacher, src, params, True, "mean", None, upstream)
    s = student.detach().float().requires_grad_(True)
    ref = tpswarp.reference.warped_kl_div(s, teacher.float(), src, params, teacher_is_logits=True)
    (ref_grad,) = torch.autograd.grad(ref, s, upstream)
    assert grad.dtype == dtype
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)
    assert_close(loss, ref, dtype=dtype)
    assert_close(grad.float(), ref_grad, grad=True, dtype=dtype)


def test_taken_only_for_one_way_cpp_reduced_losses():
    student, teacher, src, params = _inputs(seed=3)

    def path(s_grad=True, t_grad=False, p_grad=False, reduction="mean", backend="cpp", grad_mode=True):
        s = student.clone().requires_grad_(s_grad)
        t = teacher.clone().requires_grad_(t_grad)
        p = params.clone().requires_grad_(p_grad)
        with tpswarp.use_backend(backend), torch.set_grad_enabled(grad_mode):
            loss = tpswarp.warped_kl_div(s, t, src, p, reduction=reduction)
        return loss.grad_fn.name() if loss.grad_fn is not None else None

    assert WITH_GRAD in path()
    assert WITH_GRAD in path(reduction="sum")
    for kw in (dict(t_grad=True), dict(p_grad=True), dict(reduction="none"), dict(backend="reference")):
        name = path(**kw)
        assert name is not None and WITH_GRAD not in name, kw
    assert path(grad_mode=False) is None
    assert path(s_grad=False) is None


def test_retained_graph_and_accumulation():
    """A second backward of a retained graph recomputes (the forward's gradient was handed out);
    .grad accumulates as for any op."""
    student, teacher, src, params = _inputs(logits=True, seed=4)
    s = student.clone().requires_grad_(True)
    loss = tpswarp.warped_kl_div(s, teacher, src, params, teacher_is_logits=True)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(s.grad, 2 * first)
    (g,) = torch.autograd.grad(2 * loss, s)
    assert torch.equal(g, 2 * first)
    _, want = _plain(student, teacher, src, params, True, "mean", None, torch.ones(()))
    assert torch.equal(first, want)


def test_loss_unused_in_backward():
    """A graph where the loss does not reach the differentiated output: no gradient, no error."""
    student, teacher, src, params = _inputs(seed=5)
    s = student.clone().requires_grad_(True)
    loss = tpswarp.warped_kl_div(s, teacher, src, params)
    other = (s * 2).sum()
    (g,) = torch.autograd.grad(other + 0 * loss.detach(), s)
    assert torch.equal(g, torch.full_like(s, 2.0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_validity(reduction):
    student, teacher, src, _ = _inputs(seed=6)
    params = tpswarp.tps_solve(src, src + 4.0)  # every sample lands far outside the teacher
    s = student.clone().requires_grad_(True)
    loss = tpswarp.warped_kl_div(s, teacher, src, params, reduction=reduction)
    assert WITH_GRAD in loss.grad_fn.name()
    loss.backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(s.grad, torch.zeros_like(s))


def test_gradcheck():
    student, teacher, src, params = _inputs(1, 3, 4, 5, (5, 4), logits=True, dtype=torch.float64, seed=7)
    fn = lambda s: tpswarp.warped_kl_div(s, teacher, src, params, teacher_is_logits=True)  # noqa: E731
    assert WITH_GRAD in fn(student.clone().requires_grad_(True)).grad_fn.name()
    assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(True),))


@pytest.mark.parametrize("size", [None, [7, 9]])
def test_opcheck(size):
    student, teacher, src, params = _inputs(logits=True, seed=8)
    if size is not None:
        student = student[..., ::2, ::2].contiguous()
    args = (student.requires_grad_(True), teacher, src, params, True, False, "mean", size)
    torch.library.opcheck(torch.ops.tpswarp._warped_kl_div_with_grad.default, args)


def test_reduction_none_is_refused():
    student, teacher, src, params = _inputs(seed=9)
    with pytest.raises(ValueError, match="`reduction` must be 'mean' or 'sum', got 'none'"):
        torch.ops.tpswarp._warped_kl_div_with_grad(student, teacher, src, params, False, False, "none", None)


def test_torch_compile_uses_plain_op():
    """Under torch.compile the wrapper calls the plain op (no graph state in a compiled backward);
    results equal eager's (which takes the fused path)."""
    student, teacher, src, params = _inputs(logits=True, seed=10)

    def fn(s):
        return tpswarp.warped_kl_div(s, teacher, src, params, teacher_is_logits=True) * 1.5

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s_c, s_e = (student.clone().requires_grad_(True) for _ in range(2))
    loss_c, loss_e = compiled(s_c), fn(s_e)
    loss_c.backward()
    loss_e.backward()
    assert_close(loss_c, loss_e)
    assert_close(s_c.grad, s_e.grad, grad=True)
