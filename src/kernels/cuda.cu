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
// - row kernels (im2col, gn_apply, gn_grad_apply, bias_add, geglu, activation,
//   upsample_nearest, patch_sum) see their data as `rows` rows of `inner` contiguous values (a channel
//   plane, an im2col row, a Linear output row): AG_THREADS threads per block, `segs` blocks
//   per row (grid = rows * segs), each block striding over its row, so the per-element work
//   has no 64-bit division (the row's constants, such as a channel's scale, are computed once
//   per block);
// - gn_chunk_stats: AG_THREADS threads per block, one block per chunk of GN_CHUNK values of one
//   group;
// - gn_grad_chunk_sums: as gn_chunk_stats (same chunks); gn_grad_apply: a row kernel, as
//   gn_apply;
// - gn_finalize, gn_grad_finalize: AG_THREADS threads per block, one thread per (image, group).

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

// Exact GELU, 0.5 x (1 + erf(x / sqrt(2))), as PyTorch's default and candle's gelu_erf.
__device__ __forceinline__ float gelu_erf(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

#define AG_KERNELS(SUF, T)                                                                    \
  /* Unfolds images into cols of shape (n, cin*kh*kw, ho*wo): row (n, ci, ky, kx) of ho*wo    \
     pixels, so consecutive threads read and write consecutive addresses (stride 1).          \
     rows = n*cin*kh*kw, inner = ho*wo. */                                                    \
  extern "C" __global__ void im2col_##SUF(const T* x, T* cols, int segs, int inner, int cin,  \
                                          int h, int w, int kh, int kw, int stride, int pad,  \
                                          int wo) {                                           \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    int per_image = cin * kh * kw;                                                            \
    int n = row / per_image, r = row % per_image;                                             \
    int ci = r / (kh * kw), k = r % (kh * kw);                                                \
    int ky = k / kw - pad, kx = k % kw - pad;                                                 \
    const T* plane = x + ((i64)n * cin + ci) * h * w;                                         \
    T* dst = cols + (i64)row * inner;                                                         \
    for (int p = seg * AG_THREADS + threadIdx.x; p < inner; p += segs * AG_THREADS) {         \
      int oy = p / wo;                                                                        \
      int iy = oy * stride + ky, ix = (p - oy * wo) * stride + kx;                            \
      float v = 0.0f;                                                                         \
      if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = ld_##SUF(plane, (i64)iy * w + ix);      \
      st_##SUF(dst, p, v);                                                                    \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* Count, mean and centred sum of squares (M2) of chunk blockIdx.x: groups of `per_group`   \
     contiguous values, `chunks` chunks of GN_CHUNK values per group (the last one shorter).  \
     Written as stats[3 * chunk + {0, 1, 2}]. */                                              \
  extern "C" __global__ void gn_chunk_stats_##SUF(const T* x, float* stats, i64 per_group,    \
                                                  int chunks) {                               \
    __shared__ float buf[AG_THREADS];                                                         \
    i64 group = blockIdx.x / chunks;                                                          \
    i64 start = (i64)(blockIdx.x % chunks) * GN_CHUNK;                                        \
    int len = (int)(per_group - start < GN_CHUNK ? per_group - start : GN_CHUNK);             \
    const T* g = x + group * per_group + start;                                               \
    float s = 0.0f;                                                                           \
    for (int i = threadIdx.x; i < len; i += AG_THREADS) s += ld_##SUF(g, i);                  \
    float mean = block_sum(s, buf) / (float)len;                                              \
    float q = 0.0f;                                                                           \
    for (int i = threadIdx.x; i < len; i += AG_THREADS) {                                     \
      float d = ld_##SUF(g, i) - mean;                                                        \
      q += d * d;                                                                             \
    }                                                                                         \
    float m2 = block_sum(q, buf);                                                             \
    if (threadIdx.x == 0) {                                                                   \
      stats[3 * (i64)blockIdx.x] = (float)len;                                                \
      stats[3 * (i64)blockIdx.x + 1] = mean;                                                  \
      stats[3 * (i64)blockIdx.x + 2] = m2;                                                    \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* y = silu?((x - mean) * rstd * w[c] + b[c]) with f32 weight and bias; rows are the        \
     (image, channel) planes of `inner` values, `cpg` channels per group. */                  \
  extern "C" __global__ void gn_apply_##SUF(const T* x, T* y, const float* mean_rstd,         \
                                            const float* w, const float* b, int segs,         \
                                            int inner, int channels, int cpg, int silu) {     \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    int c = row % channels;                                                                   \
    int group = (row / channels) * (channels / cpg) + c / cpg;                                \
    /* Centred first: x * scale + (b - mean * scale) loses digits when |mean| >> std. */      \
    float mean = mean_rstd[2 * group], scale = mean_rstd[2 * group + 1] * w[c], bc = b[c];    \
    const T* src = x + (i64)row * inner;                                                      \
    T* dst = y + (i64)row * inner;                                                            \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      float v = (ld_##SUF(src, i) - mean) * scale + bc;                                       \
      if (silu) v = v / (1.0f + expf(-v));                                                    \
      st_##SUF(dst, i, v);                                                                    \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* dL/dxhat of y = silu?(xhat * w[c] + b[c]) from dL/dy: the shared first step of the       \
     group-norm backward kernels. */                                                          \
  __device__ __forceinline__ float gn_dxhat_##SUF(float xhat, float dy, float wc, float bc,   \
                                                  int silu) {                                 \
    if (silu) {                                                                               \
      float y = xhat * wc + bc;                                                               \
      float sg = 1.0f / (1.0f + expf(-y));                                                    \
      dy *= sg * (1.0f + y * (1.0f - sg));                                                    \
    }                                                                                         \
    return dy * wc;                                                                           \
  }                                                                                           \
                                                                                              \
  /* Sums of dL/dxhat and dL/dxhat * xhat over chunk blockIdx.x (gn_chunk_stats's chunks),    \
     written as sums[2 * chunk + {0, 1}]; `groups` groups per image of `cpg` channels of      \
     `inner` values, per_group < 2^31 (cuda.rs checks). */                                    \
  extern "C" __global__ void gn_grad_chunk_sums_##SUF(                                        \
      const T* x, const T* dy, const float* mean_rstd, const float* w, const float* b,        \
      float* sums, i64 per_group, int chunks, int inner, int groups, int cpg, int silu) {     \
    __shared__ float buf[AG_THREADS];                                                         \
    i64 group = blockIdx.x / chunks;                                                          \
    i64 start = (i64)(blockIdx.x % chunks) * GN_CHUNK;                                        \
    int len = (int)(per_group - start < GN_CHUNK ? per_group - start : GN_CHUNK);             \
    int c0 = (int)(group % groups) * cpg;                                                     \
    float mean = mean_rstd[2 * group], rstd = mean_rstd[2 * group + 1];                       \
    const T* xg = x + group * per_group + start;                                              \
    const T* dg = dy + group * per_group + start;                                             \
    float a1 = 0.0f, a2 = 0.0f;                                                               \
    for (int i = threadIdx.x; i < len; i += AG_THREADS) {                                     \
      int c = c0 + ((int)start + i) / inner;                                                  \
      float xhat = (ld_##SUF(xg, i) - mean) * rstd;                                           \
      float d = gn_dxhat_##SUF(xhat, ld_##SUF(dg, i), w[c], b[c], silu);                      \
      a1 += d;                                                                                \
      a2 += d * xhat;                                                                         \
    }                                                                                         \
    a1 = block_sum(a1, buf);                                                                  \
    a2 = block_sum(a2, buf);                                                                  \
    if (threadIdx.x == 0) {                                                                   \
      sums[2 * (i64)blockIdx.x] = a1;                                                         \
      sums[2 * (i64)blockIdx.x + 1] = a2;                                                     \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* dL/dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), the group means in     \
     grad_means[2 * group + {0, 1}]; rows are the (image, channel) planes, as gn_apply's. */  \
  extern "C" __global__ void gn_grad_apply_##SUF(                                             \
      const T* x, const T* dy, T* dx, const float* mean_rstd, const float* grad_means,        \
      const float* w, const float* b, int segs, int inner, int channels, int cpg, int silu) { \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    int c = row % channels;                                                                   \
    int group = (row / channels) * (channels / cpg) + c / cpg;                                \
    float mean = mean_rstd[2 * group], rstd = mean_rstd[2 * group + 1];                       \
    float m1 = grad_means[2 * group], m2 = grad_means[2 * group + 1];                         \
    float wc = w[c], bc = b[c];                                                               \
    i64 base = (i64)row * inner;                                                              \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      float xhat = (ld_##SUF(x, base + i) - mean) * rstd;                                     \
      float d = gn_dxhat_##SUF(xhat, ld_##SUF(dy, base + i), wc, bc, silu);                   \
      st_##SUF(dx, base + i, rstd * (d - m1 - xhat * m2));                                    \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* y = x + bias over rows of `inner` values: per_row, bias[row % channels] (NCHW planes,    \
     inner = H*W); else bias[i] along the row (a Linear's features, inner = features). */     \
  extern "C" __global__ void bias_add_##SUF(const T* x, const T* bias, T* y, int segs,        \
                                            int inner, int channels, int per_row) {           \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    const T* src = x + (i64)row * inner;                                                      \
    T* dst = y + (i64)row * inner;                                                            \
    float rb = per_row ? ld_##SUF(bias, row % channels) : 0.0f;                               \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      float v = ld_##SUF(src, i) + (per_row ? rb : ld_##SUF(bias, i));                        \
      st_##SUF(dst, i, v);                                                                    \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* GEGLU, value * gelu_erf(gate), for rows of [value | gate] (2 * inner values) into rows   \
     of `inner` values (Stable Diffusion's transformer feed-forward). */                      \
  extern "C" __global__ void geglu_##SUF(const T* p, T* y, int segs, int inner) {             \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    const T* value = p + (i64)row * 2 * inner;                                                \
    T* dst = y + (i64)row * inner;                                                            \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      float g = ld_##SUF(value, inner + i);                                                   \
      st_##SUF(dst, i, ld_##SUF(value, i) * gelu_erf(g));                                     \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* An activation over rows of `inner` values: op 0 quick_gelu, x * sigmoid(1.702 x)         \
     (OpenAI CLIP), op 1 exact GELU. */                                                       \
  extern "C" __global__ void activation_##SUF(const T* x, T* y, int segs, int inner, int op) { \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    i64 base = (i64)row * inner;                                                              \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      float v = ld_##SUF(x, base + i);                                                        \
      st_##SUF(y, base + i, op == 0 ? v / (1.0f + expf(-1.702f * v)) : gelu_erf(v));          \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* Nearest upsampling by `s`: rows are the (n*c) planes, inner = (h*s) * (w*s) outputs of   \
     an (h, w) input plane: a copy. */                                                        \
  extern "C" __global__ void upsample_nearest_##SUF(const T* x, T* y, int segs, int inner,    \
                                                    int h, int w, int s) {                    \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    const T* src = x + (i64)row * h * w;                                                      \
    T* dst = y + (i64)row * inner;                                                            \
    int ow = w * s;                                                                           \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      int oy = i / ow;                                                                        \
      dst[i] = src[(oy / s) * w + (i - oy * ow) / s];                                         \
    }                                                                                         \
  }                                                                                           \
                                                                                              \
  /* upsample_nearest's backward (the same arguments): rows are the (n*c) planes, inner =    \
     h * w outputs, each the float sum of its s x s patch of the (h*s, w*s) gradient plane,    \
     row by row. */                                                                           \
  extern "C" __global__ void patch_sum_##SUF(const T* g, T* y, int segs, int inner, int h,   \
                                             int w, int s) {                                  \
    (void)h;                                                                                  \
    int row = blockIdx.x / segs, seg = blockIdx.x % segs;                                     \
    const T* src = g + (i64)row * inner * s * s;                                              \
    i64 gw = (i64)w * s;                                                                      \
    for (int i = seg * AG_THREADS + threadIdx.x; i < inner; i += segs * AG_THREADS) {         \
      int oy = i / w;                                                                         \
      const T* patch = src + oy * s * gw + (i64)(i - oy * w) * s;                             \
      float acc = 0.0f;                                                                       \
      for (int dy = 0; dy < s; dy++)                                                          \
        for (int dx = 0; dx < s; dx++) acc += ld_##SUF(patch, dy * gw + dx);                  \
      st_##SUF(y, (i64)row * inner + i, acc);                                                 \
    }                                                                                         \
  }

AG_KERNELS(f32, float)
AG_KERNELS(f16, u16)
AG_KERNELS(bf16, u16)

// The group means of gn_grad_chunk_sums's chunk sums, in double: grad_means[2 * group + k] =
// sum over the group's chunks of sums[2 * chunk + k] / per_group.
extern "C" __global__ void gn_grad_finalize(const float* sums, float* grad_means, int groups,
                                            int chunks, i64 per_group) {
  int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  double s1 = 0.0, s2 = 0.0;
  for (int k = 0; k < chunks; k++) {
    s1 += sums[2 * ((i64)g * chunks + k)];
    s2 += sums[2 * ((i64)g * chunks + k) + 1];
  }
  grad_means[2 * g] = (float)(s1 / (double)per_group);
  grad_means[2 * g + 1] = (float)(s2 / (double)per_group);
}

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
