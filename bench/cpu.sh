#!/usr/bin/env bash
# Measures artguide (candle) and diffusers (PyTorch) on the same CPU in one run, each workload
# in a fresh process so peak memory is per workload, and prints a markdown table with ratios.
# Usage: bench/cpu.sh [ARCH] [SIZES] [REPS]      e.g. bench/cpu.sh sd15 256,512 3
# PARTS=unet (or vae) limits the run to one part (SDXL's VAE is SD's architecture).
# Needs: cargo, and a Python with the pinned reference stack (tests/reference/requirements.txt);
# set PYTHON to it (default: /work/venv-ref/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-sd15}
SIZES=${2:-256,512}
REPS=${3:-3}
PYTHON=${PYTHON:-$( [ -x /work/venv-ref/bin/python ] && echo /work/venv-ref/bin/python || echo python3)}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/artguide
LOG=$(mktemp)
PARTS=${PARTS:-unet,vae}
for part in ${PARTS//,/ }; do
  for size in ${SIZES//,/ }; do
    "$BIN" bench --json --arch "$ARCH" --parts "$part" --sizes "$size" --reps "$REPS" | grep '"workload"' >>"$LOG"
    "$PYTHON" bench/diffusers_bench.py --arch "$ARCH" --parts "$part" --sizes "$size" --reps "$REPS" >>"$LOG"
  done
done
"$PYTHON" - "$LOG" "$ARCH" <<'PY'
import json, sys, platform, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["workload"], r["size"]), {})[r.get("tool", "artguide")] = r
print(f"arch {sys.argv[2]}, f32, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
print("| workload | size | artguide s | diffusers s | artguide/diffusers | artguide peak RSS | diffusers peak RSS |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for (w, s), d in sorted(by.items()):
    a, p = d.get("artguide"), d.get("diffusers")
    if not a or not p:
        continue
    gb = lambda r: f'{r["peak_rss_bytes"] / 2**30:.2f} GiB' if r.get("peak_rss_bytes") else "n/a"
    print(f'| {w} | {s} | {a["seconds"]:.2f} | {p["seconds"]:.2f} | {a["seconds"] / p["seconds"]:.2f} | {gb(a)} | {gb(p)} |')
PY
