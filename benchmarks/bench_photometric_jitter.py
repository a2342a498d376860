"""Benchmark of tpswarp.photometric_jitter on the CPU: providers reference, kornia, cpp.

    python benchmarks/bench_photometric_jitter.py            # 8 x 3 x 448 x 448 (issue #3)
    python benchmarks/bench_photometric_jitter.py --quick    # small shape, a few seconds

Modes: ``forward`` (no autograd), ``backward`` (the backward pass alone, the forward done
outside the timed region) and ``full`` (forward + backward). The inputs that require grad are
fresh copies for every call, made outside the timed region (since 2026-11-26: before, the copy of
the image, about 8 ms here at 8 x 3 x 448 x 448, was timed with every provider). Gradients are taken w.r.t. the
image and the four per-image parameters for every provider.

Fairness of the kornia comparison:
- kornia's ``ColorJiggle`` draws a random order of its four steps per call unless ``order`` is
  fixed: it is fixed here to (brightness, contrast, saturation, hue), ``p=1`` (no probability
  gate), and the per-image factors are OURS, passed through ``params=`` (brightness factor
  ``1 + b``, contrast ``c``, saturation ``s``, hue ``h`` in turns, as kornia's hue factor is).
  Its channel shuffle is ``RandomChannelShuffle(p=1)`` with our per-image permutations as
  its ``channels`` parameter.
- kornia clamps its input and result to [0, 1]; tpswarp and the reference run with
  ``clamp=True`` so that all three clamp the output.
- kornia's steps are its own primitives (brightness and contrast on RGB, two HSV round trips
  for saturation and hue), so the outputs differ; the work is the same kind: the same
  per-image parameters, one HSV jitter and a channel shuffle per image.
Timings: median (and 20% / 80% quantiles) of repeated runs, all providers in one run and
interleaved round by round (a change of machine load falls on all of them alike), on the
threads torch uses (``--threads``); rows are appended to
``benchmarks/results/photometric_jitter_cpu.csv`` with the machine, torch version and commit.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (PeakMemory, append_rows, device_name, measure_interleaved, plot_rows, print_table,  # noqa: E402
                     time_mode)

import tpswarp  # noqa: E402
from tpswarp.reference import photometric_jitter as reference_jitter  # noqa: E402

PERMS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def make_inputs(B, H, W, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=gen).to(dtype)
    u = torch.rand(4, B, generator=gen)
    brightness = (-0.25 + 0.5 * u[0]).to(dtype)
    saturation = (0.25 + 1.75 * u[1]).to(dtype)
    hue = (-0.1 + 0.2 * u[2]).to(dtype)
    contrast = (0.25 + 1.75 * u[3]).to(dtype)
    perm = PERMS[torch.randint(0, 6, (B,), generator=gen)]
    return image, (brightness, saturation, hue, contrast), perm


def provider_fn(name):
    """fn(image, b, s, h, c, perm) -> output; the same per-image parameters for every provider."""
    if name == "cpp":
        def run(image, b, s, h, c, perm):
            with tpswarp.use_backend("cpp"):
                return tpswarp.photometric_jitter(image, b, s, h, c, perm, clamp=True)
        return run
    if name == "reference":
        def run(image, b, s, h, c, perm):
            return reference_jitter(image, b, s, h, c, perm, clamp=True)
        return run
    if name == "kornia":
        import kornia.augmentation as K

        # Fixed order (brightness, contrast, saturation, hue), every image jittered.
        jiggle = K.ColorJiggle(brightness=(0.75, 1.25), contrast=(0.25, 2.0), saturation=(0.25, 2.0),
                               hue=(-0.1, 0.1), p=1.0, order=(0, 1, 2, 3))
        shuffle = K.RandomChannelShuffle(p=1.0)
        cache = {}

        def run(image, b, s, h, c, perm):
            key = image.shape
            if key not in cache:  # kornia's own parameter dicts, then our factors in them
                with torch.no_grad():
                    jiggle(image.detach())
                    shuffle(image.detach())
                cache[key] = (dict(jiggle._params), dict(shuffle._params))
            jp, sp = cache[key]
            jp = {**jp, "brightness_factor": 1 + b, "contrast_factor": c, "saturation_factor": s,
                  "hue_factor": h}
            sp = {**sp, "channels": perm}
            return shuffle(jiggle(image, params=jp), params=sp)
        return run
    raise ValueError(name)


def leaves(image, params, requires_grad):
    return [t.detach().clone().requires_grad_(requires_grad) for t in (image, *params)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small shape, few repeats")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"), default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--providers", default="reference,kornia,cpp")
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, C, H, W = args.shape or ((2, 3, 64, 64) if args.quick else (8, 3, 448, 448))
    assert C == 3, "photometric_jitter takes RGB images"
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (5 if args.quick else 7)
    providers = args.providers.split(",")
    modes = args.modes.split(",")
    if "cpp" in providers and not tpswarp.backends()["extension"]["built"]:
        print("tpswarp extension not built: skipping provider cpp")
        providers.remove("cpp")

    image, params, perm = make_inputs(B, H, W, dtype)
    grad = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = []
    print(f"photometric_jitter {B}x{C}x{H}x{W} {args.dtype} on {device_name('cpu')}, torch {torch.__version__}")
    fns = {name: provider_fn(name) for name in providers}
    inputs = leaves(image, params, False)  # of the forward mode

    def call(name, mode):
        """One call of provider ``name`` in ``mode``, its time in ms (_common.time_mode)."""
        return time_mode(lambda *a: fns[name](*a, perm), mode, inputs, lambda: leaves(image, params, True), grad)

    for mode in modes:
        # all providers side by side, round by round (see _common.measure_interleaved)
        stats_by = measure_interleaved({name: (lambda name=name: call(name, mode)) for name in providers}, "cpu",
                                       repeats=repeats, warmup=1)
        for name in providers:
            stats = stats_by[name]
            with PeakMemory("cpu") as pm:
                call(name, mode)
            rows.append({"op": "photometric_jitter", "shape": f"{B}x{C}x{H}x{W}", "dtype": args.dtype,
                         "provider": name, "mode": mode, "threads": torch.get_num_threads(),
                         "load_avg_1m": round(os.getloadavg()[0], 2),
                         **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
                         "peak_mb": round(pm.peak / 2**20, 2)})
            print(f"  {name:9s} {mode:8s} {stats['ms']:9.3f} ms  peak {pm.peak / 2**20:8.1f} MiB", flush=True)

    print_table(rows, ["provider", "mode", "ms", "ms_q20", "ms_q80", "peak_mb"], title="results")
    by = {(r["provider"], r["mode"]): r for r in rows}
    if "cpp" in providers:
        print("\nspeed-up of cpp (median time of provider / median time of cpp; peak memory ratio):")
        for other in [p for p in providers if p != "cpp"]:
            for mode in modes:
                o, c = by[(other, mode)], by[("cpp", mode)]
                mem = f"{o['peak_mb'] / c['peak_mb']:.1f}x" if c["peak_mb"] > 0 else "n/a"
                print(f"  vs {other:9s} {mode:8s} {o['ms'] / c['ms']:7.1f}x   memory {mem}")
    if not args.no_csv:
        path = append_rows("photometric_jitter_cpu", rows, "cpu")
        print(f"\nrows appended to {path}")
        plot = plot_rows("photometric_jitter_cpu", rows, f"photometric_jitter {B}x{C}x{H}x{W} {args.dtype}", "cpu")
        if plot:
            print(f"plot: {plot}")


if __name__ == "__main__":
    main()
