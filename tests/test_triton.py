"""Triton kernels vs the reference: values and gradients (random upstream gradients), float32 and
float64 (the interpreter runs float64 natively), half dtypes, channels_last and non-contiguous
inputs, masks (bool, float, empty), teacher logits and probabilities, the chunked class sweep,
the deterministic scatter, and argument edge cases.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (CI: small shapes, the whole module in about
two minutes) or on CUDA tensors when a GPU is present; skipped otherwise.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

import tpswarp  # noqa: E402
from tpswarp import reference  # noqa: E402
from tpswarp.testing import assert_close, non_contiguous, ordered_logits, random_tps, to_channels_last  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
F32, F64 = torch.float32, torch.float64
LAYOUTS = ("contiguous", "channels_last", "non_contiguous")


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return to_channels_last(t)
    if kind == "non_contiguous":
        return non_contiguous(t)
    return t


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=F32, scale=1.0, seed=0):
    return (torch.randn(tuple(shape), generator=gen(seed), dtype=F64) * scale).to(dtype=dtype, device=DEVICE)


def rand(*shape, dtype=F32, seed=0):
    return torch.rand(tuple(shape), generator=gen(seed), dtype=F64).to(dtype=dtype, device=DEVICE)


def tps(batch, dtype=F32, scale=0.3, seed=0, n=4):
    src, _, params = random_tps(batch, n=n, scale=scale, generator=gen(seed), dtype=dtype, device=DEVICE)
    return src, params


@pytest.fixture(autouse=True)
def _triton_backend():
    assert tpswarp.backends()["triton"], "triton is importable but the backend is not reported"
    with tpswarp.use_backend("triton"):
        yield


def run(fn, inputs, grad_mask, upstream_seed=1, upstream=None):
    """Outputs of ``fn(*inputs)`` and the gradients of the first output against a random
    upstream gradient, w.r.t. the inputs flagged in ``grad_mask``."""
    leaves = [x.detach().requires_grad_(need) if isinstance(x, torch.Tensor) else x
              for x, need in zip(inputs, grad_mask)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    wanted = [x for x, need in zip(leaves, grad_mask) if need]
    grads = ()
    if wanted:
        y = outs[0]
        g = upstream if upstream is not None else randn(*y.shape, dtype=y.dtype, seed=upstream_seed) + 0.5
        grads = torch.autograd.grad(y, wanted, g, allow_unused=True)
        # e.g. nearest sampling: the reference's graph does not reach src/params at all
        grads = tuple(torch.zeros_like(x) if gx is None else gx for x, gx in zip(wanted, grads))
    return tuple(o.detach() for o in outs), grads


def compare(fn, ref_fn, inputs, grad_mask, *, dtype=None, upstream=None):
    """Triton (through the public op) vs the reference: values, dtypes, memory format, gradients."""
    outs, grads = run(fn, inputs, grad_mask, upstream=upstream)
    with tpswarp.use_backend("reference"):
        ref_outs, ref_grads = run(ref_fn, inputs, grad_mask, upstream=upstream)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and o.shape == r.shape and o.device == r.device
        if o.dim() == 4:
            assert o.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
                memory_format=torch.channels_last)
        if o.is_floating_point():
            assert_close(o, r, dtype=dtype)
        else:
            assert torch.equal(o, r)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert_close(g, r, grad=True, dtype=dtype)
    return outs, grads


# --------------------------------------------------------------------------------------------
# masked_kl_div
# --------------------------------------------------------------------------------------------
def kl_inputs(shape, dtype, teacher_is_logits, seed=0):
    s = randn(*shape, dtype=dtype, scale=2.0, seed=seed)
    if teacher_is_logits:
        t = randn(*shape, dtype=dtype, scale=2.0, seed=seed + 1)
    else:
        t = torch.softmax(randn(*shape, dtype=F64, scale=2.0, seed=seed + 1), dim=1)
        t[0, :, 0] = 0.0  # exact zeros: 0 log 0 = 0
        t[0, 0, 0] = 1.0
        t = t.to(dtype)
    return s, t


def make_mask(kind, batch, spatial, dtype=F32):
    if kind is None:
        return None
    if kind == "bool":
        return rand(batch, *spatial, seed=7) > 0.4
    if kind == "float":
        return rand(batch, 1, *spatial, dtype=dtype, seed=7)
    if kind == "empty":
        return torch.zeros(batch, *spatial, dtype=torch.bool, device=DEVICE)
    raise ValueError(kind)


def kl_compare(s, t, mask, teacher_is_logits, reduction, grad_mask=(True, True), dtype=None):
    def fn(a, b):
        return tpswarp.masked_kl_div(a, b, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)

    def ref(a, b):
        return reference.masked_kl_div(a, b, mask, teacher_is_logits=teacher_is_logits, reduction=reduction)

    return compare(fn, ref, (s, t), grad_mask, dtype=dtype)


@pytest.mark.parametrize("mask", [None, "bool", "float", "empty"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_masked_kl_div(dtype, teacher_is_logits, reduction, mask):
    s, t = kl_inputs((2, 4, 5, 6), dtype, teacher_is_logits)
    kl_compare(s, t, make_mask(mask, 2, (5, 6), dtype), teacher_is_logits, reduction)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_masked_kl_div_layouts(kind, teacher_is_logits):
    s, t = kl_inputs((2, 4, 5, 6), F32, teacher_is_logits)
    kl_compare(layout(s, kind), layout(t, kind), make_mask("bool", 2, (5, 6)), teacher_is_logits, "mean")


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 5, 2, 3, 2), (3, 2), (2, 1, 4, 3)])
def test_masked_kl_div_spatial_ranks(shape):
    s, t = kl_inputs(shape, F64, True)
    kl_compare(s, t, None, True, "none")
    kl_compare(s, t, None, True, "mean")


ORDERS = [("ascending", "descending"), ("descending", "ascending"), ("zigzag", "ascending"), ("zigzag", "zigzag")]


@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("orders", ORDERS)
def test_masked_kl_div_online_statistics(teacher_is_logits, orders):
    """One sweep over the classes with running maxima (37 classes): the student's and the teacher's
    maxima grow at different classes, and loss and gradients still match the reference."""
    s = ordered_logits((2, 37, 3, 5), orders[0], seed=0).to(DEVICE)
    t = ordered_logits((2, 37, 3, 5), orders[1], seed=1).to(DEVICE)
    if not teacher_is_logits:
        t = torch.softmax(t / 8.0, dim=1)
    kl_compare(s, t, make_mask("float", 2, (3, 5), F64), teacher_is_logits, "mean")
    kl_compare(s.to(F32), t.to(F32), None, teacher_is_logits, "none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_kl_div_half(dtype):
    s, t = kl_inputs((2, 4, 5, 6), dtype, True)
    outs, grads = kl_compare(to_channels_last(s), t, make_mask("bool", 2, (5, 6)), True, "mean", dtype=dtype)
    assert outs[0].dtype == F32 and grads[0].dtype == dtype


def test_masked_kl_div_mixed_dtypes_and_extremes():
    s, t = kl_inputs((2, 4, 3, 3), F32, True)
    s = s * 1e4  # extreme logits: the max sweep keeps every exp finite
    kl_compare(s, t.to(F64), None, True, "sum")
    s2, t2 = kl_inputs((2, 4, 3, 3), F32, False)
    kl_compare(s2, t2, None, False, "mean", grad_mask=(False, True))


def test_masked_kl_div_backward_output_mask_and_empty():
    s, t = kl_inputs((2, 4, 3, 3), F32, True)
    g = torch.tensor(1.5, device=DEVICE)
    gs, gt = torch.ops.tpswarp._masked_kl_div_backward(g, s, t, None, True, "mean", None, [True, False])
    assert gs.shape == s.shape and gt.numel() == 0
    gs, gt = torch.ops.tpswarp._masked_kl_div_backward(g, s, t, None, True, "mean", None, [False, True])
    assert gs.numel() == 0 and gt.shape == t.shape
    empty = torch.zeros(0, 4, 3, 3, device=DEVICE)
    loss = tpswarp.masked_kl_div(empty, empty, reduction="mean")
    assert loss.item() == 0.0
    assert tpswarp.masked_kl_div(empty, empty, reduction="none").shape == (0, 3, 3)


def assert_same_statistics_result(a, b):
    """A result of the statistics path against the plain path's: the same bits under the interpreter (the
    same functions on the same values); compiled, the two kernels may contract multiply-adds differently."""
    if INTERPRET:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# The student-only gradient: the forward keeps 4 statistics per pixel (_masked_kl_div_with_stats) and
# the backward sweeps the classes once.
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("reduction,mask", [("mean", "bool"), ("sum", None), ("none", "float"), ("mean", "empty")])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_masked_kl_div_statistics_from_forward(monkeypatch, teacher_is_logits, reduction, mask, kind):
    s, t = kl_inputs((2, 7, 5, 6), F32, teacher_is_logits)
    s, t = layout(s, kind), layout(t, kind)
    m = make_mask(mask, 2, (5, 6))
    g = randn(*((2, 5, 6) if reduction == "none" else ()), seed=3) + 0.5

    def loss_and_grad(stats_env):
        monkeypatch.setenv("TPSWARP_KL_STATS", stats_env)
        leaf = s.detach().requires_grad_(True)
        loss = tpswarp.masked_kl_div(leaf, t, m, teacher_is_logits=teacher_is_logits, reduction=reduction)
        return loss, torch.autograd.grad(loss, leaf, g)[0]

    loss, grad = loss_and_grad("1")
    assert "_masked_kl_div_with_stats" in loss.grad_fn.name()
    plain_loss, plain_grad = loss_and_grad("0")
    assert "_masked_kl_div_with_stats" not in plain_loss.grad_fn.name()
    # the same per-pixel statistics, kept instead of recomputed
    assert_same_statistics_result(loss, plain_loss)
    assert_same_statistics_result(grad, plain_grad)
    assert grad.stride() == s.stride()
    kl_compare(s, t, m, teacher_is_logits, reduction, grad_mask=(True, False))


@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
def test_masked_kl_div_statistics_extremes_and_orders(teacher_is_logits):
    """Running maxima growing at different classes, logits of 1e4, half inputs, float64."""
    s = ordered_logits((2, 37, 3, 5), "zigzag", seed=0).to(DEVICE)
    t = ordered_logits((2, 37, 3, 5), "ascending", seed=1).to(DEVICE)
    t = t if teacher_is_logits else torch.softmax(t / 8.0, dim=1)
    kl_compare(s, t, make_mask("float", 2, (3, 5), F64), teacher_is_logits, "mean", grad_mask=(True, False))
    s32, t32 = kl_inputs((2, 4, 3, 3), F32, teacher_is_logits)
    kl_compare(s32 * 1e4, t32, None, teacher_is_logits, "sum", grad_mask=(True, False))
    s16, t16 = kl_inputs((2, 4, 5, 6), torch.bfloat16, teacher_is_logits)
    kl_compare(s16, t16, None, teacher_is_logits, "mean", grad_mask=(True, False), dtype=torch.bfloat16)


def test_masked_kl_div_statistics_ops():
    s, t = kl_inputs((2, 4, 3, 5), F32, True)
    mask = make_mask("float", 2, (3, 5)).reshape(2, 3, 5)
    loss, stats = torch.ops.tpswarp._masked_kl_div_with_stats(s, t, mask, True, "mean")
    assert stats.shape == (2, 4, 15) and stats.dtype == F32
    torch.testing.assert_close(stats[:, 0], s.reshape(2, 4, 15).amax(1))  # s_max
    torch.testing.assert_close(stats[:, 0] + stats[:, 1], torch.logsumexp(s.reshape(2, 4, 15), 1))
    torch.testing.assert_close(stats[:, 2] + stats[:, 3], torch.logsumexp(t.reshape(2, 4, 15), 1))
    _, probs_stats = torch.ops.tpswarp._masked_kl_div_with_stats(s, t.softmax(1) * 0.5, None, False, "sum")
    torch.testing.assert_close(probs_stats[:, 2], torch.full((2, 15), 0.5, device=DEVICE))  # the teacher's mass
    assert torch.equal(probs_stats[:, 3], torch.zeros(2, 15, device=DEVICE))
    g = torch.tensor(1.5, device=DEVICE)
    grad = torch.ops.tpswarp._masked_kl_div_backward_stats(g, s, t, mask, stats, True, "mean")
    expected = torch.ops.tpswarp._masked_kl_div_backward(g, s, t, mask, True, "mean", None, [True, False])[0]
    assert_same_statistics_result(grad, expected)
    with pytest.raises(ValueError, match=r"`stats` must be .*\(2, 4, 15\)"):
        torch.ops.tpswarp._masked_kl_div_backward_stats(g, s, t, mask, stats[:, :3], True, "mean")
    for args in [(s, t, mask, True, "mean"), (s, t.softmax(1), None, False, "none")]:
        torch.library.opcheck(torch.ops.tpswarp._masked_kl_div_with_stats, args)
    torch.library.opcheck(torch.ops.tpswarp._masked_kl_div_backward_stats, (g, s, t, mask, stats, True, "mean"))
    empty = torch.zeros(0, 4, 3, 3, device=DEVICE, requires_grad=True)
    loss = tpswarp.masked_kl_div(empty, empty.detach())
    assert "_masked_kl_div_with_stats" in loss.grad_fn.name() and loss.item() == 0.0
    loss.backward()
    assert empty.grad.shape == empty.shape


# --------------------------------------------------------------------------------------------
# photometric_jitter
# --------------------------------------------------------------------------------------------
def jitter_params(batch, dtype, seed=3):
    u = rand(4, batch, dtype=F64, seed=seed)
    brightness = (u[0] * 0.5 - 0.25).to(dtype)
    saturation = (u[1] * 1.75 + 0.25).to(dtype)
    hue = (u[2] * 0.2 - 0.1).to(dtype)
    contrast = (u[3] * 1.75 + 0.25).to(dtype)
    return brightness, saturation, hue, contrast


def jitter_compare(image, params, permutation, clamp, grad_mask=(True,) * 5, dtype=None):
    def fn(x, b, s, h, c):
        return tpswarp.photometric_jitter(x, b, s, h, c, permutation, clamp=clamp)

    def ref(x, b, s, h, c):
        return reference.photometric_jitter(x, b, s, h, c, permutation, clamp=clamp)

    return compare(fn, ref, (image, *params), grad_mask, dtype=dtype)


def permutations(batch):
    rows = [[2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0]]
    return torch.tensor([rows[i % 4] for i in range(batch)], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_photometric_jitter(dtype, permute, clamp, kind):
    image = layout(rand(2, 3, 5, 7, dtype=dtype) * 1.2 - 0.1, kind)
    jitter_compare(image, jitter_params(2, dtype), permutations(2) if permute else None, clamp)


@pytest.mark.parametrize("clamp", [False, True])
def test_photometric_jitter_ties(clamp):
    """Quantized images: equal channels, grey pixels, zeros; gradients split at ties like autograd."""
    image = (rand(3, 3, 4, 6, dtype=F64) * 4).floor() / 4
    image[0, :, 0, :] = 0.5  # grey rows
    image[1, :, 1, :] = 0.0  # black rows
    jitter_compare(image, jitter_params(3, F64), permutations(3), clamp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_photometric_jitter_half(dtype):
    image = rand(2, 3, 4, 5, dtype=dtype)
    jitter_compare(to_channels_last(image), jitter_params(2, F32), permutations(2), False, dtype=dtype)


def test_photometric_jitter_parameter_grads_only():
    image = rand(2, 3, 1, 9, dtype=F64)
    jitter_compare(image, jitter_params(2, F64), None, False, grad_mask=(False, True, False, True, True))


# --------------------------------------------------------------------------------------------
# tps_warp
# --------------------------------------------------------------------------------------------
def warp_compare(image, src, params, grad_mask=(True, True, True), dtype=None, **kwargs):
    def fn(x, s, p):
        return tpswarp.tps_warp(x, s, p, **kwargs)

    def ref(x, s, p):
        return reference.tps_warp(x, s, p, **kwargs)

    return compare(fn, ref, (image, src, params), grad_mask, dtype=dtype)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_tps_warp(dtype, mode, padding_mode, align_corners):
    src, params = tps(2, dtype, scale=0.4)
    image = randn(2, 3, 5, 7, dtype=dtype)
    warp_compare(image, src, params, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_tps_warp_layouts_fill_size(kind, mode):
    src, params = tps(2, F64, scale=0.4, seed=2)
    image = layout(randn(2, 3, 5, 7, dtype=F64), kind)
    warp_compare(image, src, params, mode=mode, fill=0.5, size=(4, 6))


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_tps_warp_large_displacement(padding_mode):
    """Samples far outside the image: reflection folds several times, border clamps."""
    src, params = tps(2, F64, scale=1.5, seed=5, n=6)
    image = randn(2, 2, 4, 5, dtype=F64)
    for align_corners in (False, True):
        warp_compare(image, src, params, padding_mode=padding_mode, align_corners=align_corners)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_tps_warp_label_maps(dtype):
    src, params = tps(2, F32, scale=0.4)
    labels = (rand(2, 1, 6, 5) * 5).floor().to(dtype)
    out, valid = tpswarp.tps_warp(labels, src, params, mode="nearest", fill=255 if dtype == torch.uint8 else -1)
    ref, ref_valid = reference.tps_warp(labels, src, params, mode="nearest", fill=255 if dtype == torch.uint8 else -1)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(valid, ref_valid)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tps_warp_half(dtype):
    src, params = tps(2, F32, scale=0.3)
    image = rand(2, 3, 5, 6, dtype=dtype)
    warp_compare(to_channels_last(image), src, params, dtype=dtype)


def test_tps_warp_single_pixel_axes():
    src, params = tps(1, F64, scale=0.2)
    for shape in ((1, 1, 1, 4), (1, 2, 3, 1), (1, 1, 1, 1)):
        image = randn(*shape, dtype=F64)
        for pad in ("zeros", "border", "reflection"):
            warp_compare(image, src, params, padding_mode=pad, align_corners=True)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_tps_warp_deterministic_scatter(mode):
    """Under use_deterministic_algorithms the image gradient is summed by index_add_: the same
    bits twice, and the same values as the atomics."""
    src, params = tps(2, F64, scale=0.4)
    image = randn(2, 3, 6, 5, dtype=F64)
    grad = randn(2, 3, 6, 5, dtype=F64, seed=4)
    args = (grad, image, src, params, mode, "zeros", False, 0.0, None, [True, True, True])
    plain = torch.ops.tpswarp._tps_warp_backward(*args)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.ops.tpswarp._tps_warp_backward(*args)
        second = torch.ops.tpswarp._tps_warp_backward(*args)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, plain):
        assert torch.equal(a, b)
        assert_close(a, c, grad=True)


# --------------------------------------------------------------------------------------------
# warped_kl_div
# --------------------------------------------------------------------------------------------
def warped_compare(s, t, src, params, teacher_is_logits, reduction, align_corners=False,
                   grad_mask=(True, True, True, True), dtype=None):
    def fn(a, b, c, p):
        return tpswarp.warped_kl_div(a, b, c, p, teacher_is_logits=teacher_is_logits,
                                     align_corners=align_corners, reduction=reduction)

    def ref(a, b, c, p):
        return reference.warped_kl_div(a, b, c, p, teacher_is_logits=teacher_is_logits,
                                       align_corners=align_corners, reduction=reduction)

    return compare(fn, ref, (s, t, src, params), grad_mask, dtype=dtype)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_warped_kl_div(dtype, teacher_is_logits, reduction, align_corners):
    s, t = kl_inputs((2, 4, 5, 6), dtype, teacher_is_logits)
    src, params = tps(2, dtype, scale=0.3)
    warped_compare(s, t, src, params, teacher_is_logits, reduction, align_corners)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_warped_kl_div_layouts_and_teacher_size(kind):
    s, _ = kl_inputs((2, 3, 4, 5), F64, True)
    _, t = kl_inputs((2, 3, 6, 7), F64, True, seed=3)
    src, params = tps(2, F64, scale=0.3, seed=1)
    warped_compare(layout(s, kind), layout(t, kind), src, params, True, "mean")


@pytest.mark.parametrize("teacher_is_logits", [False, True])
@pytest.mark.parametrize("orders", ORDERS)
def test_warped_kl_div_online_statistics(teacher_is_logits, orders):
    """The warped teacher's online statistics: maxima that grow at different classes (37 classes)."""
    s = ordered_logits((2, 37, 4, 5), orders[0], seed=0).to(DEVICE)
    t = ordered_logits((2, 37, 5, 6), orders[1], seed=1).to(DEVICE)
    if not teacher_is_logits:
        t = torch.softmax(t / 8.0, dim=1)
    src, params = tps(2, F64, scale=0.3)
    warped_compare(s, t, src, params, teacher_is_logits, "mean")


def test_warped_kl_div_mostly_and_fully_invalid():
    s, t = kl_inputs((2, 3, 4, 5), F64, True)
    src, params = tps(2, F64, scale=2.0, seed=4)  # large warp: many samples leave the teacher
    warped_compare(s, t, src, params, True, "mean")
    far = params.clone()
    far[:, -3, :] += 10.0  # translate everything out of the image: empty mask, loss and grads 0
    outs, grads = warped_compare(s, t, src, far, True, "mean")
    assert outs[0].item() == 0.0 and all(g.abs().max().item() == 0.0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_warped_kl_div_half(dtype):
    s, t = kl_inputs((2, 4, 5, 6), dtype, False)
    src, params = tps(2, F32, scale=0.3)
    warped_compare(to_channels_last(s), t, src, params, False, "mean", dtype=dtype)


# The student-only gradient (one-way consistency): the forward keeps 5 values per pixel
# (_warped_kl_div_with_stats) and the backward sweeps the classes once, without the validity pass.
@pytest.mark.parametrize("teacher_is_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_warped_kl_div_statistics_from_forward(monkeypatch, teacher_is_logits, reduction, kind):
    s, _ = kl_inputs((2, 7, 6, 5), F32, teacher_is_logits)
    _, t = kl_inputs((2, 7, 5, 8), F32, teacher_is_logits, seed=3)
    s, t = layout(s, kind), layout(t, kind)
    src, params = tps(2, F32, scale=0.4, seed=2)
    g = randn(*((2, 6, 5) if reduction == "none" else ()), seed=3) + 0.5

    def loss_and_grad(stats_env):
        monkeypatch.setenv("TPSWARP_KL_STATS", stats_env)
        leaf = s.detach().requires_grad_(True)
        loss = tpswarp.warped_kl_div(leaf, t, src, params, teacher_is_logits=teacher_is_logits, reduction=reduction)
        return loss, torch.autograd.grad(loss, leaf, g)[0]

    loss, grad = loss_and_grad("1")
    assert "_warped_kl_div_with_stats" in loss.grad_fn.name()
    plain_loss, plain_grad = loss_and_grad("0")
    assert "_warped_kl_div_with_stats" not in plain_loss.grad_fn.name()
    assert_same_statistics_result(loss, plain_loss)  # the statistics kept instead of recomputed
    assert_same_statistics_result(grad, plain_grad)
    assert grad.stride() == s.stride()
    warped_compare(s, t, src, params, teacher_is_logits, reduction, grad_mask=(True, False, False, False))


def test_warped_kl_div_statistics_edge_cases():
    """Running maxima, an empty mask (everything warped out), half inputs, float64; the statistics
    against torch; the private ops under opcheck; statistics of other inputs rejected."""
    s = ordered_logits((2, 37, 4, 5), "zigzag", seed=0).to(DEVICE)
    t = ordered_logits((2, 37, 5, 6), "ascending", seed=1).to(DEVICE)
    src, params = tps(2, F64, scale=0.3)
    warped_compare(s, t, src, params, True, "mean", grad_mask=(True, False, False, False))
    far = params.clone()
    far[:, -3, :] += 10.0  # everything outside the teacher: loss and gradient 0
    outs, grads = warped_compare(s, t, src, far, True, "mean", grad_mask=(True, False, False, False))
    assert outs[0].item() == 0.0 and grads[0].abs().max().item() == 0.0
    s16, t16 = kl_inputs((2, 4, 5, 6), torch.bfloat16, False)
    src32, params32 = tps(2, F32, scale=0.3)
    warped_compare(s16, t16, src32, params32, False, "mean", grad_mask=(True, False, False, False),
                   dtype=torch.bfloat16)

    s32, t32 = kl_inputs((2, 4, 5, 6), F32, True)
    loss, stats = torch.ops.tpswarp._warped_kl_div_with_stats(s32, t32, src32, params32, True, False, "mean")
    assert stats.shape == (2, 5, 30) and stats.dtype == F32
    _, valid = reference.tps_warp(t32, src32, params32)
    assert torch.equal(stats[:, 4], valid.reshape(2, 30).to(F32))
    live = valid.reshape(2, 30)
    torch.testing.assert_close(stats[:, 0][live], s32.reshape(2, 4, 30).amax(1)[live])
    gl = torch.tensor(0.8, device=DEVICE)
    grad = torch.ops.tpswarp._warped_kl_div_backward_stats(gl, s32, t32, src32, params32, stats, True, False, "mean")
    plain = torch.ops.tpswarp._warped_kl_div_backward(gl, s32, t32, src32, params32, True, False, "mean", None,
                                                      [True, False, False, False])[0]
    assert_same_statistics_result(grad, plain)
    with pytest.raises(ValueError, match=r"`stats` must be .*\(2, 5, 30\)"):
        torch.ops.tpswarp._warped_kl_div_backward_stats(gl, s32, t32, src32, params32, stats[:, :4], True, False,
                                                        "mean")
    torch.library.opcheck(torch.ops.tpswarp._warped_kl_div_with_stats, (s32, t32, src32, params32, True, False, "sum"))
    torch.library.opcheck(torch.ops.tpswarp._warped_kl_div_backward_stats,
                          (gl, s32, t32, src32, params32, stats, True, False, "mean"))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_kl_statistics_under_torch_compile(compile_backend):
    """One-way consistency under torch.compile(fullgraph=True): the graph holds the statistics ops (the
    backend's choice is traceable), and loss and gradient equal eager's."""
    s, _ = kl_inputs((2, 4, 5, 6), F32, True)
    _, t = kl_inputs((2, 4, 7, 8), F32, True, seed=3)
    src, params = tps(2, F32, scale=0.3)
    probs = t[:, :, :5, :6].softmax(1)

    def one_way(student):
        return (tpswarp.warped_kl_div(student, t, src, params, teacher_is_logits=True)
                + tpswarp.masked_kl_div(student, probs, reduction="none").mean())

    def run(fn):
        leaf = s.detach().clone().requires_grad_(True)
        loss = fn(leaf)
        return loss, torch.autograd.grad(loss, leaf)[0]

    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    run(torch.compile(one_way, fullgraph=True, backend=record))
    assert {t.removesuffix(".default") for t in targets if "_with_stats" in t} == {
        "tpswarp._warped_kl_div_with_stats", "tpswarp._masked_kl_div_with_stats"}, targets
    torch._dynamo.reset()
    loss_c, grad_c = run(torch.compile(one_way, fullgraph=True, backend=compile_backend))
    loss_e, grad_e = run(one_way)
    assert_close(loss_c, loss_e)
    assert_close(grad_c, grad_e, grad=True)


def test_warped_kl_div_deterministic_scatter():
    s, t = kl_inputs((2, 3, 4, 5), F64, True)
    src, params = tps(2, F64, scale=0.3)
    args = (torch.tensor(1.3, dtype=F64, device=DEVICE), s, t, src, params, True, False, "mean", None, [True] * 4)
    plain = torch.ops.tpswarp._warped_kl_div_backward(*args)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.ops.tpswarp._warped_kl_div_backward(*args)
        second = torch.ops.tpswarp._warped_kl_div_backward(*args)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, plain):
        assert torch.equal(a, b)
        assert_close(a, c, grad=True)


# --------------------------------------------------------------------------------------------
# registration and fake kernels
# --------------------------------------------------------------------------------------------
def test_backend_selected():
    selected = tpswarp.backends()["selected"][DEVICE.type]
    assert all(selected[op] == "triton" for op in
               ("masked_kl_div", "photometric_jitter", "tps_warp", "warped_kl_div")), selected


def test_fake_kernels_agree():
    """The fake (meta) kernels promise the dtypes, shapes and memory formats the kernels return."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    src, params = tps(2, F32)
    image = to_channels_last(rand(2, 3, 5, 6))
    s, t = kl_inputs((2, 4, 5, 6), F32, True)
    p = jitter_params(2, F32)
    calls = [
        (torch.ops.tpswarp.tps_warp, (image, src, params)),
        (torch.ops.tpswarp.photometric_jitter, (image, *p)),
        (torch.ops.tpswarp.masked_kl_div, (s, t, None, True, "none")),
        (torch.ops.tpswarp._masked_kl_div_with_stats, (s, t, None, True, "mean")),
        (torch.ops.tpswarp._warped_kl_div_with_stats, (s, t, src, params, True, False, "none")),
        (torch.ops.tpswarp.warped_kl_div, (s, t, src, params, True, False, "mean")),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), op


def test_package_imports_without_triton():
    """tpswarp.ops imports the Triton kernels only when ``import triton`` works."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, tpswarp\n"
            "assert not tpswarp.backends()['triton']\n"
            "assert 'tpswarp.triton' not in sys.modules\n"
            "x = torch.randn(1, 3, 2, 2)\n"
            "print(float(tpswarp.masked_kl_div(x, x.softmax(1))))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TPSWARP_BACKEND", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the kernels are compiled by every other test")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (no GPU
    needed, Triton ships ptxas) through tests/triton_compile_check.py."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode == 2:
        pytest.skip("compile-only driver not supported by this Triton version: " + result.stdout[-300:])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
