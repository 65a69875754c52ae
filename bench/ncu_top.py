#!/usr/bin/env python3
"""Ranks the kernels of an Nsight Compute CSV log by total GPU time.

Usage: python3 bench/ncu_top.py LABEL=ncu.csv [LABEL=ncu.csv ...] [--json out.json] [--top 12]

Each CSV comes from `ncu --metrics gpu__time_duration.sum --csv --log-file ncu.csv CMD`
(bench/gpu.sh's `profile` group). Kernels are grouped by name (template arguments and
parameter lists dropped), so a table row is one kernel's launches and share of the total;
the JSON keeps the same figures per label (the form of bench/results/ncu-2026-11-24.json).
"""
import argparse
import csv
import json
import os
import re
import sys


def kernel_times(path):
    """(kernel name, nanoseconds) per launch in an ncu CSV log."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # ncu may print its own messages (==PROF==, warnings) before the header.
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"{path}: no ncu CSV header (\"ID\",...) found")
    rows = csv.DictReader(lines[start:])
    out = []
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        scale = {"ns": 1.0, "nsecond": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6}
        if unit not in scale:
            sys.exit(f"{path}: unknown time unit {unit!r}")
        name = re.sub(r"^void\s+", "", re.sub(r"[<(].*$", "", r["Kernel Name"]).strip())
        out.append((name, value * scale[unit]))
    if not out:
        sys.exit(f"{path}: no gpu__time_duration.sum rows")
    return out


def rank(times, top):
    total = sum(t for _, t in times)
    by = {}
    for name, t in times:
        n, s = by.get(name, (0, 0.0))
        by[name] = (n + 1, s + t)
    ranked = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "total_ns": total,
        "launches": len(times),
        "top": [
            {"kernel": k, "launches": n, "share": round(s / total, 4), "ns": s}
            for k, (n, s) in ranked
        ],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="+", help="LABEL=ncu.csv")
    ap.add_argument("--json")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    result = {}
    for spec in a.logs:
        label, sep, path = spec.partition("=")
        if not sep:
            sys.exit(f"{spec}: expected LABEL=ncu.csv")
        result[label] = rank(kernel_times(path), a.top)
    for label, r in result.items():
        print(f"\n**{label}**: {r['total_ns'] / 1e6:.2f} ms of kernels in {r['launches']} launches\n")
        print("| kernel | launches | ms | share |")
        print("| --- | --- | --- | --- |")
        for k in r["top"]:
            print(f"| {k['kernel']} | {k['launches']} | {k['ns'] / 1e6:.3f} | {k['share']:.1%} |")
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
