//! GroupNorm, optionally followed by SiLU, in one parallel sweep per group on the CPU in f32;
//! and a layer norm with its own backward for differentiated graphs (the guide CLIP).
//!
//! candle's `GroupNorm` is composed of about eight elementwise and reduction ops, each a full
//! pass over the activations (33M values per pass for a 128-channel 512x512 VAE layer), and
//! the SiLU after it is another. Here two passes over each group (cache-resident) give the
//! mean and the centred variance, and a third writes `silu?((x - mean) / sqrt(var + eps) * gamma + beta)`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::{contiguous_f32, vmath};
use crate::Result;

/// A GroupNorm layer (`weight`, `bias` of one value per channel) that can fuse the SiLU
/// after it.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    reference: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// `weight` and `bias` in f32 for the CUDA kernel, made at its first use (two casts per
    /// layer per call otherwise, also inside a CUDA graph).
    #[cfg(feature = "cuda")]
    f32_params: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl GroupNorm {
    /// Loads `weight` and `bias` for `channels` channels in `groups` groups.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        // The same init hints as `candle_nn::group_norm`, which random-weight builders honour.
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        let reference =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(GroupNorm {
            reference,
            weight,
            bias,
            groups,
            eps,
            #[cfg(feature = "cuda")]
            f32_params: Default::default(),
        })
    }

    /// `GroupNorm(x)`; candle's composition (with backward) off the CPU or outside f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `SiLU(GroupNorm(x))` in the same pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    /// For paths that need gradients: on the CPU in f32 (and on CUDA with the `norm` kernel
    /// group, `ARTGUIDE_CUDA_KERNELS`) the fused value with its own backward (one op, instead of
    /// candle's composition keeping a dozen full-size intermediates for its backward);
    /// elsewhere candle's composition.
    pub fn forward_differentiable(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if !(self.cuda_kernel_applies(x) || self.fused_applies(x)) {
            return self.composed(x, silu);
        }
        super::frozen::input_only(x, |x| self.run(x, silu), || self.input_grad(x, silu))
    }

    /// The backward of [`GroupNorm::forward_differentiable`]'s fused value, `(x, dL/dy) ->
    /// dL/dx`: the CUDA kernels' or the CPU kernel's.
    fn input_grad(&self, x: &Tensor, silu: bool) -> Result<super::frozen::InputGrad> {
        let (groups, eps) = (self.groups, self.eps);
        #[cfg(feature = "cuda")]
        if self.cuda_kernel_applies(x) {
            let (w, b) = self.f32_params()?.clone();
            return Ok(Box::new(move |x: &Tensor, g: &Tensor| {
                super::cuda::group_norm_backward(x, g, &w, &b, groups, eps, silu)
            }));
        }
        let _ = x;
        let wb = Tensor::stack(&[&self.weight, &self.bias], 0)?;
        let op = FusedGrad { groups, eps, silu };
        Ok(Box::new(move |x: &Tensor, g: &Tensor| {
            x.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, &wb, &op)
        }))
    }

    /// Whether `x` goes through the CUDA kernels (the `norm` group).
    fn cuda_kernel_applies(&self, x: &Tensor) -> bool {
        #[cfg(feature = "cuda")]
        return super::on_cuda_kernel(x, super::CudaKernel::Norm);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = x;
            false
        }
    }

    /// `weight` and `bias` in f32, made at the first call.
    #[cfg(feature = "cuda")]
    fn f32_params(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(p) = self.f32_params.get() {
            return Ok(p);
        }
        let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let p = (f32s(&self.weight)?, f32s(&self.bias)?);
        Ok(self.f32_params.get_or_init(|| p))
    }

    fn composed(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let y = self.reference.forward(x)?;
        Ok(if silu { candle_nn::ops::silu(&y)? } else { y })
    }

    fn fused_applies(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if self.fused_applies(x) {
            let op = Fused {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return Ok(x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)?);
        }
        #[cfg(feature = "cuda")]
        if self.cuda_kernel_applies(x) {
            let (w, b) = self.f32_params()?;
            return Ok(super::cuda::group_norm(
                x,
                w,
                b,
                self.groups,
                self.eps,
                silu,
            )?);
        }
        self.composed(x, silu)
    }
}

/// Channels, spatial size and group count of a group-norm input, checked against the
/// per-channel parameters' element count.
fn geometry(
    op: &str,
    lx: &Layout,
    params: usize,
    groups: usize,
) -> candle_core::Result<(usize, usize)> {
    let dims = lx.shape().dims();
    if dims.len() < 2 {
        candle_core::bail!("{op}: input {:?} has no channel axis", lx.shape());
    }
    let c = dims[1];
    if groups == 0 || c % groups != 0 || params != c {
        candle_core::bail!(
            "{op}: {c} channels, {groups} groups and {params} parameters do not fit"
        );
    }
    Ok((c, dims[2..].iter().product()))
}

/// Mean and `1 / sqrt(var + eps)` of one group: the mean, then the variance of the centred
/// values (no E[x^2] - mean^2 cancellation); f32 partial sums over short runs, f64 across them.
fn group_stats(xs: &[f32], eps: f64) -> (f64, f64) {
    let n = xs.len() as f64;
    let sum: f64 = xs.chunks(4096).map(|c| c.iter().sum::<f32>() as f64).sum();
    let mean = sum / n;
    let m32 = mean as f32;
    let sq: f64 = xs
        .chunks(4096)
        .map(|c| c.iter().map(|&v| (v - m32) * (v - m32)).sum::<f32>() as f64)
        .sum();
    (mean, 1.0 / (sq / n + eps).sqrt())
}

/// `dL/dx` of `silu?(GroupNorm(x))` from `x`, `dL/dout` and the (2, C) weight-and-bias rows.
struct FusedGrad {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for FusedGrad {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, spatial) = geometry(self.name(), lx, lp.shape().elem_count() / 2, self.groups)?;
        if lg.shape() != lx.shape() {
            candle_core::bail!(
                "{}: gradient {:?} for input {:?}",
                self.name(),
                lg.shape(),
                lx.shape()
            );
        }
        let (x, dout, p) = (
            contiguous_f32(sx, lx, self.name())?,
            contiguous_f32(sg, lg, self.name())?,
            contiguous_f32(sp, lp, self.name())?,
        );
        let (w, bias) = p.split_at(c);
        let g = self.groups;
        let cpg = c / g;
        let per_group = (cpg * spatial).max(1);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group).zip(dout.par_chunks(per_group)))
            .enumerate()
            .for_each(|(task, (d, (xs, gs)))| {
                let group = task % g;
                let (mean, inv) = group_stats(xs, self.eps);
                let (m32, i32_) = (mean as f32, inv as f32);
                // Pass 1: d = dL/dxhat, and the group sums of d and d * xhat.
                let (mut s1, mut s2) = (0f64, 0f64);
                for (k, ((dc, xc), gc)) in d
                    .chunks_mut(spatial.max(1))
                    .zip(xs.chunks(spatial.max(1)))
                    .zip(gs.chunks(spatial.max(1)))
                    .enumerate()
                {
                    let ch = group * cpg + k;
                    let (gamma, beta) = (w[ch], bias[ch]);
                    let (mut a1, mut a2) = (0f32, 0f32);
                    for ((dv, &xv), &gv) in dc.iter_mut().zip(xc).zip(gc) {
                        let xhat = (xv - m32) * i32_;
                        let dy = if self.silu {
                            let y = xhat * gamma + beta;
                            let s = 1.0 / (1.0 + vmath::exp(-y));
                            gv * s * (1.0 + y * (1.0 - s))
                        } else {
                            gv
                        };
                        let dxhat = dy * gamma;
                        *dv = dxhat;
                        a1 += dxhat;
                        a2 += dxhat * xhat;
                    }
                    s1 += a1 as f64;
                    s2 += a2 as f64;
                }
                // Pass 2: dL/dx = inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
                let n = xs.len() as f64;
                let (m1, m2) = ((s1 / n) as f32, (s2 / n) as f32);
                for (dv, &xv) in d.iter_mut().zip(xs) {
                    let xhat = (xv - m32) * i32_;
                    *dv = i32_ * (*dv - m1 - xhat * m2);
                }
            });
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}

struct Fused {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "group-norm"
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
        if lw.shape().elem_count() != lb.shape().elem_count() {
            candle_core::bail!(
                "group norm: weight {:?} and bias {:?} differ",
                lw.shape(),
                lb.shape()
            );
        }
        let (c, spatial) = geometry(self.name(), lx, lw.shape().elem_count(), self.groups)?;
        let g = self.groups;
        let (x, w, bias) = (
            contiguous_f32(sx, lx, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
            contiguous_f32(sb, lb, self.name())?,
        );
        let per_group = c / g * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_group.max(1))
            .zip(x.par_chunks(per_group.max(1)))
            .enumerate()
            .for_each(|(task, (o, xs))| {
                let group = task % g;
                let (mean, inv) = group_stats(xs, self.eps);
                let cpg = c / g;
                for (k, (oc, xc)) in o
                    .chunks_mut(spatial.max(1))
                    .zip(xs.chunks(spatial.max(1)))
                    .enumerate()
                {
                    let ch = group * cpg + k;
                    let scale = (inv * w[ch] as f64) as f32;
                    let shift = (bias[ch] as f64 - mean * inv * w[ch] as f64) as f32;
                    for (ov, &xv) in oc.iter_mut().zip(xc) {
                        *ov = xv * scale + shift;
                    }
                    if self.silu {
                        vmath::silu_inplace(oc);
                    }
                }
            });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// Rows per task of the layer-norm kernels.
const LN_ROWS: usize = 8;

/// Layer norm over the last axis with constant `weight` and `bias`, for graphs. On the CPU
/// in f32 the value in one op and a backward that computes `dL/dx` in one pass per row
/// (candle's composition is seven ops each way, each keeping a full-size intermediate);
/// elsewhere [`layer_norm_composed`].
pub fn layer_norm_differentiable(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(x) && f32_cpu(weight) && f32_cpu(bias)) {
        return Ok(layer_norm_composed(x, weight, bias, eps)?);
    }
    let w = weight.clone();
    super::frozen::input_only(
        x,
        |x| {
            let op = LayerNorm { eps };
            Ok(x.contiguous()?.apply_op3_no_bwd(weight, bias, &op)?)
        },
        || {
            Ok(Box::new(move |x: &Tensor, g: &Tensor| {
                let op = LayerNormGrad { eps };
                x.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, &w, &op)
            }))
        },
    )
}

/// Layer norm composed from candle ops whose backward is right: mean, centred variance,
/// scale and shift. The reference for [`layer_norm_differentiable`].
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    // Half precision is normalised in f32: candle sums f16 in f16, so a token whose RMS passes
    // sqrt(65504 / width) (about 9 for ViT-B) has an infinite variance, the norm outputs its
    // bias alone and the gradient through it is silently zero. The fused kernels accumulate
    // in f32 already.
    let dtype = xs.dtype();
    let up = |t: &Tensor| match dtype {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    };
    let x = up(xs)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let denom = (var + eps)?.sqrt()?;
    centred
        .broadcast_div(&denom)?
        .broadcast_mul(&up(weight)?)?
        .broadcast_add(&up(bias)?)?
        .to_dtype(dtype)
}

/// Checks that `params` values fit the last axis of `l`; returns its width.
fn row_width(op: &str, l: &Layout, params: usize) -> candle_core::Result<usize> {
    match l.shape().dims().last() {
        Some(&d) if d == params && d > 0 => Ok(d),
        _ => candle_core::bail!("{op}: input {:?} with {params} parameters", l.shape()),
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis.
struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let op = self.name();
        let d = row_width(op, lx, lw.shape().elem_count())?;
        let _ = row_width(op, lx, lb.shape().elem_count())?;
        let (x, w, bias) = (
            contiguous_f32(sx, lx, op)?,
            contiguous_f32(sw, lw, op)?,
            contiguous_f32(sb, lb, op)?,
        );
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * LN_ROWS)
            .zip(x.par_chunks(d * LN_ROWS))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                    let (mean, inv) = group_stats(xrow, self.eps);
                    let (m32, i32_) = (mean as f32, inv as f32);
                    for (((ov, &xv), &wv), &bv) in orow.iter_mut().zip(xrow).zip(w).zip(bias) {
                        *ov = (xv - m32) * i32_ * wv + bv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// `dL/dx` of [`LayerNorm`] from `x`, `dL/dy` and the weight:
/// `inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))` with `dxhat = dL/dy * weight`.
struct LayerNormGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = row_width(op, lx, lw.shape().elem_count())?;
        if lg.shape() != lx.shape() {
            candle_core::bail!("{op}: gradient {:?} for input {:?}", lg.shape(), lx.shape());
        }
        let (x, dout, w) = (
            contiguous_f32(sx, lx, op)?,
            contiguous_f32(sg, lg, op)?,
            contiguous_f32(sw, lw, op)?,
        );
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d * LN_ROWS)
            .zip(x.par_chunks(d * LN_ROWS).zip(dout.par_chunks(d * LN_ROWS)))
            .for_each(|(dxs, (xs, gs))| {
                let rows = dxs.chunks_exact_mut(d).zip(xs.chunks_exact(d));
                for ((drow, xrow), grow) in rows.zip(gs.chunks_exact(d)) {
                    let (mean, inv) = group_stats(xrow, self.eps);
                    let (m32, i32_) = (mean as f32, inv as f32);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for (((dv, &xv), &gv), &wv) in drow.iter_mut().zip(xrow).zip(grow).zip(w) {
                        let dxhat = gv * wv;
                        *dv = dxhat;
                        s1 += dxhat;
                        s2 += dxhat * (xv - m32) * i32_;
                    }
                    let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                    for (dv, &xv) in drow.iter_mut().zip(xrow) {
                        *dv = i32_ * (*dv - m1 - (xv - m32) * i32_ * m2);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{f64, randn, rel_err_vs_f64, weighted_grads};
    use candle_core::Device;
    use std::collections::HashMap;

    fn layer(c: usize, groups: usize, seed: u64) -> (GroupNorm, candle_nn::GroupNorm) {
        let w = randn(&[c], 1.0, seed);
        let b = randn(&[c], 1.0, seed + 1);
        let map: HashMap<String, Tensor> = [
            ("weight".to_string(), w.clone()),
            ("bias".to_string(), b.clone()),
        ]
        .into();
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let ours = GroupNorm::new(groups, c, 1e-6, vb).unwrap();
        let reference = candle_nn::GroupNorm::new(f64(&w), f64(&b), c, groups, 1e-6).unwrap();
        (ours, reference)
    }

    #[test]
    fn fused_group_norm_and_silu_match_candle_in_f64() {
        for (i, (shape, groups)) in [
            (vec![2usize, 8, 5, 7], 4usize),
            (vec![1, 64, 33, 20], 32),
            (vec![3, 6, 11], 3),
        ]
        .into_iter()
        .enumerate()
        {
            let (ours, reference) = layer(shape[1], groups, 10 * i as u64);
            // An offset mean, so a one-pass variance without care would lose digits.
            let x = (randn(&shape, 2.0, 5 + i as u64) + 3.0).unwrap();
            let want = reference.forward(&f64(&x)).unwrap();
            assert!(
                rel_err_vs_f64(&ours.forward(&x).unwrap(), &want) < 2e-6,
                "case {i}"
            );
            let want = candle_nn::ops::silu(&want).unwrap();
            assert!(
                rel_err_vs_f64(&ours.forward_silu(&x).unwrap(), &want) < 2e-6,
                "case {i}"
            );
        }
    }

    /// Layer norm in a graph: value and input gradient against candle's composition in f64,
    /// with an offset mean; no weight gradient; f64 inputs take the composition.
    #[test]
    fn layer_norm_backward_matches_composed_in_f64() {
        for (i, shape) in [vec![4usize, 50, 768], vec![3, 7], vec![1, 5, 9, 13]]
            .into_iter()
            .enumerate()
        {
            let d = *shape.last().unwrap();
            let (w, b) = (
                randn(&[d], 1.0, 3 * i as u64),
                randn(&[d], 1.0, 1 + i as u64),
            );
            let x0 = (randn(&shape, 2.0, 5 + i as u64) + 3.0).unwrap();
            let x = candle_core::Var::from_tensor(&x0).unwrap();
            let y = layer_norm_differentiable(x.as_tensor(), &w, &b, 1e-5).unwrap();
            let r = randn(&shape, 1.0, 99);
            let grads = weighted_grads(&y, &r);
            assert!(grads.get(&w).is_none(), "case {i}: a weight gradient");

            let xd = candle_core::Var::from_tensor(&f64(&x0)).unwrap();
            let yd = layer_norm_composed(xd.as_tensor(), &f64(&w), &f64(&b), 1e-5).unwrap();
            assert!(rel_err_vs_f64(&y, &yd) < 2e-6, "case {i}: value");
            let gd = weighted_grads(&yd, &r);
            let e = rel_err_vs_f64(
                grads.get(x.as_tensor()).unwrap(),
                gd.get(xd.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "case {i}: input gradient rel err {e}");
        }
        // Off the kernel (here f64) it is the composition itself.
        let (x, w, b) = (
            f64(&randn(&[2, 3], 1.0, 1)),
            f64(&randn(&[3], 1.0, 2)),
            f64(&randn(&[3], 1.0, 3)),
        );
        let y = layer_norm_differentiable(&x, &w, &b, 1e-5).unwrap();
        let want = layer_norm_composed(&x, &w, &b, 1e-5).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        assert_eq!(rel_err_vs_f64(&y, &want), 0.0);
    }

    /// In a graph (CPU f32): the fused value, and candle's input gradient (in f64), with and
    /// without the SiLU; the weights get no gradient.
    #[test]
    fn differentiable_backward_matches_candle_in_f64() {
        for (i, (shape, groups)) in [(vec![2usize, 8, 5, 7], 4usize), (vec![1, 6, 33], 3)]
            .into_iter()
            .enumerate()
        {
            for silu in [false, true] {
                let (ours, reference) = layer(shape[1], groups, 10 * i as u64);
                let x0 = (randn(&shape, 2.0, 5 + i as u64) + 3.0).unwrap();
                let x = candle_core::Var::from_tensor(&x0).unwrap();
                let y = ours.forward_differentiable(x.as_tensor(), silu).unwrap();
                let r = randn(&shape, 1.0, 99);
                let grads = weighted_grads(&y, &r);
                assert!(grads.get(&ours.weight).is_none());

                let xd = candle_core::Var::from_tensor(&f64(&x0)).unwrap();
                let mut yd = reference.forward(xd.as_tensor()).unwrap();
                if silu {
                    yd = candle_nn::ops::silu(&yd).unwrap();
                }
                assert!(
                    rel_err_vs_f64(&y, &yd) < 2e-6,
                    "case {i} silu {silu}: value"
                );
                let gd = weighted_grads(&yd, &r);
                let e = rel_err_vs_f64(
                    grads.get(x.as_tensor()).unwrap(),
                    gd.get(xd.as_tensor()).unwrap(),
                );
                assert!(e < 1e-5, "case {i} silu {silu}: input gradient rel err {e}");
            }
        }
    }
}
