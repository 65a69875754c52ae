//! GroupNorm, optionally followed by SiLU, in one parallel sweep per group on the CPU in f32.
//!
//! candle's `GroupNorm` is composed of about eight elementwise and reduction ops, each a full
//! pass over the activations (33M values per pass for a 128-channel 512x512 VAE layer), and
//! the SiLU after it is another. Here two passes over each group (cache-resident) give the
//! mean and the centred variance, and a third writes `silu?((x - mean) / sqrt(var + eps) * gamma + beta)`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};
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

    /// candle's composition, whose backward is right: for paths that need gradients.
    pub fn forward_differentiable(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let y = self.reference.forward(x)?;
        Ok(if silu { candle_nn::ops::silu(&y)? } else { y })
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            let op = Fused {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return Ok(x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)?);
        }
        self.forward_differentiable(x, silu)
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
        let dims = lx.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm: input {:?} has no channel axis", lx.shape());
        }
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let g = self.groups;
        if g == 0 || c % g != 0 || lw.shape().elem_count() != c || lb.shape().elem_count() != c {
            candle_core::bail!(
                "group norm: {c} channels, {g} groups, weight {:?}, bias {:?} do not fit",
                lw.shape(),
                lb.shape()
            );
        }
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
                // Mean, then the variance of the centred values (no E[x^2] - mean^2
                // cancellation); f32 partial sums over short runs, f64 across them.
                let n = xs.len() as f64;
                let sum: f64 = xs.chunks(4096).map(|c| c.iter().sum::<f32>() as f64).sum();
                let mean = sum / n;
                let m32 = mean as f32;
                let sq: f64 = xs
                    .chunks(4096)
                    .map(|c| c.iter().map(|&v| (v - m32) * (v - m32)).sum::<f32>() as f64)
                    .sum();
                let var = sq / n;
                let inv = 1.0 / (var + self.eps).sqrt();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{f64, randn, rel_err_vs_f64};
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
}
