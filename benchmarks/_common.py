"""Shared benchmark helpers: timing (side by side), peak memory, CSV rows with the machine and commit, plots."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside (A/B switches the extension reads at each launch, e.g.
    ``TPSWARP_CUDA_WARP_ROWS``), restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def kl_statistics_off() -> Iterator[None]:
    """The KL ops' plain forward/backward pair inside (``TPSWARP_KL_STATS=0``: no statistics kept by the
    forward for the backward), for A/B rows in one build."""
    with environment("TPSWARP_KL_STATS", "0"):
        yield


def git_commit() -> str:
    """The checkout's short commit (``+dirty`` with local changes outside ``benchmarks/results``,
    where runs write); ``GIT_COMMIT`` overrides it where the tree is a copy without ``.git`` (the
    lent GPU machine)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"][:7]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"]
        dirty = subprocess.run(status, capture_output=True, text=True, cwd=root).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str, *, repeats: int = 10, warmup: int = 2,
            min_time: float = 0.0) -> Dict[str, float]:
    """Median / 20% / 80% quantiles of the wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_q20": qs[0], "ms_q80": qs[-1], "repeats": len(times)}


def measure_interleaved(fns: Dict[str, Callable[[], Optional[float]]], device: str, *, repeats: int = 10,
                        warmup: int = 1) -> Dict[str, Dict[str, float]]:
    """``measure`` for several callables timed side by side: every round runs each callable once,
    in an order rotated from round to round, so that a change of machine load during the run
    falls on all of them alike (the benchmarks report ratios of these medians). A callable may
    return its own time in milliseconds (e.g. a backward pass alone, its forward excluded);
    otherwise its wall time is taken."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            own = fns[name]()
            sync(device)
            times[name].append(own if isinstance(own, float) else (time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        qs = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        out[name] = {"ms": statistics.median(ts), "ms_q20": qs[0], "ms_q80": qs[-1], "repeats": len(ts)}
    return out


def time_mode(fn: Callable, mode: str, forward_args: Sequence, make_leaves: Callable[[], Sequence],
              grad: torch.Tensor) -> float:
    """One call of ``fn`` in ``mode``, its time in ms: ``forward`` under no_grad on ``forward_args``;
    ``backward`` (the backward pass alone) and ``full`` (forward + backward against ``grad``) on fresh
    leaves from ``make_leaves()``, made outside the timed region."""
    if mode == "forward":
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*forward_args)
        return (time.perf_counter() - t0) * 1e3
    xs = make_leaves()
    t0 = time.perf_counter()
    out = fn(*xs)
    if mode == "backward":
        t0 = time.perf_counter()
    torch.autograd.backward(out, grad)
    return (time.perf_counter() - t0) * 1e3


def side_by_side_rows(op: str, shape: str, dtype: str, calls: Dict[str, Dict[str, Callable[[], object]]],
                      device: str, repeats: int) -> List[dict]:
    """Rows (op, shape, dtype, provider, mode, timings, peak_MiB) for ``calls[provider][mode]``: the
    providers of each mode timed side by side (measure_interleaved), then one more call of each
    for its peak memory."""
    rows = []
    modes = list(next(iter(calls.values()))) if calls else []
    for mode in modes:
        stats = measure_interleaved({name: c[mode] for name, c in calls.items()}, device, repeats=repeats)
        for name, c in calls.items():
            with PeakMemory(device) as pm:
                c[mode]()
            rows.append({"op": op, "shape": shape, "dtype": dtype, "provider": name, "mode": mode, **stats[name],
                         "peak_MiB": pm.peak / 2**20})
    return rows


class PeakMemory:
    """Peak bytes allocated by tensors while inside the block, on CPU or CUDA.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: a dispatch-mode
    tracker of live tensor storages (see ``tpswarp_memory``), relative to the start.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from memory_tracker import LiveTensorTracker

            self.tracker = LiveTensorTracker()
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.tracker.__exit__(*exc)
            self.peak = self.tracker.peak_bytes
        return False


def append_rows(name: str, rows: Iterable[dict], device: str) -> str:
    """Append ``rows`` to ``benchmarks/results/<name>.csv`` with device, torch version, commit, date."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.csv")
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    rows = [{**meta, **r} for r in rows]
    if not rows:
        return path
    fields = list(rows[0].keys())
    exists = os.path.exists(path)
    if exists:
        with open(path) as f:
            header = f.readline().strip().split(",")
        if header != fields:  # schema changed: start a new file rather than mixing columns
            os.replace(path, path + ".old")
            exists = False
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            w.writeheader()
        w.writerows(rows)
    return path


def print_table(rows: List[dict], columns: List[str], title: Optional[str] = None) -> None:
    if title:
        print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def plot_rows(name: str, rows: List[dict], title: str, device: str, value: str = "ms") -> Optional[str]:
    """Bar chart of one run's median times (log scale): one panel per shape, the modes along x, a
    bar per provider with its time written on it. ``value`` is the rows' time key and unit ("ms",
    or "us"). Saved as ``benchmarks/results/<name>.png`` (overwritten: the CSV keeps the history);
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    shapes = list(dict.fromkeys(r.get("shape", "") for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, shape in zip(axes[0], shapes):
        by = {(r["provider"], r["mode"]): r[value] for r in rows if r.get("shape", "") == shape}
        for k, prov in enumerate(providers):
            xs = [m + (k - (len(providers) - 1) / 2) * width for m in range(len(modes))]
            ys = [by.get((prov, mode), float("nan")) for mode in modes]
            bars = ax.bar(xs, ys, width, label=prov)
            for bar, y in zip(bars, ys):
                if y == y:  # not NaN
                    ax.annotate(f"{y:.3g}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                                fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes)
        ax.set_ylabel(f"median {value} (log scale)")
        ax.set_title(shape, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{device_name(device)}, torch {torch.__version__}, commit {git_commit()}", fontsize=9)
    fig.tight_layout()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
