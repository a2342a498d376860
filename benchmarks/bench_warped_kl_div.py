"""Benchmark warped_kl_div: the fused consistency loss vs warping then taking the masked KL.

Providers: ``pytorch`` (TPS grid + grid_sample + log_softmax composition), ``unfused``
(tpswarp.tps_warp then tpswarp.masked_kl_div, both compiled), ``reference``, ``cpp`` (fused).
The gradient flows to the student only (one-way consistency).

    python benchmarks/bench_warped_kl_div.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import tpswarp  # noqa: E402
from _common import append_rows, plot_rows, print_table, side_by_side_rows  # noqa: E402
from tpswarp.testing import random_tps  # noqa: E402


def pytorch_warped_kl(student, teacher, src, params):
    B, C, H, W = student.shape
    ys = (2 * torch.arange(H, device=student.device) + 1) / H - 1
    xs = (2 * torch.arange(W, device=student.device) + 1) / W - 1
    q = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, H * W, 2).expand(B, -1, -1)
    grid = tpswarp.reference.tps_transform(q, src, params).view(B, H, W, 2)
    warped = F.grid_sample(teacher, grid, align_corners=False)
    valid = F.grid_sample(torch.ones_like(teacher[:, :1]), grid, align_corners=False) >= 1 - 1e-5
    log_q = torch.log_softmax(student, 1)
    kl = (torch.xlogy(warped, warped) - warped * log_q).sum(1, keepdim=True)
    m = valid.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def unfused(student, teacher, src, params):
    warped, valid = tpswarp.tps_warp(teacher, src, params)
    return tpswarp.masked_kl_div(student, warped, valid)


def providers(device: str):
    out = {"pytorch": (None, pytorch_warped_kl), "reference": ("reference", tpswarp.warped_kl_div)}
    ext = tpswarp.backends()["extension"]
    if ext["built"] and (device == "cpu" or ext["cuda"]):
        out["unfused"] = ("cpp", unfused)
        out["cpp"] = ("cpp", tpswarp.warped_kl_div)
    if device.startswith("cuda") and tpswarp.backends()["triton"]:
        out["triton"] = ("triton", tpswarp.warped_kl_div)
    return out


def run(shapes, device: str, dtype: torch.dtype, repeats: int, only=None):
    """Rows of (shape, provider, mode): all providers of a shape and mode timed side by side, round
    by round (_common.side_by_side_rows)."""
    rows = []
    for B, C, H, W in shapes:
        g = torch.Generator().manual_seed(0)
        student = torch.randn(B, C, H, W, generator=g).to(device, dtype)
        teacher = torch.randn(B, C, H, W, generator=g).softmax(1).to(device, dtype)
        src, _, params = random_tps(B, generator=g, device=device)
        calls = {}  # provider -> mode -> callable
        for name, (backend, fn) in providers(device).items():
            if only and name not in only:
                continue
            s = student.clone().requires_grad_()
            with tpswarp.use_backend(backend):
                loss = fn(s, teacher, src, params)  # the graph the backward mode differentiates

            def forward(backend=backend, fn=fn, s=s):
                with tpswarp.use_backend(backend), torch.no_grad():
                    return fn(s, teacher, src, params)

            def backward(backend=backend, s=s, loss=loss):
                with tpswarp.use_backend(backend):
                    torch.autograd.grad(loss, s, retain_graph=True)

            def full(backend=backend, fn=fn, s=s):
                with tpswarp.use_backend(backend):
                    fn(s, teacher, src, params).backward()
                s.grad = None

            calls[name] = {"forward": forward, "backward": backward, "full": full}
        shape = f"{B}x{C}x{H}x{W}"
        rows += side_by_side_rows("warped_kl_div", shape, str(dtype).split(".")[-1], calls, device, repeats)
        del calls
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    shapes = [(2, 19, 64, 64)] if args.quick else [(8, 19, 224, 224), (8, 19, 448, 448)]
    if args.device.startswith("cuda") and not args.quick:
        shapes.append((8, 19, 768, 768))
    rows = run(shapes, args.device, getattr(torch, args.dtype), args.repeats or (3 if args.quick else 5), args.providers)
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "unfused"}
    for r in rows:
        b = base.get((r["shape"], r["mode"]))
        r["speedup_vs_unfused"] = b["ms"] / r["ms"] if b else float("nan")
        r["peak_vs_unfused"] = r["peak_MiB"] / b["peak_MiB"] if b and b["peak_MiB"] else float("nan")
    print_table(rows, ["shape", "provider", "mode", "ms", "ms_q20", "ms_q80", "peak_MiB", "speedup_vs_unfused",
                       "peak_vs_unfused"], title=f"warped_kl_div on {args.device}, {args.dtype}")
    if not args.no_save:
        name = f"warped_kl_div_{args.device.split(':')[0]}"
        print("rows appended to", append_rows(name, rows, args.device))
        plot = plot_rows(name, rows, f"warped_kl_div {args.dtype}", args.device)
        if plot:
            print("plot:", plot)


if __name__ == "__main__":
    main()
