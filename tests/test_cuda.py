"""Every op on CUDA tensors, for the compiled CUDA kernels ("cpp") and the Triton kernels
("triton"), against the reference run on the same CUDA tensors: values, dtypes, memory
formats, gradients for random upstream gradients, float32/float64/half, channels_last and
non-contiguous inputs, shapes larger than one kernel block, determinism under
``torch.use_deterministic_algorithms(True)`` and ``torch.compile``.

Skipped without a GPU (``benchmarks/gpu_check.sh`` runs it on one).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import tpswarp  # noqa: E402
from tpswarp import reference  # noqa: E402
from tpswarp.testing import assert_close, non_contiguous, random_tps, to_channels_last  # noqa: E402

DEV = torch.device("cuda")
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
BACKENDS = ["cpp", "triton"]
OPS = ["tps_solve", "tps_transform", "tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div"]


def gen(seed=0):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=F32, scale=1.0, seed=0):
    return (torch.randn(tuple(shape), generator=gen(seed), dtype=F64) * scale).to(DEV, dtype)


def rand(*shape, dtype=F32, seed=0):
    return torch.rand(tuple(shape), generator=gen(seed), dtype=F64).to(DEV, dtype)


def tps(batch, dtype=F32, scale=0.3, seed=0, n=4):
    src, dst, params = random_tps(batch, n=n, scale=scale, generator=gen(seed), dtype=dtype, device=DEV)
    return src, dst, params


def smooth(*shape, dtype=F32, seed=0):
    """Low-frequency values: float32 rounding of the sample coordinates (which differs between
    implementations, e.g. FMA contraction) then moves the result by about eps, not eps * |noise|."""
    B, C, H, W = shape
    coarse = torch.randn(B, C, max(2, H // 8), max(2, W // 8), generator=gen(seed), dtype=F64)
    fine = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)
    return fine.to(DEV, dtype)


def layout(t, kind):
    return to_channels_last(t) if kind == "channels_last" else non_contiguous(t) if kind == "non_contiguous" else t


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def use(backend, op):
    """Context forcing ``backend``; skips when it does not serve ``op`` on CUDA."""
    if backend == "triton" and not tpswarp.backends()["triton"]:
        pytest.skip("triton is not installed")
    if backend == "cpp" and not tpswarp.backends()["extension"].get("cuda"):
        pytest.skip("the extension was built without CUDA")
    ctx = tpswarp.use_backend(backend)
    ctx.__enter__()
    served = tpswarp.backends()["selected"]["cuda"][op]
    if served != backend and not (backend == "triton" and op in ("tps_solve", "tps_transform")):
        ctx.__exit__(None, None, None)
        pytest.skip(f"{backend} has no CUDA kernel for {op} (served by {served})")
    return ctx


def run(fn, inputs, grad_mask, seed=1):
    leaves = [x.detach().requires_grad_(need) if isinstance(x, torch.Tensor) else x
              for x, need in zip(inputs, grad_mask)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    wanted = [x for x, need in zip(leaves, grad_mask) if need]
    grads = ()
    if wanted:
        y = outs[0]
        g = randn(*y.shape, dtype=y.dtype, seed=seed) + 0.5
        grads = torch.autograd.grad(y, wanted, g, allow_unused=True)
        grads = tuple(torch.zeros_like(x) if gx is None else gx for x, gx in zip(wanted, grads))
    torch.cuda.synchronize()
    return tuple(o.detach() for o in outs), grads


def close(a, b, *, grad, dtype, loose):
    if loose:  # float32 sample coordinates: implementations round differently, amplified by the image slope
        torch.testing.assert_close(a, b, rtol=2e-3, atol=5e-4)
    else:
        assert_close(a, b, grad=grad, dtype=dtype)


def compare(backend, op, fn, ref_fn, inputs, grad_mask, dtype=None, loose=False):
    ctx = use(backend, op)
    try:
        outs, grads = run(fn, inputs, grad_mask)
    finally:
        ctx.__exit__(None, None, None)
    with tpswarp.use_backend("reference"):
        ref_outs, ref_grads = run(ref_fn, inputs, grad_mask)
    for o, r in zip(outs, ref_outs):
        assert o.device.type == "cuda" and o.dtype == r.dtype and o.shape == r.shape
        if o.dim() == 4:
            assert o.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
                memory_format=torch.channels_last)
        if o.is_floating_point():
            close(o, r, grad=False, dtype=dtype, loose=loose)
        elif loose:  # float32 sample points: one on the edge of the pixel hull may round either way
            assert (o != r).double().mean().item() <= 1e-4
        else:
            assert torch.equal(o, r)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        close(g, r, grad=True, dtype=dtype, loose=loose)
    return outs, grads


# --------------------------------------------------------------------------------------------
# per-op cases: (fn, reference fn, inputs, grad mask)
# --------------------------------------------------------------------------------------------
def case_tps_solve(dtype, kind, big):
    src, dst, _ = tps(64 if big else 3, F64, seed=2, n=6)
    src, dst = src.to(dtype), dst.to(dtype)
    return (lambda s, d: tpswarp.tps_solve(s, d), lambda s, d: reference.tps_solve(s, d), (src, dst), (True, True))


def case_tps_transform(dtype, kind, big):
    src, _, params = tps(3, dtype, seed=1)
    points = rand(3, 4097 if big else 33, 2, dtype=dtype) * 2 - 1
    if kind == "non_contiguous":
        points = non_contiguous(points.transpose(1, 2).contiguous()).transpose(1, 2)
    return (lambda p, s, w: tpswarp.tps_transform(p, s, w), lambda p, s, w: reference.tps_transform(p, s, w),
            (points, src, params), (True, True, True))


def case_tps_warp(dtype, kind, big, **kwargs):
    src, _, params = tps(2, F32 if dtype in (F16, BF16) else dtype, scale=0.4, seed=3)
    shape = (2, 3, 97, 131) if big else (2, 3, 5, 7)
    image = layout(smooth(*shape, dtype=dtype) if big else randn(*shape, dtype=dtype), kind)
    return (lambda x, s, p: tpswarp.tps_warp(x, s, p, **kwargs), lambda x, s, p: reference.tps_warp(x, s, p, **kwargs),
            (image, src, params), (True, True, True))


def case_photometric_jitter(dtype, kind, big, clamp=False):
    shape = (3, 3, 97, 131) if big else (3, 3, 5, 7)
    image = layout(rand(*shape, dtype=dtype) * 1.2 - 0.1, kind)
    u = rand(4, 3, dtype=F64, seed=5)
    pd = F32 if dtype in (F16, BF16) else dtype
    params = ((u[0] * 0.5 - 0.25).to(pd), (u[1] * 1.75 + 0.25).to(pd), (u[2] * 0.2 - 0.1).to(pd),
              (u[3] * 1.75 + 0.25).to(pd))
    perm = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2]], device=DEV)
    return (lambda x, b, s, h, c: tpswarp.photometric_jitter(x, b, s, h, c, perm, clamp=clamp),
            lambda x, b, s, h, c: reference.photometric_jitter(x, b, s, h, c, perm, clamp=clamp),
            (image, *params), (True,) * 5)


def kl_inputs(shape, dtype, teacher_is_logits, seed=0):
    s = randn(*shape, dtype=dtype, scale=2.0, seed=seed)
    if teacher_is_logits:
        return s, randn(*shape, dtype=dtype, scale=2.0, seed=seed + 1)
    t = torch.softmax(randn(*shape, dtype=F64, scale=2.0, seed=seed + 1), dim=1)
    t[0, :, 0] = 0.0
    t[0, 0, 0] = 1.0
    return s, t.to(dtype)


def case_masked_kl_div(dtype, kind, big, teacher_is_logits=True, reduction="mean", mask=True):
    shape = (2, 19, 61, 67) if big else (2, 4, 5, 6)
    s, t = kl_inputs(shape, dtype, teacher_is_logits)
    m = rand(shape[0], *shape[2:], seed=7) > 0.3 if mask else None
    kw = dict(teacher_is_logits=teacher_is_logits, reduction=reduction)
    return (lambda a, b: tpswarp.masked_kl_div(a, b, m, **kw), lambda a, b: reference.masked_kl_div(a, b, m, **kw),
            (layout(s, kind), layout(t, kind)), (True, True))


def case_warped_kl_div(dtype, kind, big, teacher_is_logits=True, reduction="mean"):
    shape = (2, 19, 61, 67) if big else (2, 4, 5, 6)
    s, t = kl_inputs(shape, dtype, teacher_is_logits)
    if big:  # a smooth teacher (see smooth())
        t = 2 * smooth(*shape, dtype=F64, seed=1)
        t = (t if teacher_is_logits else torch.softmax(t, dim=1)).to(dtype)
    src, _, params = tps(2, F32 if dtype in (F16, BF16) else dtype, seed=4)
    kw = dict(teacher_is_logits=teacher_is_logits, reduction=reduction)
    return (lambda a, b, c, p: tpswarp.warped_kl_div(a, b, c, p, **kw),
            lambda a, b, c, p: reference.warped_kl_div(a, b, c, p, **kw),
            (layout(s, kind), layout(t, kind), src, params), (True, True, True, True))


CASES = {name: globals()[f"case_{name}"] for name in OPS}
IMAGE_OPS = ("tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div")
WARP_OPS = ("tps_warp", "warped_kl_div")


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_op(backend, op, dtype, big):
    fn, ref, inputs, mask = CASES[op](dtype, "contiguous", big)
    compare(backend, op, fn, ref, inputs, mask, loose=big and dtype == F32 and op in WARP_OPS)


@pytest.mark.parametrize("kind", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("op", IMAGE_OPS)
def test_layouts(backend, op, kind):
    fn, ref, inputs, mask = CASES[op](F32, kind, True)
    compare(backend, op, fn, ref, inputs, mask, loose=op in WARP_OPS)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("op", IMAGE_OPS)
def test_half(backend, op, dtype):
    fn, ref, inputs, mask = CASES[op](dtype, "channels_last", False)
    compare(backend, op, fn, ref, inputs, mask, dtype=dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_options(backend, op, teacher_is_logits, reduction):
    fn, ref, inputs, mask = CASES[op](F64, "contiguous", True, teacher_is_logits=teacher_is_logits,
                                      reduction=reduction)
    compare(backend, op, fn, ref, inputs, mask)


@pytest.mark.parametrize("C", [1, 3, 8, 9, 19, 32, 33, 40])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_classes(op, teacher_is_logits, C):
    """Every class-count regime of the CUDA kernels (register arrays for C <= 8 / 16 / 32, the
    generic loaders above), both teacher kinds, float32 and float64, all gradients."""
    for dtype in (F32, F64):
        s, t = kl_inputs((2, C, 29, 31), dtype, teacher_is_logits)
        kw = dict(teacher_is_logits=teacher_is_logits, reduction="mean")
        if op == "masked_kl_div":
            m = rand(2, 29, 31, seed=7) > 0.3
            compare("cpp", op, lambda a, b: tpswarp.masked_kl_div(a, b, m, **kw),
                    lambda a, b: reference.masked_kl_div(a, b, m, **kw), (s, t), (True, True))
        else:
            src, _, params = tps(2, dtype, seed=4)
            compare("cpp", op, lambda a, b, c, p: tpswarp.warped_kl_div(a, b, c, p, **kw),
                    lambda a, b, c, p: reference.warped_kl_div(a, b, c, p, **kw), (s, t, src, params),
                    (True, True, True, True), loose=dtype == F32)
            # student gradient alone (the kernel without the src/params accumulators)
            compare("cpp", op, lambda a, b, c, p: tpswarp.warped_kl_div(a, b, c, p, **kw),
                    lambda a, b, c, p: reference.warped_kl_div(a, b, c, p, **kw), (s, t, src, params),
                    (True, False, False, False), loose=dtype == F32)


@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_register_path_matches_generic(op, monkeypatch):
    """The register path (C <= 32, TPSWARP_CUDA_KL_REGS=1) and the generic loaders (the default) agree."""
    s, t = kl_inputs((2, 19, 61, 67), F32, False)
    src, _, params = tps(2, F32, seed=4)
    extra = (None,) if op == "masked_kl_div" else (src, params)
    opts = (False, "none") if op == "masked_kl_div" else (False, False, "none")
    n_grads = 2 if op == "masked_kl_div" else 4
    fwd, bwd = getattr(torch.ops.tpswarp, op), getattr(torch.ops.tpswarp, f"_{op}_backward")
    results = []
    ctx = use("cpp", op)
    try:
        for flag in ("1", "0"):
            monkeypatch.setenv("TPSWARP_CUDA_KL_REGS", flag)
            out = fwd(s, t, *extra, *opts, None)
            g = randn(*out.shape, seed=3) + 0.5
            grads = bwd(g, s, t, *extra, *opts, None, [True] * 2 + [False] * (n_grads - 2))
            torch.cuda.synchronize()
            results.append((out, grads[0]) if op == "warped_kl_div" else (out, *grads))
    finally:
        ctx.__exit__(None, None, None)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def check_statistics_paths(backend, monkeypatch, op, loss_of, s, dtype):
    """The student's gradient of ``loss_of(s)`` with the statistics kept by the forward, without them
    (TPSWARP_KL_STATS=0) and, for the CUDA kernels, with the register path of their forward
    (TPSWARP_CUDA_KL_REGS=1): each call takes the path asked for, and all agree."""
    settings = [("1", "0"), ("0", "0")] + ([("1", "1")] if backend == "cpp" else [])
    results = []
    ctx = use(backend, op)
    try:
        for stats_flag, regs_flag in settings:
            monkeypatch.setenv("TPSWARP_KL_STATS", stats_flag)
            monkeypatch.setenv("TPSWARP_CUDA_KL_REGS", regs_flag)
            leaf = s.detach().requires_grad_(True)
            loss = loss_of(leaf)
            assert (f"_{op}_with_stats" in loss.grad_fn.name()) == (stats_flag == "1")
            grad = torch.autograd.grad(loss, leaf, randn(*loss.shape, dtype=loss.dtype, seed=3) + 0.5)[0]
            assert grad.stride() == torch.empty_like(s).stride()  # channels_last kept
            results.append((loss.detach(), grad))
        torch.cuda.synchronize()
    finally:
        ctx.__exit__(None, None, None)
    (loss, grad), *others = results
    for other_loss, other_grad in others:
        torch.testing.assert_close(loss, other_loss, rtol=1e-6, atol=1e-7)
        assert_close(grad, other_grad, grad=True, dtype=dtype)


@pytest.mark.parametrize("dtype,kind", [(F32, "contiguous"), (F64, "non_contiguous"), (F32, "channels_last"),
                                        (BF16, "channels_last")], ids=["f32", "f64-noncontig", "f32-cl", "bf16-cl"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_masked_kl_statistics_from_forward(backend, monkeypatch, teacher_is_logits, reduction, dtype, kind):
    """The student's gradient alone: the forward keeps 4 statistics per pixel (_masked_kl_div_with_stats)
    and the backward sweeps the classes once. Against the plain backward and the reference."""
    s, t = kl_inputs((2, 19, 61, 67), dtype, teacher_is_logits)
    s, t = layout(s, kind), layout(t, kind)
    m = rand(2, 61, 67, seed=7) > 0.3
    kw = dict(teacher_is_logits=teacher_is_logits, reduction=reduction)
    check_statistics_paths(backend, monkeypatch, "masked_kl_div", lambda a: tpswarp.masked_kl_div(a, t, m, **kw), s,
                           dtype)
    compare(backend, "masked_kl_div", lambda a, b: tpswarp.masked_kl_div(a, b, m, **kw),
            lambda a, b: reference.masked_kl_div(a, b, m, **kw), (s, t), (True, False),
            dtype=dtype if dtype == BF16 else None)


@pytest.mark.parametrize("dtype,kind", [(F32, "contiguous"), (F64, "non_contiguous"), (BF16, "channels_last")],
                         ids=["f32", "f64-noncontig", "bf16-cl"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_warped_kl_statistics_from_forward(backend, monkeypatch, teacher_is_logits, reduction, dtype, kind):
    """One-way consistency (the student's gradient alone): the forward keeps 5 values per pixel
    (_warped_kl_div_with_stats), the backward sweeps the classes once without the validity pass.
    Against the plain backward and the reference."""
    s, _ = kl_inputs((2, 19, 61, 67), dtype, teacher_is_logits)
    t = 2 * smooth(2, 19, 53, 71, dtype=F64, seed=1)
    t = (t if teacher_is_logits else torch.softmax(t, dim=1)).to(dtype)
    s, t = layout(s, kind), layout(t, kind)
    src, _, params = tps(2, F64 if dtype == F64 else F32, seed=4)
    kw = dict(teacher_is_logits=teacher_is_logits, reduction=reduction)
    check_statistics_paths(backend, monkeypatch, "warped_kl_div",
                           lambda a: tpswarp.warped_kl_div(a, t, src, params, **kw), s, dtype)
    compare(backend, "warped_kl_div", lambda a, b, c, p: tpswarp.warped_kl_div(a, b, c, p, **kw),
            lambda a, b, c, p: reference.warped_kl_div(a, b, c, p, **kw), (s, t, src, params),
            (True, False, False, False), dtype=dtype if dtype == BF16 else None, loose=dtype != F64)


def test_warped_kl_statistics_ops_cuda():
    """The private ops directly (C++ kernels): validity and statistics against torch, the backward from
    them against the plain backward, opcheck, a clear error for statistics of other inputs."""
    ctx = use("cpp", "warped_kl_div")
    try:
        s, t = kl_inputs((2, 40, 9, 11), F32, True)
        src, _, params = tps(2, F32, scale=0.5, seed=4)
        loss, stats = torch.ops.tpswarp._warped_kl_div_with_stats(s, t, src, params, True, False, "mean")
        with tpswarp.use_backend("reference"):
            _, valid = tpswarp.tps_warp(t, src, params)
        assert torch.equal(stats[:, 4], valid.reshape(2, 99).float())
        live = valid.reshape(2, 99)
        torch.testing.assert_close(stats[:, 0][live], s.reshape(2, 40, 99).amax(1)[live])
        g = torch.tensor(0.7, device=DEV)
        grad = torch.ops.tpswarp._warped_kl_div_backward_stats(g, s, t, src, params, stats, True, False, "mean")
        plain = torch.ops.tpswarp._warped_kl_div_backward(g, s, t, src, params, True, False, "mean", None,
                                                          [True, False, False, False])[0]
        torch.testing.assert_close(grad, plain, rtol=1e-6, atol=1e-9)
        with pytest.raises(ValueError, match=r"`stats` must have shape \(2, 5, 99\)"):
            torch.ops.tpswarp._warped_kl_div_backward_stats(g, s, t, src, params, stats[:, :4], True, False, "mean")
        torch.library.opcheck(torch.ops.tpswarp._warped_kl_div_with_stats, (s, t, src, params, True, True, "none"))
        torch.library.opcheck(torch.ops.tpswarp._warped_kl_div_backward_stats,
                              (g, s, t, src, params, stats, True, False, "mean"))
    finally:
        ctx.__exit__(None, None, None)


def test_masked_kl_statistics_ops_cuda():
    """The private ops directly (C++ kernels): the statistics against torch, the backward from them
    against the plain backward, opcheck, and a clear error for statistics of other inputs."""
    ctx = use("cpp", "masked_kl_div")
    try:
        s, t = kl_inputs((2, 40, 9, 11), F32, True)  # above 32 classes: the generic loaders
        loss, stats = torch.ops.tpswarp._masked_kl_div_with_stats(s, t, None, True, "mean")
        flat_s, flat_t = s.reshape(2, 40, 99), t.reshape(2, 40, 99)
        torch.testing.assert_close(stats[:, 0], flat_s.amax(1))
        torch.testing.assert_close(stats[:, 0] + stats[:, 1], torch.logsumexp(flat_s, 1))
        torch.testing.assert_close(stats[:, 2] + stats[:, 3], torch.logsumexp(flat_t, 1))
        g = torch.tensor(0.7, device=DEV)
        grad = torch.ops.tpswarp._masked_kl_div_backward_stats(g, s, t, None, stats, True, "mean")
        plain = torch.ops.tpswarp._masked_kl_div_backward(g, s, t, None, True, "mean", None, [True, False])[0]
        torch.testing.assert_close(grad, plain, rtol=1e-6, atol=1e-9)
        with pytest.raises(ValueError, match=r"`stats` must have shape \(2, 4, 99\)"):
            torch.ops.tpswarp._masked_kl_div_backward_stats(g, s, t, None, stats[:1], True, "mean")
        with pytest.raises(TypeError, match="`stats` must be Float"):
            torch.ops.tpswarp._masked_kl_div_backward_stats(g, s, t, None, stats.double(), True, "mean")
        torch.library.opcheck(torch.ops.tpswarp._masked_kl_div_with_stats, (s, t.softmax(1), None, False, "none"))
        torch.library.opcheck(torch.ops.tpswarp._masked_kl_div_backward_stats, (g, s, t, None, stats, True, "mean"))
    finally:
        ctx.__exit__(None, None, None)


def test_masked_kl_div_empty_mask(backend):
    s, t = kl_inputs((2, 4, 5, 6), F32, True)
    m = torch.zeros(2, 5, 6, dtype=torch.bool, device=DEV)
    outs, grads = compare(backend, "masked_kl_div", lambda a, b: tpswarp.masked_kl_div(a, b, m, teacher_is_logits=True),
                          lambda a, b: reference.masked_kl_div(a, b, m, teacher_is_logits=True), (s, t), (True, True))
    assert outs[0].item() == 0.0 and all(g.abs().max().item() == 0 for g in grads)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_tps_warp_modes(backend, mode, padding_mode, align_corners):
    fn, ref, inputs, mask = case_tps_warp(F64, "contiguous", True, mode=mode, padding_mode=padding_mode,
                                          align_corners=align_corners, fill=0.25 if padding_mode == "zeros" else 0.0,
                                          size=(50, 70))
    compare(backend, "tps_warp", fn, ref, inputs, mask)


def compare_float32_to_float64(backend, op, fn, inputs, grad_mask, rtols):
    """float32 results of ``backend`` against the reference on the float64-upcast inputs, norm-wise:
    ``rtols[k]`` bounds ||x - ref|| / ||ref|| of the k-th output, then gradient. A bool output may differ at
    one element in 10^4 (a float32 sample point on the edge of the pixel hull)."""
    ctx = use(backend, op)
    try:
        outs, grads = run(fn, inputs, grad_mask)
    finally:
        ctx.__exit__(None, None, None)
    upcast = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    with tpswarp.use_backend("reference"):
        ref_outs, ref_grads = run(fn, upcast, grad_mask)
    for k, (a, r) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        assert a.dtype == (F32 if r.is_floating_point() else r.dtype) and a.shape == r.shape
        if not r.is_floating_point():
            assert (a != r).double().mean().item() <= 1e-4
            continue
        err = ((a.double() - r).norm() / r.norm()).item()
        assert err <= rtols[k], f"output/gradient {k}: relative error {err:.2e} > {rtols[k]:.0e}"


# The TPS gradients for other control-point counts: the register tiers of tps_grad_regs.cuh (n <= 4 and
# n <= 16, also below the tier's size) and, for tps_warp, the per-point block reductions beyond 16. With
# 64 items of 97 x 131 pixels the capped backward grid (about 2048 blocks in all) makes every thread
# stride over several pixels. Control points on a jittered grid (uniform random ones can nearly coincide:
# TPS weights in the thousands, and float32 results that differ from float64 by 100%, in the kernels
# and the float32 reference alike). float64: element-wise against the reference; float32: norm-wise
# against the float64 reference (the TPS gradients sum ~10^6 terms with cancellation: the float32
# reference itself is 4e-3 off there).
@pytest.mark.parametrize("n", [3, 4, 9, 16, 17])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_tps_warp_control_points(backend, n, dtype):
    src, _, params = random_tps(64, n=n, scale=0.1, generator=gen(11), dtype=dtype, device=DEV, points="grid")
    image = smooth(64, 3, 97, 131, dtype=dtype, seed=12)
    inputs, mask = (image, src, params), (True, True, True)
    if dtype == F64:
        compare(backend, "tps_warp", lambda x, s, p: tpswarp.tps_warp(x, s, p),
                lambda x, s, p: reference.tps_warp(x, s, p), inputs, mask)
    else:
        compare_float32_to_float64(backend, "tps_warp", lambda x, s, p: tpswarp.tps_warp(x, s, p), inputs, mask,
                                   rtols=(2e-5, None, 2e-4, 2e-2, 2e-2))


@pytest.mark.parametrize("n", [3, 4, 9, 16])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_warped_kl_control_points(backend, n, dtype):
    s, _ = kl_inputs((64, 5, 41, 53), dtype, True)
    t = (2 * smooth(64, 5, 41, 53, dtype=F64, seed=13)).to(dtype)
    src, _, params = random_tps(64, n=n, scale=0.1, generator=gen(14), dtype=dtype, device=DEV, points="grid")
    fn = lambda a, b, c, p: tpswarp.warped_kl_div(a, b, c, p, teacher_is_logits=True)  # noqa: E731
    inputs, mask = (s, t, src, params), (True, False, True, True)
    if dtype == F64:
        compare(backend, "warped_kl_div", fn,
                lambda a, b, c, p: reference.warped_kl_div(a, b, c, p, teacher_is_logits=True), inputs, mask)
    else:
        compare_float32_to_float64(backend, "warped_kl_div", fn, inputs, mask, rtols=(2e-5, 2e-4, 2e-2, 2e-2))


def test_warped_kl_too_many_control_points_for_cuda():
    s, t = kl_inputs((2, 4, 9, 11), F32, True)
    src, _, params = tps(2, F32, n=17)
    ctx = use("cpp", "warped_kl_div")
    try:
        loss = tpswarp.warped_kl_div(s, t, src, params.requires_grad_(), teacher_is_logits=True)
        with pytest.raises(ValueError, match="at most 16 control points, got n=17"):
            loss.backward()
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("n", [4, 9])
def test_tps_solve_singular_items_raise(n):
    """check_singular on the GPU (the flag the kernel writes into pinned host memory): singular items of a
    batch are named (both storage tiers: n <= 4 in registers, beyond in a workspace), a regular batch right
    after passes (the flag starts at 0 on every call), and check_singular=False returns NaN rows for them."""
    src, dst, _ = tps(6, F64, seed=7, n=n)
    bad = src.clone()
    bad[2, 1] = bad[2, 0]  # duplicate control points
    bad[4] = torch.stack([torch.linspace(-0.8, 0.7, n, dtype=F64, device=DEV)] * 2, -1)  # collinear
    ctx = use("cpp", "tps_solve")
    try:
        with pytest.raises(ValueError, match=r"item\(s\) \[4\] are collinear"):
            tpswarp.tps_solve(bad, dst)
        with pytest.raises(ValueError, match=r"item\(s\) \[2\] have duplicate"):
            tpswarp.tps_solve(bad[:4], dst[:4])
        params = tpswarp.tps_solve(src, dst)  # regular
        unchecked = tpswarp.tps_solve(bad, dst, check_singular=False)
    finally:
        ctx.__exit__(None, None, None)
    assert_close(params, reference.tps_solve(src, dst), dtype=F64)
    rows_finite = torch.isfinite(unchecked).flatten(1).all(1).tolist()
    assert rows_finite == [True, True, False, True, False, True]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("rows", ["1", "2"])
def test_tps_warp_forward_rows_per_thread(monkeypatch, rows, dtype):
    """The CUDA bilinear forward with one or two output pixels per thread (TPSWARP_CUDA_WARP_ROWS, an A/B
    switch; 2 by default), at a size that is no multiple of the 32 x 8 block (or of 16 rows)."""
    monkeypatch.setenv("TPSWARP_CUDA_WARP_ROWS", rows)
    src, _, params = tps(3, dtype, scale=0.4, seed=4)
    image = smooth(3, 2, 45, 77, dtype=dtype, seed=5)
    fn, ref = (lambda x, s, p: tpswarp.tps_warp(x, s, p)), (lambda x, s, p: reference.tps_warp(x, s, p))
    if dtype == F64:
        compare("cpp", "tps_warp", fn, ref, (image, src, params), (True, True, True))
    else:
        compare_float32_to_float64("cpp", "tps_warp", fn, (image, src, params), (True, True, True),
                                   rtols=(2e-5, None, 2e-4, 2e-2, 2e-2))


def near_rounding_boundary(src, params, H, W, tol=1e-3):
    """(B, 1, H, W) bool: output pixels (align_corners=False, output size = input size) whose exact
    (float64) sample location lies within ``tol`` pixels of a nearest-rounding boundary (a half-integer)
    or of the validity hull's edge, where float32 implementations may round either way."""
    ys, xs = torch.meshgrid((2 * torch.arange(H, dtype=F64) + 1) / H - 1, (2 * torch.arange(W, dtype=F64) + 1) / W - 1,
                            indexing="ij")
    q = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(src.shape[0], -1, -1).to(src.device)
    f = reference.tps_transform(q, src.double(), params.double())
    px, py = ((f[..., 0] + 1) * W - 1) / 2, ((f[..., 1] + 1) * H - 1) / 2
    near = torch.zeros_like(px, dtype=torch.bool)
    for p, size in ((px, W), (py, H)):
        near |= ((p - p.floor()) - 0.5).abs() < tol
        near |= (p.abs() < tol) | ((p - (size - 1)).abs() < tol)
    return near.reshape(-1, 1, H, W)


def test_tps_warp_labels(backend):
    """Nearest sampling of labels equals the float32 reference except where the exact sample location is
    within 1e-3 pixels of a rounding boundary (the GPU kernels' TPS uses the hardware log2: about 1e-7
    from the reference's float32 coordinates)."""
    src, _, params = tps(2, F32, scale=0.4)
    labels = (rand(2, 1, 64, 80) * 19).floor().to(torch.uint8)
    ctx = use(backend, "tps_warp")
    try:
        out, valid = tpswarp.tps_warp(labels, src, params, mode="nearest", fill=255)
    finally:
        ctx.__exit__(None, None, None)
    ref, ref_valid = reference.tps_warp(labels, src, params, mode="nearest", fill=255)
    assert out.dtype == torch.uint8 and out.shape == ref.shape and valid.shape == ref_valid.shape
    differ = (out != ref) | (valid != ref_valid)
    assert differ.double().mean().item() <= 1e-3
    assert not (differ & ~near_rounding_boundary(src, params, 64, 80)).any()


def test_photometric_jitter_clamp(backend):
    fn, ref, inputs, mask = case_photometric_jitter(F64, "contiguous", True, clamp=True)
    compare(backend, "photometric_jitter", fn, ref, inputs, mask)


@pytest.mark.parametrize("op", ["tps_warp", "photometric_jitter", "masked_kl_div", "warped_kl_div"])
def test_deterministic_backward(backend, op):
    """With torch.use_deterministic_algorithms(True): bitwise-identical gradients twice, or a
    clear error (never silently nondeterministic)."""
    fn, _, inputs, mask = CASES[op](F32, "contiguous", True)
    ctx = use(backend, op)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        try:
            _, first = run(fn, inputs, mask)
        except RuntimeError as e:
            assert "determinis" in str(e).lower(), e
            return
        _, second = run(fn, inputs, mask)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("mode,padding_mode,size", [("bilinear", "zeros", None), ("bilinear", "reflection", (61, 90)),
                                                   ("nearest", "border", None)])
@pytest.mark.parametrize("dtype,kind", [(F32, "channels_last"), (F64, "contiguous"), (BF16, "contiguous")],
                         ids=["f32-cl", "f64", "bf16"])
def test_tps_warp_deterministic_image_gradient(backend, mode, padding_mode, size, dtype, kind):
    """Under torch.use_deterministic_algorithms(True) the image gradient is a deterministic scatter (CUDA:
    each pixel's taps written to slots and summed by index_add_): the same bits twice, the reference's
    values, and the TPS gradients alongside."""
    fn, ref, inputs, mask = case_tps_warp(dtype, kind, True, mode=mode, padding_mode=padding_mode, size=size)
    ctx = use(backend, "tps_warp")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, grads = run(fn, inputs, mask)
        _, again = run(fn, inputs, mask)
    finally:
        torch.use_deterministic_algorithms(previous)
        ctx.__exit__(None, None, None)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)
    with tpswarp.use_backend("reference"):
        _, ref_grads = run(ref, inputs, mask)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape and g.stride() == r.stride()
        close(g, r, grad=True, dtype=dtype if dtype == BF16 else None, loose=dtype != F64)


@pytest.mark.parametrize("op", IMAGE_OPS)
def test_compile(backend, op):
    fn, ref, inputs, mask = CASES[op](F32, "contiguous", False)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    compare(backend, op, compiled, ref, inputs, mask)


@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_compile_one_way(backend, op):
    """The student's gradient alone (the statistics kept by the forward) under torch.compile."""
    fn, ref, inputs, mask = CASES[op](F32, "contiguous", False)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    compare(backend, op, compiled, ref, inputs, (True,) + (False,) * (len(mask) - 1))


# --------------------------------------------------------------------------------------------
# size= of masked_kl_div / warped_kl_div: the CUDA kernels ("cpp") called through torch.ops
# (independent of the Python wrapper) against the composition the contract defines:
# F.interpolate(bilinear, align_corners=False) in the compute dtype, then the full-resolution
# reference op; gradients against autograd through that composition.
# --------------------------------------------------------------------------------------------
SIZE_CASES = {  # student (hs, ws), teacher (ht, wt), output size (H, W)
    "x1": ((24, 20), (24, 20), (24, 20)),
    "x4": ((12, 10), (12, 10), (48, 40)),
    "frac": ((13, 17), (13, 17), (40, 50)),
    "mixed": ((13, 17), (20, 25), (40, 50)),  # teacher at another resolution than the student
    "down": ((45, 52), (40, 50), (21, 26)),  # a smaller output size (plain bilinear, no antialias)
}


def interp(x, size):
    ct = F64 if x.dtype == F64 else F32
    return torch.nn.functional.interpolate(x.to(ct), size=size, mode="bilinear", align_corners=False)


def size_inputs(case, dtype, teacher_is_logits, B=2, C=5):
    (hs, ws), (ht, wt), size = SIZE_CASES[case]
    s = randn(B, C, hs, ws, dtype=dtype, scale=2.0, seed=11)
    if teacher_is_logits:
        return s, randn(B, C, ht, wt, dtype=dtype, scale=2.0, seed=12), size
    t = torch.softmax(randn(B, C, ht, wt, dtype=F64, scale=2.0, seed=12), dim=1)
    t[0, :, :3, :3] = 0.0  # a one-hot corner: exact zeros after resizing (0 log 0)
    t[0, 0, :3, :3] = 1.0
    return s, t.to(dtype), size


def size_reference(op, s, t, size, teacher_is_logits, reduction, mask=None, tps_args=()):
    """Loss, upstream gradient g and the gradients of the composition (autograd) w.r.t. s, t, *tps_args."""
    leaves = [x.detach().requires_grad_() for x in (s, t, *tps_args)]
    su, tu = interp(leaves[0], size), interp(leaves[1], size)
    kw = dict(teacher_is_logits=teacher_is_logits, reduction=reduction)
    if op == "masked_kl_div":
        loss = reference.masked_kl_div(su, tu, mask, **kw)
    else:
        loss = reference.warped_kl_div(su, tu, *leaves[2:], **kw)
    g = randn(*loss.shape, dtype=loss.dtype, seed=3) + 0.5
    grads = torch.autograd.grad(loss, leaves, g, allow_unused=True)
    return loss.detach(), g, [torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, grads)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_masked_kl_div_size(case, teacher_is_logits, reduction):
    s, t, size = size_inputs(case, F64, teacher_is_logits)
    for mask in (None, rand(s.shape[0], *size, seed=7) > 0.3):
        with tpswarp.use_backend("reference"):
            ref_loss, g, ref_grads = size_reference("masked_kl_div", s, t, size, teacher_is_logits, reduction, mask)
        ctx = use("cpp", "masked_kl_div")
        try:
            out = torch.ops.tpswarp.masked_kl_div(s, t, mask, teacher_is_logits, reduction, list(size))
            gs, gt = torch.ops.tpswarp._masked_kl_div_backward(g, s, t, mask, teacher_is_logits, reduction, list(size),
                                                                [True, True])
            torch.cuda.synchronize()
        finally:
            ctx.__exit__(None, None, None)
        assert out.shape == ref_loss.shape and out.dtype == ref_loss.dtype
        assert gs.shape == s.shape and gt.shape == t.shape
        assert_close(out, ref_loss)
        assert_close(gs, ref_grads[0], grad=True)
        assert_close(gt, ref_grads[1], grad=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_warped_kl_div_size(case, teacher_is_logits, reduction):
    s, t, size = size_inputs(case, F64, teacher_is_logits)
    src, _, params = tps(2, F64, seed=4)
    with tpswarp.use_backend("reference"):
        ref_loss, g, ref_grads = size_reference("warped_kl_div", s, t, size, teacher_is_logits, reduction,
                                                tps_args=(src, params))
    ctx = use("cpp", "warped_kl_div")
    try:
        out = torch.ops.tpswarp.warped_kl_div(s, t, src, params, teacher_is_logits, False, reduction, list(size))
        # student alone (the two-pass gather), then everything (teacher / src / params composed)
        only_s = torch.ops.tpswarp._warped_kl_div_backward(g, s, t, src, params, teacher_is_logits, False, reduction,
                                                            list(size), [True, False, False, False])
        grads = torch.ops.tpswarp._warped_kl_div_backward(g, s, t, src, params, teacher_is_logits, False, reduction,
                                                           list(size), [True, True, True, True])
        torch.cuda.synchronize()
    finally:
        ctx.__exit__(None, None, None)
    assert out.shape == ref_loss.shape and out.dtype == ref_loss.dtype
    assert_close(out, ref_loss)
    assert_close(only_s[0], ref_grads[0], grad=True)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert_close(got, want, grad=True)


@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_size_identity_equals_no_size(op):
    """size equal to the input size reads the inputs unchanged: the same loss and gradient as size=None."""
    s, t, size = size_inputs("x1", F32, True)
    src, _, params = tps(2, F32, seed=4)
    extra = (None,) if op == "masked_kl_div" else (src, params)
    opts = (True, "none") if op == "masked_kl_div" else (True, False, "none")
    n_grads = 2 if op == "masked_kl_div" else 4
    fwd, bwd = getattr(torch.ops.tpswarp, op), getattr(torch.ops.tpswarp, f"_{op}_backward")
    ctx = use("cpp", op)
    try:
        a = fwd(s, t, *extra, *opts, list(size))
        b = fwd(s, t, *extra, *opts, None)
        g = randn(*a.shape, seed=3) + 0.5
        mask = [True] + [False] * (n_grads - 1)
        ga = bwd(g, s, t, *extra, *opts, list(size), mask)[0]
        gb = bwd(g, s, t, *extra, *opts, None, mask)[0]
    finally:
        ctx.__exit__(None, None, None)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_size_dtypes_layouts(op, dtype):
    """float32 / half inputs, channels_last student and non-contiguous teacher, deterministic student gradient."""
    s, t, size = size_inputs("frac", dtype, False)
    s, t = to_channels_last(s), non_contiguous(t)
    src, _, params = tps(2, F32, seed=4)
    extra = (None,) if op == "masked_kl_div" else (src, params)
    opts = (False, "mean") if op == "masked_kl_div" else (False, False, "mean")
    n_grads = 2 if op == "masked_kl_div" else 4
    fwd, bwd = getattr(torch.ops.tpswarp, op), getattr(torch.ops.tpswarp, f"_{op}_backward")
    g = torch.tensor(1.5, device=DEV)
    with tpswarp.use_backend("reference"):
        sl = s.detach().requires_grad_()
        su, tu = interp(sl, size), interp(t, size)
        ref = reference.masked_kl_div(su, tu) if op == "masked_kl_div" else reference.warped_kl_div(su, tu, src, params)
        (ref_gs,) = torch.autograd.grad(ref, (sl,), g)
    ctx = use("cpp", op)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = fwd(s, t, *extra, *opts, list(size))
        mask = [True] + [False] * (n_grads - 1)
        gs1 = bwd(g, s, t, *extra, *opts, list(size), mask)[0]
        gs2 = bwd(g, s, t, *extra, *opts, list(size), mask)[0]
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(previous)
        ctx.__exit__(None, None, None)
    assert out.dtype == F32 and gs1.dtype == dtype and gs1.shape == s.shape
    assert torch.equal(gs1, gs2)
    loose = op == "warped_kl_div" and dtype == F32  # float32 sample coordinates (see close())
    close(out, ref.detach().to(out.dtype), grad=False, dtype=dtype, loose=loose)
    close(gs1, ref_gs.to(dtype), grad=True, dtype=dtype, loose=loose)


@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_size_bad_size(op):
    s, t, _ = size_inputs("x4", F32, True)
    src, _, params = tps(2, F32, seed=4)
    extra = (None,) if op == "masked_kl_div" else (src, params)
    opts = (True, "mean") if op == "masked_kl_div" else (True, False, "mean")
    ctx = use("cpp", op)
    try:
        for bad in ([0, 5], [5], [4, 5, 6], [-1, 3]):
            with pytest.raises(ValueError, match="size"):
                getattr(torch.ops.tpswarp, op)(s, t, *extra, *opts, bad)
    finally:
        ctx.__exit__(None, None, None)


def _direct_bad_calls():
    """(id, call, exception, pattern): torch.ops called directly on CUDA tensors with one bad argument."""
    ops = torch.ops.tpswarp
    src, _, params = tps(2, F32, seed=4)
    img = randn(2, 3, 6, 7)
    s, t = randn(2, 5, 6, 7), rand(2, 5, 6, 7)
    bright, sat, hue, con = rand(2), rand(2) + 0.5, rand(2) - 0.5, rand(2) + 0.5
    perm = torch.tensor([[0, 1, 2], [2, 0, 1]], device=DEV)
    return [
        ("tps_solve-reg", lambda: ops.tps_solve(src, src, -1.0, True), ValueError, "`reg`"),
        ("tps_solve-points", lambda: ops.tps_solve(src[:, :2], src[:, :2], 0.0, True), ValueError, "at least 3"),
        ("tps_transform-params", lambda: ops.tps_transform(src, src, params[:, :-1]), ValueError, "`params`"),
        ("tps_warp-mode", lambda: ops.tps_warp(img, src, params, "bicubic", "zeros", False, 0.0, None),
         ValueError, "`mode`"),
        ("tps_warp-size", lambda: ops.tps_warp(img, src, params, "bilinear", "zeros", False, 0.0, [0, 5]),
         ValueError, "`size`"),
        ("tps_warp-params", lambda: ops.tps_warp(img, src, params[:1], "bilinear", "zeros", False, 0.0, None),
         ValueError, "`params`"),
        ("photometric_jitter-permutation", lambda: ops.photometric_jitter(img, bright, sat, hue, con, perm.int(), False),
         TypeError, "`permutation`"),
        ("masked_kl_div-teacher", lambda: ops.masked_kl_div(s, t[:, :4], None, False, "mean", None),
         ValueError, "`teacher`"),
        ("masked_kl_div-reduction", lambda: ops.masked_kl_div(s, t, None, False, "avg", None),
         ValueError, "`reduction`"),
        ("masked_kl_div-size", lambda: ops.masked_kl_div(s, t, None, False, "mean", [5]), ValueError, "`size`"),
        ("warped_kl_div-teacher", lambda: ops.warped_kl_div(s, t[:, :4], src, params, False, False, "mean", None),
         ValueError, "`teacher`"),
        ("warped_kl_div-size", lambda: ops.warped_kl_div(s, t, src, params, False, False, "mean", [-1, 3]),
         ValueError, "`size`"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _direct_bad_calls()] if torch.cuda.is_available() else [])
def test_cuda_kernels_reject_bad_arguments(case):
    """Every check in the CUDA kernels raises a Python exception naming the argument (no crash)."""
    _, call, exc, pattern = next(c for c in _direct_bad_calls() if c[0] == case)
    op = case.split("-")[0]
    ctx = use("cpp", op)
    try:
        with pytest.raises(exc, match=pattern):
            call()
    finally:
        ctx.__exit__(None, None, None)


def _public_size_supported(op):
    import inspect
    return "size" in inspect.signature(getattr(tpswarp, op)).parameters


@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("op", ["masked_kl_div", "warped_kl_div"])
def test_kl_size_public(backend, op, teacher_is_logits):
    """The public API with size=, autograd included, on each CUDA backend."""
    if not _public_size_supported(op):
        pytest.skip(f"tpswarp.{op} has no size= in this build")
    s, t, size = size_inputs("frac", F64, teacher_is_logits)
    kw = dict(teacher_is_logits=teacher_is_logits, reduction="mean")
    if op == "masked_kl_div":
        m = rand(s.shape[0], *size, seed=7) > 0.3
        fn = lambda a, b: tpswarp.masked_kl_div(a, b, m, size=size, **kw)  # noqa: E731
        ref = lambda a, b: reference.masked_kl_div(interp(a, size), interp(b, size), m, **kw)  # noqa: E731
        compare(backend, op, fn, ref, (s, t), (True, True))
    else:
        src, _, params = tps(2, F64, seed=4)
        fn = lambda a, b, c, p: tpswarp.warped_kl_div(a, b, c, p, size=size, **kw)  # noqa: E731
        ref = lambda a, b, c, p: reference.warped_kl_div(interp(a, size), interp(b, size), c, p, **kw)  # noqa: E731
        compare(backend, op, fn, ref, (s, t, src, params), (True, True, True, True))


# --------------------------------------------------------------------------------------
# warped_kl_div's student gradient in the forward on CUDA (opt-in: TPSWARP_CUDA_GRAD_IN_FORWARD=1)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_warped_kl_gradient_in_forward(monkeypatch, teacher_is_logits, reduction, dtype):
    """The opt-in CUDA path: its loss and gradient equal the plain op's bit for bit for an upstream
    gradient of 1 (the same per-pixel functions), and the reference's for another one."""
    monkeypatch.setenv("TPSWARP_CUDA_GRAD_IN_FORWARD", "1")
    B, C, H, W = 3, 19, 37, 70
    student = randn(B, C, H, W, dtype=dtype, scale=2.0, seed=1)
    t = randn(B, C, 29, 41, scale=2.0, seed=2)
    teacher = (t if teacher_is_logits else t.softmax(1)).to(dtype)
    src, _, params = tps(B, seed=3)
    with tpswarp.use_backend("cpp"):
        for upstream in (1.0, 2.5):
            s1, s2 = (student.clone().requires_grad_(True) for _ in range(2))
            loss = tpswarp.warped_kl_div(s1, teacher, src, params, teacher_is_logits=teacher_is_logits,
                                         reduction=reduction)
            assert "_warped_kl_div_with_grad" in loss.grad_fn.name()
            plain = torch.ops.tpswarp.warped_kl_div(s2, teacher, src, params, teacher_is_logits, False, reduction,
                                                    None)
            g = torch.tensor(upstream, device=DEV, dtype=loss.dtype)
            (g1,), (g2,) = torch.autograd.grad(loss, s1, g), torch.autograd.grad(plain, s2, g)
            if upstream == 1.0:
                assert torch.equal(loss, plain) and torch.equal(g1, g2)
            else:
                assert_close(g1, g2, grad=True)
    ref_dtype = F64 if dtype == F64 else F32  # half inputs are computed in float32
    s = student.to(ref_dtype).requires_grad_(True)
    ref = reference.warped_kl_div(s, teacher.to(ref_dtype), src, params, teacher_is_logits=teacher_is_logits,
                                  reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref, s, torch.tensor(2.5, device=DEV, dtype=ref.dtype))
    assert_close(g1.to(ref_dtype), g_ref, grad=True, dtype=dtype)


def test_warped_kl_gradient_in_forward_is_opt_in(monkeypatch):
    monkeypatch.delenv("TPSWARP_CUDA_GRAD_IN_FORWARD", raising=False)
    student = randn(2, 5, 8, 9, seed=4).requires_grad_(True)
    src, _, params = tps(2, seed=5)
    with tpswarp.use_backend("cpp"):
        loss = tpswarp.warped_kl_div(student, randn(2, 5, 8, 9, seed=6).softmax(1), src, params)
    assert "_warped_kl_div_with_grad" not in loss.grad_fn.name()
