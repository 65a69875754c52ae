//! Activations: `quick_gelu` and exact GELU for CLIP, and GEGLU, the gated activation of Stable Diffusion's transformer feed-forward layers:
//! `value * gelu_erf(gate)` where the projection's last axis is `[value | gate]`.
//!
//! candle computes it as two strided narrows, a scalar-libm GELU and a multiply (three passes
//! and two temporaries); on the CPU in f32 this is one vectorised pass.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::vmath;
use crate::Result;

/// `value * gelu_erf(gate)` for `p = [value | gate]` on the last axis (each `inner` wide).
pub fn geglu(p: &Tensor, inner: usize) -> Result<Tensor> {
    if p.device().is_cpu() && p.dtype() == DType::F32 {
        return Ok(p.contiguous()?.apply_op1_no_bwd(&Geglu { inner })?);
    }
    composed(p, inner)
}

/// candle's composition, the reference for the kernel.
pub fn composed(p: &Tensor, inner: usize) -> Result<Tensor> {
    let value = p.narrow(D::Minus1, 0, inner)?;
    let gate = p.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
    Ok((value * gate)?)
}

/// `x * sigmoid(1.702 x)` (OpenAI CLIP's `quick_gelu`), one vectorised pass on the CPU in
/// f32, candle's composition elsewhere.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&Elementwise::QuickGelu)?);
    }
    Ok(x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// Exact (erf) GELU, one vectorised pass on the CPU in f32, candle's `gelu_erf` elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&Elementwise::GeluErf)?);
    }
    Ok(x.gelu_erf()?)
}

enum Elementwise {
    QuickGelu,
    GeluErf,
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        match self {
            Elementwise::QuickGelu => "quick-gelu",
            Elementwise::GeluErf => "gelu-erf",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{} needs a contiguous input", self.name());
        };
        let mut out = s.as_slice::<f32>()?[start..end].to_vec();
        out.par_chunks_mut(16384).for_each(|c| match self {
            Elementwise::QuickGelu => vmath::quick_gelu_inplace(c),
            Elementwise::GeluErf => vmath::gelu_erf_inplace(c),
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

struct Geglu {
    inner: usize,
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let inner = self.inner;
        let dims = l.shape().dims();
        match dims.last() {
            Some(&last) if last == 2 * inner && inner > 0 => {}
            _ => candle_core::bail!("geglu: last axis of {:?} is not 2 x {inner}", l.shape()),
        }
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("geglu needs a contiguous input");
        };
        let p = &s.as_slice::<f32>()?[start..end];
        let rows = p.len() / (2 * inner);
        let mut out = vec![0f32; rows * inner];
        // Enough rows per task to amortise rayon, few enough to spread over the cores.
        let per_task = (16384 / inner).max(1);
        out.par_chunks_mut(per_task * inner)
            .zip(p.par_chunks(per_task * 2 * inner))
            .for_each(|(o, p)| {
                for (o, p) in o.chunks_exact_mut(inner).zip(p.chunks_exact(2 * inner)) {
                    o.copy_from_slice(&p[inner..]);
                    vmath::gelu_erf_mul(o, &p[..inner]);
                }
            });
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = inner;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn geglu_matches_candle_composition() {
        for (shape, inner) in [((2usize, 37usize, 10usize), 5usize), ((1, 3, 2560), 1280)] {
            let p = crate::kernels::testing::randn(&[shape.0, shape.1, shape.2], 3.0, inner as u64);
            let got = geglu(&p, inner).unwrap();
            // The reference in f64, so the tolerance measures the kernel's own error.
            let want = composed(&p.to_dtype(DType::F64).unwrap(), inner)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = ((got - &want).unwrap().abs().unwrap()
                / (want.abs().unwrap() + 1.0).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert!(err < 1e-6, "{err}");
        }
    }

    #[test]
    fn elementwise_activations_match_candle_in_f64() {
        let x = crate::kernels::testing::randn(&[3, 7, 1001], 4.0, 5);
        let x64 = x.to_dtype(DType::F64).unwrap();
        let want = x64
            .mul(&candle_nn::ops::sigmoid(&(&x64 * 1.702).unwrap()).unwrap())
            .unwrap();
        let got = quick_gelu(&x).unwrap();
        assert!(crate::kernels::testing::rel_err_vs_f64(&got, &want) < 1e-6);
        let got = gelu_erf(&x).unwrap();
        let want = x64.gelu_erf().unwrap();
        assert!(crate::kernels::testing::rel_err_vs_f64(&got, &want) < 1e-6);
    }

    #[test]
    fn geglu_refuses_an_odd_last_axis() {
        let p = Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap();
        let err = geglu(&p, 3).unwrap_err().to_string();
        assert!(err.contains("not 2 x 3"), "{err}");
    }
}
