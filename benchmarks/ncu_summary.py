"""A markdown table of an Nsight Compute report: one row per profiled kernel launch.

    python benchmarks/ncu_summary.py ncu.log [--out ncu_summary.md]

Reads ``ncu --csv --page details`` output (as ``gpu_check.sh NCU=1`` writes it to ``ncu.log``; lines that
are not CSV rows, such as the program's own output and ``==PROF==`` notes, are skipped) and keeps, per
launch: duration, DRAM and SM (compute) throughput as percentages of their peaks (which of the two is
higher says whether the kernel is bound by memory or by instructions), L1 and L2 hit rates, registers,
theoretical and achieved occupancy, warp cycles per issued instruction (latency per instruction; high
with low throughputs means too little independent work in flight), and the executed warp instructions
(with the InstructionStats section; per pixel, what an instruction-bound kernel has to shed).
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys

COLUMNS = [
    ("Duration", "us"),
    ("DRAM Throughput", "DRAM %"),
    ("Compute (SM) Throughput", "SM %"),
    ("L1/TEX Hit Rate", "L1 hit %"),
    ("L2 Hit Rate", "L2 hit %"),
    ("Registers Per Thread", "regs"),
    ("Theoretical Occupancy", "occ. theor. %"),
    ("Achieved Occupancy", "occ. achieved %"),
    ("Warp Cycles Per Issued Instruction", "cycles / issue"),
    ("Executed Instructions", "warp instructions"),
    ("Grid Size", "grid"),
]


def short_name(name: str) -> str:
    """``void ns::<unnamed>::kernel<float, float, 4>(args...)`` -> ``kernel<float, float, 4>``."""
    name = re.sub(r"^void\s+", "", name.strip())
    # anonymous namespaces: "<unnamed>::", "(anonymous namespace)::", or as ncu's demangled base prints them,
    # "unnamed>::"
    name = re.sub(r"<?unnamed>::|\(anonymous namespace\)::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(name):  # drop namespaces outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == ":" and depth == 0:
            start = i + 1
    return name[start:]


def number(value: str) -> float:
    return float(value.replace(",", ""))


def parse(text: str) -> list[dict]:
    """Per launch (in report order): {"id", "kernel", metric name: (value, unit)}."""
    rows = csv.DictReader(io.StringIO("".join(line for line in text.splitlines(True) if line.startswith('"'))))
    launches: dict[str, dict] = {}
    for row in rows:
        launch = launches.setdefault(row["ID"], {"id": row["ID"], "kernel": short_name(row["Kernel Name"])})
        if row["Metric Name"]:
            launch[row["Metric Name"]] = (row["Metric Value"], row["Metric Unit"])
    return list(launches.values())


def cell(launch: dict, metric: str) -> str:
    if metric not in launch:
        return ""
    value, unit = launch[metric]
    try:
        x = number(value)
    except ValueError:
        return value
    if metric == "Duration":
        x = x / 1000 if unit == "ns" else x * 1000 if unit == "ms" else x
        return f"{x:.1f}"
    return f"{x:.1f}" if x != int(x) else f"{int(x)}"


def table(launches: list[dict]) -> str:
    head = "| # | kernel | " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|---|---|" + "---:|" * len(COLUMNS)
    body = [f"| {l['id']} | `{l['kernel']}` | " + " | ".join(cell(l, m) for m, _ in COLUMNS) + " |" for l in launches]
    return "\n".join([head, rule, *body]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="ncu --csv --page details output")
    ap.add_argument("--out", help="write the table here (default: stdout)")
    args = ap.parse_args(argv)
    with open(args.report, errors="replace") as f:
        launches = parse(f.read())
    if not launches:
        sys.exit(f"ncu_summary: no CSV rows of a profiled kernel in {args.report}")
    text = table(launches)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
