"""Benchmark of tpswarp.tps_solve: many small TPS systems (issue #3 CPU, issue #4 GPU target:
4096 systems of 4 points in under 50 us on an H100).

    python benchmarks/bench_tps_solve.py                  # CPU, B x n in (4096 x 4, 64 x 4, 4096 x 9, 256 x 33)
    python benchmarks/bench_tps_solve.py --quick          # 4096 x 4 and 256 x 9, a few seconds
    python benchmarks/bench_tps_solve.py --device cuda    # GPU (benchmarks/gpu_check.sh passes it)

Providers, all given the same float32 (B, n, 2) ``src``, ``dst`` (jittered grids, well posed):

- ``reference``: ``tpswarp.reference.tps_solve``: builds the system with torch ops and solves it
  with ``torch.linalg.solve`` in float64 (plus the geometric singularity test when checked);
- ``kornia``: ``kornia.geometry.transform.get_tps_transform(src, dst)`` (float32
  ``torch.linalg.solve``; note kornia 0.9 fills its kernel block with src-dst distances, so it is not
  the interpolating spline, but it is the same amount of work); forward and backward, no check;
- ``cpp``: ``tpswarp.tps_solve`` on the compiled backend (one item per loop iteration on the CPU,
  one thread per item on CUDA, double precision, partial pivoting).

``check`` is the ``check_singular`` flag: with True the kernels report singular items (on CUDA
that reads a flag per item on the host: one synchronization), with False singular items are NaN.
Modes: ``forward`` (no autograd), ``backward`` (the backward pass alone, given the forward graph;
gradients w.r.t. ``src`` and ``dst``) and ``full`` (forward + backward).
Timing: each timed sample runs the call in a loop long enough (>= ~20 ms) to be measured, and
reports the time per call in microseconds (median and 20% / 80% quantiles of the samples), on the
threads torch uses (``--threads``). Per shape and mode all providers (and both ``check`` values) are
timed interleaved, round by round in a rotating order (since 2026-11-26; before, one after the other,
which made e.g. ``cpp`` with the check look faster than without it). Peak memory of the tensors
allocated by one call. Rows are appended to ``benchmarks/results/tps_solve_<device>.csv`` with the
machine, torch version and commit, and the run is plotted to ``benchmarks/results/tps_solve_<device>.png``
(a panel per B x n, a bar per provider and check).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (PeakMemory, append_rows, device_name, measure_interleaved, plot_rows, print_table,  # noqa: E402
                     sync)

import tpswarp  # noqa: E402


def make_points(B: int, n: int, device: str, dtype=torch.float32):
    """Jittered sqrt(n) x sqrt(n) grids in [-0.9, 0.9]^2 and their images, (B, n, 2)."""
    g = torch.Generator().manual_seed(0)
    side = int(n ** 0.5 + 0.999)
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)[:n]
    base = ((ij.double() + 0.5) / side * 2 - 1) * 0.9
    src = base + (torch.rand(B, n, 2, generator=g, dtype=torch.float64) - 0.5) * (0.4 / side)
    dst = src + 0.1 * torch.randn(B, n, 2, generator=g, dtype=torch.float64)
    return src.to(device, dtype), dst.to(device, dtype)


def providers(device: str):
    out = {"reference": (None, lambda s, d, check: tpswarp.reference.tps_solve(s, d, check_singular=check))}
    try:
        from kornia.geometry.transform import get_tps_transform

        out["kornia"] = (None, lambda s, d, check: torch.cat(get_tps_transform(s, d), dim=1))
    except ImportError:
        pass
    ext = tpswarp.backends()["extension"]
    if ext["built"] and (device == "cpu" or ext["cuda"]):
        out["cpp"] = ("cpp", lambda s, d, check: tpswarp.tps_solve(s, d, check_singular=check))
    return out


def calibrate(fn, device: str, backend, min_sample_s: float = 0.02) -> int:
    """Warm ``fn`` up and return how many calls make a timed loop of at least ``min_sample_s``."""
    with tpswarp.use_backend(backend):
        for _ in range(3):
            fn()
        sync(device)
        calls = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_sample_s or calls >= 1 << 16:
                return calls
            calls = max(calls * 2, int(calls * min_sample_s / max(elapsed, 1e-9)))


def timed_loop(fn, device: str, backend, calls: int):
    """A callable for measure_interleaved: ``calls`` calls of ``fn`` on ``backend``, returning the
    milliseconds per call."""
    def loop():
        with tpswarp.use_backend(backend):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            return (time.perf_counter() - t0) / calls * 1e3
    return loop


def run(shapes, device: str, samples: int):
    """Rows of every (shape, provider, check, mode); per shape and mode the variants are timed
    interleaved (``_common.measure_interleaved``), each sample a calibrated loop of calls."""
    rows = []
    for B, n in shapes:
        src, dst = make_points(B, n, device)
        variants = {}  # (provider, check) -> (backend, {mode: fn})
        for name, (backend, fn) in providers(device).items():
            for check in ((False,) if name == "kornia" else (True, False)):
                with tpswarp.use_backend(backend):
                    s = src.clone().requires_grad_()
                    d = dst.clone().requires_grad_()
                    params = fn(s, d, check)
                grad = torch.randn_like(params)

                def forward(fn=fn, s=s, d=d, check=check):
                    with torch.no_grad():
                        return fn(s, d, check)

                def backward(params=params, s=s, d=d, grad=grad):
                    torch.autograd.grad(params, (s, d), grad, retain_graph=True)

                def full(fn=fn, s=s, d=d, check=check, grad=grad):
                    torch.autograd.grad(fn(s, d, check), (s, d), grad)

                variants[(name, check)] = (backend, {"forward": forward, "backward": backward, "full": full})
        for mode in ("forward", "backward", "full"):
            loops, calls = {}, {}
            for key, (backend, fns) in variants.items():
                calls[key] = calibrate(fns[mode], device, backend)
                loops[key] = timed_loop(fns[mode], device, backend, calls[key])
            stats = measure_interleaved(loops, device, repeats=samples, warmup=0)
            for (name, check), (backend, fns) in variants.items():
                st = stats[(name, check)]
                with tpswarp.use_backend(backend), PeakMemory(device) as pm:
                    fns[mode]()
                rows.append({"op": "tps_solve", "B": B, "n": n, "dtype": "float32", "provider": name,
                             "check": check, "mode": mode, "us": st["ms"] * 1e3, "us_q20": st["ms_q20"] * 1e3,
                             "us_q80": st["ms_q80"] * 1e3, "calls_per_sample": calls[(name, check)],
                             "samples": samples, "peak_KiB": pm.peak / 2**10,
                             "threads": torch.get_num_threads() if device == "cpu" else ""})
    return rows


def plot_view(rows):
    """The rows as plot_rows draws them: a panel per B x n, a bar per provider and check."""
    return [{"shape": f"{r['B']} x {r['n']}", "provider": r["provider"] + (" (checked)" if r["check"] else ""),
             "mode": r["mode"], "us": r["us"]} for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="two shapes, few samples")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(4096, 4), (256, 9)] if args.quick else [(4096, 4), (64, 4), (4096, 9), (256, 33)]
    samples = args.samples or (5 if args.quick else 9)
    rows = run(shapes, args.device, samples)
    base = {(r["B"], r["n"], r["check"], r["mode"]): r for r in rows if r["provider"] == "reference"}
    for r in rows:
        b = base.get((r["B"], r["n"], r["check"], r["mode"]))
        r["speedup_vs_reference"] = b["us"] / r["us"] if b else float("nan")
    print(f"device: {device_name(args.device)}, torch {torch.__version__}")
    print_table(rows, ["B", "n", "provider", "check", "mode", "us", "us_q20", "us_q80", "peak_KiB",
                       "speedup_vs_reference"], title=f"tps_solve on {args.device} (time per call, microseconds)")
    if args.device.startswith("cuda"):
        target = [r for r in rows if r["provider"] == "cpp" and (r["B"], r["n"], r["mode"]) == (4096, 4, "forward")]
        for r in target:
            print(f"issue #4 target (4096 x 4 forward < 50 us), check_singular={r['check']}: {r['us']:.1f} us "
                  f"({'met' if r['us'] < 50 else 'missed'})")
    if not args.no_save:
        name = f"tps_solve_{args.device.split(':')[0]}"
        print("rows appended to", append_rows(name, rows, args.device))
        plot = plot_rows(name, plot_view(rows), "tps_solve (time per call)", args.device, value="us")
        if plot:
            print("plot:", plot)


if __name__ == "__main__":
    main()
