#!/usr/bin/env bash
# Issue 6's GPU measurements in one call: artguide (candle, CUDA, f16) and PyTorch on the same
# GPU in the same run, each workload in a fresh process, printed as a markdown table of ratios.
#
# Usage (on the GPU machine, from the repository root):
#   BIN=path/to/artguide-cuda PYTHON=python3 bash bench/gpu.sh [REPS]
# BIN: an artguide built with `--features cuda` (README, "CUDA"); the GPU machine has no Rust,
# so it is built on the x86-64 build machine and copied. PYTHON needs torch with CUDA,
# transformers and diffusers (diffusers is pure Python: `pip download diffusers --no-deps`
# on a machine with network and carry the wheel).
# Not yet measured: no GPU has been lent to this project so far (NOTES.md). The guided step is
# timed for artguide only; a PyTorch guided-step peer is still to be written.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
BIN=${BIN:-target/release/artguide}
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
LOG=$(mktemp)
run() { "$@" | grep '"workload"' >>"$LOG"; }
# Unguided SD 1.5 at 512x512: one CFG step (batch 2) and one VAE decode; 30 steps + a decode
# make an image.
run "$BIN" bench --json --device cuda --dtype f16 --arch sd15 --parts unet,vae --sizes 512 --reps "$REPS"
run "$PYTHON" bench/diffusers_cpu.py --device cuda --dtype f16 --arch sd15 --parts unet,vae --sizes 512 --reps "$REPS"
# Guided step: ViT-B/32 guide, 4 cutouts, through the full VAE and the cheap decoders.
run "$BIN" bench --json --device cuda --dtype f16 --parts guidance --sizes 512 --guide-clip vit-b32 --cutouts 4 --reps "$REPS"
# Probe throughput, batch 64, f16.
for arch in vit-b32 vit-l14; do
  run "$BIN" bench --json --device cuda --dtype f16 --parts clip --clip-arch "$arch" --clip-batch 64 --reps "$REPS"
  run "$PYTHON" bench/transformers_clip.py --device cuda --dtype f16 --arch "$arch" --batch 64 --reps "$REPS"
done
cat "$LOG"
"$PYTHON" - "$LOG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["workload"], r["size"]), {})[r.get("tool", "artguide")] = r
print("| workload | size | artguide | peer | artguide/peer (time; for images/s, peer/artguide) | peer GPU peak |")
print("| --- | --- | --- | --- | --- | --- |")
for (w, s), d in sorted(by.items()):
    a = d.get("artguide")
    p = d.get("diffusers") or d.get("transformers")
    if a is None:
        continue
    if p is None:
        print(f'| {w} | {s} | {a["seconds"]:.4f} | - | - | - |')
        continue
    ratio = p["seconds"] / a["seconds"] if "images_per_s" in w else a["seconds"] / p["seconds"]
    gpu = f'{p["peak_gpu_bytes"] / 2**30:.2f} GiB' if "peak_gpu_bytes" in p else "n/a"
    print(f'| {w} | {s} | {a["seconds"]:.4f} | {p["seconds"]:.4f} | {ratio:.2f} | {gpu} |')
if ("unet_step_cfg_batch2", 512) in by:
    d = by[("unet_step_cfg_batch2", 512)]
    for tool, r in d.items():
        dec = by.get(("vae_decode", 512), {}).get(tool)
        if dec:
            print(f'{tool}: one 512x512 image, 30 DDIM steps + decode: {30 * r["seconds"] + dec["seconds"]:.2f} s')
PY
