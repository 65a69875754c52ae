"""Compiles src/kernels/cuda.cu as artguide does at run time (NVRTC, to PTX) and then to SASS
with ptxas for one GPU, and prints each kernel's registers, shared memory and spills: what the
compiler decides costs no GPU time to read. Exits 1 if any kernel spills to local memory.

Usage (bench/build_cuda.sh runs it): python3 bench/kernel_resources.py CU_DIR [SM]
  CU_DIR: the nvidia/cu13 folder of PyPI's CUDA wheels (nvrtc and nvcc); SM: default 90.
"""

import ctypes
import os
import re
import subprocess
import sys
import tempfile


def ptx(cu_dir, source):
    # libnvrtc loads libnvrtc-builtins from its own folder through LD_LIBRARY_PATH, which the
    # caller sets (it must be set before the process starts).
    lib = ctypes.CDLL(os.path.join(cu_dir, "lib", "libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"cuda.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    # No options, as cudarc's compile_ptx: NVRTC's default virtual architecture, which the
    # driver (here ptxas) compiles for the GPU at hand.
    rc = lib.nvrtcCompileProgram(prog, 0, None)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(f"NVRTC could not compile src/kernels/cuda.cu:\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    out = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, out)
    return out.value


def main():
    cu_dir = sys.argv[1]
    arch = sys.argv[2] if len(sys.argv) > 2 else "90"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "src", "kernels", "cuda.cu"), "rb") as f:
        code = ptx(cu_dir, f.read())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "artguide.ptx")
        with open(path, "wb") as f:
            f.write(code)
        report = subprocess.run(
            [os.path.join(cu_dir, "bin", "ptxas"), f"-arch=sm_{arch}", "-v", path,
             "-o", os.path.join(tmp, "artguide.cubin")],
            capture_output=True, text=True, check=True).stderr
    rows, name, spilled = [], None, []
    for line in report.splitlines():
        m = re.search(r"entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name and (int(m.group(1)) or int(m.group(2))):
            spilled.append(name)
        m = re.search(r"Used (\d+) registers(.*)", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", m.group(2))
            rows.append((name, int(m.group(1)), int(smem.group(1)) if smem else 0))
    print(f"| kernel (sm_{arch}) | registers | shared memory bytes |")
    print("| --- | --- | --- |")
    for name, regs, smem in sorted(rows):
        print(f"| {name} | {regs} | {smem} |")
    if spilled:
        sys.exit(f"kernels spilling to local memory: {', '.join(sorted(spilled))}")


if __name__ == "__main__":
    main()
