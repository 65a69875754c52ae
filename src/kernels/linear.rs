//! Fully connected layers on the CPU in f32: one GEMM over all leading dimensions with the
//! bias written into the destination first. On x86-64 with AVX2/FMA the GEMM is
//! [`sgemm`]'s (no per-tile re-packing of the weight); elsewhere the `gemm` crate's.
//!
//! candle's `Linear` runs a batched matmul against the transposed weight and then adds the
//! bias in a separate pass over the whole output (84 MB for SD 1.5's 320 -> 2560 projection
//! at 512x512, batch 2); measured at 82 GFLOP/s there against torch's 121 on this machine.

use std::sync::{Arc, OnceLock};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor,
};

use super::{contiguous_f32, for_each_task, sgemm, OutPtr};
use crate::Result;

/// Output tile of one task (rows, columns) for the `gemm` crate path.
const ROWS: usize = 256;
const COLS: usize = 512;

/// `y = x W^T + b` over the last axis; the drop-in for `candle_nn::Linear` in inference-only
/// models (candle's `Linear` on other devices and dtypes).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The candle layer; None once the weight lives only in `packed`.
    inner: Option<candle_nn::Linear>,
    /// The weight packed for [`sgemm::gemm_nt_packed`] (see [`Linear::packed`]).
    packed: Option<Arc<sgemm::PackedB>>,
    /// Its transpose packed, for the input gradient: made by the first backward, so a layer
    /// only ever run forward (a probe tower, the guide's text tower) never holds it.
    packed_t: Arc<OnceLock<Arc<sgemm::PackedB>>>,
    /// The bias, or zeros: the kernel always starts from it.
    bias: Tensor,
}

impl Linear {
    /// Wraps a loaded candle layer.
    pub fn new(inner: candle_nn::Linear) -> Result<Self> {
        let bias = match inner.bias() {
            Some(b) => b.clone(),
            None => Tensor::zeros(
                inner.weight().dim(0)?,
                inner.weight().dtype(),
                inner.weight().device(),
            )?,
        };
        Ok(Linear {
            inner: Some(inner),
            packed: None,
            packed_t: Arc::default(),
            bias,
        })
    }

    /// As [`Linear::new`], but a CPU f32 weight is packed once here and the original dropped
    /// (same memory), so no call re-packs it: for models whose layers see few rows per call
    /// (CLIP towers), where per-call packing is a visible share of the time. The layer then
    /// only takes CPU f32 inputs; in a graph its backward packs the weight's transpose once,
    /// on first use (a second copy of the weight). Elsewhere (other devices, dtypes, CPUs) it
    /// is [`Linear::new`].
    pub fn packed(inner: candle_nn::Linear) -> Result<Self> {
        let w = inner.weight();
        if !(sgemm::available() && w.device().is_cpu() && w.dtype() == DType::F32) {
            return Self::new(inner);
        }
        let (n, k) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let packed = sgemm::PackedB::pack(&values, (n, k), k);
        Ok(Linear {
            packed: Some(Arc::new(packed)),
            inner: None,
            ..Self::new(inner)?
        })
    }

    /// The value `x W^T + b`, without a graph.
    fn value(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let inner = match (&self.inner, &self.packed) {
            (_, Some(p)) => {
                return xs.contiguous()?.apply_op2_no_bwd(
                    &self.bias,
                    &PackedGemm {
                        packed: Arc::clone(p),
                    },
                )
            }
            (Some(inner), None) => inner,
            (None, None) => unreachable!("a Linear keeps its weight in one form"),
        };
        let w = inner.weight();
        if xs.device().is_cpu() && xs.dtype() == DType::F32 && w.dtype() == DType::F32 {
            xs.contiguous()?.apply_op3_no_bwd(w, &self.bias, &Gemm)
        } else if xs.device().is_cuda() {
            let (k, n) = (w.dim(1)?, w.dim(0)?);
            if xs.dims().last() != Some(&k) {
                candle_core::bail!(
                    "linear: input {:?} for a weight of {k} input features",
                    xs.shape()
                );
            }
            let rows = xs.elem_count() / k.max(1);
            let x = xs.contiguous()?.reshape((rows, k))?;
            #[cfg(feature = "cuda")]
            if let Some(b) = inner.bias() {
                if super::on_cuda_kernel(xs, super::CudaKernel::Linear) {
                    if let Some(y) = super::cuda::linear(&x, w, b)? {
                        return y.reshape(with_last(xs.dims(), n));
                    }
                }
            }
            let y = x.matmul(&w.t()?)?;
            let y = match inner.bias() {
                Some(b) => add_rows_cuda(&y, b, false)?,
                None => y,
            };
            y.reshape(with_last(xs.dims(), n))
        } else {
            inner.forward(xs)
        }
    }
}

/// `dims` with its last axis (a layer's features) set to `last`.
pub(super) fn with_last(dims: &[usize], last: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(l) = out.last_mut() {
        *l = last;
    }
    out
}

/// `y + bias` on CUDA without candle's broadcast add, whose kernel indexes every element
/// through a division and remainder per dimension (47% of CLIP ViT-L/14's time and 14% of
/// the VAE decode's on an H100, BENCHMARKS.md): the bias is spread by a rank-1 matmul into
/// a contiguous tensor and added element-wise. `per_channel`: `y` is NCHW and `bias` has one
/// value per channel; else `y` is `(rows, n)` and `bias` has `n` values.
pub fn add_rows_cuda(y: &Tensor, bias: &Tensor, per_channel: bool) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda_kernels().contains(super::CudaKernel::Bias) {
        return super::cuda::bias_add(y, bias, per_channel);
    }
    let y = y.contiguous()?;
    let dtype = y.dtype();
    let bias = bias.to_dtype(dtype)?;
    let spread = if per_channel {
        let (b, c, h, w) = y.dims4()?;
        // (b*c, 1) channel values times (1, h*w) ones.
        let col = bias
            .reshape((1, c))?
            .broadcast_as((b, c))?
            .contiguous()?
            .reshape((b * c, 1))?;
        col.matmul(&Tensor::ones((1, h * w), dtype, y.device())?)?
            .reshape((b, c, h, w))?
    } else {
        let (rows, n) = y.dims2()?;
        Tensor::ones((rows, 1), dtype, y.device())?.matmul(&bias.reshape((1, n))?)?
    };
    y + spread
}

impl Module for Linear {
    /// Inside a differentiated graph (guidance) the weights are constants: the backward
    /// computes only the input's gradient, `dL/dy W` ([`super::frozen`]).
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if !xs.track_op() {
            return self.value(xs);
        }
        let grad: super::frozen::InputGrad = match (&self.inner, &self.packed) {
            (_, Some(p)) => {
                let (p, t) = (Arc::clone(p), Arc::clone(&self.packed_t));
                Box::new(move |_: &Tensor, g: &Tensor| {
                    let t = t.get_or_init(|| Arc::new(p.transposed()));
                    g.contiguous()?.apply_op1_no_bwd(&PackedGemm {
                        packed: Arc::clone(t),
                    })
                })
            }
            (Some(inner), None) => {
                let w = inner.weight().clone();
                Box::new(move |_: &Tensor, g: &Tensor| {
                    // One GEMM over all rows: `broadcast_matmul` would run one small GEMM
                    // per leading index (per image of a batch of CLIP views).
                    let (n, k) = w.dims2()?;
                    let rows = g.elem_count() / n.max(1);
                    let out = with_last(g.dims(), k);
                    g.contiguous()?.reshape((rows, n))?.matmul(&w)?.reshape(out)
                })
            }
            (None, None) => unreachable!("a Linear keeps its weight in one form"),
        };
        super::frozen::input_only(xs, |x| Ok(self.value(x)?), || Ok(grad))
            .map_err(candle_core::Error::wrap)
    }
}

/// `x W^T + b` with W already packed (as an op of two; as an op of one, `x W^T`).
struct PackedGemm {
    packed: Arc<sgemm::PackedB>,
}

impl PackedGemm {
    /// Every output row starts as `bias` (zeros without one), then the GEMM adds into it.
    fn run(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o, i) = self.packed.dims();
        let dims = lx.shape().dims();
        if dims.last() != Some(&i) || bias.is_some_and(|b| b.len() != o) {
            candle_core::bail!(
                "linear: input {:?} does not fit a packed ({o}, {i}) weight",
                lx.shape()
            );
        }
        let x = contiguous_f32(sx, lx, "linear-packed-gemm")?;
        let rows = x.len() / i.max(1);
        let mut out = match bias {
            Some(bias) => {
                let mut out: Vec<f32> = Vec::with_capacity(rows * o);
                for _ in 0..rows {
                    out.extend_from_slice(bias);
                }
                out
            }
            None => vec![0f32; rows * o],
        };
        // SAFETY: x is rows x i, out rows x o; the packed weight exists only where
        // sgemm::available() held.
        unsafe { sgemm::gemm_nt_packed(rows, x.as_ptr(), i, &self.packed, out.as_mut_ptr(), o) };
        let shape = with_last(dims, o);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

impl CustomOp2 for PackedGemm {
    fn name(&self) -> &'static str {
        "linear-packed-gemm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(sx, lx, Some(contiguous_f32(sb, lb, "linear-packed-gemm")?))
    }
}

impl CustomOp1 for PackedGemm {
    fn name(&self) -> &'static str {
        "linear-packed-gemm"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(sx, lx, None)
    }
}

struct Gemm;

impl CustomOp3 for Gemm {
    fn name(&self) -> &'static str {
        "linear-gemm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = lx.shape().dims();
        let (o, i) = lw.shape().dims2()?;
        if dims.last() != Some(&i) || lb.shape().elem_count() != o {
            candle_core::bail!(
                "linear: input {:?} does not fit weight {:?} / bias {:?}",
                lx.shape(),
                lw.shape(),
                lb.shape()
            );
        }
        let (x, w, bias) = (
            contiguous_f32(sx, lx, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
            contiguous_f32(sb, lb, self.name())?,
        );
        let rows = x.len() / i.max(1);
        // Every element starts as its bias (no zeroing pass first).
        let mut out: Vec<f32> = Vec::with_capacity(rows * o);
        for _ in 0..rows {
            out.extend_from_slice(bias);
        }
        let shape = with_last(dims, o);
        if sgemm::available() {
            // C = bias (above) += x W^T over every core.
            // SAFETY: x is rows x i, the weight o x i, out rows x o; availability checked.
            unsafe {
                sgemm::gemm_nt_par(
                    (rows, o, i),
                    x.as_ptr(),
                    i,
                    w.as_ptr(),
                    i,
                    out.as_mut_ptr(),
                    o,
                )
            };
            return Ok((CpuStorage::F32(out), Shape::from(shape)));
        }
        let out_ptr = OutPtr(out.as_mut_ptr());
        // Output tiles of ROWS x COLS, each one GEMM on one core accumulating into the bias,
        // so only a COLS-wide slice of the weight is packed per tile.
        let (rt, ct) = (rows.div_ceil(ROWS), o.div_ceil(COLS));
        for_each_task(rt * ct, |task, par| {
            let (r0, c0) = ((task / ct) * ROWS, (task % ct) * COLS);
            let (nr, nc) = (ROWS.min(rows - r0), COLS.min(o - c0));
            // SAFETY: tiles are disjoint; every pointer/stride pair stays inside out (rows x
            // o), x (rows x i) and the o x i weight read as W^T.
            unsafe {
                let dst = out_ptr.get().add(r0 * o + c0);
                gemm::gemm(
                    nr,
                    nc,
                    i,
                    dst,
                    1,
                    o as isize,
                    true,
                    x.as_ptr().add(r0 * i),
                    1,
                    i as isize,
                    w.as_ptr().add(c0 * i),
                    i as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{f64, randn, rel_err_vs_f64, weighted_grads};

    #[test]
    fn linear_matches_candle_in_f64() {
        for (i, (shape, inp, out, bias)) in [
            (vec![2usize, 5, 7], 7usize, 3usize, true),
            (vec![9, 16], 16, 33, false),
            (vec![1, 2, 3, 8], 8, 4, true),
        ]
        .into_iter()
        .enumerate()
        {
            let w = randn(&[out, inp], 1.0, i as u64);
            let b = bias.then(|| randn(&[out], 1.0, 10 + i as u64));
            let x = randn(&shape, 1.0, 20 + i as u64);
            let got = Linear::new(candle_nn::Linear::new(w.clone(), b.clone()))
                .unwrap()
                .forward(&x)
                .unwrap();
            let want = candle_nn::Linear::new(f64(&w), b.as_ref().map(f64))
                .forward(&f64(&x))
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(rel_err_vs_f64(&got, &want) < 1e-6, "case {i}");
        }
    }

    /// In a graph: candle's input gradient (in f64), no weight gradient, for a layer that
    /// keeps its weight and for a packed one (whose backward packs the transpose; run twice
    /// so the second backward reuses it). Shapes with odd widths and more than one panel.
    #[test]
    fn backward_gives_the_input_gradient_only() {
        type Build = fn(candle_nn::Linear) -> Result<Linear>;
        let builds: [(&str, Build); 2] = [("new", Linear::new), ("packed", Linear::packed)];
        for (name, build) in builds {
            for (i, (shape, inp, out)) in [
                (vec![2usize, 5, 7], 7usize, 3usize),
                (vec![9, 16], 16, 33),
                (vec![4, 50, 40], 40, 70),
            ]
            .into_iter()
            .enumerate()
            {
                let w = randn(&[out, inp], 1.0, i as u64);
                let b = randn(&[out], 1.0, 10 + i as u64);
                let x0 = randn(&shape, 1.0, 20 + i as u64);
                let layer = build(candle_nn::Linear::new(w.clone(), Some(b.clone()))).unwrap();
                let xd = candle_core::Var::from_tensor(&f64(&x0)).unwrap();
                let yd = candle_nn::Linear::new(f64(&w), Some(f64(&b)))
                    .forward(xd.as_tensor())
                    .unwrap();
                let r = randn(yd.dims(), 1.0, 30);
                let gd = weighted_grads(&yd, &r);
                for run in 0..2 {
                    let x = candle_core::Var::from_tensor(&x0).unwrap();
                    let y = layer.forward(x.as_tensor()).unwrap();
                    let grads = weighted_grads(&y, &r);
                    let case = format!("{name} case {i} run {run}");
                    assert!(grads.get(&w).is_none(), "{case}: a weight gradient");
                    assert!(rel_err_vs_f64(&y, &yd) < 1e-6, "{case}: value");
                    let e = rel_err_vs_f64(
                        grads.get(x.as_tensor()).unwrap(),
                        gd.get(xd.as_tensor()).unwrap(),
                    );
                    assert!(e < 1e-6, "{case}: input gradient rel err {e}");
                }
            }
        }
    }

    #[test]
    fn packed_matches_candle_in_f64() {
        for (i, (shape, inp, out)) in [
            (vec![2usize, 5, 7], 7usize, 3usize),
            (vec![300, 40], 40, 70),
            (vec![1, 77, 24], 24, 33),
        ]
        .into_iter()
        .enumerate()
        {
            let w = randn(&[out, inp], 1.0, i as u64);
            let b = randn(&[out], 1.0, 10 + i as u64);
            let x = randn(&shape, 1.0, 20 + i as u64);
            let got = Linear::packed(candle_nn::Linear::new(w.clone(), Some(b.clone())))
                .unwrap()
                .forward(&x)
                .unwrap();
            let want = candle_nn::Linear::new(f64(&w), Some(f64(&b)))
                .forward(&f64(&x))
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(rel_err_vs_f64(&got, &want) < 1e-6, "case {i}");
        }
    }

    #[test]
    fn wrong_width_is_an_error() {
        let l = Linear::new(candle_nn::Linear::new(randn(&[3, 4], 1.0, 1), None)).unwrap();
        assert!(l.forward(&randn(&[2, 5], 1.0, 2)).is_err());
    }
}
