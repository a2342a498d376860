"""Memory of one semi-supervised training iteration (the paper's Algorithm 1, Figure 4, Table 9).

One iteration of Algorithm 1 on SwiftNet-RN18/RN34 (random init), labeled batch ``(xl, yl)``
and unlabeled batch ``xu``, with the tensor memory recorded after each phase (allocated) and
the peak during it:

    phase             Alg. 1 line   what runs
    start             4             model, optimizer, inputs, PhTPS parameters
    sup_forward       7             pl = h(xl)
    sup_loss          8             Ls = CE(yl, pl)
    sup_backward      9             g = grad Ls (activations freed; pl dropped)
    teacher           13            pt = h'(xu)  (no_grad, except two-way)
    perturb           14            xs = T_G(T_P(xu))  (no_grad)
    student_forward   14            ps = h(xs)
    consistency       15-16         v, Lc = KL_masked(T_G(pt), ps, v); perturbed input, teacher freed
    unsup_backward    17            g += grad Lc (ps dropped)
    step              18            optimizer step (``--step`` only; SGD momentum buffers are new)

Configurations:

    supervised        the supervised part only
    1w-unfused        one-way, clean teacher; the consistency written by hand in PyTorch: TPS grid
                      (tpswarp.reference.tps_transform), F.grid_sample of the teacher logits and of
                      an all-ones image (validity mask), log_softmax, product, sum, mask; the student
                      input by reference.photometric_jitter + F.grid_sample
    1w-fused          one-way with tpswarp: PhTPS.perturb (fused jitter + warp) and
                      tpswarp.warped_kl_div (fused warp + masked KL, nothing B x C x H x W created)
    1w-fused-lowres   as 1w-fused, but student and teacher hand their stride-4 logits to
                      warped_kl_div(..., size=(H, W)) (skipped while tpswarp lacks ``size=``)
    2w-c1             two-way consistency, one clean input (Table 5): the teacher branch keeps its
                      graph, the gradient flows through both branches (fused warped_kl_div)

All consistency losses use the teacher's logits, warped before the softmax (the authors' code);
their values agree across configurations (a check of the hand-written composition).

Memory: on CUDA ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` after
``reset_peak_memory_stats`` (as the paper); on CPU ``memory_tracker.LiveTensorTracker`` (live
tensor storages, weights and inputs counted explicitly, autograd-saved tensors and gradients
included, a kernel's internal scratch buffers not). Each configuration runs in a fresh
subprocess (``--in-process`` to run them in this one), so peaks do not leak between them; a
watchdog kills a worker whose resident memory exceeds ``--max-rss-gib``.

    python benchmarks/memory_consistency.py [--model rn18 rn34] [--crop 768] [--batch 8 8]
        [--device cpu|cuda] [--configs supervised,1w-unfused,...] [--quick] [--step] [--out DIR]
        [--meter tracker]  (the CPU tracker on CUDA too, to compare it with the allocator)

Results: a markdown table (printed, and ``<out>/memory_consistency_<device>[_<size>].md``), rows
appended to ``<out>/memory_consistency_<device>.csv`` (date, machine, torch, commit), a plot
per model like the paper's Figure 4 (``<out>/memory_consistency_<device>_<model>[_<size>].png``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import tpswarp  # noqa: E402
from _common import device_name, git_commit  # noqa: E402
from memory_tracker import LiveTensorTracker  # noqa: E402

CONFIGS = ("supervised", "1w-unfused", "1w-fused", "1w-fused-lowres", "2w-c1")
# (name, line of Algorithm 1, label)
PHASES = (
    ("start", "4", "start"),
    ("sup_forward", "7", "sup. forward"),
    ("sup_loss", "8", "sup. loss"),
    ("sup_backward", "9", "sup. backward"),
    ("teacher", "13", "teacher"),
    ("perturb", "14", "perturb"),
    ("student_forward", "14", "student forward"),
    ("consistency", "16", "consistency"),
    ("unsup_backward", "17", "unsup. backward"),
    ("step", "18", "opt. step"),
)
PHASE_NAMES = tuple(p[0] for p in PHASES)
SUP_PHASES = ("start", "sup_forward", "sup_loss", "sup_backward")
UNSUP_PHASES = ("teacher", "perturb", "student_forward", "consistency", "unsup_backward")
DEFAULT_CROP, DEFAULT_BATCH = 768, (8, 8)
QUICK_CROP, QUICK_BATCH = 128, (2, 2)
GIB = 2.0 ** 30
NUM_CLASSES = 19
TARGETS = {"fused_over_sup": 1.05, "fused_overhead_fraction": 0.25, "fused_over_2w": 0.5}
PAPER = "paper (RTX A4500, RN34, 768px, 8+8): one-way 6.48 GiB, two-way 11.77 GiB; one-way / supervised 1.26x"


def size_supported() -> bool:
    """Whether ``tpswarp.warped_kl_div`` takes ``size=`` (issue 5; /work/size_contract.md)."""
    try:
        return "size" in inspect.signature(tpswarp.warped_kl_div).parameters
    except (TypeError, ValueError):
        return False


def phases_of(config: str, step: bool) -> List[str]:
    names = list(SUP_PHASES) if config == "supervised" else list(SUP_PHASES + UNSUP_PHASES)
    return names + (["step"] if step else [])


# ---------------------------------------------------------------------------------------------
# memory readings


class Recorder:
    """Allocated bytes after each phase and the peak during it, on CUDA (caching allocator
    statistics, absolute) or CPU (LiveTensorTracker with the weights and inputs counted)."""

    def __init__(self, device: str, tracker: Optional[LiveTensorTracker], on_mark=None):
        self.device = device
        self.tracker = tracker
        self.cuda_stats = device.startswith("cuda") and tracker is None
        self.on_mark = on_mark
        self.readings: Dict[str, Dict[str, int]] = {}

    def begin(self, baseline: Sequence[torch.Tensor]) -> None:
        if self.cuda_stats:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker.track_all(baseline)
            self.tracker.reset_peak()

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda_stats else self.tracker.current_bytes

    def mark(self, phase: str) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        if self.cuda_stats:
            alloc, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            alloc, peak = self.tracker.current_bytes, self.tracker.peak_bytes
            self.tracker.reset_peak()
        self.readings[phase] = {"alloc": int(alloc), "peak": int(peak)}
        if self.on_mark:
            self.on_mark(phase)


# ---------------------------------------------------------------------------------------------
# the consistency written by hand (what people write without tpswarp)


def tps_grid(src: torch.Tensor, params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H, W, 2)`` sampling grid of the TPS map at the pixel centres (align_corners=False)."""
    B = src.shape[0]
    ys = (2 * torch.arange(height, device=src.device, dtype=src.dtype) + 1) / height - 1
    xs = (2 * torch.arange(width, device=src.device, dtype=src.dtype) + 1) / width - 1
    q = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, height * width, 2).expand(B, -1, -1)
    return tpswarp.reference.tps_transform(q, src, params).view(B, height, width, 2)


def unfused_perturb(xu: torch.Tensor, params, grid: torch.Tensor) -> torch.Tensor:
    x = tpswarp.reference.photometric_jitter(xu, params.brightness, params.saturation, params.hue, params.contrast,
                                             params.permutation)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def unfused_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Masked KL(warped teacher || student), mean over valid pixels, in plain PyTorch."""
    warped = F.grid_sample(teacher_logits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones_like(teacher_logits[:, :1])
    valid = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0] >= 1 - 1e-5
    log_pt = F.log_softmax(warped, 1)
    pt = log_pt.exp()
    log_ps = F.log_softmax(student_logits, 1)
    kl = (pt * (log_pt - log_ps)).sum(1)
    m = valid.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# one iteration of Algorithm 1


def iteration(config: str, model, opt, xl, yl, xu, phtps, params, mark) -> Dict[str, float]:
    """Algorithm 1 with a reading after each phase; returns the loss values."""
    H, W = xu.shape[-2:]
    out = {}
    mark("start")
    # supervised loss (lines 7-9)
    logits_l = model(xl)
    mark("sup_forward")
    loss_s = F.cross_entropy(logits_l, yl, ignore_index=255)
    mark("sup_loss")
    loss_s.backward()
    out["loss_s"] = loss_s.item()
    del logits_l, loss_s
    mark("sup_backward")
    if config != "supervised":
        lowres = config == "1w-fused-lowres"
        two_way = config == "2w-c1"
        forward = (lambda x: model(x, upsample=False)) if lowres else model
        # teacher (line 13): the live model on the clean input; no graph unless two-way
        with torch.set_grad_enabled(two_way):
            teacher = forward(xu)
        mark("teacher")
        # perturbed student input (line 14)
        grid = None
        with torch.no_grad():
            if config == "1w-unfused":
                grid = tps_grid(params.src, params.tps, H, W)
                xs = unfused_perturb(xu, params, grid)
            else:
                xs = phtps.perturb(xu, params)[0]  # the validity mask is not needed
        mark("perturb")
        student = forward(xs)
        mark("student_forward")
        # validity mask and consistency loss (lines 15-16)
        if config == "1w-unfused":
            loss_c = unfused_consistency(student, teacher, grid)
        else:
            kw = {"size": (H, W)} if lowres else {}
            loss_c = tpswarp.warped_kl_div(student, teacher, params.src, params.tps, teacher_is_logits=True, **kw)
        del teacher, xs, grid
        mark("consistency")
        loss_c.backward()  # line 17
        out["loss_c"] = loss_c.item()
        del student, loss_c
        mark("unsup_backward")
    if opt is not None:
        opt.step()
        mark("step")
    return out


def build_model(model_name: str, device: str):
    from examples.semiseg.swiftnet import SwiftNet

    return SwiftNet(NUM_CLASSES, model_name).to(device).train()


def run_config(model_name: str, config: str, crop: int, batch: Sequence[int], device: str = "cpu", *,
               step: bool = False, seed: int = 0, on_mark=None, meter: str = "auto") -> dict:
    """One iteration of ``config`` in this process; returns readings, losses, time."""
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}; choose from {CONFIGS}")
    if config == "1w-fused-lowres" and not size_supported():
        return {"skipped": "tpswarp.warped_kl_div has no size= argument yet (issue 5)"}
    bl, bu = int(batch[0]), int(batch[1])
    torch.manual_seed(seed)
    model = build_model(model_name, device)
    g = torch.Generator().manual_seed(seed)
    xl = torch.rand(bl, 3, crop, crop, generator=g).to(device)
    yl = torch.randint(0, NUM_CLASSES, (bl, crop, crop), generator=g).to(device)
    xu = torch.rand(bu, 3, crop, crop, generator=g).to(device)
    phtps = tpswarp.PhTPS()
    params = phtps.sample(bu, (crop, crop), generator=g, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4) if step else None
    baseline = [*model.parameters(), *model.buffers(), xl, yl, xu,
                *(v for v in vars(params).values() if isinstance(v, torch.Tensor))]
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    tracker = None if device.startswith("cuda") and meter != "tracker" else LiveTensorTracker()
    rec = Recorder(device, tracker, on_mark)
    t0 = time.perf_counter()
    try:
        with tracker if tracker is not None else contextlib.nullcontext():
            rec.begin(baseline)
            losses = iteration(config, model, opt, xl, yl, xu, phtps, params, rec.mark)
    except TypeError as e:
        if config == "1w-fused-lowres" and "size" in str(e):
            return {"skipped": f"warped_kl_div(size=) not supported: {e}"}
        raise
    seconds = time.perf_counter() - t0
    backend = tpswarp.backends()["selected"].get(torch.device(device).type, {}).get("warped_kl_div", "?")
    return {"readings": rec.readings, **losses, "seconds": seconds, "backend": backend,
            "meter": "cuda" if rec.cuda_stats else "tracker"}


def summarize(config: str, result: dict) -> dict:
    """Peaks of the whole iteration, of its supervised and unsupervised parts, the overhead."""
    r = result["readings"]
    row = {"peak": max(v["peak"] for v in r.values()),
           "sup_peak": max(r[p]["peak"] for p in SUP_PHASES if p in r)}
    if config != "supervised":
        row["unsup_peak"] = max(r[p]["peak"] for p in UNSUP_PHASES if p in r)
        row["overhead"] = row["unsup_peak"] - row["sup_peak"]
    return row


# ---------------------------------------------------------------------------------------------
# workers


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_worker(args, model_name: str, config: str, bar=None) -> dict:
    """``config`` in a fresh Python process; phase progress read from its stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model_name, "--configs", config,
               "--crop", str(args.crop), "--batch", str(args.batch[0]), str(args.batch[1]), "--device", args.device,
               "--seed", str(args.seed), "--json", path]
        if args.step:
            cmd.append("--step")
        if args.meter != "auto":
            cmd += ["--meter", args.meter]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
        state = {"killed": False, "rss": 0}
        limit = args.max_rss_gib * GIB

        def watch():
            while proc.poll() is None:
                rss = _rss_bytes(proc.pid)
                state["rss"] = max(state["rss"], rss)
                if limit > 0 and rss > limit:
                    state["killed"] = True
                    proc.kill()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for line in proc.stdout:
            if line.startswith("@phase "):
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{model_name} {config}: {line.split()[1]}")
            elif bar is not None:
                bar.write(line.rstrip())
            else:
                print(line.rstrip())
        proc.wait()
        watcher.join()
        if state["killed"]:
            return {"skipped": f"worker killed: resident memory over --max-rss-gib {args.max_rss_gib}"}
        if proc.returncode != 0 or not os.path.exists(path):
            return {"skipped": f"worker failed (exit code {proc.returncode})"}
        with open(path) as f:
            return json.load(f)


def worker_main(args) -> int:
    config = args.configs[0]
    result = run_config(args.model[0], config, args.crop, args.batch, args.device, step=args.step, seed=args.seed,
                        on_mark=lambda p: print(f"@phase {p}", flush=True), meter=args.meter)
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------------------------
# reporting


def _gib(b) -> Optional[float]:
    return None if b is None else round(b / GIB, 4)


def _suffix(args) -> str:
    meter = "_tracker" if args.device.startswith("cuda") and args.meter == "tracker" else ""
    if args.crop == DEFAULT_CROP and tuple(args.batch) == DEFAULT_BATCH:
        return meter
    return f"_{args.crop}px_b{args.batch[0]}+{args.batch[1]}{meter}"


def build_rows(results: Dict[str, Dict[str, dict]], args) -> List[dict]:
    rows = []
    for model_name, per_config in results.items():
        sup = per_config.get("supervised", {})
        sup_peak = summarize("supervised", sup)["peak"] if "readings" in sup else None
        for config, res in per_config.items():
            row = {"model": model_name, "config": config, "crop": args.crop, "batch_l": args.batch[0],
                   "batch_u": args.batch[1], "step": int(args.step), "meter": res.get("meter", "")}
            if "readings" not in res:
                rows.append({**row, "skipped": res.get("skipped", "")})
                continue
            s = summarize(config, res)
            row.update({
                "peak_gib": _gib(s["peak"]),
                "peak_over_sup": round(s["peak"] / sup_peak, 3) if sup_peak else None,
                "sup_peak_gib": _gib(s["sup_peak"]),
                "unsup_peak_gib": _gib(s.get("unsup_peak")),
                "overhead_gib": _gib(s.get("overhead")),
                "loss_s": res.get("loss_s"),
                "loss_c": res.get("loss_c"),
                "seconds": round(res["seconds"], 2),
                "max_rss_gib": _gib(res.get("max_rss")),
                "backend": res.get("backend"),
                "skipped": "",
            })
            for p in PHASE_NAMES:
                rd = res["readings"].get(p)
                row[f"alloc_{p}_gib"] = _gib(rd["alloc"]) if rd else None
                row[f"peak_{p}_gib"] = _gib(rd["peak"]) if rd else None
            rows.append(row)
    return rows


def append_csv(path: str, rows: List[dict], device: str) -> None:
    """Append ``rows`` with date, machine, torch version and commit (as _common.append_rows)."""
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": f"{platform.node()}: {device_name(device)}", "torch": torch.__version__,
            "tpswarp": tpswarp.__version__, "commit": git_commit()}
    fields = list(meta) + ["model", "config", "crop", "batch_l", "batch_u", "step", "meter", "peak_gib",
                           "peak_over_sup", "sup_peak_gib", "unsup_peak_gib", "overhead_gib", "loss_s", "loss_c",
                           "seconds",
                           "max_rss_gib", "backend", "skipped"]
    fields += [f"{k}_{p}_gib" for p in PHASE_NAMES for k in ("alloc", "peak")]
    old: List[dict] = []
    rewrite = not os.path.exists(path)
    if not rewrite:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if list(reader.fieldnames or []) != fields:  # columns changed: rewrite the old rows under the new header
                old, rewrite = list(reader), True
                fields += [k for k in (reader.fieldnames or []) if k not in fields]
    mode = "w" if rewrite else "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if mode == "w":
            w.writeheader()
            w.writerows(old)
        w.writerows({**meta, **r} for r in rows)


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def targets(rows: List[dict]) -> List[str]:
    """The issue's targets, evaluated (not asserted), per model."""
    lines = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model_name and not r.get("skipped")}
        for fused in ("1w-fused", "1w-fused-lowres"):
            f = by.get(fused)
            if not f:
                continue
            if f.get("peak_over_sup") is not None:
                ok = f["peak_over_sup"] <= TARGETS["fused_over_sup"]
                lines.append(f"{model_name} {fused}: peak / supervised peak = {f['peak_over_sup']:.3f}x "
                             f"(target <= {TARGETS['fused_over_sup']}x, paper 1.26x): {'met' if ok else 'MISSED'}")
            u = by.get("1w-unfused")
            if u and u.get("overhead_gib") is not None:
                fo, uo = f["overhead_gib"], u["overhead_gib"]
                ok = fo <= TARGETS["fused_overhead_fraction"] * uo
                frac = f"{fo / uo:.3f} of" if uo > 0 else "vs"
                lines.append(f"{model_name} {fused}: consistency overhead {fo:.3f} GiB = {frac} 1w-unfused's "
                             f"{uo:.3f} GiB (target <= 1/4): {'met' if ok else 'MISSED'}")
            t = by.get("2w-c1")
            if t:
                ratio = f["peak_gib"] / t["peak_gib"]
                ok = ratio <= TARGETS["fused_over_2w"]
                lines.append(f"{model_name} {fused}: peak / 2w-c1 peak = {ratio:.3f} "
                             f"({f['peak_gib']:.2f} vs {t['peak_gib']:.2f} GiB; target <= 0.5, paper 0.55): "
                             f"{'met' if ok else 'MISSED'}")
    return lines


def markdown(rows: List[dict], args, total_seconds: float) -> str:
    dev = device_name(args.device)
    cuda_stats = args.device.startswith("cuda") and args.meter != "tracker"
    mem = "torch.cuda.max_memory_allocated" if cuda_stats else "LiveTensorTracker (live tensor storages)"
    out = [f"### One training iteration: peak memory ({args.device}, {args.crop}x{args.crop}, "
           f"batch {args.batch[0]}+{args.batch[1]}{', with optimizer step' if args.step else ''})", "",
           f"{dev}; torch {torch.__version__}; commit {git_commit()}; "
           f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; memory: {mem}; "
           f"whole run {total_seconds:.0f} s.", "",
           "| model | config | peak GiB | peak / sup. | sup. peak GiB | unsup. peak GiB | overhead GiB | loss_c "
           "| time s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            out.append(f"| {r['model']} | {r['config']} | skipped: {r['skipped']} | | | | | | |")
            continue
        out.append(f"| {r['model']} | {r['config']} | {_f(r['peak_gib'], '{:.3f}')} | "
                   f"{_f(r['peak_over_sup'], '{:.3f}x')} | {_f(r['sup_peak_gib'], '{:.3f}')} | "
                   f"{_f(r['unsup_peak_gib'], '{:.3f}')} | {_f(r['overhead_gib'], '{:+.3f}')} | "
                   f"{_f(r['loss_c'], '{:.5f}')} | {_f(r['seconds'], '{:.1f}')} |")
    out += ["", "Allocated after each phase / peak during it (GiB):", "",
            "| model | config | " + " | ".join(f"{lbl} ({line})" for name, line, lbl in PHASES
                                               if args.step or name != "step") + " |",
            "|---|---|" + "---:|" * sum(1 for p in PHASE_NAMES if args.step or p != "step")]
    for r in rows:
        if r.get("skipped"):
            continue
        cells = []
        for p in PHASE_NAMES:
            if p == "step" and not args.step:
                continue
            a, pk = r.get(f"alloc_{p}_gib"), r.get(f"peak_{p}_gib")
            cells.append("" if a is None else f"{a:.3f} / {pk:.3f}")
        out.append(f"| {r['model']} | {r['config']} | " + " | ".join(cells) + " |")
    lines = targets(rows)
    if lines:
        out += ["", "Targets (evaluated, not asserted):", ""] + [f"- {t}" for t in lines] + [f"- {PAPER}"]
    return "\n".join(out) + "\n"


def plot(rows: List[dict], model_name: str, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p in PHASE_NAMES if args.step or p != "step"]
    labels = [f"{lbl}\n({line})" for n, line, lbl in PHASES if n in names]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for i, r in enumerate(r for r in rows if r["model"] == model_name and not r.get("skipped")):
        xs = [k for k, p in enumerate(names) if r.get(f"alloc_{p}_gib") is not None]
        color = f"C{i}"
        ax.plot(xs, [r[f"alloc_{names[k]}_gib"] for k in xs], "o-", color=color,
                label=f"{r['config']} (peak {r['peak_gib']:.2f} GiB)")
        ax.plot(xs, [r[f"peak_{names[k]}_gib"] for k in xs], "^--", color=color, alpha=0.55)
        k = max(xs, key=lambda k: r[f"peak_{names[k]}_gib"])
        ax.annotate(f"{r[f'peak_{names[k]}_gib']:.2f}", (k, r[f"peak_{names[k]}_gib"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color=color)
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_xlabel("phase of the iteration (line of Algorithm 1); solid: allocated after, dashed: peak during")
    ax.set_ylabel("memory / GiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    meter = "CUDA allocator" if args.device.startswith("cuda") and args.meter != "tracker" else "live tensor storages"
    ax.set_title(f"SwiftNet-{model_name.upper()}, {args.crop}x{args.crop}, batch {args.batch[0]}+{args.batch[1]}, "
                 f"{args.device} ({meter})")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["rn18", "rn34"], choices=["rn18", "rn34"])
    ap.add_argument("--crop", type=int, default=None,
                    help=f"square crop (default {DEFAULT_CROP}; --quick {QUICK_CROP})")
    ap.add_argument("--batch", type=int, nargs=2, default=None, metavar=("BL", "BU"),
                    help=f"labeled and unlabeled batch (default {DEFAULT_BATCH}; --quick {QUICK_BATCH})")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_CROP}x{QUICK_CROP} crops, batch 2+2")
    ap.add_argument("--step", action="store_true", help="end with an SGD (momentum) step")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--in-process", action="store_true", help="run the configurations in this process")
    ap.add_argument("--max-rss-gib", type=float, default=18.0, help="kill a worker above this resident memory (0: off)")
    ap.add_argument("--meter", default="auto", choices=["auto", "tracker"],
                    help="auto: CUDA allocator statistics on CUDA, LiveTensorTracker on CPU; tracker: the tracker "
                         "on CUDA too (to compare the two)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.crop = args.crop or (QUICK_CROP if args.quick else DEFAULT_CROP)
    args.batch = tuple(args.batch or (QUICK_BATCH if args.quick else DEFAULT_BATCH))
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configurations {bad}; choose from {','.join(CONFIGS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker_main(args)
        return {}
    from tqdm import tqdm

    if "1w-fused-lowres" in args.configs and not size_supported():
        print("1w-fused-lowres: skipped, tpswarp.warped_kl_div has no size= argument yet (issue 5, "
              "see /work/size_contract.md); it runs once the argument lands.")
    total = sum(len(phases_of(c, args.step)) for c in args.configs
                if c != "1w-fused-lowres" or size_supported()) * len(args.model)
    results: Dict[str, Dict[str, dict]] = {}
    t0 = time.perf_counter()
    with tqdm(total=total, desc="memory_consistency", unit="phase", dynamic_ncols=True) as bar:
        for model_name in args.model:
            results[model_name] = {}
            for config in args.configs:
                bar.set_postfix_str(f"{model_name} {config}")
                if args.in_process:
                    def on_mark(p, m=model_name, c=config):
                        bar.update(1)
                        bar.set_postfix_str(f"{m} {c}: {p}")

                    res = run_config(model_name, config, args.crop, args.batch, args.device, step=args.step,
                                     seed=args.seed, on_mark=on_mark, meter=args.meter)
                    gc.collect()
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                else:
                    res = run_worker(args, model_name, config, bar)
                if "skipped" in res:
                    bar.write(f"{model_name} {config}: skipped ({res['skipped']})")
                results[model_name][config] = res
    total_seconds = time.perf_counter() - t0
    rows = build_rows(results, args)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device).type
    suffix = _suffix(args)
    md = markdown(rows, args, total_seconds)
    print()
    print(md)
    md_path = os.path.join(args.out, f"memory_consistency_{dev}{suffix}.md")
    with open(md_path, "w") as f:
        f.write(md)
    csv_path = os.path.join(args.out, f"memory_consistency_{dev}.csv")
    append_csv(csv_path, rows, args.device)
    pngs = []
    if not args.no_plot:
        for model_name in args.model:
            if any(r["model"] == model_name and not r.get("skipped") for r in rows):
                pngs.append(os.path.join(args.out, f"memory_consistency_{dev}_{model_name}{suffix}.png"))
                plot(rows, model_name, pngs[-1], args)
    print(f"whole run: {total_seconds:.1f} s; wrote {md_path}, {csv_path}" + "".join(f", {p}" for p in pngs))
    return {"rows": rows, "results": results, "md": md_path, "csv": csv_path, "png": pngs, "seconds": total_seconds}


if __name__ == "__main__":
    main()
