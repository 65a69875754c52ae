#!/usr/bin/env bash
# CLIP image-embedding throughput (images/s), artguide vs transformers, same machine, same run.
# Usage: bench/clip_cpu.sh [BATCH] [REPS]     PYTHON: a Python with tests/reference/requirements.txt
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-64}
REPS=${2:-3}
PYTHON=${PYTHON:-$( [ -x /work/venv-ref/bin/python ] && echo /work/venv-ref/bin/python || echo python3)}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/artguide
LOG=$(mktemp)
for arch in vit-b32 vit-l14; do
  "$BIN" bench --json --parts clip --clip-arch "$arch" --clip-batch "$BATCH" --reps "$REPS" | grep '"workload"' >>"$LOG"
  "$PYTHON" bench/transformers_clip.py --arch "$arch" --batch "$BATCH" --reps "$REPS" >>"$LOG"
done
"$PYTHON" - "$LOG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["workload"], {})[r.get("tool", "artguide")] = r
print("| workload | artguide images/s | transformers images/s | artguide/transformers | artguide peak RSS | transformers peak RSS |")
print("| --- | --- | --- | --- | --- | --- |")
for w, d in by.items():
    a, t = d["artguide"], d["transformers"]
    gb = lambda r: f'{r["peak_rss_bytes"] / 2**30:.2f} GiB'
    print(f'| {w} | {a["seconds"]:.2f} | {t["seconds"]:.2f} | {a["seconds"] / t["seconds"]:.2f} | {gb(a)} | {gb(t)} |')
PY
