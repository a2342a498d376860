"""Issue #4's GPU targets in one run: each streaming op's effective bandwidth as a fraction of
the measured device-to-device copy bandwidth, for the compiled CUDA kernels ("cpp") and the
Triton kernels ("triton"); ``tps_warp`` vs kornia; ``tps_solve`` on 4096 systems; peak memory
of ``warped_kl_div`` forward + backward.

Effective bandwidth counts each input read once and each output written once (what an ideal
streaming kernel moves); the copy reads and writes a 1 GiB buffer. Compare numbers only within
one run on one device.

    python benchmarks/gpu_bandwidth.py [--device cuda] [--quick] [--out DIR] [--name STEM]
                                       [--backends triton] [--streaming-only]

``--quick`` uses small shapes (also runs on CPU tensors under TRITON_INTERPRET=1, to check the
script itself).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpswarp  # noqa: E402
from _common import environment, kl_statistics_off  # noqa: E402
from tpswarp.testing import random_tps  # noqa: E402


def timer(fn, device, repeats, warmup=3):
    """Median milliseconds of ``fn`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, quick):
    n = (1 << 20) if quick else (1 << 28)  # 4 MiB / 1 GiB of float32
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x), device, 5 if quick else 50)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def backends_for(op, device, only=None):
    names = []
    info = tpswarp.backends()
    if device.type == "cuda" and info["extension"].get("cuda"):
        names.append("cpp")
    if info["triton"] and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    if device.type == "cpu" and info["extension"].get("built"):
        names.append("cpp")
    out = []
    for name in names:
        if only and name not in only:
            continue
        with tpswarp.use_backend(name):
            if tpswarp.backends()["selected"][device.type][op] == name:
                out.append(name)
    return out


def bench_streaming(device, dtype, quick, repeats, copy_gbs, rows, only=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, C, H, W = (2, 19, 32, 48) if quick else (8, 19, 768, 768)
    Bi, Ci = (2, 3) if quick else (8, 3)
    s = torch.randn(B, C, H, W, generator=g).to(device, dtype)
    t_logits = torch.randn(B, C, H, W, generator=g).to(device, dtype)
    mask = (torch.rand(B, H, W, generator=g) > 0.1).to(device)
    image = torch.rand(Bi, Ci, H, W, generator=g).to(device, dtype)
    src, _, params = random_tps(B, generator=g, dtype=torch.float32, device=device)
    src_i, params_i = src[:Bi], params[:Bi]
    p = [torch.rand(Bi, generator=g).to(device) + 0.5 for _ in range(4)]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(Bi)]).to(device)

    def add(op, backend, mode, ms, moved):
        gbs = moved / (ms * 1e-3) / 1e9
        rows.append({"op": op, "backend": backend, "mode": mode, "dtype": str(dtype).split(".")[-1],
                     "ms": round(ms, 4), "GB/s": round(gbs, 1), "fraction_of_copy": round(gbs / copy_gbs, 3)})

    cases = {}

    # masked_kl_div: forward reads s, t, mask; backward (student) also writes grad_s. With a gradient wanted
    # for the student, the forward keeps 4 statistics per pixel and the backward reads them
    # (_masked_kl_div_with_stats); "without statistics" rows: TPSWARP_KL_STATS=0, the same build.
    def masked(backend):
        ss = s.detach().requires_grad_()
        loss = tpswarp.masked_kl_div(ss, t_logits, mask, teacher_is_logits=True)
        with kl_statistics_off():
            plain_loss = tpswarp.masked_kl_div(ss, t_logits, mask, teacher_is_logits=True)
        fwd = lambda: tpswarp.masked_kl_div(s, t_logits, mask, teacher_is_logits=True)  # noqa: E731
        fwd_stats = lambda: tpswarp.masked_kl_div(ss, t_logits, mask, teacher_is_logits=True)  # noqa: E731
        bwd = lambda: torch.autograd.grad(loss, ss, retain_graph=True)  # noqa: E731
        bwd_plain = lambda: torch.autograd.grad(plain_loss, ss, retain_graph=True)  # noqa: E731
        return [("forward", fwd, nbytes(s, t_logits, mask)),
                ("forward keeping statistics", fwd_stats, nbytes(s, t_logits, mask)),
                ("backward", bwd, nbytes(s, t_logits, mask, s)),
                ("backward without statistics", bwd_plain, nbytes(s, t_logits, mask, s))]
    cases["masked_kl_div"] = masked

    # warped_kl_div: the teacher is read once (gathers), grads to the student and the TPS params; then the
    # one-way case (the student's gradient alone: statistics kept by the forward, and without them).
    def warped(backend):
        ss = s.detach().requires_grad_()
        pp = params.detach().requires_grad_()
        loss = tpswarp.warped_kl_div(ss, t_logits, src, pp, teacher_is_logits=True)
        student_loss = tpswarp.warped_kl_div(ss, t_logits, src, params, teacher_is_logits=True)
        with kl_statistics_off():
            plain_loss = tpswarp.warped_kl_div(ss, t_logits, src, params, teacher_is_logits=True)
        fwd = lambda: tpswarp.warped_kl_div(s, t_logits, src, params, teacher_is_logits=True)  # noqa: E731
        fwd_stats = lambda: tpswarp.warped_kl_div(ss, t_logits, src, params, teacher_is_logits=True)  # noqa: E731
        bwd = lambda: torch.autograd.grad(loss, (ss, pp), retain_graph=True)  # noqa: E731
        bwd_student = lambda: torch.autograd.grad(student_loss, ss, retain_graph=True)  # noqa: E731
        bwd_plain = lambda: torch.autograd.grad(plain_loss, ss, retain_graph=True)  # noqa: E731
        moved = nbytes(s, t_logits, s)
        return [("forward", fwd, nbytes(s, t_logits)), ("forward keeping statistics", fwd_stats, nbytes(s, t_logits)),
                ("backward", bwd, moved), ("backward, student only", bwd_student, moved),
                ("backward, student only, without statistics", bwd_plain, moved)]
    cases["warped_kl_div"] = warped

    def jitter(backend):
        xx = image.detach().requires_grad_()
        out = tpswarp.photometric_jitter(xx, *p, perm)
        go = torch.randn_like(out)
        fwd = lambda: tpswarp.photometric_jitter(image, *p, perm)  # noqa: E731
        bwd = lambda: torch.autograd.grad(out, xx, go, retain_graph=True)  # noqa: E731
        return [("forward", fwd, 2 * nbytes(image)), ("backward", bwd, 3 * nbytes(image))]
    cases["photometric_jitter"] = jitter

    def warp(backend):
        xx = image.detach().requires_grad_()
        pp = params_i.detach().requires_grad_()
        out, valid = tpswarp.tps_warp(xx, src_i, pp)
        go = torch.randn_like(out)
        fwd = lambda: tpswarp.tps_warp(image, src_i, params_i)  # noqa: E731
        bwd = lambda: torch.autograd.grad(out, (xx, pp), go, retain_graph=True)  # noqa: E731
        rows = [("forward", fwd, nbytes(image, out, valid)), ("backward", bwd, nbytes(go, image, image))]
        if backend == "cpp" and device.type == "cuda":  # the CUDA forward's A/B switch, in the same build

            def fwd_one_row():
                with environment("TPSWARP_CUDA_WARP_ROWS", "1"):
                    return tpswarp.tps_warp(image, src_i, params_i)
            rows.append(("forward, one pixel per thread", fwd_one_row, nbytes(image, out, valid)))
        return rows
    cases["tps_warp"] = warp

    for op, make in cases.items():
        for backend in backends_for(op, device, only):
            with tpswarp.use_backend(backend):
                try:
                    for mode, fn, moved in make(backend):
                        add(op, backend, mode, timer(fn, device, repeats), moved)
                except Exception as e:  # record and go on
                    rows.append({"op": op, "backend": backend, "mode": "error", "error": repr(e)[:300]})


def bench_extras(device, quick, repeats, rows):
    g = torch.Generator(device="cpu").manual_seed(1)
    # tps_solve: 4096 systems of 4 control points (target: < 50 us)
    n_sys = 64 if quick else 4096
    src = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]).expand(n_sys, 4, 2).contiguous()
    dst = src + 0.1 * torch.randn(n_sys, 4, 2, generator=g)
    src, dst = src.to(device), dst.to(device)
    for backend in backends_for("tps_solve", device) or ["reference"]:
        with tpswarp.use_backend(backend):
            for check in (True, False):
                ms = timer(lambda: tpswarp.tps_solve(src, dst, check_singular=check), device, repeats)
                rows.append({"op": "tps_solve", "backend": backend, "mode": f"forward check_singular={check}",
                             "dtype": "float32", "ms": round(ms, 4), "us": round(ms * 1e3, 1), "systems": n_sys})
    # tps_warp vs kornia's TPS warp (target: >= 20x faster)
    B, C, H, W = (2, 3, 32, 48) if quick else (8, 3, 768, 768)
    image = torch.rand(B, C, H, W, generator=g).to(device)
    s4, d4, params = random_tps(B, generator=g, device=device)
    try:
        import kornia.geometry.transform as KT

        kernel_weights, affine_weights = KT.get_tps_transform(s4, d4)  # as benchmarks/bench_tps_warp.py
        k_ms = timer(lambda: KT.warp_image_tps(image, s4, kernel_weights, affine_weights, align_corners=False),
                     device, max(3, repeats // 4))
        rows.append({"op": "tps_warp", "backend": "kornia", "mode": "forward (warp only, weights given)",
                     "dtype": "float32", "ms": round(k_ms, 4)})
    except Exception as e:
        k_ms = None
        rows.append({"op": "tps_warp", "backend": "kornia", "mode": "unavailable", "error": repr(e)[:200]})
    for backend in backends_for("tps_warp", device):
        with tpswarp.use_backend(backend):
            ms = timer(lambda: tpswarp.tps_warp(image, s4, params), device, repeats)
        row = {"op": "tps_warp", "backend": backend, "mode": "forward (warp only, params given)", "dtype": "float32",
               "ms": round(ms, 4)}
        if k_ms:
            row["speedup_vs_kornia"] = round(k_ms / ms, 1)
        rows.append(row)
    # warped_kl_div peak memory, forward + backward (target: inputs + gradient + O(B x H x W))
    if device.type == "cuda":
        B, C, H, W = (2, 19, 32, 48) if quick else (8, 19, 768, 768)
        s = torch.randn(B, C, H, W, generator=g).to(device)
        t = torch.randn(B, C, H, W, generator=g).to(device)
        src, _, params = random_tps(B, generator=g, device=device)
        for backend in backends_for("warped_kl_div", device):
            with tpswarp.use_backend(backend):
                ss = s.detach().requires_grad_()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss = tpswarp.warped_kl_div(ss, t, src, params, teacher_is_logits=True)
                loss.backward()
                torch.cuda.synchronize()
                extra = torch.cuda.max_memory_allocated() - base
                rows.append({"op": "warped_kl_div", "backend": backend, "mode": "peak memory fwd+bwd",
                             "extra_MiB": round(extra / 2**20, 1), "grad_MiB": round(nbytes(s) / 2**20, 1),
                             "BHW_float_MiB": round(B * H * W * 4 / 2**20, 1),
                             "extra_over_grad_in_BHW_floats": round((extra - nbytes(s)) / (B * H * W * 4), 2)})
                del ss, loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=None, help="directory for <name>.csv / <name>.json")
    ap.add_argument("--name", default="bandwidth", help="file name stem of the results (default bandwidth)")
    ap.add_argument("--backends", default=None, help="only these backends of the streaming ops, e.g. triton")
    ap.add_argument("--streaming-only", action="store_true",
                    help="leave out tps_solve, the kornia comparison and the peak-memory rows")
    args = ap.parse_args(argv)
    only = args.backends.split(",") if args.backends else None
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 30)
    copy_gbs = copy_bandwidth(device, args.quick)
    rows = [{"op": "copy", "backend": "torch", "mode": "d2d", "GB/s": round(copy_gbs, 1)}]
    for name in args.dtypes.split(","):
        bench_streaming(device, getattr(torch, name), args.quick, repeats, copy_gbs, rows, only)
    if not args.streaming_only:
        bench_extras(device, args.quick, repeats, rows)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": _triton_version(), "backends": tpswarp.backends(),
            "tpswarp": os.path.dirname(tpswarp.__file__)}
    print(json.dumps(meta, indent=1, default=str))
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        keys = sorted({k for r in rows for k in r})
        with open(os.path.join(args.out, f"{args.name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
