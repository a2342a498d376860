"""Small helpers shared by the TPS reference ops."""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tps_kernel_from_sq_dist(r2: torch.Tensor) -> torch.Tensor:
    """phi(r) = r^2 log r written in r^2: 0.5 * r2 * log(r2), with phi(0) = 0 and a finite gradient."""
    positive = r2 > 0
    safe = torch.where(positive, r2, torch.ones_like(r2))
    return torch.where(positive, 0.5 * r2 * torch.log(safe), torch.zeros_like(r2))


def tps_evaluate(points: torch.Tensor, src: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """f(q) for points (B, m, 2), src (B, n, 2), params (B, n + 3, 2), all of one dtype."""
    device_type = points.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # The Python kernels run inside the caller's autocast region, which would compute the
        # matmul below in bfloat16/float16; keep the computation in the dtype it was given.
        with torch.autocast(device_type, enabled=False):
            return tps_evaluate(points, src, params)
    n = src.shape[1]
    r2 = ((points[:, :, None, :] - src[:, None, :, :]) ** 2).sum(-1)  # (B, m, n)
    radial = tps_kernel_from_sq_dist(r2) @ params[:, :n]
    affine = params[:, n : n + 1] + points[..., :1] * params[:, n + 1 : n + 2] + points[..., 1:] * params[:, n + 2 :]
    return radial + affine
