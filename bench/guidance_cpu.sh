#!/usr/bin/env bash
# Cost of CLIP guidance per sampling step, per guidance decoder, on real-size SD 1.5 with a
# random-weight ViT-B/32 guide (4 cutouts), against the same step in PyTorch
# (bench/diffusers_bench.py --parts guidance) measured in the same run. Each decoder and tool
# runs in its own process so its peak RSS is its own.
# Usage: bench/guidance_cpu.sh SIZES DECODERS REPS
#   e.g. bench/guidance_cpu.sh 256 vae,taesd,linear 2
# Set CARGO_TARGET_DIR to reuse a release build; PYTHON to the reference venv's python
# (default: /work/venv-ref/bin/python, else python3; tests/reference/requirements.txt).
set -euo pipefail
sizes=${1:-256}
decoders=${2:-vae,taesd,linear}
reps=${3:-1}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x /work/venv-ref/bin/python ] && echo /work/venv-ref/bin/python || echo python3)}
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/artguide
LOG=$(mktemp)
for d in ${decoders//,/ }; do
  "$bin" bench --json --parts guidance --sizes "$sizes" --reps "$reps" --guidance-decoders "$d" \
    --guide-clip vit-b32 --cutouts 4 | grep '"workload"' >>"$LOG"
  "$PYTHON" bench/diffusers_bench.py --parts guidance --sizes "$sizes" --reps "$reps" \
    --guidance-decoders "$d" --guide-clip vit-b32 --cutouts 4 2>/dev/null | grep '"workload"' >>"$LOG"
done
"$PYTHON" - "$LOG" "$reps" <<'PY'
import json, sys
by = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    r["peak_gib"] = r["peak_rss_bytes"] / 2**30
    # The unguided step is timed once per decoder run: keep the first of each tool.
    by.setdefault((r["workload"], r["size"]), {}).setdefault(r.get("tool", "artguide"), r)
print(f"| workload | size | artguide s (median of {sys.argv[2]}) | PyTorch s | artguide / PyTorch "
      "| guided / unguided: artguide | PyTorch | peak RSS: artguide | PyTorch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for (w, s), d in sorted(by.items()):
    a, p = d.get("artguide"), d.get("diffusers")
    f = lambda r, k, fmt: "-" if r is None or r.get(k) is None else fmt.format(r[k])
    ratio = "-" if a is None or p is None else f'{a["seconds"] / p["seconds"]:.2f}'
    print(f'| {w} | {s} | {f(a, "seconds", "{:.3f}")} | {f(p, "seconds", "{:.3f}")} | {ratio} '
          f'| {f(a, "ratio_to_unguided", "{:.2f}")} | {f(p, "ratio_to_unguided", "{:.2f}")} '
          f'| {f(a, "peak_gib", "{:.2f} GiB")} | {f(p, "peak_gib", "{:.2f} GiB")} |')
PY
