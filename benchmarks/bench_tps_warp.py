"""Benchmark of tpswarp.tps_warp (with its tps_solve) on the CPU: providers reference, kornia, grid_sample, cpp.

    python benchmarks/bench_tps_warp.py            # 8 x 3 x 448 x 448 (issue #3)
    python benchmarks/bench_tps_warp.py --quick    # small shape, a few seconds

Every provider computes the same warp: the TPS with control points ``src`` (the PhTPS 2x2
grid) mapped to ``dst = src + offsets``, bilinear sampling, zero padding,
``align_corners=False``:

- ``reference``: ``tpswarp.reference.tps_solve`` + ``tpswarp.reference.tps_warp`` (pure PyTorch);
- ``kornia``: ``get_tps_transform(src, dst)`` + ``warp_image_tps(image, src, ...)``, which builds
  the full (B, H, W, 2) grid and calls ``grid_sample``. The same amount of work, but not quite
  the same map: kornia 0.9's ``get_tps_transform`` fills its kernel matrix with the src-dst
  distances instead of src-src, so its spline does not interpolate (``warp_image_tps`` given our
  ``params`` matches ``tpswarp.tps_warp`` to 1e-5);
- ``grid_sample``: ``F.grid_sample`` given a PRECOMPUTED grid (the grid is made once, outside
  the timed region, so this provider does strictly less work: no solve, no TPS evaluation);
- ``cpp``: ``tpswarp.tps_solve`` + ``tpswarp.tps_warp`` on the compiled backend (the solve
  uses whatever backend serves it; the warp never materializes the grid).

Modes: ``forward`` (no autograd), ``backward`` (the backward pass alone, the forward done
outside the timed region) and ``full`` (forward + backward). The inputs that require grad are
fresh copies for every call, made outside the timed region (since 2026-11-26: before, the copy of
the image, about 8 ms here at 8 x 3 x 448 x 448, was timed with every provider). Gradients are taken w.r.t. the
image and ``dst`` (through the solve), and w.r.t. the image and the grid for ``grid_sample``.
Timings: median (and 20% / 80% quantiles) of repeated runs, all providers in one run and
interleaved round by round (a change of machine load falls on all of them alike), on the
threads torch uses (``--threads``); peak memory of tensors allocated during one call; rows are
appended to ``benchmarks/results/tps_warp_cpu.csv`` with the machine, torch version and commit.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (PeakMemory, append_rows, device_name, measure_interleaved, plot_rows, print_table,  # noqa: E402
                     time_mode)

import tpswarp  # noqa: E402
from tpswarp import reference  # noqa: E402
from tpswarp.testing import quadrant_points  # noqa: E402


def make_inputs(B, C, H, W, dtype, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(B, C, H, W, generator=gen).to(dtype)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    src = quadrant_points(B)
    dst = src + 0.2 * torch.randn(B, 4, 2, generator=gen)  # the paper's N(0, 0.2) offsets
    return image, src, dst


def provider_fn(name, src, image_shape):
    """fn(image, dst) -> warped image, with ``src`` fixed (the control points)."""
    if name == "cpp":
        def run(image, dst):
            with tpswarp.use_backend("cpp"):
                params = tpswarp.tps_solve(src, dst)
                return tpswarp.tps_warp(image, src, params)[0]
        return run
    if name == "reference":
        def run(image, dst):
            params = reference.tps_solve(src, dst)
            return reference.tps_warp(image, src, params)[0]
        return run
    if name == "kornia":
        from kornia.geometry.transform import get_tps_transform, warp_image_tps

        def run(image, dst):
            kernel_weights, affine_weights = get_tps_transform(src, dst)
            return warp_image_tps(image, src, kernel_weights, affine_weights, align_corners=False)
        return run
    raise ValueError(name)


def grid_sample_fn(src, dst, image_shape):
    """grid_sample with the grid of the same TPS, computed once (outside the timed region)."""
    B, _, H, W = image_shape
    with torch.no_grad():
        params = reference.tps_solve(src, dst)
        from tpswarp.reference.tps_warp import output_grid
        from tpswarp.reference._tps_math import tps_evaluate

        q = output_grid(B, H, W, False, torch.float32, "cpu")
        grid = tps_evaluate(q, src, params).reshape(B, H, W, 2).contiguous()

    def run(image, grid):
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return run, grid


def peak_mb(fn):
    """Peak MiB of tensors allocated while ``fn`` runs; NaN where the tracker cannot follow (a
    backward computed by autograd inside a dispatch mode, e.g. a Python reference kernel's VJP)."""
    try:
        with PeakMemory("cpu") as pm:
            fn()
        return round(pm.peak / 2**20, 2)
    except RuntimeError:
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small shape, few repeats")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"), default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--providers", default="reference,kornia,grid_sample,cpp")
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, C, H, W = args.shape or ((2, 3, 64, 64) if args.quick else (8, 3, 448, 448))
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (5 if args.quick else 7)
    warmup = 1
    providers = args.providers.split(",")
    modes = args.modes.split(",")
    if "cpp" in providers and tpswarp.backends()["selected"]["cpu"]["tps_warp"] != "cpp":
        print("tpswarp has no compiled CPU kernel for tps_warp: skipping provider cpp")
        providers.remove("cpp")

    image, src, dst = make_inputs(B, C, H, W, dtype, args.channels_last)
    grad = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)).to(dtype)
    layout = "channels_last" if args.channels_last else "contiguous"
    rows = []
    print(f"tps_warp (+ tps_solve) {B}x{C}x{H}x{W} {args.dtype} {layout} on {device_name('cpu')}, "
          f"torch {torch.__version__}")
    runs, seconds = {}, {}  # provider -> fn, its second input (dst, or the grid for grid_sample)
    for name in providers:
        if name == "grid_sample":
            runs[name], seconds[name] = grid_sample_fn(src, dst, image.shape)
        else:
            runs[name], seconds[name] = provider_fn(name, src, image.shape), dst

    def leaves(name, requires_grad):
        return (image.detach().clone().requires_grad_(requires_grad),
                seconds[name].detach().clone().requires_grad_(requires_grad))

    inputs = {name: leaves(name, False) for name in providers}  # of the forward mode

    def call(name, mode):
        """One call of provider ``name`` in ``mode``, its time in ms (_common.time_mode)."""
        return time_mode(runs[name], mode, inputs[name], lambda: leaves(name, True), grad)

    for mode in modes:
        # all providers side by side, round by round (see _common.measure_interleaved)
        stats_by = measure_interleaved({name: (lambda name=name: call(name, mode)) for name in providers}, "cpu",
                                       repeats=repeats, warmup=warmup)
        for name in providers:
            stats = stats_by[name]
            peak = peak_mb(lambda: call(name, mode))
            rows.append({"op": "tps_warp", "shape": f"{B}x{C}x{H}x{W}", "dtype": args.dtype, "layout": layout,
                         "provider": name, "mode": mode, "threads": torch.get_num_threads(),
                         **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
                         "peak_mb": peak})
            print(f"  {name:11s} {mode:8s} {stats['ms']:9.3f} ms  peak {peak:8.1f} MiB", flush=True)

    print_table(rows, ["provider", "mode", "ms", "ms_q20", "ms_q80", "peak_mb"], title="results")
    by = {(r["provider"], r["mode"]): r for r in rows}
    if "cpp" in providers:
        print("\nspeed-up of cpp (median time of provider / median time of cpp; peak memory ratio):")
        for other in [p for p in providers if p != "cpp"]:
            for mode in modes:
                o, c = by[(other, mode)], by[("cpp", mode)]
                mem = f"{o['peak_mb'] / c['peak_mb']:.1f}x" if c["peak_mb"] > 0 else "n/a"
                print(f"  vs {other:11s} {mode:8s} {o['ms'] / c['ms']:7.2f}x   memory {mem}")
        print("targets (issue #3): >= 10x vs kornia; >= 1x vs grid_sample (precomputed grid)")
    if not args.no_csv:
        path = append_rows("tps_warp_cpu", rows, "cpu")
        print(f"\nrows appended to {path}")
        plot = plot_rows("tps_warp_cpu", rows, f"tps_warp (+ tps_solve) {B}x{C}x{H}x{W} {args.dtype} {layout}", "cpu")
        if plot:
            print(f"plot: {plot}")


if __name__ == "__main__":
    main()
