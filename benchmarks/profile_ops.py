"""One forward and one backward of every streaming op at gpu_bandwidth.py's shapes, for a profiler.

Run under Nsight Compute on a GPU, e.g. (``benchmarks/gpu_check.sh`` with ``NCU=1`` does this)::

    ncu --clock-control none --kernel-name-base demangled -k regex:tpswarp --csv --page details \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/profile_ops.py --backend cpp --warmup 0 > ncu.csv

``--warmup K`` runs each op K times more before the call in an NVTX range named after the op (for
timing profilers; ncu replays each kernel with flushed caches, so it needs none). float32, 8 x 19 x 768 x 768 logits and
8 x 3 x 768 x 768 images as in ``gpu_bandwidth.py``; ``--quick`` shrinks them (also runs on the CPU,
to check the script).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpswarp  # noqa: E402
from _common import kl_statistics_off  # noqa: E402
from tpswarp.testing import random_tps  # noqa: E402


def cases(device, quick):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, C, H, W = (2, 19, 32, 48) if quick else (8, 19, 768, 768)
    s = torch.randn(B, C, H, W, generator=g).to(device)
    t = torch.randn(B, C, H, W, generator=g).to(device)
    mask = (torch.rand(B, H, W, generator=g) > 0.1).to(device)
    image = torch.rand(B, 3, H, W, generator=g).to(device)
    src, _, params = random_tps(B, generator=g, device=device)
    p = [torch.rand(B, generator=g).to(device) + 0.5 for _ in range(4)]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)]).to(device)

    def masked():
        ss = s.detach().requires_grad_()
        tpswarp.masked_kl_div(ss, t, mask, teacher_is_logits=True).backward()

    def warped(tps_grads):
        def run():
            ss = s.detach().requires_grad_()
            pp = params.detach().requires_grad_(tps_grads)
            tpswarp.warped_kl_div(ss, t, src, pp, teacher_is_logits=True).backward()
        return run

    def jitter():
        xx = image.detach().requires_grad_()
        out = tpswarp.photometric_jitter(xx, *p, perm)
        out.backward(torch.ones_like(out))

    def warp():
        xx = image.detach().requires_grad_()
        pp = params.detach().requires_grad_()
        out, _ = tpswarp.tps_warp(xx, src, pp)
        out.backward(torch.ones_like(out))

    def without_statistics(fn):  # the plain backward (TPSWARP_KL_STATS=0) for comparison
        def run():
            with kl_statistics_off():
                fn()
        return run

    return {"masked_kl_div": masked, "masked_kl_div without statistics": without_statistics(masked),
            "warped_kl_div student grad": warped(False),
            "warped_kl_div student grad without statistics": without_statistics(warped(False)),
            "warped_kl_div student + TPS grads": warped(True), "photometric_jitter": jitter, "tps_warp": warp}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cpp", help="tpswarp backend to profile (cpp or triton)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    with tpswarp.use_backend(args.backend):
        for name, fn in cases(device, args.quick).items():
            for _ in range(args.warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_push(name)
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
            print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main()
