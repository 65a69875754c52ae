// artguide's own CUDA kernels, compiled by NVRTC at run time (src/kernels/cuda.rs) and, for the
// tests, as plain C++ against a small emulation of CUDA (tests/cuda_emulated/).
//
// Every kernel comes in three element types, by suffix: _f32 (float), _f16 and _bf16 (both as
// raw 16-bit patterns, converted through float here, so no CUDA header is needed and the
// emulation can use the same source). Arithmetic and statistics are in float in every type.
// Only blockIdx.x, blockDim.x, threadIdx.x, gridDim.x, static __shared__ arrays and
// __syncthreads are used (no warp shuffles), which keeps the emulation exact.
//
// Launch shapes (cuda.rs and the emulation's driver use the same ones):
// - elementwise kernels (im2col, gn_apply, bias_add, upsample_nearest): AG_THREADS threads per
//   block, grid-stride loops over a 64-bit element count;
// - gn_chunk_stats: AG_THREADS threads per block, one block per chunk of GN_CHUNK values of one
//   group;
// - gn_finalize: AG_THREADS threads per block, one thread per (image, group).

#define AG_THREADS 256
#define GN_CHUNK 16384

#ifdef __CUDACC_RTC__
typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ float h2f(u16 h) {
  float f;
  asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 f2h(float f) {
  u16 h;
  asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ u16 f2b(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return (u16)(u >> 16);
}
#endif

__device__ __forceinline__ float ld_f32(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ void st_f32(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ float ld_f16(const u16* p, i64 i) { return h2f(p[i]); }
__device__ __forceinline__ void st_f16(u16* p, i64 i, float v) { p[i] = f2h(v); }
__device__ __forceinline__ float ld_bf16(const u16* p, i64 i) { return b2f(p[i]); }
__device__ __forceinline__ void st_bf16(u16* p, i64 i, float v) { p[i] = f2b(v); }

// The sum of one value per thread of the block, returned to every thread. `buf` holds
// AG_THREADS floats; the barrier at the end lets the caller reuse it.
__device__ float block_sum(float v, float* buf) {
  unsigned t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (unsigned s = AG_THREADS / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  float total = buf[0];
  __syncthreads();
  return total;
}

#define AG_KERNELS(SUF, T)                                                                      \
  /* Unfolds images into cols of shape (n, cin*kh*kw, ho*wo): row r = (ci, ky, kx), pixels  \
     last, so consecutive threads read and write consecutive addresses (stride 1). */         \
  extern "C" __global__ void im2col_##SUF(const T* x, T* cols, i64 total, int cin, int h,     \
                                          int w, int kh, int kw, int stride, int pad, int ho, \
                                          int wo) {                                           \
    i64 pixels = (i64)ho * wo;                                                                \
    i64 rows = (i64)cin * kh * kw;                                                            \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;                       \
         i += (i64)gridDim.x * blockDim.x) {                                                  \
      i64 p = i % pixels;                                                                     \
      i64 r = (i / pixels) % rows;                                                            \
      i64 n = i / (pixels * rows);                                                            \
      int ci = (int)(r / (kh * kw));                                                          \
      int k = (int)(r % (kh * kw));                                                           \
      int iy = (int)(p / wo) * stride + k / kw - pad;                                         \
      int ix = (int)(p % wo) * stride + k % kw - pad;                                         \
      float v = 0.0f;                                                                         \
      if (iy >= 0 && iy < h && ix >= 0 && ix < w)                                             \
        v = ld_##SUF(x, ((n * cin + ci) * h + iy) * w + ix);                                  \
      st_##SUF(cols, i, v);                                                                   \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* Count, mean and centred sum of squares (M2) of chunk blockIdx.x: groups of `per_group`  \
     contiguous values, `chunks` chunks of GN_CHUNK values per group (the last one shorter). \
     Written as stats[3 * chunk + {0, 1, 2}]. */                                              \
  extern "C" __global__ void gn_chunk_stats_##SUF(const T* x, float* stats, i64 per_group,    \
                                                  int chunks) {                               \
    __shared__ float buf[AG_THREADS];                                                         \
    i64 group = blockIdx.x / chunks;                                                          \
    i64 start = (i64)(blockIdx.x % chunks) * GN_CHUNK;                                        \
    i64 end = start + GN_CHUNK < per_group ? start + GN_CHUNK : per_group;                    \
    const T* g = x + group * per_group;                                                       \
    float s = 0.0f;                                                                           \
    for (i64 i = start + threadIdx.x; i < end; i += AG_THREADS) s += ld_##SUF(g, i);          \
    float count = (float)(end - start);                                                       \
    float mean = block_sum(s, buf) / count;                                                   \
    float q = 0.0f;                                                                           \
    for (i64 i = start + threadIdx.x; i < end; i += AG_THREADS) {                             \
      float d = ld_##SUF(g, i) - mean;                                                        \
      q += d * d;                                                                             \
    }                                                                                         \
    float m2 = block_sum(q, buf);                                                             \
    if (threadIdx.x == 0) {                                                                   \
      stats[3 * (i64)blockIdx.x] = count;                                                     \
      stats[3 * (i64)blockIdx.x + 1] = mean;                                                  \
      stats[3 * (i64)blockIdx.x + 2] = m2;                                                    \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* y = silu?((x - mean) * rstd * w[c] + b[c]) over (n, channels, inner) values, with      \
     `cpg` channels per group and f32 weight and bias. */                                     \
  extern "C" __global__ void gn_apply_##SUF(const T* x, T* y, const float* mean_rstd,         \
                                            const float* w, const float* b, i64 total,        \
                                            int channels, i64 inner, int cpg, int silu) {     \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;                       \
         i += (i64)gridDim.x * blockDim.x) {                                                  \
      i64 nc = i / inner;                                                                     \
      int c = (int)(nc % channels);                                                           \
      i64 group = (nc / channels) * (channels / cpg) + c / cpg;                               \
      float mean = mean_rstd[2 * group], rstd = mean_rstd[2 * group + 1];                     \
      float scale = rstd * w[c];                                                              \
      float v = ld_##SUF(x, i) * scale + (b[c] - mean * scale);                               \
      if (silu) v = v / (1.0f + expf(-v));                                                    \
      st_##SUF(y, i, v);                                                                      \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* y = x + bias[(i / inner) % channels]: a per-channel bias over NCHW (inner = H*W) or a   \
     per-feature bias over rows (inner = 1). */                                               \
  extern "C" __global__ void bias_add_##SUF(const T* x, const T* bias, T* y, i64 total,       \
                                            int channels, i64 inner) {                        \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;                       \
         i += (i64)gridDim.x * blockDim.x) {                                                  \
      float v = ld_##SUF(x, i) + ld_##SUF(bias, (i / inner) % channels);                      \
      st_##SUF(y, i, v);                                                                      \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* Nearest upsampling by `s` of (n*c, h, w) planes into (n*c, h*s, w*s): a copy. */         \
  extern "C" __global__ void upsample_nearest_##SUF(const T* x, T* y, i64 total, int h,       \
                                                    int w, int s) {                           \
    i64 ow = (i64)w * s, oplane = (i64)h * s * ow;                                            \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;                       \
         i += (i64)gridDim.x * blockDim.x) {                                                  \
      i64 plane = i / oplane, r = i % oplane;                                                 \
      i64 iy = (r / ow) / s, ix = (r % ow) / s;                                               \
      y[i] = x[(plane * h + iy) * w + ix];                                                    \
    }                                                                                         \
  }

AG_KERNELS(f32, float)
AG_KERNELS(f16, u16)
AG_KERNELS(bf16, u16)

// Merges the chunk statistics of each (image, group) in double (Chan et al.'s pairwise
// update) into mean_rstd[2 * group + {0, 1}] = {mean, 1 / sqrt(var + eps)}.
extern "C" __global__ void gn_finalize(const float* stats, float* mean_rstd, int groups,
                                       int chunks, float eps) {
  int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int k = 0; k < chunks; k++) {
    const float* s = stats + 3 * ((i64)g * chunks + k);
    double nb = s[0], mb = s[1], m2b = s[2];
    double total = n + nb;
    double delta = mb - mean;
    mean += delta * nb / total;
    m2 += m2b + delta * delta * n * nb / total;
    n = total;
  }
  mean_rstd[2 * g] = (float)mean;
  mean_rstd[2 * g + 1] = (float)(1.0 / sqrt(m2 / n + (double)eps));
}
