// Just enough of CUDA to compile src/kernels/cuda.cu as C++20 and run its kernels on the CPU.
//
// A block's threads are OS threads and __syncthreads() is a std::barrier they share, so the
// kernels' shared-memory reductions run with real concurrency between barriers. __shared__
// arrays become function statics: blocks of a kernel that synchronises run one at a time, so
// its static array is the running block's shared memory (see launch).

#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

// cuda.cu defines these under __CUDACC_RTC__ only (NVRTC has no standard headers).
typedef uint16_t u16;
typedef long long i64;

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half through the compiler's _Float16, whose conversion from float rounds to nearest
// even (subnormals, infinities and NaN included) like PTX's cvt.rn.f16.f32.
inline float h2f(u16 h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
}
inline u16 f2h(float f) {
  _Float16 v = static_cast<_Float16>(f);
  u16 h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}

// bfloat16 exactly as cuda.cu's NVRTC versions.
inline float b2f(u16 b) { return __uint_as_float(((unsigned)b) << 16); }
inline u16 f2b(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return (u16)(u >> 16);
}

struct Dim3 {
  unsigned x;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier;
// Whether this thread's current block has reached a __syncthreads.
inline thread_local bool synced;

inline void __syncthreads() {
  synced = true;
  block_barrier->arrive_and_wait();
}

// Runs kernel<<<grid, block>>>(args...). Each thread is spawned once per launch and walks the
// blocks in order. A block that synchronised may share memory (and CUDA has every thread of
// it reach each barrier), so its threads wait for each other at its end before the next
// block reuses the static arrays; blocks of kernels without barriers overlap, as on a GPU
// (waiting there would cost a barrier of all the threads per block for nothing).
template <class... P>
void launch(void (*kernel)(P...), unsigned grid, unsigned block,
            std::type_identity_t<P>... args) {
  gridDim.x = grid;
  blockDim.x = block;
  std::barrier<> barrier(block);
  block_barrier = &barrier;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; t++)
    threads.emplace_back([&, t] {
      threadIdx.x = t;
      for (unsigned b = 0; b < grid; b++) {
        blockIdx.x = b;
        synced = false;
        kernel(args...);
        if (synced) barrier.arrive_and_wait();
      }
    });
  for (std::thread& t : threads) t.join();
}
