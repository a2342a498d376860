"""The ``size=`` argument of masked_kl_div and warped_kl_div (/work/size_contract.md, issue 5):
the reference vs an independent oracle (explicit F.interpolate, then the full-resolution loss written
with torch.nn.functional), every backend vs the reference in value and gradient (student, teacher,
src/params; random upstream gradients; reductions; masks; teacher probabilities and logits;
upsampling by 1, 2, 4 and non-integer factors, downsampling, different student/teacher sizes),
layouts and half inputs, float64 gradcheck, opcheck, determinism, and bad ``size`` values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tpswarp
from tpswarp.testing import assert_close, non_contiguous, random_tps, to_channels_last

REDUCTIONS = ("mean", "sum", "none")

# name: (student (hs, ws), teacher (ht, wt), size (H, W))
SIZES = {
    "x1": ((6, 7), (6, 7), (6, 7)),
    "x2": ((5, 6), (5, 6), (10, 12)),
    "x4": ((3, 4), (3, 4), (12, 16)),
    "frac": ((13, 17), (13, 17), (40, 50)),
    "down": ((20, 22), (20, 22), (7, 11)),
    "mixed": ((5, 7), (9, 4), (10, 12)),
    "student_at_size": ((10, 12), (4, 5), (10, 12)),
    "one_pixel": ((1, 1), (2, 1), (3, 5)),
}


def _interp(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _teacher(shape, gen, logits, dtype=torch.float64, zeros=True):
    t = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if not logits and not zeros:
        t = t.softmax(1)
    elif not logits:
        t = t.softmax(1)
        # exact zeros in some classes (0 log 0 = 0), renormalized
        drop = torch.rand(shape, generator=gen) < 0.3
        drop[:, 0] = False
        t = torch.where(drop, torch.zeros_like(t), t)
        t = t / t.sum(1, keepdim=True)
    return t.to(dtype)


def _mask(kind, B, size, gen):
    if kind is None:
        return None
    base = torch.rand((B, *size), generator=gen, dtype=torch.float64)
    if kind == "empty":
        return torch.zeros((B, *size), dtype=torch.bool)
    m = base > 0.35 if kind.startswith("bool") else (2 * base).where(base > 0.35, torch.zeros_like(base))
    m.view(-1)[0] = True if m.dtype == torch.bool else 1.0
    return m.unsqueeze(1) if kind.endswith("_c") else m


def _inputs(name, *, B=2, C=4, logits=False, dtype=torch.float64, seed=0, zeros=True):
    """Student logits, teacher (probabilities with exact zeros in some classes when ``zeros``, or
    logits) at the resolutions of SIZES[name], and the output size."""
    (hs, ws), (ht, wt), size = SIZES[name]
    gen = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, C, hs, ws, generator=gen, dtype=torch.float64)).to(dtype)
    teacher = _teacher((B, C, ht, wt), gen, logits, dtype, zeros)
    return student, teacher, size


def _upstream(shape, dtype, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _value_and_grads(fn, tensors, needs, seed=7):
    """fn(*leaves) and its gradients w.r.t. the leaves in ``needs``, against a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    out = fn(*leaves)
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(out, wanted, _upstream(out.shape, out.dtype, seed)) if wanted else ()
    return out.detach(), grads


# --------------------------------------------------------------------------------------
# independent oracle: F.interpolate, then KL with torch.nn.functional (no tpswarp code)
# --------------------------------------------------------------------------------------
def _kl_oracle(student, teacher, weights, logits, reduction):
    log_q = F.log_softmax(student, 1)
    if logits:
        kl = F.kl_div(log_q, F.log_softmax(teacher, 1), reduction="none", log_target=True).sum(1)
    else:
        # sum_c p log p - p log q with 0 log 0 = 0 and, as the design says, the p log p term
        # contributing 0 to the gradient at p = 0 (F.kl_div's gradient there is NaN)
        pos = teacher > 0
        log_p = torch.log(torch.where(pos, teacher, torch.ones_like(teacher)))
        kl = (torch.where(pos, teacher * log_p, torch.zeros_like(teacher)) - teacher * log_q).sum(1)
    if weights is not None:
        kl = kl * weights
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    count = weights.sum() if weights is not None else torch.tensor(float(kl.numel()), dtype=kl.dtype)
    return kl.sum() / count if count != 0 else kl.sum() * 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("name", list(SIZES))
def test_reference_masked_matches_oracle(name, logits, reduction):
    student, teacher, size = _inputs(name, logits=logits, seed=1)
    mask = _mask("float", student.shape[0], size, torch.Generator().manual_seed(2))

    def oracle(s, t):
        return _kl_oracle(_interp(s, size), _interp(t, size), mask, logits, reduction)

    def ref(s, t):
        return tpswarp.reference.masked_kl_div(s, t, mask, teacher_is_logits=logits, reduction=reduction, size=size)

    expected, g_expected = _value_and_grads(oracle, (student, teacher), (True, True))
    out, g_out = _value_and_grads(ref, (student, teacher), (True, True))
    assert out.shape == expected.shape == ((2, *size) if reduction == "none" else ())
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_out, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("name", ["x2", "frac", "down", "mixed"])
def test_reference_warped_matches_composition(name, logits, reduction):
    # contract: warped_kl_div(interp(student), interp(teacher), src, params) at full resolution
    student, teacher, size = _inputs(name, logits=logits, seed=3)
    src, _, params = random_tps(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(teacher_is_logits=logits, reduction=reduction)

    def composed(s, t, p):
        return tpswarp.reference.warped_kl_div(_interp(s, size), _interp(t, size), src, p, **kw)

    def ref(s, t, p):
        return tpswarp.reference.warped_kl_div(s, t, src, p, size=size, **kw)

    expected, g_expected = _value_and_grads(composed, (student, teacher, params), (True, True, True))
    out, g_out = _value_and_grads(ref, (student, teacher, params), (True, True, True))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_out, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # and the warped teacher is the upsampled one: not the low-resolution teacher warped directly
    if name != "student_at_size":
        direct = tpswarp.reference.warped_kl_div(_interp(student, size), teacher, src, params, **kw)
        assert not torch.allclose(direct, out)


# --------------------------------------------------------------------------------------
# every backend vs the reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_masked_backend_vs_reference(backend, dtype, name, logits, reduction):
    student, teacher, size = _inputs(name, logits=logits, dtype=dtype, seed=5, zeros=False)
    mask = _mask("bool", student.shape[0], size, torch.Generator().manual_seed(6))
    kw = dict(teacher_is_logits=logits, reduction=reduction, size=size)
    expected, g_expected = _value_and_grads(
        lambda s, t: tpswarp.reference.masked_kl_div(s, t, mask, **kw), (student, teacher), (True, True))
    out, g_out = _value_and_grads(lambda s, t: tpswarp.masked_kl_div(s, t, mask, **kw), (student, teacher),
                                  (True, True))
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected)
    for a, b, x in zip(g_out, g_expected, (student, teacher)):
        assert a.shape == x.shape and a.dtype == x.dtype
        assert_close(a, b, grad=True)


@pytest.mark.parametrize("name", ["x2", "frac", "mixed"])
@pytest.mark.parametrize("op", ["masked", "warped"])
def test_zero_probabilities(backend, op, name):
    # Exact zeros in the teacher's probabilities (0 log 0 = 0): values and the student gradient
    # match the reference; the teacher gradient (log p, ill-conditioned where a resized p is ~0)
    # is finite and matches away from the resized zeros and their neighbours.
    student, teacher, size = _inputs(name, logits=False, dtype=torch.float32, seed=29, zeros=True)
    assert (teacher == 0).any()
    src, _, params = random_tps(2, dtype=torch.float32)
    if op == "masked":
        def fn(mod):
            return lambda s, t: mod.masked_kl_div(s, t, reduction="none", size=size)
    else:
        def fn(mod):
            return lambda s, t: mod.warped_kl_div(s, t, src, params, reduction="none", size=size)
    expected, g_expected = _value_and_grads(fn(tpswarp.reference), (student, teacher), (True, True))
    out, g_out = _value_and_grads(fn(tpswarp), (student, teacher), (True, True))
    assert_close(out, expected)
    assert_close(g_out[0], g_expected[0], grad=True)
    assert torch.isfinite(g_out[1]).all()
    # teacher pixels whose resized neighbourhood is free of (near-)zero probabilities
    near_zero = F.max_pool2d((teacher < 1e-3).float(), 3, stride=1, padding=1) > 0
    assert (~near_zero).any()
    assert_close(g_out[1][~near_zero], g_expected[1][~near_zero], grad=True)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "bool_c", "float_c", "empty"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_masks(backend, mask_kind, reduction):
    student, teacher, size = _inputs("frac", logits=True, dtype=torch.float32, seed=8)
    mask = _mask(mask_kind, student.shape[0], size, torch.Generator().manual_seed(9))
    kw = dict(teacher_is_logits=True, reduction=reduction, size=size)
    expected, g_expected = _value_and_grads(
        lambda s, t: tpswarp.reference.masked_kl_div(s, t, mask, **kw), (student, teacher), (True, True))
    out, g_out = _value_and_grads(lambda s, t: tpswarp.masked_kl_div(s, t, mask, **kw), (student, teacher),
                                  (True, True))
    assert_close(out, expected)
    for a, b in zip(g_out, g_expected):
        assert_close(a, b, grad=True)
    if mask_kind == "empty":
        assert torch.all(out == 0)
        assert all(torch.all(g == 0) for g in g_out)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["student", "teacher"])
def test_masked_single_gradient(backend, needs):
    student, teacher, size = _inputs("mixed", logits=False, dtype=torch.float32, seed=10, zeros=False)
    fn_ref = lambda s, t: tpswarp.reference.masked_kl_div(s, t, size=size, reduction="sum")  # noqa: E731
    fn = lambda s, t: tpswarp.masked_kl_div(s, t, size=size, reduction="sum")  # noqa: E731
    _, g_expected = _value_and_grads(fn_ref, (student, teacher), needs)
    _, g_out = _value_and_grads(fn, (student, teacher), needs)
    assert len(g_out) == 1
    assert_close(g_out[0], g_expected[0], grad=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("name", ["x1", "x2", "x4", "frac", "down", "mixed", "student_at_size"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_warped_backend_vs_reference(backend, name, logits, reduction, align_corners):
    student, teacher, size = _inputs(name, logits=logits, dtype=torch.float32, seed=11, zeros=False)
    src, _, params = random_tps(2, generator=torch.Generator().manual_seed(12), dtype=torch.float32)
    kw = dict(teacher_is_logits=logits, align_corners=align_corners, reduction=reduction, size=size)
    tensors, needs = (student, teacher, src, params), (True, True, True, True)
    expected, g_expected = _value_and_grads(lambda *a: tpswarp.reference.warped_kl_div(*a, **kw), tensors, needs)
    out, g_out = _value_and_grads(lambda *a: tpswarp.warped_kl_div(*a, **kw), tensors, needs)
    assert out.shape == expected.shape == ((2, *size) if reduction == "none" else ())
    assert_close(out, expected)
    for a, b, x in zip(g_out, g_expected, tensors):
        assert a.shape == x.shape
        assert_close(a, b, grad=True)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, False, True), (True, False, True, True)],
                         ids=["student", "teacher", "params", "student_src_params"])
def test_warped_gradient_subsets(backend, needs):
    student, teacher, size = _inputs("x2", logits=True, dtype=torch.float32, seed=13)
    src, _, params = random_tps(2, generator=torch.Generator().manual_seed(14), dtype=torch.float32)
    kw = dict(teacher_is_logits=True, reduction="none", size=size)
    tensors = (student, teacher, src, params)
    _, g_expected = _value_and_grads(lambda *a: tpswarp.reference.warped_kl_div(*a, **kw), tensors, needs)
    _, g_out = _value_and_grads(lambda *a: tpswarp.warped_kl_div(*a, **kw), tensors, needs)
    assert len(g_out) == sum(needs)
    for a, b in zip(g_out, g_expected):
        assert_close(a, b, grad=True)


def test_warped_empty_validity(backend):
    # every sample lands outside the image: mean is 0 with zero gradients, never NaN
    student, teacher, size = _inputs("x2", logits=True, dtype=torch.float32, seed=15)
    src, _, params = random_tps(2, scale=0.0, dtype=torch.float32)
    params = params.clone()
    params[:, -3, :] += 5.0  # shift the affine part far away
    out, grads = _value_and_grads(
        lambda s, t, p: tpswarp.warped_kl_div(s, t, src, p, teacher_is_logits=True, size=size),
        (student, teacher, params), (True, True, True))
    assert out == 0
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("op", ["masked", "warped"])
def test_extreme_logits_are_finite(backend, op):
    student, teacher, size = _inputs("x2", logits=True, dtype=torch.float32, seed=16)
    student = student * 1e4
    teacher = teacher * 1e4
    src, _, params = random_tps(2, dtype=torch.float32)
    if op == "masked":
        fn = lambda s, t: tpswarp.masked_kl_div(s, t, teacher_is_logits=True, size=size)  # noqa: E731
        fn_ref = lambda s, t: tpswarp.reference.masked_kl_div(s, t, teacher_is_logits=True, size=size)  # noqa: E731
    else:
        fn = lambda s, t: tpswarp.warped_kl_div(s, t, src, params, teacher_is_logits=True, size=size)  # noqa: E731
        fn_ref = lambda s, t: tpswarp.reference.warped_kl_div(  # noqa: E731
            s, t, src, params, teacher_is_logits=True, size=size)
    out, grads = _value_and_grads(fn, (student, teacher), (True, True))
    expected, g_expected = _value_and_grads(fn_ref, (student, teacher), (True, True))
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-2)


# --------------------------------------------------------------------------------------
# identity, layouts, half inputs
# --------------------------------------------------------------------------------------
def test_size_at_input_resolution_is_size_none(backend):
    student, teacher, size = _inputs("x1", logits=False, dtype=torch.float32, seed=17, zeros=True)
    mask = _mask("float", 2, size, torch.Generator().manual_seed(18))
    src, _, params = random_tps(2, dtype=torch.float32)
    for reduction in REDUCTIONS:
        a = tpswarp.masked_kl_div(student, teacher, mask, reduction=reduction, size=size)
        b = tpswarp.masked_kl_div(student, teacher, mask, reduction=reduction)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        a = tpswarp.warped_kl_div(student, teacher, src, params, reduction=reduction, size=list(size))
        b = tpswarp.warped_kl_div(student, teacher, src, params, reduction=reduction)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("op", ["masked", "warped"])
def test_layouts(backend, layout, op):
    student, teacher, size = _inputs("mixed", logits=True, dtype=torch.float32, seed=19)
    src, _, params = random_tps(2, dtype=torch.float32)
    change = to_channels_last if layout == "channels_last" else non_contiguous
    if op == "masked":
        def fn(mod):
            return lambda s, t: mod.masked_kl_div(s, t, teacher_is_logits=True, reduction="none", size=size)
    else:
        def fn(mod):
            return lambda s, t: mod.warped_kl_div(s, t, src, params, teacher_is_logits=True, reduction="none",
                                                  size=size)
    expected, g_expected = _value_and_grads(fn(tpswarp.reference), (student, teacher), (True, True))
    leaves = [change(student).requires_grad_(True), change(teacher).requires_grad_(True)]
    out = fn(tpswarp)(*leaves)
    g_out = torch.autograd.grad(out, leaves, _upstream(out.shape, out.dtype))
    assert_close(out.detach(), expected)
    for a, b in zip(g_out, g_expected):
        assert_close(a, b, grad=True)
    if layout == "channels_last":
        assert g_out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["masked", "warped"])
def test_half_inputs(backend, dtype, op):
    student, teacher, size = _inputs("x2", logits=False, dtype=dtype, seed=20, zeros=False)
    src, _, params = random_tps(2, dtype=torch.float32)
    if op == "masked":
        def fn(mod):
            return lambda s, t: mod.masked_kl_div(s, t, reduction="none", size=size)
    else:
        def fn(mod):
            return lambda s, t: mod.warped_kl_div(s, t, src, params, reduction="none", size=size)
    expected, g_expected = _value_and_grads(fn(tpswarp.reference), (student, teacher), (True, True))
    out, g_out = _value_and_grads(fn(tpswarp), (student, teacher), (True, True))
    # computed in float32 from the same half values: float32 agreement for the loss
    assert out.dtype == expected.dtype == torch.float32
    assert_close(out, expected, dtype=torch.float32)
    for a, b in zip(g_out, g_expected):
        assert a.dtype == dtype
        assert_close(a, b, grad=True)
    # and close to the float64 computation on the same values
    ref64 = fn(tpswarp.reference)(student.double(), teacher.double())
    assert_close(out.double(), ref64, dtype=dtype)


# --------------------------------------------------------------------------------------
# gradcheck, opcheck, determinism, meta
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x2", "mixed", "down"])
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
def test_gradcheck_masked(backend, name, logits):
    student, teacher, size = _inputs(name, B=1, C=3, logits=logits, seed=21, zeros=False)
    mask = _mask("float", 1, size, torch.Generator().manual_seed(22))
    fn = lambda s, t: tpswarp.masked_kl_div(s, t, mask, teacher_is_logits=logits, reduction="none", size=size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(True), teacher.requires_grad_(True)))


@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
def test_gradcheck_warped(backend, logits):
    student, teacher, size = _inputs("mixed", B=1, C=3, logits=logits, seed=23, zeros=False)
    src, _, params = random_tps(1, dtype=torch.float64)
    fn = lambda s, t, c, p: tpswarp.warped_kl_div(s, t, c, p, teacher_is_logits=logits, reduction="sum",  # noqa: E731
                                                  size=size)
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(True), teacher.requires_grad_(True),
                                         src.requires_grad_(True), params.requires_grad_(True)))


@pytest.mark.parametrize("logits, reduction, name", [(False, "mean", "x2"), (True, "none", "mixed"),
                                                     (True, "sum", "down")])
def test_opcheck(backend, logits, reduction, name):
    student, teacher, size = _inputs(name, logits=logits, dtype=torch.float32, seed=24)
    mask = _mask("bool", 2, size, torch.Generator().manual_seed(25))
    torch.library.opcheck(torch.ops.tpswarp.masked_kl_div.default,
                          (student.requires_grad_(True), teacher.requires_grad_(True), mask, logits, reduction,
                           list(size)))
    src, _, params = random_tps(2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.tpswarp.warped_kl_div.default,
                          (student, teacher, src, params.requires_grad_(True), logits, False, reduction, list(size)))


@pytest.mark.parametrize("op", ["masked", "warped"])
def test_backward_is_deterministic(backend, op):
    student, teacher, size = _inputs("frac", logits=True, dtype=torch.float32, seed=26)
    src, _, params = random_tps(2, dtype=torch.float32)
    if op == "masked":
        fn = lambda s, t: tpswarp.masked_kl_div(s, t, teacher_is_logits=True, reduction="none", size=size)  # noqa: E731
    else:
        fn = lambda s, t: tpswarp.warped_kl_div(s, t, src, params, teacher_is_logits=True, reduction="none",  # noqa: E731
                                                size=size)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(_value_and_grads(fn, (student, teacher), (True, True)))
            runs.append(_value_and_grads(fn, (student, teacher), (True, True)))
    finally:
        torch.set_num_threads(threads)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert torch.equal(a, b)


def test_meta_shapes():
    s = torch.empty(2, 3, 5, 7, device="meta")
    t = torch.empty(2, 3, 4, 4, device="meta")
    src, _, params = random_tps(2, dtype=torch.float32)
    for reduction, shape in (("none", (2, 11, 13)), ("mean", ()), ("sum", ())):
        out = torch.ops.tpswarp.masked_kl_div(s, t, None, False, reduction, [11, 13])
        assert out.shape == shape and out.dtype == torch.float32
        out = torch.ops.tpswarp.warped_kl_div(s, t, src.to("meta"), params.to("meta"), False, False, reduction,
                                              [11, 13])
        assert out.shape == shape


def test_phtps_consistency_loss_forwards_size(backend):
    model = tpswarp.PhTPS()
    p = model.sample(2, (24, 32), generator=torch.Generator().manual_seed(27))
    student, teacher, _ = _inputs("x2", logits=True, dtype=torch.float32, seed=28)
    out = model.consistency_loss(student, teacher, p, teacher_is_logits=True, size=(24, 32))
    expected = tpswarp.reference.warped_kl_div(student, teacher, p.src, p.tps, teacher_is_logits=True,
                                               align_corners=model.align_corners, size=(24, 32))
    assert_close(out, expected)
    assert not torch.allclose(out, model.consistency_loss(student, teacher, p, teacher_is_logits=True))


# --------------------------------------------------------------------------------------
# bad size values and shapes
# --------------------------------------------------------------------------------------
BAD_SIZES = [(0, 5), (5,), (4, 5, 6), (-1, 3), (2.5, 3), (True, 3), "ab", 7, (None, 3)]


@pytest.mark.parametrize("size", BAD_SIZES, ids=[repr(s) for s in BAD_SIZES])
def test_bad_size(backend, size):
    s, t = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    src, _, params = random_tps(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="`size`"):
        tpswarp.masked_kl_div(s, t, size=size)
    with pytest.raises(ValueError, match="`size`"):
        tpswarp.warped_kl_div(s, t, src, params, size=size)
    for ref in (tpswarp.reference.masked_kl_div, lambda a, b, size: tpswarp.reference.warped_kl_div(
            a, b, src, params, size=size)):
        with pytest.raises(ValueError, match="`size`"):
            ref(s, t, size=size)


@pytest.mark.parametrize("size", [[0, 5], [5], [3, 4, 5], [-2, 4]])
def test_bad_size_direct_op_call(backend, size):
    # torch.ops.tpswarp.* called directly (no Python wrapper): the kernel checks too
    s, t = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    src, _, params = random_tps(2, dtype=torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="`size`"):
        torch.ops.tpswarp.masked_kl_div(s, t, None, False, "mean", size)
    with pytest.raises((ValueError, RuntimeError), match="`size`"):
        torch.ops.tpswarp.warped_kl_div(s, t, src, params, False, False, "mean", size)


def test_bad_shapes_with_size(backend):
    s3, t3 = torch.randn(2, 3, 7), torch.rand(2, 3, 7)
    with pytest.raises(ValueError, match="`size`"):
        tpswarp.masked_kl_div(s3, t3, size=(4, 4))  # 1-D spatial
    s5 = torch.randn(2, 3, 2, 3, 4)
    with pytest.raises(ValueError, match="`size`"):
        tpswarp.masked_kl_div(s5, s5.softmax(1), size=(4, 4))  # 3-D spatial
    s, t = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 6, 6)
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.masked_kl_div(s, torch.rand(2, 4, 4, 5), size=(8, 10))  # classes differ
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.masked_kl_div(s, torch.rand(3, 3, 4, 5), size=(8, 10))  # batch differs
    with pytest.raises(ValueError, match="`mask`"):
        tpswarp.masked_kl_div(s, t, torch.ones(2, 4, 5, dtype=torch.bool), size=(8, 10))  # mask at input size
    with pytest.raises(ValueError, match="`mask`"):
        tpswarp.masked_kl_div(s, t, torch.ones(2, 2, 8, 10, dtype=torch.bool), size=(8, 10))
    # the mask at the output size, teacher at another resolution: fine
    out = tpswarp.masked_kl_div(s, t, torch.ones(2, 1, 8, 10, dtype=torch.bool), size=(8, 10), reduction="none")
    assert out.shape == (2, 8, 10)
    # without size the shapes must still agree
    with pytest.raises(ValueError, match="`teacher`"):
        tpswarp.masked_kl_div(s, t)
    # direct call with a mask at the wrong size
    with pytest.raises((ValueError, RuntimeError), match="`mask`"):
        torch.ops.tpswarp.masked_kl_div(s, t, torch.ones(2, 4, 5), False, "mean", [8, 10])
