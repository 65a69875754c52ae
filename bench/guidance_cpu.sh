#!/usr/bin/env bash
# Cost of CLIP guidance per sampling step, per guidance decoder, on real-size SD 1.5 with a
# random-weight ViT-B/32 guide (4 cutouts). Each decoder runs in its own process so its peak
# RSS is its own. Usage: bench/guidance_cpu.sh SIZES DECODERS REPS
#   e.g. bench/guidance_cpu.sh 256 vae,taesd,linear 1
# Set CARGO_TARGET_DIR to reuse a release build.
set -euo pipefail
sizes=${1:-256}
decoders=${2:-vae,taesd,linear}
reps=${3:-1}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/artguide
echo "| workload | size | seconds (median of $reps) | peak RSS | guided / unguided |"
echo "| --- | --- | --- | --- | --- |"
for d in ${decoders//,/ }; do
  "$bin" bench --parts guidance --sizes "$sizes" --reps "$reps" --guidance-decoders "$d" \
    --guide-clip vit-b32 --cutouts 4 | tail -n +3
done
