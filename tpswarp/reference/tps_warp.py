"""Reference TPS backward warp: explicit taps, no grid_sample, so grid_sample can be its oracle."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._validation import check_tps_warp
from ._tps_math import compute_dtype, tps_evaluate


def output_grid(batch: int, height: int, width: int, align_corners: bool, dtype, device) -> torch.Tensor:
    """Normalized (x, y) coordinates of the output pixel centres, shape (B, H * W, 2)."""

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=dtype, device=device)
        if align_corners:
            return (2 * i / (n - 1) - 1) if n > 1 else torch.zeros(1, dtype=dtype, device=device)
        return (2 * i + 1) / n - 1

    ys, xs = torch.meshgrid(axis(height), axis(width), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(1, height * width, 2).expand(batch, -1, -1)


def unnormalize(coord: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    """Normalized coordinate -> pixel coordinate, as grid_sample."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def reflect(coord: torch.Tensor, low2: int, high2: int) -> torch.Tensor:
    """Reflect ``coord`` into [low2 / 2, high2 / 2] (grid_sample's reflect_coordinates)."""
    if low2 == high2:
        return torch.zeros_like(coord)
    lo = low2 / 2
    span = (high2 - low2) / 2
    c = (coord - lo).abs()
    flips = torch.floor(c / span)
    extra = c - flips * span
    even = torch.remainder(flips, 2) == 0
    return torch.where(even, extra + lo, span - extra + lo)


def source_coordinates(coord: torch.Tensor, size: int, padding_mode: str, align_corners: bool) -> torch.Tensor:
    """Pixel coordinate of a normalized sample location after the padding mode's remapping."""
    p = unnormalize(coord, size, align_corners)
    if padding_mode == "border":
        p = p.clamp(0, size - 1)
    elif padding_mode == "reflection":
        p = reflect(p, 0, 2 * (size - 1)) if align_corners else reflect(p, -1, 2 * size - 1)
        p = p.clamp(0, size - 1)
    return p


def hull_tolerance(size: int, dtype: torch.dtype) -> float:
    """Slack of the hull test in pixels: coordinates computed in ``dtype`` carry rounding
    errors of about ``eps * size`` pixels, so a border pixel centre that maps onto itself may
    land a few ulps outside. Shared with the kernels (``pixel_hull_tolerance`` in tps.h)."""
    return 8.0 * torch.finfo(dtype).eps * max(size, 1)


def validity_mask(grid: torch.Tensor, height: int, width: int, align_corners: bool) -> torch.Tensor:
    """True where the sample location lies in the input's pixel-centre hull
    ``[0, W - 1] x [0, H - 1]`` (up to :func:`hull_tolerance`)."""
    px = unnormalize(grid[..., 0], width, align_corners)
    py = unnormalize(grid[..., 1], height, align_corners)
    tx, ty = hull_tolerance(width, grid.dtype), hull_tolerance(height, grid.dtype)
    return (px >= -tx) & (px <= width - 1 + tx) & (py >= -ty) & (py <= height - 1 + ty)


def _gather(image_flat: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, width: int) -> torch.Tensor:
    """image_flat (B, C, H*W); ix, iy (B, P) long -> (B, C, P)."""
    idx = (iy * width + ix).unsqueeze(1).expand(-1, image_flat.shape[1], -1)
    return torch.gather(image_flat, 2, idx)


def sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool, fill: float) -> torch.Tensor:
    """Sample ``image (B, C, H, W)`` at normalized ``grid (B, P, 2)`` -> (B, C, P).

    Taps outside the image read ``fill`` (for ``padding_mode="zeros"``; border and
    reflection never read outside). Float images are computed in ``grid.dtype``.
    """
    B, C, H, W = image.shape
    px = source_coordinates(grid[..., 0], W, padding_mode, align_corners)
    py = source_coordinates(grid[..., 1], H, padding_mode, align_corners)
    flat = image.reshape(B, C, H * W)
    if mode == "nearest":
        ix = torch.round(px).long()  # round half to even, like grid_sample
        iy = torch.round(py).long()
        inside = (ix >= 0) & (ix <= W - 1) & (iy >= 0) & (iy <= H - 1)
        vals = _gather(flat, ix.clamp(0, W - 1), iy.clamp(0, H - 1), W)
        return torch.where(inside.unsqueeze(1), vals, torch.full_like(vals, fill))
    x0, y0 = torch.floor(px), torch.floor(py)
    wx1, wy1 = px - x0, py - y0
    wx0, wy0 = 1 - wx1, 1 - wy1
    x0l, y0l = x0.long(), y0.long()
    flat = flat.to(grid.dtype) - fill
    out = 0
    for dx, dy, w in ((0, 0, wx0 * wy0), (1, 0, wx1 * wy0), (0, 1, wx0 * wy1), (1, 1, wx1 * wy1)):
        ix, iy = x0l + dx, y0l + dy
        inside = (ix >= 0) & (ix <= W - 1) & (iy >= 0) & (iy <= H - 1)
        vals = _gather(flat, ix.clamp(0, W - 1), iy.clamp(0, H - 1), W)
        out = out + torch.where(inside, w, torch.zeros_like(w)).unsqueeze(1) * vals
    return out + fill


def tps_warp(
    image: torch.Tensor,
    src: torch.Tensor,
    params: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
    fill: float = 0.0,
    size: Optional[Sequence[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``image (B, C, H, W)`` through the TPS map.

    Returns ``(out (B, C, Ho, Wo), valid (B, 1, Ho, Wo) bool)``; ``(Ho, Wo) = size or (H, W)``.
    ``out`` keeps the dtype and memory format of ``image``.
    """
    check_tps_warp(image, src, params, mode, padding_mode, fill, size)
    B, C, H, W = image.shape
    Ho, Wo = size if size is not None else (H, W)
    ct = compute_dtype(image, src, params) if image.is_floating_point() else compute_dtype(src, params)
    q = output_grid(B, Ho, Wo, align_corners, ct, image.device)
    grid = tps_evaluate(q, src.to(ct), params.to(ct))
    valid = validity_mask(grid, H, W, align_corners).reshape(B, 1, Ho, Wo)
    out = sample(image, grid, mode, padding_mode, align_corners, fill).reshape(B, C, Ho, Wo).to(image.dtype)
    if image.dim() == 4 and image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out, valid
