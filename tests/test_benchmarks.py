"""The op benchmarks' timing helper and the scripts themselves (quick shapes, nothing written).

measure_interleaved: every callable runs once per round, the order rotated from round to
round, and a callable's own returned time is used when it returns one. time_mode: what each mode
runs (no_grad forward; fresh leaves for backward and full, the backward against the given grad). The scripts: each op
benchmark runs end to end with --quick and prints its table and ratios. No timing assertions.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tpswarp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import torch  # noqa: E402
from _common import measure_interleaved, time_mode  # noqa: E402


def test_measure_interleaved_rotates_the_order_and_uses_returned_times():
    calls = []

    def make(name, own):
        def fn():
            calls.append(name)
            return own
        return fn

    fns = {"a": make("a", 3.0), "b": make("b", None), "c": make("c", 7.5)}
    stats = measure_interleaved(fns, "cpu", repeats=4, warmup=1)
    timed = calls[3:]  # after one warmup round
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert stats["a"]["ms"] == 3.0 and stats["c"]["ms"] == 7.5 and stats["c"]["repeats"] == 4
    assert 0.0 <= stats["b"]["ms"] < 1000.0  # wall time of a call that returned nothing


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_time_mode_runs_what_the_mode_says(mode):
    seen = []
    x = torch.tensor([1.0, 2.0])

    def fn(t):
        seen.append(("call", torch.is_grad_enabled(), t.requires_grad))
        return t * 3

    made = []

    def make_leaves():
        made.append(x.clone().requires_grad_(True))
        return made[-1:]

    ms = time_mode(fn, mode, [x], make_leaves, torch.tensor([1.0, 0.5]))
    assert ms >= 0.0 and len(seen) == 1
    if mode == "forward":
        assert seen == [("call", False, False)] and not made
    else:
        assert seen == [("call", True, True)] and len(made) == 1
        assert torch.equal(made[0].grad, torch.tensor([3.0, 1.5]))


@pytest.mark.parametrize("script, args, expect", [
    ("bench_tps_warp.py", ["--providers", "reference,grid_sample,cpp", "--no-csv"], "speed-up of cpp"),
    ("bench_masked_kl_div.py", ["--no-save"], "speedup_vs_pytorch"),
    ("bench_warped_kl_div.py", ["--no-save"], "speedup_vs_unfused"),
    ("bench_photometric_jitter.py", ["--providers", "reference,cpp", "--no-csv"], "speed-up of cpp"),
])
def test_op_benchmark_runs(script, args, expect):
    if not tpswarp.backends()["extension"]["built"]:
        pytest.skip("C++ extension not built")
    cmd = [sys.executable, os.path.join(BENCH, script), "--quick", "--repeats", "2", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout


def test_plot_rows_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import _common

    monkeypatch.setattr(_common, "RESULTS", str(tmp_path))
    rows = [{"shape": s, "provider": p, "mode": m, "ms": ms}
            for s in ("8x19x224x224", "8x19x448x448") for p, ms in (("pytorch", 9.0), ("cpp", 3.0))
            for m in ("forward", "full")]
    path = _common.plot_rows("op_cpu", rows, "op", "cpu")
    assert path == str(tmp_path / "op_cpu.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tps_solve_benchmark_rows_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import _common
    import bench_tps_solve

    monkeypatch.setattr(_common, "RESULTS", str(tmp_path))
    rows = bench_tps_solve.run([(16, 4)], "cpu", samples=1)
    view = bench_tps_solve.plot_view(rows)
    assert {r["provider"] for r in view} >= {"reference", "reference (checked)"}
    assert all(r["shape"] == "16 x 4" and r["us"] > 0 for r in view)
    path = _common.plot_rows("tps_solve_cpu", view, "tps_solve", "cpu", value="us")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_kernel_resources_reads_compiled_kernels(tmp_path):
    """benchmarks/kernel_resources.py: the Triton kernels compiled for sm_90 without a GPU, and the
    CUDA kernels of the extension when it was built with CUDA, each listed with its registers."""
    pytest.importorskip("triton")
    out = tmp_path / "resources.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(BENCH, "kernel_resources.py"), "--quick", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ") and "`" in line]
    triton_kernels = {r[2].strip(" `") for r in rows if len(r) == 12}
    assert {"_masked_kl_fwd_kernel", "_warped_kl_bwd_kernel", "_jitter_fwd_kernel", "_tps_warp_bwd_kernel"} <= \
        triton_kernels
    assert all(int(r[4]) > 0 and int(r[10]) > 0 for r in rows if len(r) == 12)  # registers, SASS instructions
    ext = tpswarp.backends()["extension"]
    if ext["cuda"] and "9.0" in str(ext.get("cuda_archs", "")):  # sm_90 code, which the script reads
        cuda = {r[1].strip(" `").split("<")[0]: (int(r[2]), int(r[6])) for r in rows if len(r) == 8}
        assert {"warped_kl_forward_kernel", "kl_backward_kernel", "tps_solve_kernel"} <= set(cuda)
        assert all(regs > 0 and instructions > 0 for regs, instructions in cuda.values())


def test_cuda_tps_kernels_use_the_hardware_log2():
    """The CUDA kernels that evaluate the TPS per pixel use lg2.approx (MUFU.LG2 in the sm_90 SASS, the
    GPU form of tps.h), and tps_transform keeps the accurate logarithm (no MUFU.LG2): read with cuobjdump
    from the extension, no GPU needed."""
    ext = tpswarp.backends()["extension"]
    if not (ext["cuda"] and "9.0" in str(ext.get("cuda_archs", ""))):
        pytest.skip("the extension has no sm_90 CUDA code")
    import importlib.util
    import re

    import kernel_resources

    text = subprocess.run([kernel_resources.cuobjdump_path(), "-sass", "-arch", "sm_90",
                           importlib.util.find_spec("tpswarp._C").origin], check=True, capture_output=True,
                          text=True, timeout=600).stdout
    uses_lg2 = {}
    for part in re.split(r"\n\s*Function : ", text)[1:]:
        name = part.split("\n", 1)[0]
        for kernel in ("forward_bilinear_kernel", "forward_nearest_kernel", "warped_kl_forward_kernel",
                       "warped_validity_kernel", "tps_transform_kernel"):
            if kernel in name:  # every instantiation; those computing in double have no MUFU.LG2
                uses_lg2.setdefault(kernel, []).append("MUFU.LG2" in part)
    assert all(any(v) for k, v in uses_lg2.items() if k != "tps_transform_kernel"), uses_lg2
    assert len(uses_lg2) == 5 and not any(uses_lg2["tps_transform_kernel"]), uses_lg2


def test_profile_ops_runs_every_op():
    """benchmarks/profile_ops.py (what gpu_check.sh NCU=1 profiles) on the CPU with small shapes."""
    cmd = [sys.executable, os.path.join(BENCH, "profile_ops.py"), "--device", "cpu", "--quick", "--backend",
           "reference", "--warmup", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    ran = {line[4:] for line in result.stdout.splitlines() if line.startswith("ran ")}
    ops = ("masked_kl_div", "warped_kl_div", "photometric_jitter", "tps_warp")
    assert all(any(case.startswith(op) for case in ran) for op in ops), ran
    assert {"masked_kl_div without statistics", "warped_kl_div student grad without statistics"} <= ran


def ncu_csv():
    """A small `ncu --csv --page details` log: two launches, a section row without a metric, other output."""
    header = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
              "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
    k0 = "void unnamed>::kl_forward_kernel<float, float, 0>(const T1 *, unnamed>::Strides3, long, bool)"
    k1 = "void tpswarp::(anonymous namespace)::backward_kernel<float, float, 4>(GeoArgs<float>, int)"
    sol = "GPU Speed Of Light Throughput"
    rows = [("0", k0, sol, "Duration", "ns", "257,952"), ("0", k0, sol, "DRAM Throughput", "%", "60.95"),
            ("0", k0, "Launch Statistics", "Registers Per Thread", "register/thread", "43"),
            ("0", k0, "SpeedOfLight", "", "", ""), ("1", k1, sol, "Duration", "ms", "1.25"),
            ("1", k1, sol, "Compute (SM) Throughput", "%", "50.88")]
    quote = lambda fields: ",".join(f'"{f}"' for f in fields)  # noqa: E731
    lines = ["==PROF== Connected to process 1 (python3)", "ran masked_kl_div", quote(header)]
    lines += [quote([i, "1", "python3", "h", k, "1", "7", "(256, 1, 1)", "(2304, 8, 1)", "0", "9.0", sec, met, unit, v])
              for i, k, sec, met, unit, v in rows]
    return "\n".join(lines + ["==PROF== Disconnected from process 1"]) + "\n"


def test_ncu_summary_table(tmp_path):
    """benchmarks/ncu_summary.py: one row per launch, short kernel names, durations in microseconds."""
    from ncu_summary import main, short_name

    assert short_name("void tpswarp::<unnamed>::k<a::b<c>, 4>(x::y, int)") == "k<a::b<c>, 4>"
    report, out = tmp_path / "ncu.log", tmp_path / "ncu.md"
    report.write_text(ncu_csv())
    main([str(report), "--out", str(out)])
    rows = [line.split("|") for line in out.read_text().splitlines()[2:]]
    names = [r[2].strip(" `") for r in rows]
    assert names == ["kl_forward_kernel<float, float, 0>", "backward_kernel<float, float, 4>"]
    assert [r[3].strip() for r in rows] == ["258.0", "1250.0"]  # us
    assert rows[0][4].strip() == "61.0" and rows[0][5].strip() == "" and rows[0][8].strip() == "43"
    assert rows[1][5].strip() == "50.9"
    empty = tmp_path / "empty.log"
    empty.write_text("==PROF== nothing profiled\n")
    with pytest.raises(SystemExit, match="no CSV rows"):
        main([str(empty)])
