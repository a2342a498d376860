"""Reference TPS solve: the (n + 3) x (n + 3) interpolation system, solved in float64."""
from __future__ import annotations

import torch

from .._validation import check_tps_solve
from ._tps_math import compute_dtype, tps_kernel_from_sq_dist

# Relative thresholds for the singularity test, on float64 geometry.
_DUPLICATE_RTOL = 1e-12
_COLLINEAR_RTOL = 1e-12


def tps_system(src: torch.Tensor, reg: float) -> torch.Tensor:
    """The TPS matrix [[K + reg I, P], [P^T, 0]] of shape (B, n + 3, n + 3), P = [1, x, y]."""
    B, n, _ = src.shape
    r2 = ((src[:, :, None, :] - src[:, None, :, :]) ** 2).sum(-1)
    K = tps_kernel_from_sq_dist(r2)
    if reg:
        K = K + reg * torch.eye(n, dtype=src.dtype, device=src.device)
    P = torch.cat([torch.ones_like(src[..., :1]), src], dim=-1)  # (B, n, 3)
    zeros = torch.zeros(B, 3, 3, dtype=src.dtype, device=src.device)
    return torch.cat([torch.cat([K, P], dim=2), torch.cat([P.transpose(1, 2), zeros], dim=2)], dim=1)


def singular_items(src: torch.Tensor, reg: float) -> tuple[list[int], list[int]]:
    """Batch items whose TPS system is singular: (collinear items, duplicate-point items).

    Collinear (or all-equal) points leave the affine part undetermined whatever `reg`;
    duplicate points make the kernel block singular unless `reg > 0`.
    """
    s = src.detach().to(torch.float64)
    centred = s - s.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred  # (B, 2, 2)
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0]
    trace = cov[:, 0, 0] + cov[:, 1, 1]
    collinear = det <= _COLLINEAR_RTOL * trace * trace
    duplicate = torch.zeros_like(collinear)
    if reg == 0:
        d2 = ((s[:, :, None, :] - s[:, None, :, :]) ** 2).sum(-1)
        n = s.shape[1]
        d2 = d2.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), float("inf"))  # not eye * inf: 0 * inf = nan
        duplicate = d2.amin(dim=(1, 2)) <= _DUPLICATE_RTOL * trace.clamp_min(1e-300)
        duplicate &= ~collinear
    return collinear.nonzero().flatten().tolist(), duplicate.nonzero().flatten().tolist()


def raise_if_singular(src: torch.Tensor, reg: float) -> None:
    collinear, duplicate = singular_items(src, reg)
    if collinear:
        raise ValueError(
            f"tps_solve: singular system: the control points `src` of batch item(s) {collinear[:8]} "
            "are collinear (or coincide), so the affine part is undetermined; `reg` cannot fix this"
        )
    if duplicate:
        raise ValueError(
            f"tps_solve: singular system: batch item(s) {duplicate[:8]} have duplicate control "
            "points in `src`; remove them or pass reg > 0 for a smoothing spline"
        )


def tps_solve(src: torch.Tensor, dst: torch.Tensor, *, reg: float = 0.0, check_singular: bool = True) -> torch.Tensor:
    """TPS parameters mapping ``src`` to ``dst``.

    Args:
        src, dst: ``(B, n, 2)`` control points, ``n >= 3``.
        reg: ``>= 0``; adds ``reg * I`` to the kernel block (smoothing spline).
        check_singular: raise ``ValueError`` on a singular system (host sync on GPU).

    Returns:
        ``(B, n + 3, 2)`` parameters: radial weights ``W`` (rows ``0..n-1``) then the affine
        coefficients of ``[1, x, y]``. float64 for float64 inputs, float32 otherwise.
    """
    check_tps_solve(src, dst, reg)
    out_dtype = compute_dtype(src, dst)
    if check_singular:
        raise_if_singular(src, reg)
    s, d = src.to(torch.float64), dst.to(torch.float64)
    L = tps_system(s, float(reg))
    rhs = torch.cat([d, torch.zeros_like(d[:, :3])], dim=1)
    return torch.linalg.solve(L, rhs).to(out_dtype).contiguous()  # linalg.solve returns column-major strides
