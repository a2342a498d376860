"""Benchmark masked_kl_div: fused kernels vs the plain PyTorch composition.

Providers: ``pytorch`` (log_softmax, product, sum, mask: what people write by hand),
``reference`` (tpswarp.reference), ``cpp`` (compiled kernels), ``triton`` (GPU only).
Modes: forward, backward (given the forward graph), full (forward + backward).

    python benchmarks/bench_masked_kl_div.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import tpswarp  # noqa: E402
from _common import append_rows, plot_rows, print_table, side_by_side_rows  # noqa: E402


def pytorch_masked_kl(student, teacher, mask):
    log_q = torch.log_softmax(student.float(), dim=1)
    kl = (torch.xlogy(teacher, teacher) - teacher * log_q).sum(1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def providers(device: str):
    out = {
        "pytorch": pytorch_masked_kl,
        "reference": lambda s, t, m: tpswarp.reference.masked_kl_div(s, t, m),
    }
    ext = tpswarp.backends()["extension"]
    if ext["built"] and (device == "cpu" or ext["cuda"]):
        out["cpp"] = ("cpp", tpswarp.masked_kl_div)
    if device.startswith("cuda") and tpswarp.backends()["triton"]:
        out["triton"] = ("triton", tpswarp.masked_kl_div)
    return out


def run(shapes, device: str, dtype: torch.dtype, repeats: int):
    """Rows of (shape, provider, mode): all providers of a shape and mode timed side by side, round
    by round (_common.side_by_side_rows)."""
    rows = []
    for B, C, H, W in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        student = torch.randn(B, C, H, W, generator=g).to(device, dtype)
        teacher = torch.randn(B, C, H, W, generator=g).softmax(1).to(device, dtype)
        mask = (torch.rand(B, H, W, generator=g) > 0.1).to(device)
        calls = {}  # provider -> mode -> callable
        for name, prov in providers(device).items():
            backend, fn = prov if isinstance(prov, tuple) else (None, prov)
            s = student.clone().requires_grad_()
            with tpswarp.use_backend(backend):
                loss = fn(s, teacher, mask)  # the graph the backward mode differentiates

            def forward(backend=backend, fn=fn, s=s):
                with tpswarp.use_backend(backend), torch.no_grad():
                    return fn(s, teacher, mask)

            def backward(backend=backend, s=s, loss=loss):
                with tpswarp.use_backend(backend):
                    torch.autograd.grad(loss, s, retain_graph=True)

            def full(backend=backend, fn=fn, s=s):
                with tpswarp.use_backend(backend):
                    fn(s, teacher, mask).backward()
                s.grad = None

            calls[name] = {"forward": forward, "backward": backward, "full": full}
        shape = f"{B}x{C}x{H}x{W}"
        rows += side_by_side_rows("masked_kl_div", shape, str(dtype).split(".")[-1], calls, device, repeats)
        del calls
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    shapes = [(2, 19, 64, 64)] if args.quick else [(8, 19, 224, 224), (8, 19, 448, 448)]
    if args.device.startswith("cuda") and not args.quick:
        shapes.append((8, 19, 768, 768))
    repeats = args.repeats or (3 if args.quick else 7)
    rows = run(shapes, args.device, getattr(torch, args.dtype), repeats)
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "pytorch"}
    for r in rows:
        b = base[(r["shape"], r["mode"])]
        r["speedup_vs_pytorch"] = b["ms"] / r["ms"]
        r["peak_vs_pytorch"] = r["peak_MiB"] / b["peak_MiB"] if b["peak_MiB"] else float("nan")
    print_table(rows, ["shape", "provider", "mode", "ms", "ms_q20", "ms_q80", "peak_MiB", "speedup_vs_pytorch",
                       "peak_vs_pytorch"], title=f"masked_kl_div on {args.device}, {args.dtype}")
    if not args.no_save:
        name = f"masked_kl_div_{args.device.split(':')[0]}"
        print("rows appended to", append_rows(name, rows, args.device))
        plot = plot_rows(name, rows, f"masked_kl_div {args.dtype}", args.device)
        if plot:
            print("plot:", plot)


if __name__ == "__main__":
    main()
