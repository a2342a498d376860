"""tpswarp.photometric_jitter: reference vs independent oracles (colorsys and the DESIGN
formula in numpy float64), every backend vs the reference, gradients, gradcheck, opcheck,
hypothesis properties and argument errors."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpswarp
from tpswarp.testing import assert_close, non_contiguous, to_channels_last

PERMS = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]

# Hypothesis with the function-scoped `backend` fixture: the fixture only selects the
# backend, which stays valid for every example.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _params(B, *, dtype=torch.float32, gen=None, wide=False):
    """Per-image parameters in the PhTPS ranges (or wider ones that leave s <= 1, v >= 0)."""
    u = torch.rand(4, B, generator=gen, dtype=torch.float64)
    if wide:
        b = -1.0 + 2.0 * u[0]          # v + b may be negative
        s = 3.0 * u[1]                 # s may exceed 1
        h = -2.5 + 5.0 * u[2]          # several turns, both signs
        c = -0.5 + 3.0 * u[3]          # negative contrast too
    else:
        b = -0.25 + 0.5 * u[0]
        s = 0.25 + 1.75 * u[1]
        h = -0.1 + 0.2 * u[2]
        c = 0.25 + 1.75 * u[3]
    return tuple(p.to(dtype) for p in (b, s, h, c))


def _perm(B, gen=None):
    idx = torch.randint(0, 6, (B,), generator=gen)
    return torch.tensor(PERMS)[idx]


def _image(B, H, W, *, dtype=torch.float32, gen=None):
    img = torch.rand(B, 3, H, W, generator=gen, dtype=torch.float64)
    # special pixels: black, white, grey (s = 0), pure primaries, ties (r = g > b, r > g = b)
    specials = torch.tensor([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                             [0.7, 0.7, 0.2], [0.8, 0.3, 0.3], [0.2, 0.6, 0.6], [0.4, 0.1, 0.4]],
                            dtype=torch.float64)
    flat = img.permute(0, 2, 3, 1).reshape(B, H * W, 3)
    k = min(len(specials), H * W)
    flat[0, :k] = specials[:k]
    return flat.reshape(B, H, W, 3).permute(0, 3, 1, 2).contiguous().to(dtype)


def _colorsys_oracle(image, b, s, h, c, perm=None, clamp=False):
    """DESIGN.md's order, pixel by pixel with Python's colorsys, float64."""
    img = image.detach().double().numpy()
    B, _, H, W = img.shape
    out = np.empty_like(img)
    for n in range(B):
        for i in range(H):
            for j in range(W):
                hh, ss, vv = colorsys.rgb_to_hsv(*img[n, :, i, j])
                vv += float(b[n])
                ss *= float(s[n])
                hh = (hh + float(h[n])) % 1.0
                vv *= float(c[n])
                rgb = colorsys.hsv_to_rgb(hh, ss, vv)
                p = (0, 1, 2) if perm is None else [int(x) for x in perm[n]]
                out[n, :, i, j] = [rgb[p[ch]] for ch in range(3)]
    if clamp:
        out = np.clip(out, 0, 1)
    return torch.from_numpy(out)


def _design_numpy(image, b, s, h, c, perm=None, clamp=False):
    """DESIGN.md's formulas written independently, vectorized numpy float64."""
    x = image.detach().double().numpy()
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    v = np.max(x, axis=1)
    mn = np.min(x, axis=1)
    d = v - mn
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(v > 0, d / v, 0.0)
        hr = ((g - bl) / d) % 6.0
        hg = (bl - r) / d + 2.0
        hb = (r - g) / d + 4.0
    hue6 = np.where(v == r, hr, np.where(v == g, hg, hb))
    hue = np.where(d > 0, hue6 / 6.0, 0.0) % 1.0
    P = lambda p: np.asarray(p.detach().double().numpy())[:, None, None]  # noqa: E731
    v = v + P(b)
    sat = sat * P(s)
    hue = (hue + P(h)) % 1.0
    v = v * P(c)
    chans = []
    for n in (5, 3, 1):
        k = (n + 6.0 * hue) % 6.0
        chans.append(v - v * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    rgb = np.stack(chans, axis=1)
    if perm is not None:
        p = perm.numpy()
        rgb = np.stack([rgb[np.arange(len(p)), p[:, ch]] for ch in range(3)], axis=1)
    if clamp:
        rgb = np.clip(rgb, 0, 1)
    return torch.from_numpy(rgb)


def _ref(image, b, s, h, c, perm=None, clamp=False):
    return tpswarp.reference.photometric_jitter(image, b, s, h, c, perm, clamp=clamp)


# --------------------------------------------------------------------------------------
# 1. reference vs independent oracles
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("wide", [False, True], ids=["phtps-ranges", "wide-ranges"])
@pytest.mark.parametrize("with_perm", [False, True])
def test_reference_matches_colorsys(wide, with_perm):
    # colorsys.hsv_to_rgb is linear in s and v (p = v(1-s), q = v(1-sf), t = v(1-s(1-f))),
    # so it equals the DESIGN formula for s > 1 and v < 0 as well; checked on both ranges.
    gen = torch.Generator().manual_seed(1)
    image = _image(3, 4, 5, dtype=torch.float64, gen=gen)
    b, s, h, c = _params(3, dtype=torch.float64, gen=gen, wide=wide)
    perm = _perm(3, gen) if with_perm else None
    out = _ref(image, b, s, h, c, perm)
    expected = _colorsys_oracle(image, b, s, h, c, perm)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_matches_colorsys_in_nominal_domain():
    # The domain where s <= 1 and v >= 0 after the jitter (brief's colorsys domain).
    gen = torch.Generator().manual_seed(2)
    image = _image(2, 5, 6, dtype=torch.float64, gen=gen)
    b = torch.tensor([0.0, 0.2], dtype=torch.float64)
    s = torch.tensor([0.3, 1.0], dtype=torch.float64)
    h = torch.tensor([-0.3, 0.95], dtype=torch.float64)
    c = torch.tensor([0.5, 1.5], dtype=torch.float64)
    out = _ref(image, b, s, h, c, clamp=True)
    torch.testing.assert_close(out, _colorsys_oracle(image, b, s, h, c, clamp=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("wide", [False, True], ids=["phtps-ranges", "wide-ranges"])
def test_reference_matches_design_formula(clamp, wide):
    gen = torch.Generator().manual_seed(3)
    image = _image(4, 6, 7, dtype=torch.float64, gen=gen)
    params = _params(4, dtype=torch.float64, gen=gen, wide=wide)
    perm = _perm(4, gen)
    out = _ref(image, *params, perm, clamp=clamp)
    torch.testing.assert_close(out, _design_numpy(image, *params, perm, clamp=clamp), rtol=1e-12, atol=1e-12)


def test_design_formula_oracle_is_right_on_known_values():
    # Guards the numpy oracle itself: hand-computed pixels.
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.4, 0.8]], dtype=torch.float64)
    image = image.T.reshape(1, 3, 1, 3)
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    # hue + 1/3 turn: red (h = 0) -> green (h = 1/3); cyan (h = 1/2) -> magenta (h = 5/6)
    out = _design_numpy(image, zero, one, one / 3, one)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    # saturation 0 -> grey at v; brightness adds to v; contrast scales v
    out = _design_numpy(image, one * 0.1, zero, zero, one * 2)
    torch.testing.assert_close(out[0, :, 0, 2], torch.full((3,), 1.8, dtype=torch.float64))


def test_permutation_semantics():
    # out[:, c] = rgb[permutation[c]] for every one of the six permutations.
    image = _image(6, 3, 4, dtype=torch.float64)
    b, s, h, c = _params(6, dtype=torch.float64)
    perm = torch.tensor(PERMS)
    plain = _ref(image, b, s, h, c)
    permuted = _ref(image, b, s, h, c, perm)
    for n in range(6):
        for ch in range(3):
            assert torch.equal(permuted[n, ch], plain[n, int(perm[n, ch])])
    # e.g. (2, 0, 1): the red output channel is the jittered blue channel
    assert torch.equal(permuted[4, 0], plain[4, 2])


def test_clamp_semantics(backend):
    image = _image(3, 4, 5)
    params = _params(3, wide=True)
    perm = _perm(3)
    raw = tpswarp.photometric_jitter(image, *params, perm)
    clamped = tpswarp.photometric_jitter(image, *params, perm, clamp=True)
    assert raw.min() < 0 and raw.max() > 1  # the test is meaningful
    assert clamped.min() >= 0 and clamped.max() <= 1
    assert_close(clamped, raw.clamp(0, 1))


# --------------------------------------------------------------------------------------
# 2. backends vs the reference
# --------------------------------------------------------------------------------------
def _layout(t, layout):
    if layout == "channels_last":
        return to_channels_last(t)
    if layout == "non_contiguous":
        return non_contiguous(t)
    return t.contiguous()


def _nc_param(p):
    big = torch.empty(p.shape[0] * 3, dtype=p.dtype)
    big[::3] = p
    return big[::3]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clamp", [False, True])
def test_backend_matches_reference(backend, dtype, layout, clamp):
    gen = torch.Generator().manual_seed(4)
    B, H, W = 3, 5, 7
    image = _layout(_image(B, H, W, dtype=dtype, gen=gen), layout)
    params = _params(B, dtype=dtype, gen=gen)
    if layout == "non_contiguous":
        params = tuple(_nc_param(p) for p in params)
        assert not image.is_contiguous() and not params[0].is_contiguous()
    perm = _perm(B, gen)
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, *params)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (image, *params)]

    out = tpswarp.photometric_jitter(*leaves, perm, clamp=clamp)
    expected = _ref(*ref_leaves, perm, clamp=clamp)
    assert out.dtype == dtype and out.shape == (B, 3, H, W)
    assert_close(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)

    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad)
    for name, g, r in zip(("image", "brightness", "saturation", "hue", "contrast"), grads, ref_grads):
        assert_close(g, r, grad=True, msg=f"gradient w.r.t. {name}")
        assert g.shape == r.shape
    assert all(g.abs().sum() > 0 for g in grads[1:])  # the parameters do get gradients


def test_no_permutation_equals_identity_permutation(backend):
    image = _image(2, 4, 4)
    params = _params(2)
    ident = torch.tensor([[0, 1, 2]] * 2)
    assert torch.equal(tpswarp.photometric_jitter(image, *params),
                       tpswarp.photometric_jitter(image, *params, ident))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32_reference(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    image = _image(2, 5, 6, gen=gen).to(dtype)
    params = tuple(p.to(dtype) for p in _params(2, gen=gen))
    perm = _perm(2, gen)
    leaves = [t.clone().requires_grad_(True) for t in (image, *params)]
    out = tpswarp.photometric_jitter(*leaves, perm)
    assert out.dtype == dtype
    f32 = [t.detach().float().requires_grad_(True) for t in (image, *params)]
    expected = _ref(*f32, perm)
    assert_close(out.float(), expected, dtype=dtype)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(expected, f32, grad.float())
    for name, g, r in zip(("image", "brightness", "saturation", "hue", "contrast"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g.float(), r, grad=True, dtype=dtype, msg=f"gradient w.r.t. {name}")


def test_odd_and_tiny_shapes(backend):
    for B, H, W in ((1, 1, 1), (2, 1, 9), (1, 7, 1), (3, 3, 5)):
        image = torch.rand(B, 3, H, W)
        params = _params(B)
        perm = _perm(B)
        assert_close(tpswarp.photometric_jitter(image, *params, perm), _ref(image, *params, perm))


def test_empty_batch(backend):
    image = torch.rand(0, 3, 4, 4)
    z = torch.zeros(0)
    out = tpswarp.photometric_jitter(image, z, z, z, z, torch.zeros(0, 3, dtype=torch.int64))
    assert out.shape == (0, 3, 4, 4)


# --------------------------------------------------------------------------------------
# 3. hypothesis properties
# --------------------------------------------------------------------------------------
@fixture_ok
@given(B=st.integers(1, 3), H=st.integers(1, 6), W=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_identity_parameters_are_identity(backend, B, H, W, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=gen).to(dtype)
    ident = torch.tensor([[0, 1, 2]] * B)
    out = tpswarp.photometric_jitter(image, torch.zeros(B, dtype=dtype), torch.ones(B, dtype=dtype),
                                     torch.zeros(B, dtype=dtype), torch.ones(B, dtype=dtype), ident)
    assert_close(out, image)


@fixture_ok
@given(B=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       wide=st.booleans(), clamp=st.booleans())
def test_hypothesis_reference_vs_design_and_backend(backend, B, H, W, seed, wide, clamp):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=gen, dtype=torch.float64)
    params = _params(B, dtype=torch.float64, gen=gen, wide=wide)
    perm = _perm(B, gen)
    expected = _design_numpy(image, *params, perm, clamp=clamp)
    torch.testing.assert_close(_ref(image, *params, perm, clamp=clamp), expected, rtol=1e-12, atol=1e-12)
    assert_close(tpswarp.photometric_jitter(image, *params, perm, clamp=clamp), expected)
    out32 = tpswarp.photometric_jitter(image.float(), *(p.float() for p in params), perm, clamp=clamp)
    # float32 vs the float64 oracle (not a same-dtype comparison, so not the table): a hue
    # rounding error d reaches the output as 6 d |v s|, and |v s| grows to ~15 in the wide
    # ranges, so the absolute tolerance scales with the output magnitude.
    bound = 1.0 + expected.abs().max().item()
    torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-5 * bound)


@fixture_ok
@given(seed=st.integers(0, 2**31 - 1))
def test_permuting_commutes_with_jitter(backend, seed):
    # Jitter is equivariant: permuting the output channels equals indexing the plain output.
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 3, 4, generator=gen)
    params = _params(2, gen=gen)
    perm = _perm(2, gen)
    plain = tpswarp.photometric_jitter(image, *params)
    permuted = tpswarp.photometric_jitter(image, *params, perm)
    expected = torch.stack([plain[n, perm[n]] for n in range(2)])
    assert torch.equal(permuted, expected)


# --------------------------------------------------------------------------------------
# 5. gradcheck
# --------------------------------------------------------------------------------------
def _smooth_inputs(B, H, W, gen):
    """float64 pixels with distinct channels (no ties: rgb_to_hsv is smooth) whose jittered
    hue is away from the sector boundaries of hsv_to_rgb (6h not near an integer)."""
    b, s, h, c = _params(B, dtype=torch.float64, gen=gen)
    image = torch.empty(B, 3, H * W, dtype=torch.float64)
    for n in range(B):
        cand = 0.1 + 0.8 * torch.rand(400, 3, generator=gen, dtype=torch.float64)
        hh = torch.tensor([colorsys.rgb_to_hsv(*px)[0] for px in cand.tolist()], dtype=torch.float64)
        hj = torch.remainder(hh + h[n], 1.0)
        srt = cand.sort(dim=1).values
        gap = torch.minimum(srt[:, 1] - srt[:, 0], srt[:, 2] - srt[:, 1])
        f6 = torch.remainder(6 * hj, 1.0)
        ok = (gap > 0.05) & (f6 > 0.05) & (f6 < 0.95)
        assert ok.sum() >= H * W
        image[n] = cand[ok][: H * W].T
    return image.reshape(B, 3, H, W), (b, s, h, c)


@pytest.mark.parametrize("clamp", [False, True])
def test_gradcheck(backend, clamp):
    gen = torch.Generator().manual_seed(6)
    image, params = _smooth_inputs(2, 2, 3, gen)
    perm = torch.tensor([[2, 0, 1], [0, 1, 2]])
    if clamp:
        out = _ref(image, *params, perm)
        assert ((out - 0).abs().min() > 1e-3) and ((out - 1).abs().min() > 1e-3)
        assert (out > 1).any() or (out < 0).any()  # clamping is active somewhere
    inputs = [t.detach().clone().requires_grad_(True) for t in (image, *params)]
    fn = lambda *x: tpswarp.photometric_jitter(*x, perm, clamp=clamp)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------
# 6. opcheck
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "perm_clamp", "channels_last"])
def test_opcheck(backend, variant):
    image = _image(2, 4, 5)
    if variant == "channels_last":
        image = to_channels_last(image)
    params = _params(2)
    perm = torch.tensor([[1, 2, 0], [2, 1, 0]]) if variant != "plain" else None
    args = (image.requires_grad_(True), *(p.requires_grad_(True) for p in params), perm, variant == "perm_clamp")
    torch.library.opcheck(torch.ops.tpswarp.photometric_jitter.default, args)


# --------------------------------------------------------------------------------------
# 8. bad inputs
# --------------------------------------------------------------------------------------
def _good(B=2):
    return torch.rand(B, 3, 4, 4), *_params(B), _perm(B)


def test_bad_image(backend):
    image, b, s, h, c, perm = _good()
    with pytest.raises(ValueError, match="`image`"):
        tpswarp.photometric_jitter(torch.rand(2, 4, 4, 4), b, s, h, c, perm)
    with pytest.raises(ValueError, match="`image`"):
        tpswarp.photometric_jitter(torch.rand(3, 4, 4), b, s, h, c, perm)
    with pytest.raises(TypeError, match="`image`"):
        tpswarp.photometric_jitter(torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8), b, s, h, c, perm)
    with pytest.raises(TypeError, match="`image`"):
        tpswarp.photometric_jitter(image.numpy(), b, s, h, c, perm)


def test_bad_parameters(backend):
    image, b, s, h, c, perm = _good()
    with pytest.raises(ValueError, match="`brightness`"):
        tpswarp.photometric_jitter(image, b[:, None], s, h, c, perm)
    with pytest.raises(ValueError, match="`saturation`"):
        tpswarp.photometric_jitter(image, b, torch.ones(3), h, c, perm)
    with pytest.raises(ValueError, match="`contrast`"):
        tpswarp.photometric_jitter(image, b, s, h, torch.tensor(1.0), perm)
    with pytest.raises(TypeError, match="`hue`"):
        tpswarp.photometric_jitter(image, b, s, torch.zeros(2, dtype=torch.int64), c, perm)
    with pytest.raises(TypeError, match="`contrast`"):
        tpswarp.photometric_jitter(image, b, s, h, 1.0, perm)


def test_bad_permutation(backend):
    image, b, s, h, c, perm = _good()
    with pytest.raises(TypeError, match="`permutation`"):
        tpswarp.photometric_jitter(image, b, s, h, c, perm.to(torch.int32))
    with pytest.raises(TypeError, match="`permutation`"):
        tpswarp.photometric_jitter(image, b, s, h, c, perm.float())
    with pytest.raises(ValueError, match="`permutation`"):
        tpswarp.photometric_jitter(image, b, s, h, c, perm[:, :2])
    with pytest.raises(ValueError, match="`permutation`"):
        tpswarp.photometric_jitter(image, b, s, h, c, perm[:1])
    for row in ([0, 0, 2], [0, 1, 3], [-1, 0, 1], [2, 2, 2]):
        bad = torch.tensor([[0, 1, 2], row])
        with pytest.raises(ValueError, match="`permutation`"):
            tpswarp.photometric_jitter(image, b, s, h, c, bad)


def test_device_mismatch(backend):
    image, b, s, h, c, perm = _good()
    with pytest.raises(RuntimeError, match="`brightness`"):
        tpswarp.photometric_jitter(image, b.to("meta"), s, h, c, perm)
