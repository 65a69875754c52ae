#!/usr/bin/env bash
# Builds `artguide --features cuda` on a machine without a CUDA toolkit or GPU, from PyPI's
# CUDA 13.0 wheels, for copying to a GPU machine (which needs the NVIDIA driver and the
# cuBLAS / cuRAND / NVRTC / cudart 13 libraries, e.g. those of a PyTorch cu130 install, on
# LD_LIBRARY_PATH).
#
# Usage: bash bench/build_cuda.sh [VENV] [TARGET_DIR]
#   defaults: VENV=/work/venv-cuda  TARGET_DIR=target-cuda; needs python3, gcc, cargo, xz.
#   CUDNN=0 skips the cudnn build (half the build time; gpu.sh then skips its variants).
# Leaves .gpu/ (git-ignored) ready to carry to the GPU machine, where bench/gpu.sh unpacks it:
#   .gpu/artguide-cuda.tar.xz  the binary and tests/cuda.rs's test executable, stripped, each
#                              built twice: `--features cuda` and `--features cudnn` (-cudnn);
#   .gpu/wheels/               diffusers (and importlib_metadata) wheels for the peer;
#   .gpu/kernel-resources.md   registers and shared memory of src/kernels/cuda.cu's kernels;
#   .gpu/BUILD                 the commit built and when.
# Why 13.0: so nothing in the binary needs a newer driver than the oldest CUDA 13 one (PTX JIT
# has no minor-version compatibility). CUDA_COMPUTE_CAP=90 is
# the H100; set it for other GPUs (89 L4/4090, 86 A10/3090, 80 A100).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/work/venv-cuda}
TARGET=$(realpath -m "${2:-target-cuda}")
# Read before building: a commit made while cargo runs is not in the binaries.
BUILT_FROM="$(git describe --always --dirty) $(date -u +%FT%TZ)"
if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-crt==13.0.88" "nvidia-cuda-runtime==13.0.88" "nvidia-cuda-cccl==13.0.85" \
  "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
# Link directory: unversioned names for the wheels' libraries, and a stub libcuda (the driver
# is not on PyPI) that defines every driver function cudarc declares; the real libcuda.so.1
# replaces it at run time through its SONAME.
LINK=$TARGET/cuda-link
mkdir -p "$LINK"
for l in cublas cublasLt cudart nvrtc; do ln -sf "$CU/lib/lib$l.so.13" "$LINK/lib$l.so"; done
ln -sf "$CU/lib/libcurand.so.10" "$LINK/libcurand.so"
CUDARC=$(cargo metadata --format-version 1 --features cuda | "$VENV/bin/python" -c \
  'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
grep -o "fn cu[A-Za-z0-9_]*" "$CUDARC/src/driver/sys/mod.rs" | sort -u \
  | sed 's/fn \(.*\)/void \1(void) {}/' >"$LINK/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda_stub.c"
# The same for cuDNN (the `cudnn` build): the GPU machine's PyTorch brings libcudnn.so.9
# (nvidia-cudnn-cu13); a 600 MB wheel is not needed to link against it.
grep -o "fn cudnn[A-Za-z0-9_]*" "$CUDARC/src/cudnn/sys/mod.rs" | sort -u \
  | sed 's/fn \(.*\)/void \1(void) {}/' >"$LINK/libcudnn_stub.c"
gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$LINK/libcudnn.so" "$LINK/libcudnn_stub.c"
export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-L $LINK" CARGO_TARGET_DIR="$TARGET"
STAGE=$TARGET/gpu-stage
rm -rf "$STAGE" && mkdir -p "$STAGE"
# build FEATURES SUFFIX: the binary and tests/cuda.rs's test executable (`cargo test --release`
# uses the release profile, so it reuses the build), stripped into the stage. Both feature
# sets share one target directory: cargo keeps each one's artifacts, and candle's kernels
# (the slow part) do not depend on cuDNN.
build() {
  cargo build --release --features "$1"
  local exe
  exe=$(cargo test --release --features "$1" --test cuda --no-run --message-format=json \
    | "$VENV/bin/python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')
  strip -o "$STAGE/artguide$2" "$TARGET/release/artguide"
  strip -o "$STAGE/cuda-parity$2" "$exe"
}
build cuda ""
STAGED=(artguide cuda-parity)
if [ "${CUDNN:-1}" != 0 ]; then
  build cudnn -cudnn
  STAGED+=(artguide-cudnn cuda-parity-cudnn)
fi
# The device tool carries at most 64 MiB with the working tree (~42 MB of it tracked files):
# each stripped executable is ~65 MB, mostly candle's PTX, which xz packs to ~9 MB; one
# archive with a dictionary larger than all four shares what they have in common.
mkdir -p .gpu/wheels
# The kernels' registers and shared memory as ptxas compiles NVRTC's PTX for this GPU (a spill
# to local memory fails the build before .gpu/ changes).
LD_LIBRARY_PATH="$CU/lib" "$VENV/bin/python" bench/kernel_resources.py "$CU" "$CUDA_COMPUTE_CAP" \
  >"$STAGE/kernel-resources.md"
tar -C "$STAGE" -cf - "${STAGED[@]}" \
  | xz -9e -T1 --lzma2=preset=9e,dict=384MiB >.gpu/artguide-cuda.tar.xz.tmp
mv .gpu/artguide-cuda.tar.xz.tmp .gpu/artguide-cuda.tar.xz
cp "$STAGE/kernel-resources.md" .gpu/
# What was built (the tree when the build began), for gpu.sh's log: a later commit may leave
# .gpu/ behind the code.
echo "$BUILT_FROM" >.gpu/BUILD
# The GPU image has torch, transformers and diffusers' other needs but neither diffusers nor
# importlib_metadata; pure-Python wheels, pinned as in tests/reference/requirements.txt.
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels \
  "diffusers==$(sed -n 's/^diffusers==//p' tests/reference/requirements.txt)" "importlib_metadata==8.7.0"
ls -la "$STAGE" .gpu .gpu/wheels
echo "carried with the working tree: $(( ($(git ls-files -z | xargs -0 cat | wc -c) + $(du -cb .gpu | tail -1 | cut -f1)) / 1048576 )) MiB of 64"
