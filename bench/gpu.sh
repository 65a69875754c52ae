#!/usr/bin/env bash
# Issue 6's GPU measurements in one call: the CUDA parity tests, then artguide (candle, CUDA)
# and PyTorch (diffusers / transformers) on the same GPU in the same run, each workload in a
# fresh process whose GPU memory peak nvidia-smi samples, ending with a markdown table of
# ratios (bench/gpu_table.py; rerun it on the returned gpu.jsonl).
#
# Usage, on the GPU machine from the repository root, after `bash bench/build_cuda.sh` here
# (device tool: carry [".gpu"]; the machine has no Rust toolchain and no network):
#   bash bench/gpu.sh [GROUPS] [REPS]
#   GROUPS: comma list of parity,unet,vae,guidance,clip,variants,profile (default: all but
#           profile); parity runs tests/cuda.rs and a same-seed-same-bytes check at real size;
#           profile runs Nsight Compute (NCU, default ncu) on a UNet step and a VAE decode at
#           256 and a CLIP ViT-L/14 batch, without and with ARTGUIDE_CUDA_KERNELS=1, ranked
#           per kernel by bench/ncu_top.py into profile.md and profile.json
#   REPS:   timed repetitions per measurement after one warm-up, median reported (default 5)
# Environment: OUT (where gpu.jsonl, gpu.log, table.md, the parity logs, profile.md/json and
# logs.tgz, every other log packed, go: at most 8 files; the device tool sets it), BIN and
# PARITY (use these executables instead of unpacking .gpu/artguide-cuda.tar.xz), PYTHON
# (default python3, which needs torch with CUDA and transformers; diffusers comes from
# .gpu/wheels); DEVICE, DTYPE, SIZE (default cuda, f16, 512: a CPU smoke test of this
# script sets them smaller); DEADLINE (seconds for the whole call, default 570: later steps
# are skipped); PROFILE_KERNELS (default "0 1": profile without and with the own kernels).
# Workloads (issue 6): SD 1.5 at 512x512, f16: a CFG UNet step (batch 2) and a VAE decode;
# the same step with CLIP guidance (random ViT-B/32 guide, 4 cutouts) through the full VAE,
# TAESD and the linear decoder; CLIP ViT-B/32 and ViT-L/14 image embedding, batch 64, f16.
# Variants for diagnosis (the guidance and clip groups run the own kernels' variant beside
# each workload, the variants group the UNet and VAE ones): artguide with its own CUDA
# kernels (ARTGUIDE_CUDA_KERNELS=1: im2col convolution, GroupNorm, bias adds, cuBLASLt
# Linear, activations, upsampling, attention without head copies; parity and repro run with
# them too), the UNet call as a CUDA graph (ARTGUIDE_CUDA_GRAPHS=1; repro too: a hash equal
# to `repro cuda`'s means the graph gives the eager bytes), all three switches together, the
# device's memory pool kept and no per-buffer events (ARTGUIDE_CUDA_TUNING=1, alone and with
# the kernels), artguide in bf16, diffusers with its classic (non-SDPA) attention, artguide
# built with cuDNN convolutions (BIN_CUDNN, PARITY_CUDNN; unpacked from .gpu when there).
set -uo pipefail
cd "$(dirname "$0")/.."
GROUPS_=${1:-parity,unet,vae,guidance,clip,variants}
REPS=${2:-5}
OUTDIR=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-f16}
SIZE=${SIZE:-512}
LOG=$OUTDIR/gpu.jsonl
: >"$LOG"
# The device tool returns at most 8 files from $OUT: the records, logs and tables go there,
# every other file to WORK, packed into $OUT/logs.tgz after each step (so a call cut short
# still returns what it had).
WORK=$(mktemp -d)
pack() { tar -czf "$WORK.tgz" -C "$WORK" . && mv "$WORK.tgz" "$OUTDIR/logs.tgz"; }
want() { [[ ",$GROUPS_," == *",$1,"* ]]; }
# One deadline for the whole call (the device tool stops a command at 600 s): each step's
# timeout is cut to what is left, and a step that would get less than 30 s is skipped.
DEADLINE=${DEADLINE:-570}
# limit CAP: prints min(CAP, seconds left - 10), or fails when under 30 s are left.
limit() {
  local left=$((DEADLINE - SECONDS - 10))
  [ "$left" -ge 30 ] || { say "deadline: a step skipped (${DEADLINE} s for the call)" >&2; return 1; }
  echo $((left < $1 ? left : $1))
}
# Every process loads candle's PTX; the driver's cache of what it compiled keeps it.
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
say() { echo "== $*" | tee -a "$OUTDIR/gpu.log"; }

if [ -z "${BIN:-}" ]; then
  [ -f .gpu/artguide-cuda.tar.xz ] || { echo "no .gpu/artguide-cuda.tar.xz: run bench/build_cuda.sh and carry .gpu" >&2; exit 2; }
  "$PYTHON" - .gpu/artguide-cuda.tar.xz /tmp/artguide-cuda <<'PY' || exit 2
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="data")
    except TypeError:  # Python < 3.12
        t.extractall(sys.argv[2])
PY
  BIN=/tmp/artguide-cuda/artguide
  PARITY=${PARITY:-/tmp/artguide-cuda/cuda-parity}
  if [ -x /tmp/artguide-cuda/artguide-cudnn ]; then
    BIN_CUDNN=${BIN_CUDNN:-/tmp/artguide-cuda/artguide-cudnn}
    PARITY_CUDNN=${PARITY_CUDNN:-/tmp/artguide-cuda/cuda-parity-cudnn}
  fi
fi
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# cuBLAS / cuRAND / NVRTC / cudart 13 and cuDNN 9 from PyTorch's CUDA wheels (the driver's
# libcuda is on the system path).
for d in $("$PYTHON" -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("cu13", "cudnn")))' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
say "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUTDIR/gpu.log"
"$PYTHON" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)' | tee -a "$OUTDIR/gpu.log"
if ldd "$BIN" | grep "not found"; then
  echo "$BIN: shared libraries not found (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})" >&2
  exit 3
fi
"$BIN" --version | tee -a "$OUTDIR/gpu.log"
[ -f .gpu/BUILD ] && say "built from $(cat .gpu/BUILD)"
# The cuDNN build is a variant: without a loadable libcudnn 9 the rest still runs.
if [ -n "${BIN_CUDNN:-}" ] && ! "$BIN_CUDNN" --version | tee -a "$OUTDIR/gpu.log"; then
  ldd "$BIN_CUDNN" | grep -i "cudnn\|not found" | tee -a "$OUTDIR/gpu.log"
  say "cudnn build does not start: its variants are skipped"
  BIN_CUDNN=
  PARITY_CUDNN=
fi

# parity LABEL LOG BIN [ENV=VALUE...]: tests/cuda.rs's executable BIN with ENV, its output to
# LOG; logs and returns its exit status (1 when the deadline skips it).
parity() {
  local label=$1 log=$2 bin=$3 t rc
  shift 3
  say "parity, $label"
  t=$(limit 240) || return 1
  env "$@" timeout "$t" "$bin" --include-ignored --nocapture --test-threads 1 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo "parity ($label) rc=$rc" | tee -a "$OUTDIR/gpu.log"
  return "$rc"
}

if want parity && [ -z "${PARITY:-}" ]; then
  say "parity: skipped, no PARITY executable given"
elif want parity; then
  parity "tests/cuda.rs, CPU f32 vs CUDA f16" "$OUTDIR/parity.log" "$PARITY"
  if ! parity "own CUDA kernels" "$OUTDIR/parity-kernels.log" "$PARITY" ARTGUIDE_CUDA_KERNELS=1; then
    # The tiny-model pipeline tests once per kernel group (seconds each): the groups that
    # pass can be switched on alone. The names are `kernels::CudaKernel::ALL`'s.
    for g in conv norm bias linear activation attention upsample; do
      t=$(limit 60) || break
      ARTGUIDE_CUDA_KERNELS=$g timeout "$t" "$PARITY" --include-ignored --test-threads 1 \
        cuda_f16_matches_cpu_f32 cuda_guidance_gradient_matches_cpu cuda_f16_probe_embeddings \
        >"$WORK/parity-kernels-$g.log" 2>&1
      echo "parity (kernels $g only) rc=$?" | tee -a "$OUTDIR/gpu.log"
    done
    pack
  fi
  if [ -n "${PARITY_CUDNN:-}" ]; then
    parity "cudnn build" "$WORK/parity-cudnn.log" "$PARITY_CUDNN"
  fi
fi

# repro LABEL BIN [ENV=VALUE...] (right after the parity tests): the same real-size generation twice (random
# SD 1.5 weights, euler-a's per-step noise, CLIP guidance through the VAE with the tiny
# fixture CLIP) must give the same PNG bytes: the product's reproducibility promise, on
# this device.
repro() {
  local label=$1 bin=$2 sums=()
  shift 2
  for i in 1 2; do
    rm -rf "/tmp/repro-$label-$i"
    local t
    t=$(limit 300) || return
    env "$@" timeout "$t" "$bin" --quiet generate --random-weights sd15 --device "$DEVICE" --dtype "$DTYPE" \
      --prompt "a harbour at dusk" --steps 3 --scheduler euler-a --seed 1 --width "$SIZE" \
      --height "$SIZE" --clip tests/fixtures/clip/tiny-clip-a --clip-prompt "a storm at sea" \
      --guidance-decoder vae --skip-nonfinite-guidance --out "/tmp/repro-$label-$i" \
      2>>"$WORK/repro.err" || { say "repro $label: run $i failed (logs.tgz: repro.err)"; pack; return; }
    sums+=("$(cat /tmp/repro-$label-$i/*.png | sha256sum | cut -c1-16)")
  done
  if [ "${sums[0]}" = "${sums[1]}" ]; then
    say "repro $label: same PNG bytes in two runs (${sums[0]})"
  else
    say "repro $label: DIFFERENT PNG bytes in two runs (${sums[0]} vs ${sums[1]})"
  fi
  pack
}
# Right after the parity tests: the switches are turned on by default only if these hold.
if want parity; then
  repro cuda "$BIN"
  repro cuda-kernels "$BIN" ARTGUIDE_CUDA_KERNELS=1
  repro cuda-graphs "$BIN" ARTGUIDE_CUDA_GRAPHS=1
  [ -n "${BIN_CUDNN:-}" ] && repro cudnn "$BIN_CUDNN"
fi

N=0
# run LABEL COMMAND...: runs one workload process, samples the GPU's used memory meanwhile, and
# appends its JSON lines to gpu.jsonl with `variant` and `peak_gpu_smi_mib` (the sampled peak
# above the level before the process started: its context, weights and activations).
run() {
  local label=$1; shift
  N=$((N + 1))
  local smi=$WORK/smi.$N.txt raw=$WORK/run.$N.out
  local base t
  t=$(limit 400) || return
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"$smi" 2>/dev/null &
  local spid=$! t0=$SECONDS
  timeout "$t" "$@" >"$raw" 2>"$WORK/run.$N.err"
  local rc=$?
  kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
  local peak
  peak=$(sort -n "$smi" | tail -1)
  echo "[$N] $label rc=$rc $((SECONDS - t0)) s, GPU peak $((${peak:-0} - base)) MiB: $*" | tee -a "$OUTDIR/gpu.log"
  [ "$rc" = 0 ] || tail -5 "$WORK/run.$N.err"
  "$PYTHON" -c '
import json, sys
label, peak = sys.argv[1], int(sys.argv[2])
for line in open(sys.argv[3]):
    if "\"workload\"" in line:
        r = json.loads(line)
        r["variant"], r["peak_gpu_smi_mib"] = label, peak
        print(json.dumps(r))' "$label" "$((${peak:-0} - base))" "$raw" >>"$LOG"
  pack
}
AG=("$BIN" bench --json --device "$DEVICE" --arch sd15 --sizes "$SIZE" --reps "$REPS")
PY=("$PYTHON" bench/diffusers_bench.py --device "$DEVICE" --arch sd15 --sizes "$SIZE" --reps "$REPS")
for part in unet vae; do
  if want $part; then
    say "$part"
    run artguide "${AG[@]}" --dtype "$DTYPE" --parts $part
    run diffusers "${PY[@]}" --dtype "$DTYPE" --parts $part
  fi
done
if want guidance; then
  say "guidance"
  for d in vae taesd linear; do
    run artguide "${AG[@]}" --dtype "$DTYPE" --parts guidance --guide-clip vit-b32 --cutouts 4 --guidance-decoders $d
    run diffusers "${PY[@]}" --dtype "$DTYPE" --parts guidance --guide-clip vit-b32 --cutouts 4 --guidance-decoders $d
    run artguide-kernels env ARTGUIDE_CUDA_KERNELS=1 "${AG[@]}" --dtype "$DTYPE" --parts guidance --guide-clip vit-b32 --cutouts 4 --guidance-decoders $d
  done
fi
if want clip; then
  say "clip"
  for arch in vit-b32 vit-l14; do
    run artguide "$BIN" bench --json --device "$DEVICE" --dtype "$DTYPE" --parts clip --clip-arch $arch --clip-batch 64 --reps "$REPS"
    run transformers "$PYTHON" bench/transformers_clip.py --device "$DEVICE" --dtype "$DTYPE" --arch $arch --batch 64 --reps "$REPS"
    run artguide-kernels env ARTGUIDE_CUDA_KERNELS=1 "$BIN" bench --json --device "$DEVICE" --dtype "$DTYPE" --parts clip --clip-arch $arch --clip-batch 64 --reps "$REPS"
  done
fi
if want variants; then
  say "variants"
  # The baseline in the same call (the machine of another call may differ).
  want unet || run artguide "${AG[@]}" --dtype "$DTYPE" --parts unet,vae
  # Most telling first: a call that reaches its deadline skips the last.
  run artguide-kernels env ARTGUIDE_CUDA_KERNELS=1 "${AG[@]}" --dtype "$DTYPE" --parts unet,vae
  run artguide-graphs env ARTGUIDE_CUDA_GRAPHS=1 "${AG[@]}" --dtype "$DTYPE" --parts unet
  run artguide-all env ARTGUIDE_CUDA_KERNELS=1 ARTGUIDE_CUDA_TUNING=1 ARTGUIDE_CUDA_GRAPHS=1 "${AG[@]}" --dtype "$DTYPE" --parts unet,vae
  run artguide-tuned env ARTGUIDE_CUDA_TUNING=1 "${AG[@]}" --dtype "$DTYPE" --parts unet,vae
  run artguide-kernels-tuned env ARTGUIDE_CUDA_KERNELS=1 ARTGUIDE_CUDA_TUNING=1 "${AG[@]}" --dtype "$DTYPE" --parts unet,vae
  run artguide-bf16 "${AG[@]}" --dtype bf16 --parts unet,vae
  run diffusers-classic-attention "${PY[@]}" --dtype "$DTYPE" --parts unet --attention classic
  if [ -n "${BIN_CUDNN:-}" ]; then
    AGC=("$BIN_CUDNN" "${AG[@]:1}")
    run artguide-cudnn "${AGC[@]}" --dtype "$DTYPE" --parts unet,vae
    run artguide-cudnn "${AGC[@]}" --dtype "$DTYPE" --parts guidance --guide-clip vit-b32 --cutouts 4 --guidance-decoders vae
  fi
fi
if want profile; then
  NCU=${NCU:-ncu}
  if ! command -v "$NCU" >/dev/null; then
    say "profile: skipped, $NCU not found (set NCU)"
  else
    say "profile (Nsight Compute)"
    specs=()
    for k in ${PROFILE_KERNELS:-0 1}; do
      for w in "unet:--arch sd15 --sizes 256 --parts unet" "vae:--arch sd15 --sizes 256 --parts vae" \
        "clip-l14:--parts clip --clip-arch vit-l14 --clip-batch 64"; do
        name=${w%%:*}-kernels$k
        t=$(limit 400) || break 2
        # shellcheck disable=SC2086
        ARTGUIDE_CUDA_KERNELS=$k timeout "$t" "$NCU" --metrics gpu__time_duration.sum --csv \
          --cache-control none --clock-control none \
          --log-file "$WORK/ncu-$name.csv" "$BIN" bench --device "$DEVICE" --dtype "$DTYPE" \
          --reps 1 ${w#*:} >"$WORK/ncu-$name.out" 2>&1 \
          && specs+=("$name=$WORK/ncu-$name.csv") || say "profile $name failed (logs.tgz: ncu-$name.out)"
        pack
      done
    done
    [ ${#specs[@]} -gt 0 ] && "$PYTHON" bench/ncu_top.py "${specs[@]}" --json "$OUTDIR/profile.json" \
      | tee "$OUTDIR/profile.md"
  fi
fi
"$PYTHON" bench/gpu_table.py "$LOG" | tee "$OUTDIR/table.md"
