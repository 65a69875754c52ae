//! 2-D convolution (groups 1, dilation 1) on the CPU in f32, as strips of im2col times the
//! weight matrix.
//!
//! candle 0.11 builds the im2col matrix of the whole image (for a 128-channel 3x3 convolution
//! at 512x512 that is 1.2 GB), multiplies it in pixels-by-channels order and transposes the
//! result back to NCHW. Here each task unfolds a strip of output rows whose im2col block
//! fits in cache, in `(cin*kh*kw) x pixels` order, so one GEMM with the `(cout, cin*kh*kw)`
//! weight matrix writes the strip straight into the NCHW output, bias included.

use std::cell::RefCell;

use super::{contiguous_f32, for_each_task, OutPtr};
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// Bytes of im2col a task builds at once (fits the L2/L3 share of one core).
const COL_BLOCK_BYTES: usize = 1024 * 1024;

/// `conv2d(x, w) + bias` with `x: (b, cin, h, w)`, `w: (cout, cin, kh, kw)`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        let op = Conv { stride, padding };
        return add_bias(
            x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)?,
            bias,
        );
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda_kernel(x, super::CudaKernel::Conv) {
        return Ok(super::cuda::conv2d(x, w, bias, stride, padding)?);
    }
    composed(x, w, bias, stride, padding)
}

/// candle's convolution, the reference for the kernel.
pub fn composed(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    add_bias(x.conv2d(w, padding, stride, 1, 1)?, bias)
}

/// `y + bias` with one bias value per channel of NCHW `y`.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = bias else { return Ok(y) };
    if y.device().is_cuda() {
        return Ok(super::linear::add_rows_cuda(&y, b, true)?);
    }
    Ok(y.broadcast_add(&b.reshape((1, (), 1, 1))?)?)
}

/// A loaded convolution layer for inference-only models, the drop-in for `candle_nn::Conv2d`
/// (groups 1, dilation 1): on the CPU in f32, 3x3 stride-1 layers on images of at least
/// [`WINOGRAD_MIN_PIXELS`] outputs run by Winograd F(2x2, 3x3) with weights transformed once,
/// the rest through [`conv2d`]; elsewhere candle's convolution.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    /// Winograd-transformed weights, made on first use.
    winograd: std::sync::Arc<std::sync::OnceLock<Tensor>>,
    /// The layer computing this one's input gradient (stride 1), made on first backward.
    transposed: std::sync::Arc<std::sync::OnceLock<Conv2d>>,
}

/// Below this many output pixels (16x16) the 16 small GEMMs of Winograd lose to one im2col
/// GEMM, and transforming the weights is not repaid.
pub const WINOGRAD_MIN_PIXELS: usize = 256;

impl Conv2d {
    /// Wraps a candle layer; refuses grouped or dilated ones, which the kernel does not do.
    pub fn new(layer: candle_nn::Conv2d) -> Result<Self> {
        let cfg = *layer.config();
        if cfg.groups != 1 || cfg.dilation != 1 {
            return Err(crate::Error::Msg(format!(
                "conv2d kernel: groups {} / dilation {} not supported (need 1 and 1)",
                cfg.groups, cfg.dilation
            )));
        }
        Ok(Self::from_parts(
            layer.weight().clone(),
            layer.bias().cloned(),
            cfg.stride,
            cfg.padding,
        ))
    }

    /// A layer from its `(cout, cin, kh, kw)` weight and optional bias.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Conv2d {
            weight,
            bias,
            stride,
            padding,
            winograd: Default::default(),
            transposed: Default::default(),
        }
    }

    /// `dL/dy -> dL/dx` for input height/width `(h, w)`. Stride 1: the convolution of
    /// `dL/dy` with the kernel flipped in space and transposed in channels, padded
    /// `k - 1 - p` (so the fast kernels run it); otherwise candle's transposed convolution.
    fn input_grad(&self, h: usize, w: usize) -> Result<super::frozen::InputGrad> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let (stride, padding) = (self.stride, self.padding);
        if stride == 1 && kh == kw && padding < kh {
            let t = match self.transposed.get() {
                Some(t) => t.clone(),
                None => {
                    let rev = Tensor::from_vec(
                        (0..kh as u32).rev().collect::<Vec<_>>(),
                        kh,
                        self.weight.device(),
                    )?;
                    let flipped = self
                        .weight
                        .index_select(&rev, 2)?
                        .index_select(&rev, 3)?
                        .transpose(0, 1)?
                        .contiguous()?;
                    let t = Conv2d::from_parts(flipped, None, 1, kh - 1 - padding);
                    self.transposed.get_or_init(|| t).clone()
                }
            };
            return Ok(Box::new(move |_: &Tensor, g: &Tensor| {
                t.forward_fast(g).map_err(candle_core::Error::wrap)
            }));
        }
        let weight = self.weight.clone();
        Ok(Box::new(move |_: &Tensor, g: &Tensor| {
            let (_, _, gh, gw) = g.dims4()?;
            let full = |gi: usize, k: usize| (gi - 1) * stride + k - 2 * padding;
            let (out_h, out_w) = (full(gh, kh), full(gw, kw));
            if h < out_h || w < out_w || h - out_h != w - out_w {
                candle_core::bail!(
                    "conv2d backward: input {h}x{w} from output {gh}x{gw} needs unequal output padding"
                );
            }
            g.conv_transpose2d(&weight, padding, h - out_h, stride, 1)
        }))
    }

    fn use_winograd(&self, xs: &Tensor) -> Result<bool> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let (_, _, h, w) = xs.dims4()?;
        let outputs =
            (h + 2 * self.padding).saturating_sub(2) * (w + 2 * self.padding).saturating_sub(2);
        Ok(xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && (kh, kw, self.stride) == (3, 3, 1)
            && outputs >= WINOGRAD_MIN_PIXELS)
    }

    fn forward_fast(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.use_winograd(xs)? {
            return conv2d(
                xs,
                &self.weight,
                self.bias.as_ref(),
                self.stride,
                self.padding,
            );
        }
        let u = match self.winograd.get() {
            Some(u) => u,
            None => {
                let u = super::winograd::transform_weights(&self.weight)?;
                self.winograd.get_or_init(|| u)
            }
        };
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(self.weight.dim(0)?, DType::F32, xs.device())?,
        };
        super::winograd::conv3x3(xs, u, &bias, self.padding)
    }
}

impl candle_core::Module for Conv2d {
    /// Inside a differentiated graph (guidance) the weights are constants: the backward
    /// computes only the input's gradient ([`super::frozen`]).
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        super::frozen::input_only(xs, |x| self.forward_fast(x), || self.input_grad(h, w))
            .map_err(candle_core::Error::wrap)
    }
}

struct Conv {
    stride: usize,
    padding: usize,
}

thread_local! {
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Geometry of one convolution.
#[derive(Clone, Copy)]
struct Geom {
    cin: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    pad: usize,
}

impl Geom {
    /// Unfolds output rows `y0..y0+rows` of one image into `cols` (`cin*kh*kw` rows of
    /// `rows*wo` pixels).
    fn im2col(&self, x: &[f32], y0: usize, rows: usize, cols: &mut [f32]) {
        let g = *self;
        let np = rows * g.wo;
        let mut r = 0;
        for ci in 0..g.cin {
            let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let dst = &mut cols[r * np..(r + 1) * np];
                    r += 1;
                    for (oy, drow) in dst.chunks_exact_mut(g.wo).enumerate() {
                        let iy = ((y0 + oy) * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            drow.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        if g.stride == 1 {
                            // Output columns whose input column kx + ox - pad is inside.
                            let lo = g.pad.saturating_sub(kx).min(g.wo);
                            let hi = (g.w + g.pad).saturating_sub(kx).min(g.wo).max(lo);
                            drow[..lo].fill(0.0);
                            drow[lo..hi].copy_from_slice(&src[lo + kx - g.pad..hi + kx - g.pad]);
                            drow[hi..].fill(0.0);
                        } else {
                            for (ox, d) in drow.iter_mut().enumerate() {
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                *d = if ix < 0 || ix >= g.w as isize {
                                    0.0
                                } else {
                                    src[ix as usize]
                                };
                            }
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-strips"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = lx.shape().dims4()?;
        let (cout, cin_w, kh, kw) = lw.shape().dims4()?;
        let (s, p) = (self.stride.max(1), self.padding);
        if cin_w != cin || h + 2 * p < kh || w + 2 * p < kw {
            candle_core::bail!(
                "conv2d: input {:?} does not fit weight {:?} with padding {p}",
                lx.shape(),
                lw.shape()
            );
        }
        let g = Geom {
            cin,
            h,
            w,
            kh,
            kw,
            ho: (h + 2 * p - kh) / s + 1,
            wo: (w + 2 * p - kw) / s + 1,
            stride: s,
            pad: p,
        };
        let (x, wt) = (
            contiguous_f32(sx, lx, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
        );
        let k = cin * kh * kw;
        let plane = g.ho * g.wo;
        let rows = (COL_BLOCK_BYTES / (4 * k * g.wo)).clamp(1, g.ho);
        let strips = g.ho.div_ceil(rows);
        let mut out = vec![0f32; b * cout * plane];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let tasks = b * strips;
        for_each_task(tasks, |task, inner| {
            let (bi, si) = (task / strips, task % strips);
            let y0 = si * rows;
            let nr = rows.min(g.ho - y0);
            let np = nr * g.wo;
            COLS.with(|cell| {
                let mut cols = cell.borrow_mut();
                cols.resize(k * np, 0.0);
                g.im2col(
                    &x[bi * cin * h * w..(bi + 1) * cin * h * w],
                    y0,
                    nr,
                    &mut cols,
                );
                // SAFETY: the destination is rows y0..y0+nr of every channel of image bi
                // (row stride `plane`), disjoint between tasks; `cols` is k x np and `wt` is
                // cout x k, both row-major.
                unsafe {
                    gemm::gemm(
                        cout,
                        np,
                        k,
                        out_ptr.get().add(bi * cout * plane + y0 * g.wo),
                        1,
                        plane as isize,
                        false,
                        wt.as_ptr(),
                        1,
                        k as isize,
                        cols.as_ptr(),
                        1,
                        np as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        inner,
                    );
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, cout, g.ho, g.wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{f64, randn, rel_err_vs_f64, weighted_grads};
    use candle_core::Device;

    #[test]
    fn strips_match_candle_on_awkward_shapes() {
        // (batch, cin, h, w, cout, k, stride, pad): 3x3 same, 1x1, stride-2 downsampling with
        // and without padding, non-square, one pixel, and an image split into many strips.
        for (b, cin, h, w, cout, k, s, p) in [
            (2, 3, 9, 7, 5, 3, 1, 1),
            (1, 4, 6, 6, 8, 1, 1, 0),
            (2, 5, 9, 10, 3, 3, 2, 1),
            (1, 6, 8, 8, 4, 3, 2, 0),
            (1, 2, 1, 1, 3, 3, 1, 1),
            (1, 64, 70, 33, 16, 3, 1, 1),
        ] {
            let x = randn(&[b, cin, h, w], 1.0, cin as u64);
            let wt = randn(&[cout, cin, k, k], 1.0, 100 + cout as u64);
            let bias = randn(&[cout], 1.0, 200);
            let got = conv2d(&x, &wt, Some(&bias), s, p).unwrap();
            let want = composed(&f64(&x), &f64(&wt), Some(&f64(&bias)), s, p).unwrap();
            assert_eq!(got.dims(), want.dims(), "{b} {cin} {h} {w} {k} {s} {p}");
            let rel = rel_err_vs_f64(&got, &want);
            assert!(rel < 1e-6, "{b} {cin} {h} {w} {k} {s} {p}: {rel}");
        }
    }

    #[test]
    fn layer_matches_f64_on_both_paths_and_reuses_its_transform() {
        use candle_core::Module;
        // 20x20 outputs take Winograd, 8x8 the strips, stride 2 the strips.
        for (i, (hw, stride)) in [(20usize, 1usize), (8, 1), (20, 2)].into_iter().enumerate() {
            let wt = randn(&[6, 5, 3, 3], 1.0, 7);
            let bias = randn(&[6], 1.0, 8);
            let layer = Conv2d::from_parts(wt.clone(), Some(bias.clone()), stride, 1);
            let x = randn(&[2, 5, hw, hw], 1.0, 9 + i as u64);
            let want = composed(&f64(&x), &f64(&wt), Some(&f64(&bias)), stride, 1).unwrap();
            for _ in 0..2 {
                let got = layer.forward(&x).unwrap();
                assert!(rel_err_vs_f64(&got, &want) < 2e-6, "case {i}");
            }
            assert_eq!(layer.winograd.get().is_some(), i == 0, "case {i}");
        }
    }

    /// In a graph, the layer's value is the same and its backward gives candle's input
    /// gradient (computed in f64) without ever computing the weight's.
    #[test]
    fn backward_gives_the_input_gradient_only() {
        use candle_core::Module;
        // (side, kernel, stride, padding): Winograd-sized 3x3, strips 3x3, stride 2 (candle's
        // transposed convolution), 1x1, CLIP's patch embedding, an unpadded 3x3.
        let cases = [
            (20usize, 3usize, 1usize, 1usize),
            (8, 3, 1, 1),
            (9, 3, 2, 1),
            (7, 1, 1, 0),
            (12, 4, 4, 0),
            (10, 3, 1, 0),
        ];
        for (i, (hw, k, stride, pad)) in cases.into_iter().enumerate() {
            let wt = randn(&[6, 5, k, k], 1.0, 20 + i as u64);
            let bias = randn(&[6], 1.0, 30);
            let layer = Conv2d::from_parts(wt.clone(), Some(bias.clone()), stride, pad);
            let x0 = randn(&[2, 5, hw, hw], 1.0, 40 + i as u64);
            let x = candle_core::Var::from_tensor(&x0).unwrap();
            let y = layer.forward(x.as_tensor()).unwrap();
            let r = randn(y.dims(), 1.0, 50);
            let grads = weighted_grads(&y, &r);
            let got = grads.get(x.as_tensor()).unwrap();
            assert!(
                grads.get(&wt).is_none(),
                "case {i}: a weight gradient was computed"
            );

            let xd = candle_core::Var::from_tensor(&f64(&x0)).unwrap();
            let yd = composed(xd.as_tensor(), &f64(&wt), Some(&f64(&bias)), stride, pad).unwrap();
            assert!(rel_err_vs_f64(&y, &yd) < 2e-6, "case {i}: value");
            let gd = weighted_grads(&yd, &r);
            let want = gd.get(xd.as_tensor()).unwrap();
            let e = rel_err_vs_f64(got, want);
            assert!(e < 2e-6, "case {i}: input gradient rel err {e}");
        }
    }

    #[test]
    fn mismatched_channels_are_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, None, 1, 1).is_err());
    }
}
