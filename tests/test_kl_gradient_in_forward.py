"""The student's gradient computed in the forward of masked_kl_div and warped_kl_div (C++ CPU
kernels, one-way consistency: ``_<op>_with_grad``): where the path is taken, its loss and gradient
equal the plain op's (bit for bit for an upstream gradient of 1) and the reference's (dtypes,
logits/probabilities, mean/sum, masks, with and without ``size``, layouts, upstream gradients that
are not 1); when it is taken; retained graphs and accumulation; empty validity; gradcheck; opcheck;
torch.compile; the ``reduction="none"`` error of the private ops."""
from __future__ import annotations

import pytest
import torch

import tpswarp
from tpswarp.testing import assert_close, non_contiguous, random_tps, to_channels_last

pytestmark = pytest.mark.skipif(not tpswarp.backends()["extension"]["built"], reason="C++ extension not built")
OPS = ["masked_kl_div", "warped_kl_div"]


def _inputs(op, *, logits=False, dtype=torch.float32, seed=0, sized=False, B=2, C=5, H=7, W=9):
    """(student, teacher, others, size): ``others`` are the op's other tensor inputs (mask, or
    src and params); with ``sized`` the logits are at about half the output size (H, W)."""
    gen = torch.Generator().manual_seed(seed)
    hs, ws = ((H + 1) // 2, (W + 1) // 2) if sized else (H, W)
    student = 2 * torch.randn(B, C, hs, ws, generator=gen, dtype=torch.float64)
    ht, wt = (hs + 1, ws) if sized or op == "warped_kl_div" else (hs, ws)
    t = 2 * torch.randn(B, C, ht, wt, generator=gen, dtype=torch.float64)
    teacher = t if logits else t.softmax(1)
    if op == "masked_kl_div":
        others = (torch.rand(B, H, W, generator=gen) > 0.3,)
    else:
        src, _, params = random_tps(B, scale=0.3, generator=gen, dtype=torch.float64)
        others = (src.to(dtype), params.to(dtype))
    size = (H, W) if sized else None
    return student.to(dtype), teacher.to(dtype), others, size


def _public(op, s, t, others, logits, reduction, size):
    fn = getattr(tpswarp, op)
    return fn(s, t, *others, teacher_is_logits=logits, reduction=reduction, size=size)


def _plain_op(op, s, t, others, logits, reduction, size):
    size = None if size is None else list(size)
    if op == "masked_kl_div":
        return torch.ops.tpswarp.masked_kl_div(s, t, others[0], logits, reduction, size)
    return torch.ops.tpswarp.warped_kl_div(s, t, *others, logits, False, reduction, size)


def _plain(op, student, teacher, others, logits, reduction, size, grad_loss):
    """Loss and student gradient through the plain op and its separate backward."""
    s = student.detach().clone().requires_grad_(True)
    loss = _plain_op(op, s, teacher, others, logits, reduction, size)
    assert "_with_grad" not in loss.grad_fn.name()
    return loss, torch.autograd.grad(loss, s, grad_loss)[0]


def _fused(op, student, teacher, others, logits, reduction, size, grad_loss):
    s = student.detach().clone().requires_grad_(True)
    with tpswarp.use_backend("cpp"):
        loss = _public(op, s, teacher, others, logits, reduction, size)
    assert f"_{op}_with_grad" in loss.grad_fn.name()
    return loss, torch.autograd.grad(loss, s, grad_loss)[0]


@pytest.mark.parametrize("sized", [False, True], ids=["full", "size"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", OPS)
def test_equals_plain_op(op, dtype, logits, reduction, sized):
    """Upstream gradient 1: the same kernels' values, bit for bit; another upstream gradient: the
    product rounded once more."""
    student, teacher, others, size = _inputs(op, logits=logits, dtype=dtype, seed=1, sized=sized)
    one = torch.ones((), dtype=dtype)
    loss, grad = _fused(op, student, teacher, others, logits, reduction, size, one)
    loss_p, grad_p = _plain(op, student, teacher, others, logits, reduction, size, one)
    assert torch.equal(loss, loss_p)
    assert torch.equal(grad, grad_p)
    assert grad.abs().sum() > 0
    upstream = torch.tensor(2.75, dtype=dtype)
    _, grad = _fused(op, student, teacher, others, logits, reduction, size, upstream)
    _, grad_p = _plain(op, student, teacher, others, logits, reduction, size, upstream)
    assert_close(grad, grad_p, grad=True)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, dtype, layout):
    student, teacher, others, _ = _inputs(op, logits=True, seed=2, B=3, C=4, H=6, W=11)
    student = to_channels_last(student) if layout == "channels_last" else non_contiguous(student)
    if op == "masked_kl_div":
        teacher = to_channels_last(teacher) if layout == "channels_last" else non_contiguous(teacher)
    student, teacher = student.to(dtype), teacher.to(dtype)
    upstream = torch.tensor(0.6)
    loss, grad = _fused(op, student, teacher, others, True, "mean", None, upstream)
    s = student.detach().float().requires_grad_(True)
    ref = getattr(tpswarp.reference, op)(s, teacher.float(), *others, teacher_is_logits=True)
    (ref_grad,) = torch.autograd.grad(ref, s, upstream)
    assert grad.dtype == dtype
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)
    assert_close(loss, ref, dtype=dtype)
    assert_close(grad.float(), ref_grad, grad=True, dtype=dtype)


@pytest.mark.parametrize("op", OPS)
def test_taken_only_for_one_way_cpp_reduced_losses(op):
    student, teacher, others, _ = _inputs(op, seed=3)

    def path(s_grad=True, t_grad=False, other_grad=False, reduction="mean", backend="cpp", grad_mode=True):
        s = student.clone().requires_grad_(s_grad)
        t = teacher.clone().requires_grad_(t_grad)
        o = [x.clone().requires_grad_(other_grad and x.is_floating_point()) for x in others]
        with tpswarp.use_backend(backend), torch.set_grad_enabled(grad_mode):
            loss = _public(op, s, t, o, False, reduction, None)
        return loss.grad_fn.name() if loss.grad_fn is not None else None

    with_grad = f"_{op}_with_grad"
    assert with_grad in path()
    assert with_grad in path(reduction="sum")
    cases = [dict(t_grad=True), dict(reduction="none"), dict(backend="reference")]
    if op == "warped_kl_div":
        cases.append(dict(other_grad=True))  # params
    for kw in cases:
        name = path(**kw)
        assert name is not None and with_grad not in name, kw
    assert path(grad_mode=False) is None
    assert path(s_grad=False) is None


@pytest.mark.parametrize("op", OPS)
def test_retained_graph_and_accumulation(op):
    """A second backward of a retained graph recomputes (the forward's gradient was handed out);
    .grad accumulates as for any op."""
    student, teacher, others, _ = _inputs(op, logits=True, seed=4)
    s = student.clone().requires_grad_(True)
    loss = _public(op, s, teacher, others, True, "mean", None)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(s.grad, 2 * first)
    (g,) = torch.autograd.grad(2 * loss, s)
    assert torch.equal(g, 2 * first)
    _, want = _plain(op, student, teacher, others, True, "mean", None, torch.ones(()))
    assert torch.equal(first, want)


@pytest.mark.parametrize("op", OPS)
def test_loss_outside_the_differentiated_graph(op):
    student, teacher, others, _ = _inputs(op, seed=5)
    s = student.clone().requires_grad_(True)
    loss = _public(op, s, teacher, others, False, "mean", None)
    (g,) = torch.autograd.grad((s * 2).sum() + 0 * loss.detach(), s)
    assert torch.equal(g, torch.full_like(s, 2.0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("op", OPS)
def test_nothing_valid(op, reduction):
    student, teacher, others, _ = _inputs(op, seed=6)
    if op == "masked_kl_div":
        others = (torch.zeros_like(others[0]),)
    else:  # every sample lands far outside the teacher
        others = (others[0], tpswarp.tps_solve(others[0], others[0] + 4.0))
    s = student.clone().requires_grad_(True)
    loss = _public(op, s, teacher, others, False, reduction, None)
    assert f"_{op}_with_grad" in loss.grad_fn.name()
    loss.backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("sized", [False, True], ids=["full", "size"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, sized):
    student, teacher, others, size = _inputs(op, logits=True, dtype=torch.float64, seed=7, sized=sized, B=1, C=3,
                                             H=4, W=5)
    fn = lambda s: _public(op, s, teacher, others, True, "mean", size)  # noqa: E731
    assert f"_{op}_with_grad" in fn(student.clone().requires_grad_(True)).grad_fn.name()
    assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(True),))


@pytest.mark.parametrize("sized", [False, True], ids=["full", "size"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, sized):
    student, teacher, others, size = _inputs(op, logits=True, seed=8, sized=sized)
    size = None if size is None else list(size)
    if op == "masked_kl_div":
        args = (student.requires_grad_(True), teacher, others[0], True, "mean", size)
    else:
        args = (student.requires_grad_(True), teacher, *others, True, False, "mean", size)
    torch.library.opcheck(getattr(torch.ops.tpswarp, f"_{op}_with_grad").default, args)


@pytest.mark.parametrize("op", OPS)
def test_reduction_none_is_refused(op):
    student, teacher, others, _ = _inputs(op, seed=9)
    fn = getattr(torch.ops.tpswarp, f"_{op}_with_grad")
    args = (student, teacher, others[0], False, "none", None) if op == "masked_kl_div" else \
        (student, teacher, *others, False, False, "none", None)
    with pytest.raises(ValueError, match="`reduction` must be 'mean' or 'sum', got 'none'"):
        fn(*args)


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_uses_plain_op(op):
    """Under torch.compile the wrappers call the plain ops (no graph state in a compiled backward);
    results equal eager's (which takes the fused path)."""
    student, teacher, others, _ = _inputs(op, logits=True, seed=10)

    def fn(s):
        return _public(op, s, teacher, others, True, "mean", None) * 1.5

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s_c, s_e = (student.clone().requires_grad_(True) for _ in range(2))
    loss_c, loss_e = compiled(s_c), fn(s_e)
    loss_c.backward()
    loss_e.backward()
    assert_close(loss_c, loss_e)
    assert_close(s_c.grad, s_e.grad, grad=True)


@pytest.mark.parametrize("op", OPS)
def test_deterministic_across_runs_and_thread_counts(op):
    student, teacher, others, _ = _inputs(op, logits=True, seed=11, B=3, C=6, H=17, W=45)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            results.append(_fused(op, student, teacher, others, True, "mean", None, torch.tensor(1.3)))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("op", OPS)
def test_private_op_checks_its_arguments(op):
    """Called directly (bypassing the wrappers' checks), the private op raises the plain op's errors
    naming the argument, and reads nothing out of bounds."""
    student, teacher, others, _ = _inputs(op, seed=12)
    fn = getattr(torch.ops.tpswarp, f"_{op}_with_grad")

    def call(s, t, o=others, size=None, reduction="mean"):
        if op == "masked_kl_div":
            return fn(s, t, o[0], False, reduction, size)
        return fn(s, t, *o, False, False, reduction, size)

    with pytest.raises(ValueError, match="`teacher`"):
        call(student, teacher[:1])
    with pytest.raises(ValueError, match="`teacher`"):
        call(student, teacher[:, :3])
    with pytest.raises(TypeError, match="`student_logits`"):
        call(student.int(), teacher)
    with pytest.raises(ValueError, match="`reduction`"):
        call(student, teacher, reduction="batchmean")
    with pytest.raises(ValueError, match="`size`"):
        call(student, teacher, size=[0, 4])
    if op == "masked_kl_div":
        with pytest.raises(ValueError, match="`mask`"):
            call(student, teacher, (others[0][:, :3],))
    else:
        with pytest.raises(ValueError, match="`params`"):
            call(student, teacher, (others[0], others[1][:, :6]))
        with pytest.raises(ValueError, match="`src`"):
            call(student, teacher, (others[0][:1], others[1]))
