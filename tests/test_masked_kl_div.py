"""tpswarp.masked_kl_div: reference vs a float64 numpy oracle, every backend vs the reference,
gradients (student and two-way teacher), empty masks, extreme logits, gradcheck, opcheck,
hypothesis properties and argument errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpswarp
from tpswarp.testing import assert_close, non_contiguous

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

SHAPES = {
    "1d": (2, 4, 7),            # (B, C, N)
    "2d": (2, 3, 5, 6),         # (B, C, H, W)
    "3d": (2, 3, 2, 3, 4),      # (B, C, D, H, W)
}
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------
# oracle and input makers
# --------------------------------------------------------------------------------------
def _log_softmax_np(x):
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_oracle(student, teacher, mask=None, *, teacher_is_logits=False, reduction="mean"):
    """Per-pixel KL(p_t || softmax(s)) with 0 log 0 = 0, masked and reduced, numpy float64."""
    s = student.detach().double().numpy()
    t = teacher.detach().double().numpy()
    log_q = _log_softmax_np(s)
    if teacher_is_logits:
        log_p = _log_softmax_np(t)
        p = np.exp(log_p)
    else:
        p = t
        with np.errstate(divide="ignore"):
            log_p = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    kl = np.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=1)
    if mask is not None:
        w = mask.detach().double().numpy()
        if w.ndim == kl.ndim + 1:
            w = w[:, 0]
        kl = w * kl
    else:
        w = np.ones_like(kl)
    if reduction == "none":
        out = kl
    elif reduction == "sum":
        out = kl.sum()
    else:
        out = kl.sum() / w.sum() if w.sum() != 0 else 0.0
    return torch.as_tensor(np.asarray(out, dtype=np.float64))


def _teacher_probs(shape, gen, *, zeros=True, dtype=torch.float64):
    logits = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    p = logits.softmax(1)
    if zeros:
        # exact zeros in some classes of some pixels (0 log 0 = 0), renormalized
        drop = torch.rand(shape, generator=gen) < 0.3
        drop[:, 0] = False  # keep at least one class
        p = torch.where(drop, torch.zeros_like(p), p)
        p = p / p.sum(1, keepdim=True)
    return p.to(dtype)


def _mask(kind, shape, gen):
    B, _, *spatial = shape
    if kind is None:
        return None
    base = torch.rand((B, *spatial), generator=gen)
    m = base > 0.35 if kind.startswith("bool") else (base * 2).where(base > 0.35, torch.zeros_like(base))
    m.view(-1)[0] = True if m.dtype == torch.bool else 1.0  # never empty
    if kind.endswith("_c"):
        m = m.unsqueeze(1)
    return m


MASKS = [None, "bool", "bool_c", "float", "float_c"]


# --------------------------------------------------------------------------------------
# 1. reference vs the numpy oracle
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_reference_matches_numpy(shape, mask_kind, reduction, teacher_is_logits):
    gen = torch.Generator().manual_seed(10)
    shp = SHAPES[shape]
    student = 3 * torch.randn(shp, generator=gen, dtype=torch.float64)
    teacher = (3 * torch.randn(shp, generator=gen, dtype=torch.float64) if teacher_is_logits
               else _teacher_probs(shp, gen))
    if not teacher_is_logits:
        assert (teacher == 0).any()
    mask = _mask(mask_kind, shp, gen)
    out = tpswarp.reference.masked_kl_div(student, teacher, mask, teacher_is_logits=teacher_is_logits,
                                          reduction=reduction)
    expected = kl_oracle(student, teacher, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)
    assert out.dtype == torch.float64
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_oracle_known_value():
    # Guard the oracle: KL((1/2, 1/2, 0) || (1/4, 1/4, 1/2)) = log 2; 0 log 0 contributes 0.
    student = torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)).view(1, 3, 1)
    teacher = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).view(1, 3, 1)
    torch.testing.assert_close(kl_oracle(student, teacher), torch.tensor(np.log(2.0), dtype=torch.float64))
    torch.testing.assert_close(tpswarp.reference.masked_kl_div(student, teacher),
                               torch.tensor(np.log(2.0), dtype=torch.float64))


def test_public_op_matches_numpy(backend):
    gen = torch.Generator().manual_seed(11)
    shp = SHAPES["2d"]
    student = torch.randn(shp, generator=gen, dtype=torch.float64)
    teacher = _teacher_probs(shp, gen)
    mask = _mask("float", shp, gen)
    for reduction in REDUCTIONS:
        out = tpswarp.masked_kl_div(student, teacher, mask, reduction=reduction)
        assert_close(out, kl_oracle(student, teacher, mask, reduction=reduction))


# --------------------------------------------------------------------------------------
# 2. backends vs the reference (values and two-way gradients)
# --------------------------------------------------------------------------------------
def _layout(t, layout):
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "non_contiguous":
        return non_contiguous(t)
    return t


def _run_both(student, teacher, mask, teacher_is_logits, reduction, gen, upstream_dtype):
    """The op on the inputs, and the reference on the same values (upcast to float32 for half)."""
    upcast = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731
    s1, t1 = (x.detach().clone().requires_grad_(True) for x in (student, teacher))
    s2, t2 = (upcast(x.detach()).clone().requires_grad_(True) for x in (student, teacher))
    out = tpswarp.masked_kl_div(s1, t1, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)
    ref = tpswarp.reference.masked_kl_div(s2, t2, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)
    grad = 0.5 + torch.rand(out.shape, generator=gen, dtype=upstream_dtype)  # not 1
    g_out = torch.autograd.grad(out, (s1, t1), grad)
    g_ref = torch.autograd.grad(ref, (s2, t2), grad.to(ref.dtype))
    return out, ref, g_out, g_ref


@pytest.mark.parametrize("shape, layout", [
    ("2d", "contiguous"), ("2d", "channels_last"), ("2d", "non_contiguous"),
    ("3d", "contiguous"), ("3d", "channels_last"), ("3d", "non_contiguous"),
    ("1d", "contiguous"), ("1d", "non_contiguous"),  # no channels_last format for 3-D tensors
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(backend, shape, dtype, reduction, layout):
    gen = torch.Generator().manual_seed(12)
    shp = SHAPES[shape]
    student = _layout((3 * torch.randn(shp, generator=gen)).to(dtype), layout)
    teacher_is_logits = reduction != "sum"  # both modes over the matrix
    teacher = (torch.randn(shp, generator=gen) if teacher_is_logits else _teacher_probs(shp, gen)).to(dtype)
    teacher = _layout(teacher, layout)
    mask = _mask("float_c" if reduction == "mean" else "bool", shp, gen)
    out, ref, (gs, gt), (rs, rt) = _run_both(student, teacher, mask, teacher_is_logits, reduction, gen, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref)
    assert_close(gs, rs, grad=True)
    assert_close(gt, rt, grad=True)
    assert gs.shape == student.shape and gt.shape == teacher.shape
    assert gs.abs().sum() > 0 and gt.abs().sum() > 0


@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32_reference(backend, dtype, teacher_is_logits):
    gen = torch.Generator().manual_seed(13)
    shp = SHAPES["2d"]
    student = (3 * torch.randn(shp, generator=gen)).to(dtype)
    teacher = (torch.randn(shp, generator=gen) if teacher_is_logits else _teacher_probs(shp, gen, zeros=False)).to(dtype)
    mask = _mask("bool", shp, gen)
    for reduction in REDUCTIONS:
        out, ref, (gs, gt), (rs, rt) = _run_both(student, teacher, mask, teacher_is_logits, reduction, gen,
                                                 torch.float32)
        assert out.dtype == torch.float32  # half inputs are computed and returned in float32
        assert_close(out, ref, dtype=dtype)
        assert gs.dtype == dtype and gt.dtype == dtype
        assert_close(gs.float(), rs, grad=True, dtype=dtype)
        assert_close(gt.float(), rt, grad=True, dtype=dtype)


def test_student_only_gradient(backend):
    # teacher without requires_grad: one-way consistency, no gradient to the teacher
    student = torch.randn(SHAPES["2d"], requires_grad=True)
    teacher = _teacher_probs(SHAPES["2d"], None, dtype=torch.float32)
    loss = tpswarp.masked_kl_div(student, teacher)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    # gradient of the mean KL w.r.t. student logits is (softmax(s) - p) / N
    expected = (student.detach().softmax(1) - teacher) / (student.numel() / student.shape[1])
    assert_close(student.grad, expected, grad=True)


def test_mask_shapes_equivalent(backend):
    gen = torch.Generator().manual_seed(14)
    shp = SHAPES["3d"]
    student, teacher = torch.randn(shp, generator=gen), _teacher_probs(shp, gen, dtype=torch.float32)
    m = _mask("bool", shp, gen)
    a = tpswarp.masked_kl_div(student, teacher, m)
    b = tpswarp.masked_kl_div(student, teacher, m.unsqueeze(1))
    c = tpswarp.masked_kl_div(student, teacher, m.float())
    d = tpswarp.masked_kl_div(student, teacher, m.double())
    assert_close(b, a)
    assert_close(c, a)
    assert_close(d.float(), a)
    # all-true mask equals no mask
    assert_close(tpswarp.masked_kl_div(student, teacher, torch.ones_like(m)), tpswarp.masked_kl_div(student, teacher))


def test_none_is_zero_where_masked_out(backend):
    gen = torch.Generator().manual_seed(15)
    shp = SHAPES["2d"]
    student, teacher = torch.randn(shp, generator=gen), _teacher_probs(shp, gen, dtype=torch.float32)
    m = _mask("bool", shp, gen)
    none = tpswarp.masked_kl_div(student, teacher, m, reduction="none")
    assert none.shape == (shp[0], *shp[2:])
    assert torch.all(none[~m] == 0)
    assert torch.all(none[m] > 0)


# --------------------------------------------------------------------------------------
# 3. hypothesis properties
# --------------------------------------------------------------------------------------
@st.composite
def kl_case(draw):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    scale = draw(st.floats(0.01, 30.0))
    seed = draw(st.integers(0, 2**31 - 1))
    mask_kind = draw(st.sampled_from(MASKS))
    return (B, C, *spatial), scale, seed, mask_kind


@fixture_ok
@given(case=kl_case(), teacher_is_logits=st.booleans())
def test_hypothesis_properties(backend, case, teacher_is_logits):
    shape, scale, seed, mask_kind = case
    gen = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(shape, generator=gen)
    teacher_logits = scale * torch.randn(shape, generator=gen)
    teacher = teacher_logits if teacher_is_logits else teacher_logits.softmax(1)
    mask = _mask(mask_kind, shape, gen)
    kw = dict(teacher_is_logits=teacher_is_logits)
    none = tpswarp.masked_kl_div(student, teacher, mask, reduction="none", **kw)
    total = tpswarp.masked_kl_div(student, teacher, mask, reduction="sum", **kw)
    mean = tpswarp.masked_kl_div(student, teacher, mask, reduction="mean", **kw)
    # non-negative (up to float32 rounding of log-probabilities of magnitude ~scale)
    assert none.min() >= -1e-5 * max(1.0, scale)
    # "none" sums to "sum"; "mean" is sum / sum(mask)
    assert_close(none.sum(), total, msg="none.sum() != sum")
    count = none.numel() if mask is None else mask.float().sum()
    assert_close(mean, total / count, msg="mean != sum / count")
    # matches the float64 oracle (values up to ~scale^2: relative + absolute float32 error)
    torch.testing.assert_close(none.double(), kl_oracle(student, teacher, mask, reduction="none", **kw),
                               rtol=1e-4, atol=1e-5 * max(1.0, scale))
    # zero for equal distributions
    same = student.softmax(1) if not teacher_is_logits else student
    zero = tpswarp.masked_kl_div(student, same, mask, reduction="none", **kw)
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-5 * max(1.0, scale))


# --------------------------------------------------------------------------------------
# 4. empty mask and extreme logits
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_empty_mask(backend, mask_dtype, teacher_is_logits):
    shp = SHAPES["2d"]
    student = torch.randn(shp, requires_grad=True)
    teacher = (torch.randn(shp) if teacher_is_logits else _teacher_probs(shp, None, dtype=torch.float32))
    teacher.requires_grad_(True)
    mask = torch.zeros((shp[0], *shp[2:]), dtype=mask_dtype)
    for reduction in REDUCTIONS:
        loss = tpswarp.masked_kl_div(student, teacher, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss))
        grad = torch.rand(loss.shape) + 0.5
        gs, gt = torch.autograd.grad(loss, (student, teacher), grad)
        assert torch.equal(gs, torch.zeros_like(gs)), reduction
        assert torch.equal(gt, torch.zeros_like(gt)), reduction


@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_extreme_logits_are_finite(backend, teacher_is_logits):
    gen = torch.Generator().manual_seed(16)
    shp = SHAPES["2d"]
    sign = lambda: torch.where(torch.rand(shp, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    student = (1e4 * sign()).requires_grad_(True)
    teacher_logits = 1e4 * sign()
    teacher = (teacher_logits if teacher_is_logits else teacher_logits.softmax(1)).requires_grad_(True)
    if not teacher_is_logits:
        assert (teacher == 0).any()  # exact zeros in the teacher probabilities
    mask = _mask("float", shp, gen)
    for reduction in REDUCTIONS:
        loss = tpswarp.masked_kl_div(student, teacher, mask, teacher_is_logits=teacher_is_logits,
                                     reduction=reduction)
        assert torch.isfinite(loss).all()
        expected = kl_oracle(student, teacher, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)
        assert_close(loss.double(), expected, dtype=torch.float32)
        grad = torch.rand(loss.shape, generator=gen) + 0.5
        gs, gt = torch.autograd.grad(loss, (student, teacher), grad)
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all(), reduction


# --------------------------------------------------------------------------------------
# 5. gradcheck (student and teacher)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_gradcheck(backend, teacher_is_logits, reduction):
    gen = torch.Generator().manual_seed(17)
    shp = (2, 3, 2, 3)
    student = torch.randn(shp, generator=gen, dtype=torch.float64, requires_grad=True)
    # strictly positive probabilities: p log p is smooth there
    teacher = (torch.randn(shp, generator=gen, dtype=torch.float64) if teacher_is_logits
               else _teacher_probs(shp, gen, zeros=False)).requires_grad_(True)
    mask = _mask("float_c", shp, gen)
    fn = lambda s, t: tpswarp.masked_kl_div(s, t, mask, teacher_is_logits=teacher_is_logits,  # noqa: E731
                                            reduction=reduction)
    assert torch.autograd.gradcheck(fn, (student, teacher))


def test_gradcheck_3d_unmasked(backend):
    gen = torch.Generator().manual_seed(18)
    student = torch.randn(1, 2, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 2, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, t: tpswarp.masked_kl_div(s, t, teacher_is_logits=True), (student, teacher))


# --------------------------------------------------------------------------------------
# 6. opcheck
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, mask_kind, teacher_is_logits, reduction", [
    ("2d", None, False, "mean"),
    ("2d", "bool", True, "sum"),
    ("2d", "float", False, "none"),
    ("3d", "float", True, "mean"),
    ("1d", "bool", False, "none"),
])
def test_opcheck(backend, shape, mask_kind, teacher_is_logits, reduction):
    gen = torch.Generator().manual_seed(19)
    shp = SHAPES[shape]
    student = torch.randn(shp, generator=gen, requires_grad=True)
    teacher = (torch.randn(shp, generator=gen) if teacher_is_logits
               else _teacher_probs(shp, gen, dtype=torch.float32)).requires_grad_(True)
    mask = _mask(mask_kind, shp, gen)
    torch.library.opcheck(torch.ops.tpswarp.masked_kl_div.default,
                          (student, teacher, mask, teacher_is_logits, reduction))


# --------------------------------------------------------------------------------------
# 8. bad inputs
# --------------------------------------------------------------------------------------
def test_bad_inputs(backend):
    shp = SHAPES["2d"]
    s, t = torch.randn(shp), torch.rand(shp)
    with pytest.raises(ValueError, match="`reduction`"):
        tpswarp.masked_kl_div(s, t, reduction="avg")
    with pytest.raises(ValueError, match="`mask`"):
        tpswarp.masked_kl_div(s, t, torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask`"):
        tpswarp.masked_kl_div(s, t, torch.ones(2, 3, 5, 6, dtype=torch.bool))  # per-class mask
    with pytest.raises(TypeError, match="`mask`"):
        tpswarp.masked_kl_div(s, t, torch.ones(2, 5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.masked_kl_div(s, torch.rand(2, 4, 5, 6))
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.masked_kl_div(s, torch.rand(2, 3, 6, 5))
    with pytest.raises(TypeError, match="`student_logits`"):
        tpswarp.masked_kl_div(torch.randint(0, 5, shp), t)
    with pytest.raises(TypeError, match="`teacher`"):
        tpswarp.masked_kl_div(s, torch.randint(0, 5, shp))
    with pytest.raises(ValueError, match="`student_logits`"):
        tpswarp.masked_kl_div(torch.randn(5), torch.rand(5))
    with pytest.raises(TypeError, match="`student_logits`"):
        tpswarp.masked_kl_div(s.numpy(), t)
    with pytest.raises(RuntimeError, match="`teacher`"):
        tpswarp.masked_kl_div(s, t.to("meta"))


# --------------------------------------------------------------------------------------
# 9. the statistics kept by the forward (_masked_kl_div_with_stats): the CUDA kernels' per-pixel
#    code, served on the CPU by its scalar twin (tested here, not routed to on the CPU)
# --------------------------------------------------------------------------------------
def _stats_ops():
    if not tpswarp.backends()["extension"]["built"]:
        pytest.skip("the C++ extension is not built")
    return torch.ops.tpswarp._masked_kl_div_with_stats, torch.ops.tpswarp._masked_kl_div_backward_stats


@pytest.mark.parametrize("case", ["f32", "f64_3d", "bf16_cl", "f32_noncontig_extreme"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_statistics_ops_match_plain_ops(case, reduction, teacher_is_logits):
    with_stats, backward_stats = _stats_ops()
    gen = torch.Generator().manual_seed(21)
    shape = SHAPES["3d"] if case.startswith("f64_3d") else (2, 19, 5, 6)
    dtype = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}[case.split("_")[0]]
    s = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.endswith("extreme"):
        s = s * 5e3
    t = 2 * torch.randn(shape, generator=gen, dtype=torch.float64) if teacher_is_logits else _teacher_probs(shape, gen)
    s, t = s.to(dtype), t.to(dtype)
    if case.endswith("_cl"):
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    if "noncontig" in case:
        s, t = non_contiguous(s), non_contiguous(t)
    mask = _mask("float", shape, gen)
    loss, stats = with_stats(s, t, mask, teacher_is_logits, reduction)
    plain = torch.ops.tpswarp.masked_kl_div(s, t, mask, teacher_is_logits, reduction, None)
    assert_close(loss, plain, dtype=dtype)
    B, C = shape[:2]
    N = s[0, 0].numel()
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.shape == (B, 4, N) and stats.dtype == ct
    live = (mask.reshape(B, N) != 0)
    flat_s, flat_t = s.to(ct).reshape(B, C, N), t.to(ct).reshape(B, C, N)
    assert torch.equal(stats[:, 0][live], flat_s.amax(1)[live])
    torch.testing.assert_close((stats[:, 0] + stats[:, 1])[live], torch.logsumexp(flat_s, 1)[live])
    if teacher_is_logits:
        torch.testing.assert_close((stats[:, 2] + stats[:, 3])[live], torch.logsumexp(flat_t, 1)[live])
    else:
        torch.testing.assert_close(stats[:, 2][live], flat_t.sum(1)[live])
    g = torch.randn(loss.shape, generator=gen, dtype=loss.dtype) + 0.5
    grad = backward_stats(g, s, t, mask, stats, teacher_is_logits, reduction)
    expected = torch.ops.tpswarp._masked_kl_div_backward(g, s, t, mask, teacher_is_logits, reduction, None,
                                                         [True, False])[0]
    assert grad.dtype == s.dtype and grad.stride() == expected.stride()
    assert torch.isfinite(grad).all()
    assert_close(grad, expected, grad=True, dtype=dtype)


def test_statistics_ops_opcheck_and_errors():
    with_stats, backward_stats = _stats_ops()
    s, t = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    mask = torch.rand(2, 3, 5) > 0.3
    torch.library.opcheck(with_stats, (s, t, mask, True, "mean"))
    torch.library.opcheck(with_stats, (s, t.softmax(1), None, False, "none"))
    _, stats = with_stats(s, t, mask, True, "mean")
    g = torch.tensor(1.5)
    torch.library.opcheck(backward_stats, (g, s, t, mask, stats, True, "mean"))
    with pytest.raises(ValueError, match=r"`stats` must have shape \(2, 4, 15\)"):
        backward_stats(g, s, t, mask, stats[:, :3], True, "mean")
    with pytest.raises(TypeError, match="`stats` must be Float"):
        backward_stats(g, s, t, mask, stats.double(), True, "mean")
    with pytest.raises(ValueError, match="`stats` must be contiguous"):
        backward_stats(g, s, t, mask, stats.transpose(0, 1).contiguous().transpose(0, 1), True, "mean")
    empty = torch.zeros(0, 4, 3, 3)
    loss, stats = with_stats(empty, empty, None, False, "mean")
    assert loss.item() == 0.0 and stats.shape == (0, 4, 0)
    assert backward_stats(g, empty, empty, None, stats, False, "mean").shape == empty.shape


def test_statistics_not_routed_on_cpu(backend):
    """On the CPU the C++ kernels keep their own paths (the statistics ops' CPU kernels are the twin of the
    CUDA ones); the Triton backend (TRITON_INTERPRET=1) takes the statistics path."""
    s = torch.randn(2, 4, 5, 6, requires_grad=True)
    loss = tpswarp.masked_kl_div(s, torch.randn(2, 4, 5, 6), teacher_is_logits=True, reduction="none")
    assert ("_masked_kl_div_with_stats" in loss.grad_fn.name()) == (backend == "triton")
