//! artguide's own CUDA kernels (`cuda.cu`), for the compositions that profiles on an H100
//! put first (BENCHMARKS.md, "Where the time goes"): candle's `im2col` (53% of a VAE decode:
//! it reads its input H*W apart and is followed by a transpose of the GEMM's result), its
//! GroupNorm (~35%: eight full passes and casts), broadcast adds of biases, activations
//! that candle composes from several passes, nearest upsampling and its backward; and, through
//! cuBLAS rather than own kernels, attention's head-major copies (12% of a CLIP ViT-L/14
//! batch; here the GEMMs read and write the heads in place, [`super::head_gemm`]) and the
//! Linear layers' separate bias pass (cuBLASLt adds the bias in its epilogue).
//!
//! The source is compiled by NVRTC at the first use in a process and loaded into each device
//! (no build step; the driver JITs the PTX for the GPU at hand). The ops take part in no
//! autograd graph: callers use them on detached values only (inference, or a frozen layer's
//! value whose backward is computed separately, [`super::frozen`]; [`group_norm_backward`]
//! and [`patch_sum`] are such backwards). Each group ([`super::CudaKernel`]) is off unless
//! `ARTGUIDE_CUDA_KERNELS` names it (or is 1) until measured on a GPU; the CPU emulation test
//! (tests/cuda_emulated.rs) checks cuda.cu's index math and reductions, `head_gemm`'s test the
//! attention GEMMs' plans, and tests/cuda.rs compares every op with candle's compositions on
//! a GPU.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;
use candle_core::cuda_backend::cudarc::cublaslt;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape,
    Tensor,
};

use super::head_gemm;

/// The kernels' source; its launch shapes are described at its top.
const SOURCE: &str = include_str!("cuda.cu");
/// `AG_THREADS` in cuda.cu.
const THREADS: u32 = 256;
/// `GN_CHUNK` in cuda.cu.
const GN_CHUNK: usize = 16384;
/// Values each thread of a row kernel handles (at most: a row's blocks stride over it).
const ITEMS: usize = 4;
/// Bytes of im2col unfolded at once: larger batches go by groups of images (candle unfolds
/// the whole batch, 4.8 GB for four 512x512 images in a 256-channel layer).
const COL_LIMIT_BYTES: usize = 1 << 30;

/// The PTX of [`SOURCE`], compiled once per process.
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| {
        candle_core::Error::Msg(format!(
            "artguide CUDA kernels: NVRTC could not compile src/kernels/cuda.cu \
             (is libnvrtc from the same CUDA version as the driver?): {e}"
        ))
    })
}

/// Kernel `name`, loaded into `dev` at its first use there.
fn kernel(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    let func = dev
        .get_or_load_custom_func(name, "artguide_kernels", ptx()?)
        .map_err(|e| {
            // A libnvrtc newer than the driver compiles, but its PTX does not load.
            candle_core::Error::Msg(format!(
                "artguide CUDA kernels: cannot load {name} (is libnvrtc from a CUDA version \
                 newer than the driver's?): {e}"
            ))
        })?;
    Ok(func.into_cuda_function())
}

/// The launch of a row kernel over `rows` rows of `inner` values (cuda.cu's launch shapes):
/// `segs` blocks per row, each thread handling about [`ITEMS`] values, and the config.
fn rows_launch(rows: usize, inner: usize) -> candle_core::Result<(i32, LaunchConfig)> {
    // The kernels step an `int` index by up to a quarter of the row past its end.
    if inner > i32::MAX as usize / 2 {
        candle_core::bail!("CUDA kernel: a row of {inner} values is too long");
    }
    let max_grid = i32::MAX as usize;
    if rows == 0 || rows > max_grid {
        candle_core::bail!("CUDA kernel: {rows} rows do not fit a grid");
    }
    let segs = inner
        .div_ceil(THREADS as usize * ITEMS)
        .clamp(1, max_grid / rows);
    Ok((segs as i32, blocks(rows * segs)?))
}

fn blocks(n: usize) -> candle_core::Result<LaunchConfig> {
    // grid.x is at most 2^31 - 1.
    let n = i32::try_from(n).map_err(|_| {
        candle_core::Error::Msg(format!("CUDA kernel: {n} blocks do not fit a grid"))
    })? as u32;
    Ok(LaunchConfig {
        grid_dim: (n.max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn int(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("CUDA kernel: {what} {v} exceeds i32")))
}

/// The contiguous view of a storage slice, from its layout's offset.
fn view<'a, T: DeviceRepr>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    op: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.slice(start..end)),
        None => candle_core::bail!("{op}: needs a contiguous input"),
    }
}

/// Runs `$body` with `$x` bound to the slice of storage `$s` (and `$y` to that of `$t`, which
/// must have the same dtype) and `$suf` to the kernels' suffix for the dtype (f32, f16, bf16),
/// wrapping the `CudaSlice` it returns as the same dtype.
macro_rules! by_dtype {
    ($op:expr, $s:expr, |$x:ident, $suf:ident| $body:expr) => {
        match &$s.slice {
            CudaStorageSlice::F32($x) => {
                let $suf = "f32";
                CudaStorageSlice::F32($body)
            }
            CudaStorageSlice::F16($x) => {
                let $suf = "f16";
                CudaStorageSlice::F16($body)
            }
            CudaStorageSlice::BF16($x) => {
                let $suf = "bf16";
                CudaStorageSlice::BF16($body)
            }
            _ => candle_core::bail!("{}: dtype {:?} not supported", $op, $s.dtype()),
        }
    };
    ($op:expr, $s:expr, $t:expr, |$x:ident, $y:ident, $suf:ident| $body:expr) => {
        match (&$s.slice, &$t.slice) {
            (CudaStorageSlice::F32($x), CudaStorageSlice::F32($y)) => {
                let $suf = "f32";
                CudaStorageSlice::F32($body)
            }
            (CudaStorageSlice::F16($x), CudaStorageSlice::F16($y)) => {
                let $suf = "f16";
                CudaStorageSlice::F16($body)
            }
            (CudaStorageSlice::BF16($x), CudaStorageSlice::BF16($y)) => {
                let $suf = "bf16";
                CudaStorageSlice::BF16($body)
            }
            _ => candle_core::bail!(
                "{}: dtypes {:?} and {:?} not supported together",
                $op,
                $s.dtype(),
                $t.dtype()
            ),
        }
    };
}

fn cpu_refused(op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    candle_core::bail!("{op}: a CUDA kernel, called on the CPU")
}

/// The CUDA storage of a custom op's output.
fn storage(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

/// A new buffer of `n` elements of `x`'s type, for a kernel that writes every element.
fn output<T: DeviceRepr>(
    _x: &CudaView<T>,
    dev: &CudaDevice,
    n: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: each caller launches a kernel that writes all `n` elements before the buffer
    // is read.
    unsafe { dev.alloc::<T>(n) }
}

/// Unfolds `(n, cin, h, w)` into `(n, cin*kh*kw, ho*wo)`, rows `(ci, ky, kx)`.
struct Im2col {
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

impl Im2col {
    fn out_hw(&self, h: usize, w: usize) -> candle_core::Result<(usize, usize)> {
        let out = |i: usize, k: usize| {
            (i + 2 * self.pad)
                .checked_sub(k)
                .filter(|_| self.stride > 0)
                .map(|d| d / self.stride + 1)
        };
        match (out(h, self.kh), out(w, self.kw)) {
            (Some(ho), Some(wo)) => Ok((ho, wo)),
            _ => candle_core::bail!(
                "im2col: kernel {}x{} (stride {}) does not fit the padded {h}x{w} input",
                self.kh,
                self.kw,
                self.stride
            ),
        }
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "artguide-im2col"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, cin, h, w) = l.shape().dims4()?;
        let (ho, wo) = self.out_hw(h, w)?;
        let rows = cin * self.kh * self.kw;
        let total = n * rows * ho * wo;
        let (segs, cfg) = rows_launch(n * rows, ho * wo)?;
        let dev = s.device();
        let stream = dev.cuda_stream();
        let slice = by_dtype!(self.name(), s, |x, suf| {
            let x = view(x, l, self.name())?;
            let out = output(&x, dev, total)?;
            let f = kernel(dev, &format!("im2col_{suf}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&x);
            b.arg(&out);
            candle_core::builder_arg!(
                b,
                segs,
                int(ho * wo, "output pixels")?,
                int(cin, "channels")?,
                int(h, "height")?,
                int(w, "width")?,
                int(self.kh, "kernel height")?,
                int(self.kw, "kernel width")?,
                int(self.stride, "stride")?,
                int(self.pad, "padding")?,
                int(wo, "output width")?
            );
            // SAFETY: the arguments match im2col's signature in cuda.cu.
            unsafe { b.launch(cfg) }.w()?;
            out
        });
        Ok((storage(slice, dev), Shape::from((n, rows, ho * wo))))
    }
}

/// `conv2d(x, w) + bias` (groups 1, dilation 1) for `x: (b, cin, h, w)`, `w: (cout, cin, kh,
/// kw)`: im2col in channels-by-pixels order, then one batched GEMM with the weight matrix
/// that writes NCHW directly (candle's GEMM writes pixels-by-channels and transposes after).
/// 1x1 stride-1 layers without padding skip the unfold.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv2d_unfolding_at_most(x, w, bias, stride, padding, COL_LIMIT_BYTES)
}

/// [`conv2d`] unfolding at most `col_limit` bytes of im2col at once (whole images; at least
/// one), so the tests can make it split a batch.
pub fn conv2d_unfolding_at_most(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    col_limit: usize,
) -> candle_core::Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, wcin, kh, kw) = w.dims4()?;
    if wcin != cin {
        candle_core::bail!("conv2d: input has {cin} channels, the weight {wcin}");
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        return super::conv::composed(x, w, bias, stride, padding)
            .map_err(candle_core::Error::wrap);
    }
    let x = x.contiguous()?;
    let wm = w.to_dtype(x.dtype())?.reshape((cout, cin * kh * kw))?;
    let op = Im2col {
        kh,
        kw,
        stride,
        pad: padding,
    };
    let (ho, wo) = op.out_hw(h, wd)?;
    let col_bytes = cin * kh * kw * ho * wo * x.dtype().size_in_bytes();
    let per_group = (col_limit / col_bytes.max(1)).clamp(1, n.max(1));
    let mut parts = Vec::with_capacity(n.div_ceil(per_group));
    for start in (0..n).step_by(per_group) {
        let g = per_group.min(n - start);
        let xs = x.narrow(0, start, g)?;
        let cols = if (kh, kw, stride, padding) == (1, 1, 1, 0) {
            xs.reshape((g, cin, h * wd))?
        } else {
            xs.apply_op1_no_bwd(&op)?
        };
        parts.push(wm.broadcast_as((g, cout, cin * kh * kw))?.matmul(&cols)?);
    }
    let y = Tensor::cat(&parts, 0)?.reshape((n, cout, ho, wo))?;
    match bias {
        Some(b) => bias_add(&y, b, true),
        None => Ok(y),
    }
}

/// `y + bias` in one pass: `per_channel`, `y` is NCHW (or any `(n, c, ...)`) with one bias
/// value per channel; else the bias runs along `y`'s last axis (a Linear layer's features).
pub fn bias_add(y: &Tensor, bias: &Tensor, per_channel: bool) -> candle_core::Result<Tensor> {
    let dims = y.dims();
    // Rows of `inner` values: the (image, channel) planes, or a Linear's output rows.
    let (channels, inner) = if per_channel {
        if dims.len() < 2 {
            candle_core::bail!("bias add: {:?} has no channel axis", y.shape());
        }
        (dims[1], dims[2..].iter().product())
    } else {
        let features = *dims.last().unwrap_or(&1);
        (features, features)
    };
    if bias.elem_count() != channels {
        candle_core::bail!(
            "bias add: {} bias values for {channels} channels of {:?}",
            bias.elem_count(),
            y.shape()
        );
    }
    if y.elem_count() == 0 {
        return Ok(y.clone());
    }
    let bias = bias.to_dtype(y.dtype())?.contiguous()?;
    let op = BiasAdd {
        channels,
        inner,
        per_row: per_channel,
    };
    y.contiguous()?.apply_op2_no_bwd(&bias, &op)
}

/// `bias[row % channels]` added to each row of `inner` values (`per_row`), or `bias[i]` to
/// the `i`-th value of every row.
struct BiasAdd {
    channels: usize,
    inner: usize,
    per_row: bool,
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "artguide-bias-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let total = l.shape().elem_count();
        let (segs, cfg) = rows_launch(total / self.inner, self.inner)?;
        let dev = s.device();
        let stream = dev.cuda_stream();
        let slice = by_dtype!(self.name(), s, sb, |x, bias, suf| {
            let (x, bias) = (view(x, l, self.name())?, view(bias, lb, self.name())?);
            let out = output(&x, dev, total)?;
            let f = kernel(dev, &format!("bias_add_{suf}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(&x);
            b.arg(&bias);
            b.arg(&out);
            candle_core::builder_arg!(
                b,
                segs,
                int(self.inner, "row length")?,
                int(self.channels, "channels")?,
                i32::from(self.per_row)
            );
            // SAFETY: the arguments match bias_add's signature in cuda.cu.
            unsafe { b.launch(cfg) }.w()?;
            out
        });
        Ok((storage(slice, dev), l.shape().clone()))
    }
}

/// `silu?(GroupNorm(x))` for `x: (n, c, ...)` with f32 `weight` and `bias` of `c` values:
/// statistics per chunk of a group, merged per group in f64 (mean, then the centred sum of
/// squares: no E[x^2] - mean^2 cancellation), then one pass that normalises, scales and
/// applies SiLU. Statistics are f32 in every dtype, as candle's composition upcasts.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    x.contiguous()?.apply_op3_no_bwd(
        &f32s(weight)?,
        &f32s(bias)?,
        &GroupNormOp { groups, eps, silu },
    )
}

/// `dL/dx` of [`group_norm`] (weight and bias constants) from `x` and `dL/dy`: the CPU
/// kernel's formula, `rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))` per group.
pub fn group_norm_backward(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    if grad.dims() != x.dims() {
        candle_core::bail!(
            "group norm backward: gradient {:?} for input {:?}",
            grad.shape(),
            x.shape()
        );
    }
    if x.elem_count() == 0 {
        return x.zeros_like();
    }
    let params = Tensor::stack(&[weight, bias], 0)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    x.contiguous()?.apply_op3_no_bwd(
        &grad.to_dtype(x.dtype())?.contiguous()?,
        &params,
        &GroupNormGrad { groups, eps, silu },
    )
}

/// Sizes of a group-norm input `(n, c, ...)` with `groups` groups per image.
struct GnGeom {
    n: usize,
    c: usize,
    /// Values per channel plane.
    inner: usize,
    groups: usize,
    /// Values per (image, group).
    per_group: usize,
    /// Statistics chunks per group.
    chunks: usize,
}

impl GnGeom {
    /// Checked against the `params` per-channel values (weight, bias).
    fn new(op: &str, l: &Layout, groups: usize, params: usize) -> candle_core::Result<Self> {
        let dims = l.shape().dims();
        let (n, c) = match dims {
            [n, c, ..] => (*n, *c),
            _ => candle_core::bail!("{op}: input {:?} has no channel axis", l.shape()),
        };
        if groups == 0 || c % groups != 0 || params != c {
            candle_core::bail!(
                "{op}: {c} channels, {groups} groups and {params} parameters do not fit"
            );
        }
        let inner: usize = dims[2..].iter().product();
        let per_group = c / groups * inner;
        Ok(GnGeom {
            n,
            c,
            inner,
            groups,
            per_group,
            chunks: per_group.div_ceil(GN_CHUNK).max(1),
        })
    }

    fn total(&self) -> usize {
        self.n * self.c * self.inner
    }

    fn all_groups(&self) -> usize {
        self.n * self.groups
    }

    /// `(mean, rstd)` of every (image, group) of `x`: gn_chunk_stats, then gn_finalize.
    fn stats<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suf: &str,
        x: &CudaView<T>,
        eps: f64,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let stream = dev.cuda_stream();
        let all = self.all_groups();
        let stats = dev.alloc_zeros::<f32>(3 * all * self.chunks)?;
        let mean_rstd = dev.alloc_zeros::<f32>(2 * all)?;
        let f = kernel(dev, &format!("gn_chunk_stats_{suf}"))?;
        let mut k = stream.launch_builder(&f);
        k.arg(x);
        k.arg(&stats);
        candle_core::builder_arg!(k, self.per_group as i64, int(self.chunks, "chunks")?);
        // SAFETY: the arguments match gn_chunk_stats's signature in cuda.cu.
        unsafe { k.launch(blocks(all * self.chunks)?) }.w()?;
        let f = kernel(dev, "gn_finalize")?;
        let mut k = stream.launch_builder(&f);
        k.arg(&stats);
        k.arg(&mean_rstd);
        candle_core::builder_arg!(
            k,
            int(all, "groups")?,
            int(self.chunks, "chunks")?,
            eps as f32
        );
        // SAFETY: the arguments match gn_finalize's signature in cuda.cu.
        unsafe { k.launch(blocks(all.div_ceil(THREADS as usize))?) }.w()?;
        Ok(mean_rstd)
    }
}

/// The f32 view of a parameter storage, or an error naming the op.
fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(p) => view(p, l, op),
        _ => candle_core::bail!("{op}: weight and bias must be f32"),
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "artguide-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if lw.shape().elem_count() != lb.shape().elem_count() {
            candle_core::bail!(
                "group norm: weight {:?} and bias {:?} differ",
                lw.shape(),
                lb.shape()
            );
        }
        let geo = GnGeom::new(self.name(), l, self.groups, lw.shape().elem_count())?;
        let (w, b) = (
            f32_view(sw, lw, self.name())?,
            f32_view(sb, lb, self.name())?,
        );
        let total = geo.total();
        let dev = s.device();
        let stream = dev.cuda_stream();
        let slice = by_dtype!(self.name(), s, |x, suf| {
            let x = view(x, l, self.name())?;
            let out = output(&x, dev, total)?;
            if total > 0 {
                let mean_rstd = geo.stats(dev, suf, &x, self.eps)?;
                let f = kernel(dev, &format!("gn_apply_{suf}"))?;
                let mut k = stream.launch_builder(&f);
                k.arg(&x);
                k.arg(&out);
                k.arg(&mean_rstd);
                k.arg(&w);
                k.arg(&b);
                let (segs, cfg) = rows_launch(geo.n * geo.c, geo.inner)?;
                candle_core::builder_arg!(
                    k,
                    segs,
                    int(geo.inner, "plane size")?,
                    int(geo.c, "channels")?,
                    int(geo.c / geo.groups, "channels per group")?,
                    i32::from(self.silu)
                );
                // SAFETY: the arguments match gn_apply's signature in cuda.cu.
                unsafe { k.launch(cfg) }.w()?;
            }
            out
        });
        Ok((storage(slice, dev), l.shape().clone()))
    }
}

/// `dL/dx` of `silu?(GroupNorm(x))` from `x`, `dL/dy` and the (2, C) f32 weight-and-bias rows.
struct GroupNormGrad {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "artguide-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
        sp: &CudaStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let geo = GnGeom::new(self.name(), l, self.groups, lp.shape().elem_count() / 2)?;
        int(geo.per_group, "group size")?;
        let params = f32_view(sp, lp, self.name())?;
        let (w, b) = (params.slice(0..geo.c), params.slice(geo.c..2 * geo.c));
        let total = geo.total();
        let all = geo.all_groups();
        let dev = s.device();
        let stream = dev.cuda_stream();
        let slice = by_dtype!(self.name(), s, sg, |x, dy, suf| {
            let (x, dy) = (view(x, l, self.name())?, view(dy, lg, self.name())?);
            let dx = output(&x, dev, total)?;
            if total > 0 {
                let mean_rstd = geo.stats(dev, suf, &x, self.eps)?;
                let sums = dev.alloc_zeros::<f32>(2 * all * geo.chunks)?;
                let grad_means = dev.alloc_zeros::<f32>(2 * all)?;
                let silu = i32::from(self.silu);
                let cpg = int(geo.c / geo.groups, "channels per group")?;
                let f = kernel(dev, &format!("gn_grad_chunk_sums_{suf}"))?;
                let mut k = stream.launch_builder(&f);
                k.arg(&x);
                k.arg(&dy);
                k.arg(&mean_rstd);
                k.arg(&w);
                k.arg(&b);
                k.arg(&sums);
                candle_core::builder_arg!(
                    k,
                    geo.per_group as i64,
                    int(geo.chunks, "chunks")?,
                    int(geo.inner, "plane size")?,
                    int(geo.groups, "groups")?,
                    cpg,
                    silu
                );
                // SAFETY: the arguments match gn_grad_chunk_sums's signature in cuda.cu.
                unsafe { k.launch(blocks(all * geo.chunks)?) }.w()?;
                let f = kernel(dev, "gn_grad_finalize")?;
                let mut k = stream.launch_builder(&f);
                k.arg(&sums);
                k.arg(&grad_means);
                candle_core::builder_arg!(
                    k,
                    int(all, "groups")?,
                    int(geo.chunks, "chunks")?,
                    geo.per_group as i64
                );
                // SAFETY: the arguments match gn_grad_finalize's signature in cuda.cu.
                unsafe { k.launch(blocks(all.div_ceil(THREADS as usize))?) }.w()?;
                let f = kernel(dev, &format!("gn_grad_apply_{suf}"))?;
                let mut k = stream.launch_builder(&f);
                k.arg(&x);
                k.arg(&dy);
                k.arg(&dx);
                k.arg(&mean_rstd);
                k.arg(&grad_means);
                k.arg(&w);
                k.arg(&b);
                let (segs, cfg) = rows_launch(geo.n * geo.c, geo.inner)?;
                candle_core::builder_arg!(
                    k,
                    segs,
                    int(geo.inner, "plane size")?,
                    int(geo.c, "channels")?,
                    cpg,
                    silu
                );
                // SAFETY: the arguments match gn_grad_apply's signature in cuda.cu.
                unsafe { k.launch(cfg) }.w()?;
            }
            dx
        });
        Ok((storage(slice, dev), l.shape().clone()))
    }
}

/// `value * gelu_erf(gate)` for `p = [value | gate]` on the last axis (each `inner` wide), in
/// one pass (candle: two strided narrows, a GELU and a multiply).
pub fn geglu(p: &Tensor, inner: usize) -> candle_core::Result<Tensor> {
    let last = *p.dims().last().unwrap_or(&0);
    if last != 2 * inner {
        candle_core::bail!("geglu: last axis {last}, expected 2 x {inner}");
    }
    if p.elem_count() == 0 {
        return Tensor::zeros(
            super::linear::with_last(p.dims(), inner),
            p.dtype(),
            p.device(),
        );
    }
    p.contiguous()?.apply_op1_no_bwd(&RowOp::Geglu { inner })
}

/// OpenAI CLIP's `quick_gelu`, `x * sigmoid(1.702 x)`, in one pass.
pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    activation(x, RowOp::QuickGelu)
}

/// Exact (erf) GELU in one pass.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    activation(x, RowOp::GeluErf)
}

fn activation(x: &Tensor, op: RowOp) -> candle_core::Result<Tensor> {
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// The one-input row kernels over the last axis.
enum RowOp {
    Geglu { inner: usize },
    QuickGelu,
    GeluErf,
}

impl CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        match self {
            RowOp::Geglu { .. } => "artguide-geglu",
            RowOp::QuickGelu => "artguide-quick-gelu",
            RowOp::GeluErf => "artguide-gelu-erf",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = l.shape().dims();
        let last = *dims.last().unwrap_or(&1);
        // Output rows of `inner` values: half the input row for GEGLU.
        let (inner, shape) = match self {
            RowOp::Geglu { inner } => (*inner, Shape::from(super::linear::with_last(dims, *inner))),
            _ => (last, l.shape().clone()),
        };
        let total = shape.elem_count();
        let (segs, cfg) = rows_launch(total / inner.max(1), inner)?;
        let dev = s.device();
        let stream = dev.cuda_stream();
        let slice = by_dtype!(self.name(), s, |x, suf| {
            let x = view(x, l, self.name())?;
            let out = output(&x, dev, total)?;
            let f = match self {
                RowOp::Geglu { .. } => kernel(dev, &format!("geglu_{suf}"))?,
                _ => kernel(dev, &format!("activation_{suf}"))?,
            };
            let mut k = stream.launch_builder(&f);
            k.arg(&x);
            k.arg(&out);
            let row = int(inner, "row length")?;
            candle_core::builder_arg!(k, segs, row);
            // activation's `op`: 0 quick_gelu, 1 exact GELU (geglu has no such argument).
            let op = i32::from(matches!(self, RowOp::GeluErf));
            if !matches!(self, RowOp::Geglu { .. }) {
                k.arg(&op);
            }
            // SAFETY: the arguments match geglu's / activation's signature in cuda.cu.
            unsafe { k.launch(cfg) }.w()?;
            out
        });
        Ok((storage(slice, dev), shape))
    }
}

/// Nearest upsampling of `(n, c, h, w)` by `s` in both axes, as one copy (candle's
/// broadcast-reshape copy indexes in six dimensions).
pub fn upsample_nearest(x: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if x.elem_count() == 0 || s == 0 {
        return Tensor::zeros((n, c, h * s, w * s), x.dtype(), x.device());
    }
    x.contiguous()?
        .apply_op1_no_bwd(&Nearest { s, backward: false })
}

/// The backward of [`upsample_nearest`] by `s`: each value of `(n, c, h, w)` the sum of its
/// `s x s` patch of the gradient `(n, c, h*s, w*s)`, in one pass summing in f32 (candle's
/// composition: two strided reductions of a six-dimensional view, with an intermediate).
pub fn patch_sum(g: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (n, c, gh, gw) = g.dims4()?;
    if s == 0 || gh % s != 0 || gw % s != 0 {
        candle_core::bail!("patch sum: a {gh}x{gw} gradient is not whole {s}x{s} patches");
    }
    if g.elem_count() == 0 {
        return Tensor::zeros((n, c, gh / s, gw / s), g.dtype(), g.device());
    }
    g.contiguous()?
        .apply_op1_no_bwd(&Nearest { s, backward: true })
}

/// Between `(n, c, h, w)` and `(n, c, h*s, w*s)`: the upsampling copy, or (`backward`) the
/// patch sum back.
struct Nearest {
    s: usize,
    backward: bool,
}

impl CustomOp1 for Nearest {
    fn name(&self) -> &'static str {
        if self.backward {
            "artguide-patch-sum"
        } else {
            "artguide-upsample-nearest"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, c, ih, iw) = l.shape().dims4()?;
        let s = self.s;
        // (h, w): the small plane; the kernels' rows are the output planes.
        let ((h, w), (oh, ow), func) = if self.backward {
            ((ih / s, iw / s), (ih / s, iw / s), "patch_sum")
        } else {
            ((ih, iw), (ih * s, iw * s), "upsample_nearest")
        };
        let (segs, cfg) = rows_launch(n * c, oh * ow)?;
        let dev = st.device();
        let stream = dev.cuda_stream();
        let slice = by_dtype!(self.name(), st, |x, suf| {
            let x = view(x, l, self.name())?;
            let out = output(&x, dev, n * c * oh * ow)?;
            let f = kernel(dev, &format!("{func}_{suf}"))?;
            let mut k = stream.launch_builder(&f);
            k.arg(&x);
            k.arg(&out);
            candle_core::builder_arg!(
                k,
                segs,
                int(oh * ow, "output plane")?,
                int(h, "height")?,
                int(w, "width")?,
                int(s, "scale")?
            );
            // SAFETY: the arguments match upsample_nearest's and patch_sum's signature in
            // cuda.cu.
            unsafe { k.launch(cfg) }.w()?;
            out
        });
        Ok((storage(slice, dev), Shape::from((n, c, oh, ow))))
    }
}

/// Unmasked attention on `q: (b, n, heads*d)`, `k, v: (b, m, heads*d)` without head-major
/// copies: the scores `(b*heads, n, m)` by strided batched GEMMs with the scale in `alpha`
/// ([`super::head_gemm`]), candle's row softmax (it sums f16/bf16 rows in f32), and the
/// context GEMMs writing each head at its column offset of `(b, n, heads*d)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = q.contiguous()?.apply_op2_no_bwd(
        &k.contiguous()?,
        &HeadGemm::Scores {
            heads,
            scale: scale as f32,
        },
    )?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .apply_op2_no_bwd(&v.contiguous()?, &HeadGemm::Context { heads })
}

/// The attention sizes of `(b, n, heads*d)` queries and `(b, m, heads*d)` keys or values.
fn attention_shape(
    op: &str,
    q: (usize, usize, usize),
    kv: (usize, usize, usize),
    heads: usize,
) -> candle_core::Result<head_gemm::AttentionShape> {
    let ((b, n, hd), (kb, m, khd)) = (q, kv);
    if heads == 0 || hd % heads != 0 || (kb, khd) != (b, hd) || b * n * m * hd == 0 {
        candle_core::bail!(
            "{op}: queries ({b}, {n}, {hd}) and keys/values ({kb}, {m}, {khd}) with {heads} heads do not fit"
        );
    }
    Ok(head_gemm::AttentionShape {
        b,
        n,
        m,
        heads,
        d: hd / heads,
    })
}

/// The cuBLAS data type of a kernel suffix from `by_dtype!`.
fn blas_type(suffix: &str) -> cublas_sys::cudaDataType_t {
    match suffix {
        "f16" => cublas_sys::cudaDataType_t::CUDA_R_16F,
        "bf16" => cublas_sys::cudaDataType_t::CUDA_R_16BF,
        _ => cublas_sys::cudaDataType_t::CUDA_R_32F,
    }
}

/// Issues the plan `g` on `dev`'s cuBLAS handle (which runs on the device's stream), reading
/// `a` and `b` and writing `c`; the sums accumulate in f32, as candle's matmul does by default.
fn strided_gemm<T: DeviceRepr>(
    dev: &CudaDevice,
    g: &head_gemm::StridedGemm,
    data: cublas_sys::cudaDataType_t,
    a: &CudaView<T>,
    b: &CudaView<T>,
    c: &mut CudaSlice<T>,
) -> candle_core::Result<()> {
    let [ea, eb, ec] = g.extents();
    if a.len() < ea || b.len() < eb || c.len() < ec {
        candle_core::bail!(
            "strided GEMM: operands of {}, {} and {} elements, the plan reaches {ea}, {eb} and {ec}",
            a.len(),
            b.len(),
            c.len()
        );
    }
    let op = |t: bool| {
        if t {
            cublas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            cublas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let stride = |s: usize| {
        i64::try_from(s).map_err(|_| candle_core::Error::Msg(format!("GEMM stride {s}")))
    };
    let (m, n, k) = (
        int(g.m, "GEMM m")?,
        int(g.n, "GEMM n")?,
        int(g.k, "GEMM k")?,
    );
    let ld = [
        int(g.ld[0], "GEMM lda")?,
        int(g.ld[1], "GEMM ldb")?,
        int(g.ld[2], "GEMM ldc")?,
    ];
    let strides = [
        stride(g.stride[0])?,
        stride(g.stride[1])?,
        stride(g.stride[2])?,
    ];
    let batch = int(g.batch, "GEMM batch")?;
    let (alpha, beta) = (g.alpha, 0f32);
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let size = std::mem::size_of::<T>() as u64;
    let (pa, _ga) = a.device_ptr(&stream);
    let (pb, _gb) = b.device_ptr(&stream);
    let (pc, _gc) = c.device_ptr_mut(&stream);
    for call in 0..g.calls {
        let at = |p: u64, o: usize| p + (call * g.call_stride[o]) as u64 * size;
        // SAFETY: `extents` bounds every element the calls touch within the three buffers
        // (checked above), the pointers stay valid while the guards live, and alpha/beta are
        // f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                m,
                n,
                k,
                &alpha as *const f32 as *const _,
                at(pa, 0) as *const _,
                data,
                ld[0],
                strides[0],
                at(pb, 1) as *const _,
                data,
                ld[1],
                strides[1],
                &beta as *const f32 as *const _,
                at(pc, 2) as *mut _,
                data,
                ld[2],
                strides[2],
                batch,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .w()?;
    }
    Ok(())
}

/// Attention's two products on the head layout ([`head_gemm`]); in both, the second input is
/// the plan's A and the first its B.
enum HeadGemm {
    /// `scale Q K^T` per image and head: `(b, n, heads*d) x (b, m, heads*d) -> (b*heads, n, m)`.
    Scores { heads: usize, scale: f32 },
    /// `P V` per image and head: `(b*heads, n, m) x (b, m, heads*d) -> (b, n, heads*d)`.
    Context { heads: usize },
}

impl CustomOp2 for HeadGemm {
    fn name(&self) -> &'static str {
        match self {
            HeadGemm::Scores { .. } => "artguide-head-scores",
            HeadGemm::Context { .. } => "artguide-head-context",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        ls: &CudaStorage,
        ll: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let name = self.name();
        let (plan, shape) = match *self {
            HeadGemm::Scores { heads, scale } => {
                let s = attention_shape(name, ll.shape().dims3()?, rl.shape().dims3()?, heads)?;
                (
                    head_gemm::scores_plan(&s, scale),
                    Shape::from((s.b * s.heads, s.n, s.m)),
                )
            }
            HeadGemm::Context { heads } => {
                let (bh, n, m) = ll.shape().dims3()?;
                let (b, vm, hd) = rl.shape().dims3()?;
                if heads == 0 || bh != b * heads || vm != m {
                    candle_core::bail!(
                        "{name}: probabilities ({bh}, {n}, {m}) and values ({b}, {vm}, {hd}) with {heads} heads do not fit"
                    );
                }
                let s = attention_shape(name, (b, n, hd), (b, m, hd), heads)?;
                (head_gemm::context_plan(&s), Shape::from((b, n, hd)))
            }
        };
        let dev = ls.device();
        let slice = by_dtype!(name, ls, rs, |l, r, suf| {
            let (l, r) = (view(l, ll, name)?, view(r, rl, name)?);
            let mut out = output(&l, dev, shape.elem_count())?;
            strided_gemm(dev, &plan, blas_type(suf), &r, &l, &mut out)?;
            out
        });
        Ok((storage(slice, dev), shape))
    }
}

/// cuBLASLt's heuristics assume operands aligned to 256 bytes (its default minimum alignment
/// preference); candle's allocations are, views at an offset may not be.
const LT_ALIGN: usize = 256;

/// The device's cuBLASLt handle (with its 32 MiB workspace on Hopper), made at first use, on
/// the device's stream. One handle per `CudaDevice` made (each `Device::new_cuda` is a new
/// one): a process that opens the device many times keeps a workspace for each.
fn blas_lt(dev: &CudaDevice) -> candle_core::Result<Arc<cublaslt::CudaBlasLT>> {
    static HANDLES: Mutex<Vec<(DeviceId, Arc<cublaslt::CudaBlasLT>)>> = Mutex::new(Vec::new());
    let find = || {
        let handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .iter()
            .find(|(id, _)| *id == dev.id())
            .map(|(_, h)| h.clone())
    };
    if let Some(h) = find() {
        return Ok(h);
    }
    let stream = dev.cuda_stream();
    // Made during a capture, the workspace would be graph memory that outlives the graph.
    if !matches!(
        stream.capture_status(),
        Ok(cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    ) {
        candle_core::bail!("cuBLASLt: the handle cannot be made while the stream is captured");
    }
    // cudarc unwraps the workspace's allocation: out of memory there is a panic.
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cublaslt::CudaBlasLT::new(stream)
    }))
    .map_err(|_| candle_core::Error::Msg("cuBLASLt: cannot allocate its workspace".into()))?
    .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))?;
    let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, h)) = handles.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(h.clone());
    }
    let h = Arc::new(made);
    handles.push((dev.id(), h.clone()));
    Ok(h)
}

/// `x W^T + b` for `x: (rows, k)`, `w: (n, k)`, `b: (n)`, all f16 or all bf16, as one
/// cuBLASLt GEMM with the bias added in its epilogue (candle: a GEMM, then a pass over the
/// output for the bias). None when the operands do not suit it (another dtype, a view not
/// aligned as cuBLASLt's heuristics assume, a shape cuBLASLt refuses): the caller composes.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) || w.dtype() != dtype || b.dtype() != dtype {
        return Ok(None);
    }
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    let aligned = |t: &Tensor| t.layout().start_offset() * dtype.size_in_bytes() % LT_ALIGN == 0;
    if !(aligned(&x) && aligned(&w) && aligned(&b)) || x.elem_count() == 0 {
        return Ok(None);
    }
    let op = LtLinear::default();
    match x.apply_op3_no_bwd(&w, &b, &op) {
        Ok(y) => Ok(Some(y)),
        // Any other error (a failed launch, out of memory, an earlier kernel's) is the
        // caller's.
        Err(e) if !op.refused.load(std::sync::atomic::Ordering::Relaxed) => Err(e),
        Err(e) => {
            // cuBLASLt refuses some shapes (no algorithm from its heuristics) before launching
            // anything: compose instead, and say so once.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "warning: {} {:?} x {:?}: {e}; using candle's matmul and bias add",
                    op.name(),
                    x.shape(),
                    w.shape()
                )
            });
            Ok(None)
        }
    }
}

/// The GEMM; `refused` is set when cuBLASLt turned the problem down before launching
/// anything (no algorithm for it, or a layout it does not take).
#[derive(Default)]
struct LtLinear {
    refused: std::sync::atomic::AtomicBool,
}

impl LtLinear {
    fn error(&self, e: cublaslt::result::CublasError) -> candle_core::Error {
        use cublaslt::sys::cublasStatus_t as S;
        if matches!(
            e.0,
            S::CUBLAS_STATUS_NOT_SUPPORTED | S::CUBLAS_STATUS_INVALID_VALUE
        ) {
            self.refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
    }
}

impl CustomOp3 for LtLinear {
    fn name(&self) -> &'static str {
        "artguide-lt-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k || bl.shape().elem_count() != n {
            candle_core::bail!(
                "{}: input {:?}, weight {:?} and bias {:?} do not fit",
                self.name(),
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        // Row-major y (rows, n) is column-major y^T (n x rows) = W (column-major k x n,
        // transposed) times x^T (column-major k x rows); the epilogue adds the bias down the n
        // rows of y^T, one value per output feature.
        let cfg = cublaslt::MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: rows as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let dev = xs.device();
        let lt = blas_lt(dev)?;
        let name = self.name();
        // The same code for f16 and bf16 (`Matmul<T>` is implemented for each).
        macro_rules! gemm {
            ($x:expr, $w:expr, $b:expr) => {{
                let (x, w, b) = (
                    view($x, xl, name)?,
                    view($w, wl, name)?,
                    view($b, bl, name)?,
                );
                let mut out = output(&x, dev, rows * n)?;
                // SAFETY: the config describes the three contiguous operands and the output
                // of rows * n values (beta 0: the output is only written).
                unsafe { cublaslt::Matmul::matmul(&*lt, cfg, &w, &x, &mut out, Some(&b), None) }
                    .map_err(|e| self.error(e))?;
                out
            }};
        }
        let slice = match (&xs.slice, &ws.slice, &bs.slice) {
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(w), CudaStorageSlice::F16(b)) => {
                CudaStorageSlice::F16(gemm!(x, w, b))
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w), CudaStorageSlice::BF16(b)) => {
                CudaStorageSlice::BF16(gemm!(x, w, b))
            }
            _ => candle_core::bail!("{name}: f16 or bf16 operands of one dtype expected"),
        };
        Ok((storage(slice, dev), Shape::from((rows, n))))
    }
}
