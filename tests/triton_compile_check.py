"""Compile the Triton kernels for an NVIDIA GPU target without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels in NumPy and accepts code that the real
compiler rejects; this script compiles every kernel launch of the tpswarp Triton backend for
sm_90 (or ``--arch``) down to a cubin (Triton ships ptxas) through a fake driver, without
running anything. Used by tests/test_triton.py (a few variants) and standalone:

    python tests/triton_compile_check.py [--all] [--arch 90]

Exit status 0 when everything compiled, 1 when a kernel failed to compile (or a kernel evaluating the
TPS in float32 lacks the hardware log2, ``lg2.approx``), 2 when the fake driver could not be set up
with this Triton version (the caller then skips).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback


TPS_KERNELS = ("_tps_warp_fwd_kernel", "_tps_warp_bwd_kernel", "_warped_kl_fwd_kernel", "_warped_kl_bwd_kernel")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="every dtype and option combination (minutes)")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be created for the compiler")
        return 2
    import torch

    compiled, failures = [], []
    hardware_log2 = {}  # TPS kernel -> whether an instance uses lg2.approx (tpswarp/triton/_utils.py)

    def on_compiled(name, kernel):
        (compiled if kernel.asm["cubin"] else failures).append(name)  # compiled all the way down
        if name in TPS_KERNELS:
            hardware_log2[name] = hardware_log2.get(name, False) or "lg2.approx" in kernel.asm["ptx"]

    def on_failed(name, exc):
        failures.append(name)
        traceback.print_exception(exc)

    try:
        from tpswarp.triton._compile_only import compile_only

        context = compile_only(args.arch, on_compiled, on_failed)
        context.__enter__()  # for the rest of this process
    except Exception:
        traceback.print_exc()
        return 2

    import tpswarp  # noqa: F401
    from tpswarp.testing import random_tps
    from tpswarp.triton import masked_kl_div as K
    from tpswarp.triton import photometric_jitter as PJ
    from tpswarp.triton import tps_warp as TW
    from tpswarp.triton import warped_kl_div as WK

    def attempt(name, fn):
        # Kernels are compiled, not run: host code after a launch may then fail on uninitialized
        # buffers, which is not what this checks (compile failures are recorded by the launcher).
        try:
            fn()
        except Exception:
            pass

    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64] if args.all else [torch.float32,
                                                                                             torch.bfloat16]
    for dt in dtypes:
        s = torch.randn(2, 19, 8, 8, dtype=dt)
        t = torch.randn(2, 19, 8, 8, dtype=dt)
        mask = torch.rand(2, 8, 8) > 0.5
        g0 = torch.tensor(1.0)
        blocks = [64, 8] if args.all else [64]
        options = itertools.product([False, True], ["mean", "none"], [None, mask], blocks) if args.all else \
            [(True, "mean", mask, 64), (False, "none", None, 64)]
        for logits, red, m, blk in options:
            K.MAX_BLOCK_C = WK.MAX_BLOCK_C = blk
            gl = torch.ones(2, 8, 8) if red == "none" else g0
            attempt(f"masked_kl fwd {dt}", lambda: K.masked_kl_div_forward(s, t, m, logits, red))
            attempt(f"masked_kl bwd {dt}", lambda: K.masked_kl_div_backward(gl, s, t, m, logits, red, None, [True, True]))
            stats = torch.zeros(2, 4, 64, dtype=torch.float64 if dt == torch.float64 else torch.float32)
            attempt(f"masked_kl fwd stats {dt}", lambda: K.masked_kl_div_with_stats(s, t, m, logits, red))
            attempt(f"masked_kl bwd stats {dt}",
                    lambda: K.masked_kl_div_backward_stats(gl, s, t, m, stats, logits, red))
        K.MAX_BLOCK_C = WK.MAX_BLOCK_C = 64
        img = torch.rand(2, 3, 8, 8, dtype=dt)
        p = torch.rand(2, dtype=dt)
        perm = torch.stack([torch.randperm(3) for _ in range(2)])
        for pm, cl in (itertools.product([None, perm], [False, True]) if args.all else [(perm, True)]):
            attempt(f"jitter fwd {dt}", lambda: PJ.photometric_jitter_forward(img, p, p, p, p, pm, cl))
            attempt(f"jitter bwd {dt}", lambda: PJ.photometric_jitter_backward(img, img, p, p, p, p, pm, cl, [True] * 5))
        src, _, par = random_tps(2, dtype=dt if dt == torch.float64 else torch.float32)
        modes = itertools.product(["bilinear", "nearest"], ["zeros", "border", "reflection"], [False, True]) \
            if args.all else [("bilinear", "reflection", False), ("nearest", "zeros", True)]
        for mode, pad, align in modes:
            attempt(f"warp fwd {dt} {mode} {pad}", lambda: TW.tps_warp_forward(img, src, par, mode, pad, align))
            attempt(f"warp bwd {dt} {mode} {pad}",
                    lambda: TW.tps_warp_backward(img, img, src, par, mode, pad, align, 0.0, None, [True] * 3))
        for logits, red in (itertools.product([False, True], ["mean", "none"]) if args.all else [(True, "mean")]):
            gl = torch.ones(2, 8, 8) if red == "none" else g0
            attempt(f"warped_kl fwd {dt}", lambda: WK.warped_kl_div_forward(s, t, src, par, logits, False, red))
            attempt(f"warped_kl bwd {dt}",
                    lambda: WK.warped_kl_div_backward(gl, s, t, src, par, logits, False, red, None, [True] * 4))
            wstats = torch.zeros(2, 5, 64, dtype=torch.float64 if dt == torch.float64 else torch.float32)
            attempt(f"warped_kl fwd stats {dt}",
                    lambda: WK.warped_kl_div_with_stats(s, t, src, par, logits, False, red))
            attempt(f"warped_kl bwd stats {dt}",
                    lambda: WK.warped_kl_div_backward_stats(gl, s, t, src, par, wstats, logits, False, red))
        # size=: the statistics kernels (one sweep) and the gathers ((classes x pixels) tiles)
        size = (12, 12)
        g12 = torch.ones(2, *size)
        for logits, red in (itertools.product([False, True], ["mean", "none"]) if args.all else [(True, "none")]):
            gl = g12 if red == "none" else g0
            attempt(f"masked_kl size fwd {dt}", lambda: K.masked_kl_div_forward(s, t, None, logits, red, size))
            attempt(f"masked_kl size bwd {dt}",
                    lambda: K.masked_kl_div_backward(gl, s, t, None, logits, red, size, [True, True]))
            attempt(f"warped_kl size fwd {dt}",
                    lambda: WK.warped_kl_div_forward(s, t, src, par, logits, False, red, size))
            attempt(f"warped_kl size bwd {dt}",
                    lambda: WK.warped_kl_div_backward(gl, s, t, src, par, logits, False, red, size,
                                                      [True, False, False, False]))
    # the deterministic scatter variants
    torch.use_deterministic_algorithms(True)
    try:
        img = torch.rand(2, 3, 8, 8)
        src, _, par = random_tps(2)
        attempt("warp bwd deterministic",
                lambda: TW.tps_warp_backward(img, img, src, par, "bilinear", "zeros", False, 0.0, None, [True] * 3))
        s = torch.randn(2, 19, 8, 8)
        attempt("warped_kl bwd deterministic",
                lambda: WK.warped_kl_div_backward(torch.tensor(1.0), s, s, src, par, True, False, "mean", None, [True] * 4))
    finally:
        torch.use_deterministic_algorithms(False)
    # the float32 TPS evaluation is the hardware log2 (tps_log2_r2), not tl.log's polynomial
    failures += [f"{name}: no lg2.approx" for name in TPS_KERNELS if not hardware_log2.get(name, False)]
    print(f"compiled {len(compiled)} launches for sm_{args.arch}; kernels: {sorted(set(compiled))}; "
          f"failures: {len(failures)} {failures if failures else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
