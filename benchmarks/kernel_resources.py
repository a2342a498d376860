"""Registers, spills and shared memory of every GPU kernel, read from the compiled code: no GPU needed.

- Triton: each kernel is compiled ahead of time for the target (default ``sm_90``) exactly as the
  ops would launch it at the shapes of ``gpu_bandwidth.py`` (8 x 19 x 768 x 768 logits, 8 x 3 x 768 x
  768 images; the launches are intercepted, nothing runs), then read back with ``cuobjdump``.
- CUDA: ``cuobjdump -res-usage`` of the extension's ``sm_XX`` code.

Columns: registers per thread and the resident warps per SM they allow; the per-thread stack frame
(local memory: register spills and arrays indexed at run time, e.g. per-control-point accumulators);
shared memory; for Triton also the ``bar.sync`` and ``shfl.sync`` instructions in the PTX (static
counts: cross-thread reductions inside a kernel show up there); the SASS instructions of each kernel
(``cuobjdump -sass``: the size of the code, each instruction counted once, not what runs: a loop the
compiler unrolls counts several times, so a kernel can grow while each iteration shrinks; compare loop
bodies in the SASS for that). That is what a static view can show; speed is measured on a GPU with
``gpu_bandwidth.py``.

    python benchmarks/kernel_resources.py [--arch 90] [--quick] [--out benchmarks/results/kernel_resources_sm90.md]

``--quick`` compiles at small shapes (the same kernels; block sizes that depend on the shape may differ).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REGISTERS_PER_SM = 65536  # every NVIDIA GPU since sm_50
MAX_THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048, 100: 2048}


def cuobjdump_path() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    raise SystemExit("kernel_resources: no cuobjdump (install the CUDA toolkit or Triton's NVIDIA backend)")


_RES = re.compile(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def res_usage(binary: str, arch: int = 0) -> List[dict]:
    """``cuobjdump -res-usage`` of a cubin or of a shared library (only its ``sm_<arch>`` code)."""
    cmd = [cuobjdump_path(), "-res-usage"]
    if arch:
        cmd += ["-arch", f"sm_{arch}"]
    text = subprocess.run(cmd + [binary], check=True, capture_output=True, text=True).stdout
    return [{"function": m[1], "registers": int(m[2]), "stack": int(m[3]), "shared": int(m[4]), "local": int(m[5])}
            for m in _RES.finditer(text)]


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s", re.M)


def sass_instructions(binary: str, arch: int = 0) -> Dict[str, int]:
    """SASS instructions per function (``cuobjdump -sass``): the code's size, each instruction once (not
    a dynamic count: unrolled loops count several times)."""
    cmd = [cuobjdump_path(), "-sass"]
    if arch:
        cmd += ["-arch", f"sm_{arch}"]
    text = subprocess.run(cmd + [binary], check=True, capture_output=True, text=True).stdout
    starts = [(m.start(), m.group(1)) for m in _SASS_FUNCTION.finditer(text)] + [(len(text), "")]
    return {name: len(_SASS_INSTRUCTION.findall(text, begin, end))
            for (begin, name), (end, _) in zip(starts, starts[1:])}


def demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def occupancy_warps(registers: int, threads: int, arch: int) -> int:
    """Resident warps per SM that the register count allows (allocation in units of 256 per warp)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_per_block = max(1, threads // 32)
    blocks = REGISTERS_PER_SM // (per_warp * warps_per_block)
    return min(blocks * warps_per_block, MAX_THREADS_PER_SM.get(arch, 2048) // 32)


# --------------------------------------------------------------------------------------------
# Triton: compile the launches of the ops for a GPU target without a GPU
# --------------------------------------------------------------------------------------------

def triton_launches(arch: int, quick: bool) -> List[dict]:
    """Compile (never run) every Triton kernel the ops launch at the benchmark shapes."""
    import tpswarp  # noqa: F401  (registers the Triton kernels)
    from tpswarp import _backend
    from tpswarp.triton._compile_only import compile_only

    compiled: List[dict] = []
    context = {"case": ""}

    def on_compiled(name, kernel):
        compiled.append({"case": context["case"], "kernel": name, "compiled": kernel})

    with compile_only(arch, on_compiled), torch.no_grad():
        for case, call in _triton_cases(_backend._python_kernels, quick):
            context["case"] = case
            call()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in compiled:
            kernel = item["compiled"]
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = res_usage(path)[0]
            usage["instructions"] = sum(sass_instructions(path).values())
            warps = kernel.metadata.num_warps
            ptx = kernel.asm["ptx"]
            usage.update(case=item["case"], kernel=item["kernel"], warps=warps,
                         shared=max(usage["shared"], kernel.metadata.shared),
                         barriers=ptx.count("bar.sync") + ptx.count("barrier.sync"), shuffles=ptx.count("shfl.sync"),
                         resident_warps=occupancy_warps(usage["registers"], warps * 32, arch))
            rows.append(usage)
    return rows


def _triton_cases(kernels: Dict, quick: bool):
    """(name, call) pairs: the Triton forward and backward of each op at gpu_bandwidth.py's shapes."""
    from tpswarp.testing import random_tps

    g = torch.Generator().manual_seed(0)
    B, C, H, W = (2, 19, 32, 48) if quick else (8, 19, 768, 768)
    Bi = 2 if quick else 8
    s = torch.randn(B, C, H, W, generator=g)
    t = torch.randn(B, C, H, W, generator=g)
    mask = torch.rand(B, H, W, generator=g) > 0.1
    image = torch.rand(Bi, 3, H, W, generator=g)
    src, _, params = random_tps(B, generator=g, dtype=torch.float32)
    jitter = [torch.rand(Bi, generator=g) + 0.5 for _ in range(4)]
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(Bi)])
    grad = torch.ones(())

    from tpswarp.triton import masked_kl_div as tmk, warped_kl_div as twk

    mk_fwd, mk_bwd = kernels[("masked_kl_div", "triton")]
    wk_fwd, wk_bwd = kernels[("warped_kl_div", "triton")]
    pj_fwd, pj_bwd = kernels[("photometric_jitter", "triton")]
    tw_fwd, tw_bwd = kernels[("tps_warp", "triton")]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        sd, td, img = s.to(dtype), t.to(dtype), image.to(dtype)
        yield f"masked_kl_div forward {name}", lambda: mk_fwd(sd, td, mask, True, "mean", None)
        yield (f"masked_kl_div backward {name}",
               lambda: mk_bwd(grad, sd, td, mask, True, "mean", None, [True, False]))
        # one-way consistency: the forward keeps the statistics, the backward reads them
        stats_m = torch.zeros(B, 4, H * W)
        stats_w = torch.zeros(B, 5, H * W)
        yield f"masked_kl_div forward keeping statistics {name}", lambda: tmk.masked_kl_div_with_stats(
            sd, td, mask, True, "mean")
        yield f"masked_kl_div backward from statistics {name}", lambda: tmk.masked_kl_div_backward_stats(
            grad, sd, td, mask, stats_m, True, "mean")
        yield f"warped_kl_div forward {name}", lambda: wk_fwd(sd, td, src, params, True, False, "mean", None)
        yield f"warped_kl_div forward keeping statistics {name}", lambda: twk.warped_kl_div_with_stats(
            sd, td, src, params, True, False, "mean")
        yield f"warped_kl_div backward from statistics {name}", lambda: twk.warped_kl_div_backward_stats(
            grad, sd, td, src, params, stats_w, True, False, "mean")
        yield (f"warped_kl_div backward {name}",
               lambda: wk_bwd(grad, sd, td, src, params, True, False, "mean", None, [True, False, False, True]))
        yield f"photometric_jitter forward {name}", lambda: pj_fwd(img, *jitter, perm, False)
        yield (f"photometric_jitter backward {name}",
               lambda: pj_bwd(torch.ones_like(img), img, *jitter, perm, False, [True, False, False, False, False]))
        yield (f"tps_warp forward {name}",
               lambda: tw_fwd(img, src[:Bi], params[:Bi], "bilinear", "zeros", False, 0.0, None))
        yield (f"tps_warp backward {name}",
               lambda: tw_bwd(torch.ones_like(img), img, src[:Bi], params[:Bi], "bilinear", "zeros", False, 0.0,
                              None, [True, False, True]))
    # size=: logits at half resolution, the loss at full (the trainer's low-resolution mode)
    size = (H, W)
    sh, th = s[:, :, ::2, ::2].contiguous(), t[:, :, ::2, ::2].contiguous()
    g_map = torch.ones(B, H, W)
    yield "masked_kl_div size= forward float32", lambda: mk_fwd(sh, th, None, True, "none", size)
    yield "masked_kl_div size= backward float32", lambda: mk_bwd(g_map, sh, th, None, True, "none", size, [True, False])
    yield "warped_kl_div size= forward float32", lambda: wk_fwd(sh, th, src, params, True, False, "none", size)
    yield ("warped_kl_div size= backward float32",
           lambda: wk_bwd(g_map, sh, th, src, params, True, False, "none", size, [True, False, False, False]))


# --------------------------------------------------------------------------------------------
# CUDA: the extension's kernels
# --------------------------------------------------------------------------------------------

def cuda_kernels(arch: int) -> List[dict]:
    """Resources of the kernels in the installed extension (none when it was built without CUDA)."""
    spec = importlib.util.find_spec("tpswarp._C")
    if spec is None or not spec.origin:
        return []
    rows = res_usage(spec.origin, arch)
    counts = sass_instructions(spec.origin, arch)
    names = demangle([r["function"] for r in rows])
    for r, name in zip(rows, names):
        r["kernel"] = _short_kernel_name(name)
        r["instructions"] = counts.get(r["function"], 0)
    return rows


def _short_kernel_name(name: str) -> str:
    """``void tpswarp::(anonymous namespace)::kl_forward_kernel<float, float, 0>(...)`` ->
    ``kl_forward_kernel<float, float, 0>``."""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "").replace("tpswarp::", "")
    depth = 0
    for i, ch in enumerate(name):  # cut at the parameter list, after any template arguments
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def markdown(triton_rows: List[dict], cuda_rows: List[dict], arch: int) -> str:
    lines = [f"# GPU kernel resources, sm_{arch} (static: compiled here, not run)", ""]
    if triton_rows:
        lines += ["## Triton (launches of the ops at gpu_bandwidth.py's shapes)", "",
                  "| case | kernel | warps | registers | stack bytes | shared bytes | barriers | shuffles | "
                  "resident warps/SM | SASS instructions |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        seen = set()
        for r in triton_rows:
            key = (r["case"], r["kernel"], r["registers"], r["stack"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"| {r['case']} | `{r['kernel']}` | {r['warps']} | {r['registers']} | {r['stack']} | "
                         f"{r['shared']} | {r['barriers']} | {r['shuffles']} | {r['resident_warps']} | "
                         f"{r['instructions']} |")
        lines.append("")
    if cuda_rows:
        lines += ["## CUDA (the extension)", "",
                  "| kernel | registers | stack bytes | static shared bytes | resident warps/SM (256 threads) | "
                  "SASS instructions |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(cuda_rows, key=lambda r: r["kernel"]):
            lines.append(f"| `{r['kernel']}` | {r['registers']} | {r['stack']} | {r['shared']} | "
                         f"{occupancy_warps(r['registers'], 256, arch)} | {r['instructions']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--quick", action="store_true", help="small shapes for the Triton launches")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    triton_rows = [] if args.no_triton else triton_launches(args.arch, args.quick)
    cuda_rows = [] if args.no_cuda else cuda_kernels(args.arch)
    text = markdown(triton_rows, cuda_rows, args.arch)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
