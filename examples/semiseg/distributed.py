"""Multi-process training helpers: ``torchrun`` initialisation (NCCL on GPUs, gloo on CPU)
and synchronized batch normalization that also works on CPU.

``torch.nn.SyncBatchNorm`` only runs on accelerators; :class:`CPUSyncBatchNorm` computes
the batch mean and variance over all processes with two differentiable all-reduces, so CPU
runs under gloo train like a single process on the concatenated batch (up to the float
summation order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``) or
    return the single-process info (also when a group is already initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _sync_active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient is the all-reduced sum of gradients."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_autograd(t: torch.Tensor, group=None) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over all processes of
    ``process_group`` (any backend, any device); single-process or eval: plain BN."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _sync_active(self.process_group)):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum(dim=(0, 2, 3)), xf.new_tensor([xf.numel() / C])])
        total = all_reduce_sum_autograd(local, self.process_group)
        n = total[C]
        mean = total[:C] / n
        d = xf - mean.view(1, C, 1, 1)
        var = all_reduce_sum_autograd((d * d).sum(dim=(0, 2, 3)), self.process_group) / n
        y = d * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm`` on accelerators, :class:`CPUSyncBatchNorm` on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.process_group = process_group
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _sync_active(None):
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if _sync_active(None):
        dist.barrier()
