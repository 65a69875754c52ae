// Runs every kernel of src/kernels/cuda.cu on the CPU (emulation.h) with src/kernels/cuda.rs's
// launch shapes, in f32, f16 and bf16, against loops in double over the same (rounded) inputs.
// Prints one line per check and exits 1 if any failed; tests/cuda_emulated.rs runs it.

#include "emulation.h"

#include "../../src/kernels/cuda.cu"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <random>
#include <string>

// An element type: its conversions from and to float (the kernels' own) and its kernels.
// gn_tol bounds the group norm's error relative to max(1, |reference|): a few roundings of
// the output type (f16 keeps 11 significant bits, bf16 8), 2e-5 for float arithmetic in f32.
#define DTYPE(SUF, TYPE, FROM, TO, GN_TOL)                           \
  struct SUF {                                                       \
    using T = TYPE;                                                  \
    static constexpr const char* name = #SUF;                        \
    static constexpr double gn_tol = GN_TOL;                         \
    static T from(float v) { return FROM(v); }                       \
    static float to(T v) { return TO(v); }                           \
    static constexpr auto im2col = im2col_##SUF;                     \
    static constexpr auto gn_chunk_stats = gn_chunk_stats_##SUF;     \
    static constexpr auto gn_apply = gn_apply_##SUF;                 \
    static constexpr auto gn_grad_chunk_sums = gn_grad_chunk_sums_##SUF; \
    static constexpr auto gn_grad_apply = gn_grad_apply_##SUF;       \
    static constexpr auto bias_add = bias_add_##SUF;                 \
    static constexpr auto upsample_nearest = upsample_nearest_##SUF; \
    static constexpr auto patch_sum = patch_sum_##SUF;               \
    static constexpr auto geglu = geglu_##SUF;                       \
    static constexpr auto activation = activation_##SUF;             \
  };

DTYPE(f32, float, , , 2e-5)
DTYPE(f16, u16, f2h, h2f, 2e-3)
DTYPE(bf16, u16, f2b, b2f, 1.6e-2)

static int checks = 0, failures = 0;
static std::mt19937 rng(20240611);

template <class... A>
std::string describe(const char* format, A... args) {
  char buf[256];
  std::snprintf(buf, sizeof buf, format, args...);
  return buf;
}

// Fails when any |got - want| exceeds tol(i, want), or is NaN (outputs start as NaN, so an
// element a kernel never wrote fails too). Reports the element furthest beyond its bound.
template <class Tol>
void check(const std::string& what, const std::vector<double>& got,
           const std::vector<double>& want, Tol tol) {
  checks++;
  double max_err = 0.0, max_share = 0.0, worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < want.size(); i++) {
    double err = std::fabs(got[i] - want[i]);
    if (std::isnan(err)) err = INFINITY;
    double bound = tol(i, want[i]);
    max_err = std::max(max_err, err);
    if (bound > 0.0) max_share = std::max(max_share, err / bound);
    if (err - bound > worst) {
      worst = err - bound;
      at = i;
    }
  }
  if (worst == 0.0) {
    std::string share =
        max_share > 0.0 ? describe(" (%.0f%% of the allowed)", 100.0 * max_share) : "";
    std::printf("ok   %s: max err %.3g%s\n", what.c_str(), max_err, share.c_str());
  } else {
    failures++;
    std::printf("FAIL %s: max err %.3g (element %zu: got %.9g, want %.9g, allowed %.3g)\n",
                what.c_str(), max_err, at, got[at], want[at], tol(at, want[at]));
  }
}

const auto exact = [](size_t, double) { return 0.0; };

template <class D>
std::vector<typename D::T> normal(size_t n, double offset = 0.0) {
  std::normal_distribution<double> dist(offset, 1.0);
  std::vector<typename D::T> v(n);
  for (auto& e : v) e = D::from((float)dist(rng));
  return v;
}

template <class D>
std::vector<typename D::T> unwritten(size_t n) {
  return std::vector<typename D::T>(n, D::from(NAN));
}

template <class D>
std::vector<double> widen(const std::vector<typename D::T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = D::to(v[i]);
  return out;
}

// Blocks per row of a row kernel as cuda.rs's `rows_launch` picks them (about 4 values per
// thread), then (where that is more) 1, so each block's threads loop over the whole row.
std::vector<int> row_segs(i64 rows, i64 inner) {
  i64 segs = std::clamp<i64>((inner + AG_THREADS * 4 - 1) / (AG_THREADS * 4), 1,
                             std::numeric_limits<int>::max() / rows);
  if (segs == 1) return {1};
  return {(int)segs, 1};
}

template <class D>
void im2col_case(int n, int cin, int h, int w, int kh, int kw, int stride, int pad) {
  int ho = (h + 2 * pad - kh) / stride + 1, wo = (w + 2 * pad - kw) / stride + 1;
  i64 rows = (i64)cin * kh * kw, pixels = (i64)ho * wo, total = n * rows * pixels;
  auto x = normal<D>((size_t)n * cin * h * w);
  std::vector<double> want(total);
  for (int b = 0; b < n; b++)
    for (int ci = 0; ci < cin; ci++)
      for (int ky = 0; ky < kh; ky++)
        for (int kx = 0; kx < kw; kx++)
          for (int oy = 0; oy < ho; oy++)
            for (int ox = 0; ox < wo; ox++) {
              int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
              bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
              i64 r = ((i64)ci * kh + ky) * kw + kx;
              want[(b * rows + r) * pixels + (i64)oy * wo + ox] =
                  inside ? D::to(x[(((i64)b * cin + ci) * h + iy) * w + ix]) : 0.0;
            }
  for (int segs : row_segs(n * rows, pixels)) {
    auto cols = unwritten<D>(total);
    launch(D::im2col, (unsigned)(n * rows * segs), AG_THREADS, x.data(), cols.data(), segs,
           (int)pixels, cin, h, w, kh, kw, stride, pad, wo);
    check(describe("%s im2col n=%d cin=%d %dx%d kernel %dx%d stride %d pad %d, %d blocks per row",
                   D::name, n, cin, h, w, kh, kw, stride, pad, segs),
          widen<D>(cols), want, exact);
  }
}

// A group norm's f32 weight (around 1) and bias (around 0) for `c` channels.
void random_affine(int c, std::vector<float>& weight, std::vector<float>& bias) {
  weight.resize(c);
  bias.resize(c);
  std::normal_distribution<float> dist(0.0f, 0.5f);
  for (int ch = 0; ch < c; ch++) {
    weight[ch] = 1.0f + dist(rng);
    bias[ch] = dist(rng);
  }
}

// Mean and population variance, in double, of each (image, group): the per_group contiguous
// values from g * per_group on.
template <class D>
void reference_stats(const std::vector<typename D::T>& x, int groups_total, i64 per_group,
                     std::vector<double>& mean, std::vector<double>& var) {
  mean.assign(groups_total, 0.0);
  var.assign(groups_total, 0.0);
  for (int g = 0; g < groups_total; g++) {
    double sum = 0.0, m2 = 0.0;
    for (i64 i = 0; i < per_group; i++) sum += D::to(x[g * per_group + i]);
    mean[g] = sum / per_group;
    for (i64 i = 0; i < per_group; i++) {
      double d = D::to(x[g * per_group + i]) - mean[g];
      m2 += d * d;
    }
    var[g] = m2 / per_group;
  }
}

// (mean, rstd) of each (image, group) by the kernels, as cuda.rs's GnGeom::stats launches
// them: gn_chunk_stats, then gn_finalize.
template <class D>
std::vector<float> kernel_stats(const std::vector<typename D::T>& x, int groups_total,
                                i64 per_group, int chunks, float eps) {
  std::vector<float> stats(3 * (size_t)groups_total * chunks, NAN);
  std::vector<float> mean_rstd(2 * groups_total, NAN);
  launch(D::gn_chunk_stats, groups_total * chunks, AG_THREADS, x.data(), stats.data(), per_group,
         chunks);
  launch(gn_finalize, (groups_total + AG_THREADS - 1) / AG_THREADS, AG_THREADS, stats.data(),
         mean_rstd.data(), groups_total, chunks, eps);
  return mean_rstd;
}

// Statistics (gn_chunk_stats, gn_finalize), then gn_apply without and with SiLU, on inputs
// offset + N(0, 1).
template <class D>
void group_norm_case(int n, int c, int groups, int h, int w, float eps, double offset,
                     double tol) {
  int cpg = c / groups, groups_total = n * groups;
  i64 inner = (i64)h * w, per_group = cpg * inner, total = (i64)n * c * inner;
  int chunks = (int)((per_group + GN_CHUNK - 1) / GN_CHUNK);
  auto x = normal<D>(total, offset);
  std::vector<float> weight, bias;
  random_affine(c, weight, bias);
  std::string shape =
      describe("%s group norm n=%d c=%d groups=%d %dx%d eps %g%s", D::name, n, c, groups, h, w,
               eps, offset != 0.0 ? describe(" offset %g", offset).c_str() : "");

  std::vector<double> mean, var, want_stats(2 * groups_total);
  reference_stats<D>(x, groups_total, per_group, mean, var);
  for (int g = 0; g < groups_total; g++) {
    want_stats[2 * g] = mean[g];
    want_stats[2 * g + 1] = 1.0 / std::sqrt(var[g] + (double)eps);
  }

  auto mean_rstd = kernel_stats<D>(x, groups_total, per_group, chunks, eps);
  check(shape + describe(", mean and rstd (%d chunks)", chunks), widen<f32>(mean_rstd),
        want_stats, [](size_t, double want) { return 1e-5 * std::max(1.0, std::fabs(want)); });

  for (int silu = 0; silu <= 1; silu++) {
    std::vector<double> want(total);
    for (int b = 0; b < n; b++)
      for (int ch = 0; ch < c; ch++) {
        int g = b * groups + ch / cpg;
        double scale = weight[ch] / std::sqrt(var[g] + (double)eps);
        for (i64 p = 0; p < inner; p++) {
          i64 i = ((i64)b * c + ch) * inner + p;
          double v = (D::to(x[i]) - mean[g]) * scale + bias[ch];
          want[i] = silu ? v / (1.0 + std::exp(-v)) : v;
        }
      }
    for (int segs : row_segs((i64)n * c, inner)) {
      auto y = unwritten<D>(total);
      launch(D::gn_apply, (unsigned)(n * c * segs), AG_THREADS, x.data(), y.data(),
             mean_rstd.data(), weight.data(), bias.data(), segs, (int)inner, c, cpg, silu);
      check(shape + describe(", apply silu=%d, %d blocks per row", silu, segs), widen<D>(y), want,
            [tol](size_t, double want) { return tol * std::max(1.0, std::fabs(want)); });
    }
  }
}

// The backward kernels (statistics, gn_grad_chunk_sums, gn_grad_finalize, gn_grad_apply)
// without and with SiLU against dL/dx in double: rstd * (dxhat - mean(dxhat) - xhat *
// mean(dxhat * xhat)) per group, dxhat = dL/dy * silu'(y) * w[c]. The bound is relative to
// the largest |dL/dx| of the case (the formula subtracts group means of similar size).
template <class D>
void group_norm_grad_case(int n, int c, int groups, int h, int w, float eps, double tol) {
  int cpg = c / groups, groups_total = n * groups;
  i64 inner = (i64)h * w, per_group = cpg * inner, total = (i64)n * c * inner;
  int chunks = (int)((per_group + GN_CHUNK - 1) / GN_CHUNK);
  auto x = normal<D>(total, 0.5), dy = normal<D>(total);
  std::vector<float> weight, bias;
  random_affine(c, weight, bias);
  std::string shape = describe("%s group norm backward n=%d c=%d groups=%d %dx%d", D::name, n,
                               c, groups, h, w);
  auto mean_rstd = kernel_stats<D>(x, groups_total, per_group, chunks, eps);
  std::vector<double> mean, var;
  reference_stats<D>(x, groups_total, per_group, mean, var);
  for (int silu = 0; silu <= 1; silu++) {
    std::vector<double> want(total), dxhat(total), xhat(total);
    double largest = 0.0;
    for (int g = 0; g < groups_total; g++) {
      double rstd = 1.0 / std::sqrt(var[g] + (double)eps), s1 = 0.0, s2 = 0.0;
      for (i64 i = 0; i < per_group; i++) {
        i64 at = g * per_group + i;
        int ch = (g % groups) * cpg + (int)(i / inner);
        xhat[at] = (D::to(x[at]) - mean[g]) * rstd;
        double y = xhat[at] * weight[ch] + bias[ch], d = D::to(dy[at]);
        if (silu) {
          double sg = 1.0 / (1.0 + std::exp(-y));
          d *= sg * (1.0 + y * (1.0 - sg));
        }
        dxhat[at] = d * weight[ch];
        s1 += dxhat[at];
        s2 += dxhat[at] * xhat[at];
      }
      for (i64 i = 0; i < per_group; i++) {
        i64 at = g * per_group + i;
        want[at] = rstd * (dxhat[at] - s1 / per_group - xhat[at] * s2 / per_group);
        largest = std::max(largest, std::fabs(want[at]));
      }
    }
    std::vector<float> sums(2 * (size_t)groups_total * chunks, NAN);
    std::vector<float> grad_means(2 * groups_total, NAN);
    launch(D::gn_grad_chunk_sums, groups_total * chunks, AG_THREADS, x.data(), dy.data(),
           mean_rstd.data(), weight.data(), bias.data(), sums.data(), per_group, chunks,
           (int)inner, groups, cpg, silu);
    launch(gn_grad_finalize, (groups_total + AG_THREADS - 1) / AG_THREADS, AG_THREADS,
           sums.data(), grad_means.data(), groups_total, chunks, per_group);
    for (int segs : row_segs((i64)n * c, inner)) {
      auto dx = unwritten<D>(total);
      launch(D::gn_grad_apply, (unsigned)(n * c * segs), AG_THREADS, x.data(), dy.data(),
             dx.data(), mean_rstd.data(), grad_means.data(), weight.data(), bias.data(), segs,
             (int)inner, c, cpg, silu);
      check(shape + describe(", silu=%d, %d chunks, %d blocks per row", silu, chunks, segs),
            widen<D>(dx), want,
            [tol, largest](size_t, double) { return tol * std::max(1.0, largest); });
    }
  }
}

// `outer` blocks of `channels` x `inner` values, the bias indexed by channel: NCHW with
// inner = H*W (the kernel's rows are the planes, per_row), or rows of features with
// inner = 1 (the kernel's rows are the `outer` rows of `channels` features).
template <class D>
void bias_add_case(const char* layout, int outer, int channels, i64 inner) {
  i64 total = outer * channels * inner;
  auto x = normal<D>(total), bias = normal<D>(channels);
  // One float add, then the output type's rounding: the double sum of two such values is
  // exact, so rounding it to float gives the kernel's float sum.
  std::vector<double> want(total);
  for (int o = 0; o < outer; o++)
    for (int ch = 0; ch < channels; ch++)
      for (i64 p = 0; p < inner; p++) {
        i64 i = ((i64)o * channels + ch) * inner + p;
        want[i] = D::to(D::from((float)((double)D::to(x[i]) + D::to(bias[ch]))));
      }
  int per_row = inner > 1;
  i64 rows = per_row ? (i64)outer * channels : outer, row = per_row ? inner : channels;
  for (int segs : row_segs(rows, row)) {
    auto y = unwritten<D>(total);
    launch(D::bias_add, (unsigned)(rows * segs), AG_THREADS, x.data(), bias.data(), y.data(), segs,
           (int)row, channels, per_row);
    check(describe("%s bias add %s %dx%dx%lld, %d blocks per row", D::name, layout, outer,
                   channels, (long long)inner, segs),
          widen<D>(y), want, exact);
  }
}

// GEGLU (rows of [value | gate] into rows of value * gelu(gate)) and the activations
// (quick_gelu, exact GELU) against double: one float evaluation, then the output rounding.
template <class D>
void activation_cases(int rows, int inner) {
  auto gelu = [](double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); };
  auto p = normal<D>((size_t)rows * 2 * inner);
  std::vector<double> want((size_t)rows * inner);
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < inner; i++) {
      i64 at = (i64)r * 2 * inner + i;
      want[(i64)r * inner + i] = D::to(p[at]) * gelu(D::to(p[at + inner]));
    }
  // A float evaluation's error (a few ulp of exp/erf), then the output type's rounding.
  auto tol = [](size_t, double want) {
    return (D::gn_tol / 2 + 1e-6) * std::max(1e-2, std::fabs(want));
  };
  for (int segs : row_segs(rows, inner)) {
    auto y = unwritten<D>((size_t)rows * inner);
    launch(D::geglu, (unsigned)(rows * segs), AG_THREADS, p.data(), y.data(), segs, inner);
    check(describe("%s geglu %dx(2x%d), %d blocks per row", D::name, rows, inner, segs),
          widen<D>(y), want, tol);
  }
  for (int op = 0; op <= 1; op++) {
    std::vector<double> want(p.size());
    for (size_t i = 0; i < p.size(); i++) {
      double v = D::to(p[i]);
      want[i] = op == 0 ? v / (1.0 + std::exp(-1.702 * v)) : gelu(v);
    }
    for (int segs : row_segs(rows, 2 * inner)) {
      auto y = unwritten<D>(p.size());
      launch(D::activation, (unsigned)(rows * segs), AG_THREADS, p.data(), y.data(), segs,
             2 * inner, op);
      check(describe("%s %s %dx%d, %d blocks per row", D::name, op == 0 ? "quick_gelu" : "gelu",
                     rows, 2 * inner, segs),
            widen<D>(y), want, tol);
    }
  }
}

template <class D>
void upsample_case(int planes, int h, int w, int s) {
  i64 total = (i64)planes * h * s * w * s;
  auto x = normal<D>((size_t)planes * h * w);
  std::vector<double> want(total);
  for (int p = 0; p < planes; p++)
    for (int oy = 0; oy < h * s; oy++)
      for (int ox = 0; ox < w * s; ox++)
        want[((i64)p * h * s + oy) * w * s + ox] = D::to(x[((i64)p * h + oy / s) * w + ox / s]);
  for (int segs : row_segs(planes, (i64)h * s * w * s)) {
    auto y = unwritten<D>(total);
    launch(D::upsample_nearest, (unsigned)(planes * segs), AG_THREADS, x.data(), y.data(), segs,
           h * s * w * s, h, w, s);
    check(describe("%s upsample nearest %d planes %dx%d by %d, %d blocks per row", D::name,
                   planes, h, w, s, segs),
          widen<D>(y), want, exact);
  }
}

// upsample_nearest's backward: the reference sums each patch in float in the kernel's order
// (rows of the patch, then columns), then rounds to the output type, so it must match exactly.
template <class D>
void patch_sum_case(int planes, int h, int w, int s) {
  i64 inner = (i64)h * w;
  auto g = normal<D>((size_t)(planes * inner * s * s));
  std::vector<double> want(planes * inner);
  for (int p = 0; p < planes; p++)
    for (int oy = 0; oy < h; oy++)
      for (int ox = 0; ox < w; ox++) {
        float acc = 0.0f;
        for (int dy = 0; dy < s; dy++)
          for (int dx = 0; dx < s; dx++)
            acc += D::to(g[((i64)p * h * s + oy * s + dy) * w * s + ox * s + dx]);
        want[(p * h + oy) * w + ox] = D::to(D::from(acc));
      }
  for (int segs : row_segs(planes, inner)) {
    auto y = unwritten<D>(planes * inner);
    launch(D::patch_sum, (unsigned)(planes * segs), AG_THREADS, g.data(), y.data(), segs,
           (int)inner, h, w, s);
    check(describe("%s patch sum %d planes %dx%d by %d, %d blocks per row", D::name, planes, h,
                   w, s, segs),
          widen<D>(y), want, exact);
  }
}

template <class D>
void all_kernels() {
  im2col_case<D>(1, 4, 16, 16, 3, 3, 1, 1);
  im2col_case<D>(3, 3, 7, 5, 3, 3, 1, 1);
  im2col_case<D>(2, 3, 9, 8, 3, 3, 2, 0);
  im2col_case<D>(1, 5, 7, 5, 3, 3, 2, 1);
  im2col_case<D>(3, 6, 7, 5, 1, 1, 1, 0);
  im2col_case<D>(2, 3, 6, 7, 1, 3, 1, 1);
  im2col_case<D>(1, 2, 9, 6, 3, 1, 2, 0);
  im2col_case<D>(1, 2, 40, 41, 3, 3, 1, 1);  // rows of 1,640 pixels: two blocks per row

  // per_group 512; GN_CHUNK exactly with one channel per group; two full chunks; two chunks
  // with a short last one (24,570 = 16,384 + 8,186); just under one chunk; fewer values than
  // threads.
  group_norm_case<D>(2, 8, 4, 16, 16, 1e-5f, 0.0, D::gn_tol);
  group_norm_case<D>(1, 4, 4, 128, 128, 1e-6f, 0.0, D::gn_tol);
  group_norm_case<D>(1, 4, 2, 128, 128, 1e-5f, 0.0, D::gn_tol);
  group_norm_case<D>(2, 6, 2, 90, 91, 1e-6f, 0.0, D::gn_tol);
  group_norm_case<D>(2, 8, 4, 90, 91, 1e-5f, 0.0, D::gn_tol);
  group_norm_case<D>(3, 4, 4, 3, 3, 1e-6f, 0.0, D::gn_tol);
  group_norm_grad_case<D>(2, 8, 4, 9, 7, 1e-5f, D::gn_tol);
  group_norm_grad_case<D>(1, 6, 2, 90, 91, 1e-6f, D::gn_tol);  // 24,570 per group: two chunks

  bias_add_case<D>("NCHW", 2, 5, 9 * 7);
  bias_add_case<D>("NCHW", 1, 320, 8 * 8);
  bias_add_case<D>("rows", 7, 77, 1);
  bias_add_case<D>("NCHW", 2, 3, 50 * 50);  // planes of 2,500 values: three blocks per row
  bias_add_case<D>("rows", 3, 2100, 1);     // rows of 2,100 features: three blocks per row

  upsample_case<D>(6, 5, 7, 2);
  upsample_case<D>(4, 3, 4, 3);
  upsample_case<D>(2, 20, 20, 3);  // output planes of 3,600 values: four blocks per row
  patch_sum_case<D>(6, 5, 7, 2);
  patch_sum_case<D>(4, 3, 4, 3);
  patch_sum_case<D>(2, 40, 41, 2);  // planes of 1,640 outputs: two blocks per row
  activation_cases<D>(5, 37);
  activation_cases<D>(3, 1280);  // SD's GEGLU is 4 x 320 wide at its first level
}

// The conversions the f16 and bf16 kernels load and store through: round to nearest even,
// overflow to infinity, subnormal halves, NaN kept NaN (bf16's quieting keeps a NaN whose
// payload is all in the low bits from rounding into infinity).
void conversions() {
  std::string bad;
  auto expect = [&](const char* what, float in, unsigned got, unsigned want) {
    if (got != want) bad += describe(" %s(%.9g)=0x%04x want 0x%04x;", what, in, got, want);
  };
  const struct {
    float in;
    u16 half, bf;
  } cases[] = {
      {1.0f, 0x3c00, 0x3f80},
      {-2.0f, 0xc000, 0xc000},
      {1.0f + 0x1p-11f, 0x3c00, 0x3f80},       // half: tie, to even 1.0
      {1.0f + 0x3p-11f, 0x3c02, 0x3f80},       // half: tie, to even 1 + 2^-9
      {1.00390625f, 0x3c04, 0x3f80},           // bf16: 1 + 2^-8, tie, to even 1.0
      {1.0f + 0x3p-8f, 0x3c0c, 0x3f82},        // bf16: tie, to even 1 + 2^-6
      {1.0f + 0x1p-8f + 0x1p-20f, 0x3c04, 0x3f81},  // bf16: just above the tie
      {65504.0f, 0x7bff, 0x4780},
      {65520.0f, 0x7c00, 0x4780},              // half: tie with 2^16, to even: infinity
      {0x1p-24f, 0x0001, 0x3380},              // half: smallest subnormal
      {0x1p-25f, 0x0000, 0x3300},              // half: tie, to even 0
      {0x3p-26f, 0x0001, 0x3340},              // half: rounds up to the smallest subnormal
      {0x1.ff8p-15f, 0x03ff, 0x3880},          // half: largest subnormal
      {3.4028235e38f, 0x7c00, 0x7f80},         // bf16: rounds past the largest finite
      {INFINITY, 0x7c00, 0x7f80},
      {-INFINITY, 0xfc00, 0xff80},
  };
  for (const auto& c : cases) {
    expect("f2h", c.in, f2h(c.in), c.half);
    expect("f2b", c.in, f2b(c.in), c.bf);
  }
  for (unsigned nan : {0x7fc00000u, 0x7f800001u, 0xff800001u}) {
    float in = __uint_as_float(nan);
    u16 h = f2h(in), b = f2b(in);
    if ((h & 0x7c00) != 0x7c00 || (h & 0x3ff) == 0)
      bad += describe(" f2h(0x%08x) not NaN;", nan);
    if ((b & 0x7f80) != 0x7f80 || (b & 0x7f) == 0)
      bad += describe(" f2b(0x%08x) not NaN;", nan);
  }
  if (h2f(0x0001) != 0x1p-24f || h2f(0x7bff) != 65504.0f || h2f(0xfc00) != -INFINITY ||
      b2f(0x3f81) != 1.0078125f || b2f(0xc0a0) != -5.0f)
    bad += " h2f/b2f;";
  checks++;
  if (bad.empty()) {
    std::printf("ok   f2h, h2f, f2b, b2f on ties, subnormals, infinities and NaN\n");
  } else {
    failures++;
    std::printf("FAIL conversions:%s\n", bad.c_str());
  }
}

int main() {
  // Line by line, so a crash (an out-of-bounds index) still leaves the checks before it.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  conversions();
  all_kernels<f32>();
  all_kernels<f16>();
  all_kernels<bf16>();
  // More (image, group) pairs than one gn_finalize block holds; gn_finalize has no element
  // type, and each of the 288 groups costs a block of 256 threads through 21 barriers.
  group_norm_case<f32>(9, 64, 32, 4, 4, 1e-5f, 0.0, f32::gn_tol);
  // Needs the centred variance: in float, E[x^2] - mean^2 keeps little of a variance of 1
  // under a mean of 1000. The output's x * scale - mean * scale still cancels ~1000 down to
  // ~1 in float, hence 1e-3.
  group_norm_case<f32>(1, 4, 2, 128, 128, 1e-5f, 1000.0, 1e-3);
  group_norm_case<f32>(2, 6, 2, 90, 91, 1e-6f, 1000.0, 1e-3);
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
