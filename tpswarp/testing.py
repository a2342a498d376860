"""Test utilities: the one tolerance table, and input makers shared by tests and benchmarks."""
from __future__ import annotations

import math
from typing import Optional

import torch

# (rtol, atol) per dtype, for comparing a backend with the reference computed in the same dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

# Looser tolerances for gradients (more rounding in reductions).
GRAD_TOLERANCES = {
    torch.float64: (1e-8, 1e-9),
    torch.float32: (1e-3, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, grad: bool = False) -> dict:
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close``."""
    rtol, atol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, grad: bool = False, dtype: Optional[torch.dtype] = None,
                 msg: Optional[str] = None) -> None:
    """assert_close with the table's tolerance for ``dtype`` (default: ``expected.dtype``)."""
    dt = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    torch.testing.assert_close(actual, expected, **tolerance(dt, grad), msg=msg)


def quadrant_points(batch: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The PhTPS control points, ``(batch, 4, 2)``."""
    pts = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]], dtype=dtype, device=device)
    return pts.expand(batch, 4, 2).contiguous()


def jittered_grid_points(batch: int, n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(batch, n, 2)`` float64 control points: the first ``n`` nodes of a ``ceil(sqrt(n))``-square grid
    over ``[-0.75, 0.75]^2``, each moved by at most a twentieth of the spacing. Well conditioned for any
    ``n >= 3``: uniform random points can nearly coincide, and then the TPS weights (and the float32
    rounding of everything computed from them) grow by orders of magnitude."""
    m = max(2, math.ceil(math.sqrt(n)))
    axis = torch.linspace(-0.75, 0.75, m, dtype=torch.float64)
    nodes = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)[:n]
    spacing = 1.5 / (m - 1)
    return nodes + spacing / 10 * (torch.rand(batch, n, 2, generator=generator, dtype=torch.float64) - 0.5)


def random_tps(batch: int, *, n: int = 4, scale: float = 0.2, generator: Optional[torch.Generator] = None,
               dtype=torch.float32, device=None, points: str = "random"):
    """A random TPS warp ``(src, dst, params)`` around the identity, solved by the reference.

    ``src``: the PhTPS quadrant points when ``n == 4``; else uniform in ``[-0.8, 0.8]^2``
    (``points="random"``) or ``jittered_grid_points`` (``points="grid"``)."""
    from .reference import tps_solve

    if points not in ("random", "grid"):
        raise ValueError(f"random_tps: `points` must be 'random' or 'grid', got {points!r}")
    if n == 4:
        src = quadrant_points(batch, dtype=torch.float64)
    elif points == "grid":
        src = jittered_grid_points(batch, n, generator=generator)
    else:
        src = torch.rand(batch, n, 2, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    dst = src + scale * torch.randn(batch, n, 2, generator=generator, dtype=torch.float64)
    params = tps_solve(src, dst)
    cast = dict(dtype=dtype, device=device)
    return src.to(**cast), dst.to(**cast), params.to(**cast)


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor with the same values (a strided view of a larger buffer)."""
    big = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def ordered_logits(shape, order: str, *, seed: int = 0, spread: float = 40.0, noise: float = 0.5,
                   dtype=torch.float64) -> torch.Tensor:
    """Logits ``(B, C, *spatial)`` whose per-pixel maximum over the classes moves where ``order`` says:
    at every class (``"ascending"``), never after class 0 (``"descending"``), at every other class
    (``"zigzag"``). The classes span ``spread``, plus Gaussian ``noise``: one-sweep (online) softmax
    statistics must rescale their running sums, by large factors."""
    C = shape[1]
    base = torch.linspace(-spread / 2, spread / 2, C, dtype=torch.float64)
    if order == "descending":
        base = base.flip(0)
    elif order == "zigzag":
        base = torch.where(torch.arange(C) % 2 == 0, base, -base)
    elif order != "ascending":
        raise ValueError(f"ordered_logits: `order` must be 'ascending', 'descending' or 'zigzag', got {order!r}")
    rand = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (base.view([1, C] + [1] * (len(shape) - 2)) + noise * rand).to(dtype)
