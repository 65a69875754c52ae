//! Activations: `quick_gelu` and exact GELU for CLIP, and GEGLU, the gated activation of Stable Diffusion's transformer feed-forward layers:
//! `value * gelu_erf(gate)` where the projection's last axis is `[value | gate]`.
//!
//! candle computes it as two strided narrows, a scalar-libm GELU and a multiply (three passes
//! and two temporaries); on the CPU in f32 this is one vectorised pass. Also ReLU, and the
//! GELUs inside a differentiated graph, and a residual add with its ReLU, each with a
//! one-pass backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::vmath;
use crate::Result;

/// `value * gelu_erf(gate)` for `p = [value | gate]` on the last axis (each `inner` wide).
pub fn geglu(p: &Tensor, inner: usize) -> Result<Tensor> {
    if p.device().is_cpu() && p.dtype() == DType::F32 {
        return Ok(p.contiguous()?.apply_op1_no_bwd(&Geglu { inner })?);
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda_kernel(p, super::CudaKernel::Activation) {
        return Ok(super::cuda::geglu(p, inner)?);
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
    #[cfg(feature = "cuda")]
    if super::on_cuda_kernel(x, super::CudaKernel::Activation) {
        return Ok(super::cuda::quick_gelu(x)?);
    }
    Ok(x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// Exact (erf) GELU, one vectorised pass on the CPU in f32, candle's `gelu_erf` elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&Elementwise::GeluErf)?);
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda_kernel(x, super::CudaKernel::Activation) {
        return Ok(super::cuda::gelu_erf(x)?);
    }
    Ok(x.gelu_erf()?)
}

/// `max(x, 0)`, differentiable, with a one-pass backward on the CPU in f32 (the gradient
/// where the input is positive, as PyTorch's); candle's `relu` elsewhere. candle's backward
/// compares, converts the mask to floats and multiplies: three passes and two temporaries
/// per ReLU, 16 ms for each 64 x 256 x 256 map of a guided TAESD decode on this CPU.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Elementwise::Relu);
    }
    x.relu()
}

/// `max(a + b, 0)`, differentiable: a residual add and its ReLU (TAESD's blocks) as one pass
/// each way on the CPU in f32, where candle's add runs on its spin-waiting thread pool (7% of
/// a guided TAESD decode's samples were that pool waiting) and its backward accumulates the
/// masked gradient into both inputs from two more full-size tensors. Elsewhere candle's ops.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu);
    }
    (a + b)?.relu()
}

/// `max(a + b, 0)`; its backward masks the gradient by the output (positive where the sum is).
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if la.shape() != lb.shape() {
            candle_core::bail!(
                "add-relu: shapes {:?} and {:?} differ",
                la.shape(),
                lb.shape()
            );
        }
        let a = super::contiguous_f32(sa, la, self.name())?;
        let b = super::contiguous_f32(sb, lb, self.name())?;
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(16384)
            .zip(a.par_chunks(16384).zip(b.par_chunks(16384)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = (a + b).max(0.0);
                }
            });
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // ReLU's gradient masks by its input's sign, which is the output's: y > 0 iff a+b > 0.
        let masked = g
            .contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &ElementwiseGrad(Elementwise::Relu))?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// `quick_gelu` inside a differentiated graph (a guide CLIP): one pass forward and one
/// backward on the CPU in f32; candle's composition (sigmoid, two multiplies, and their
/// backward: about ten passes) elsewhere.
pub fn quick_gelu_differentiable(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Elementwise::QuickGelu);
    }
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}

/// The exact GELU inside a differentiated graph, as [`quick_gelu_differentiable`].
pub fn gelu_erf_differentiable(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Elementwise::GeluErf);
    }
    x.gelu_erf()
}

#[derive(Clone, Copy)]
enum Elementwise {
    QuickGelu,
    GeluErf,
    Relu,
}

impl CustomOp1 for Elementwise {
    fn name(&self) -> &'static str {
        match self {
            Elementwise::QuickGelu => "quick-gelu",
            Elementwise::GeluErf => "gelu-erf",
            Elementwise::Relu => "relu",
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
            Elementwise::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = ElementwiseGrad(*self);
        Ok(Some(
            g.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &grad)?,
        ))
    }
}

/// `g * f'(x)` for an [`Elementwise`] activation `f`.
struct ElementwiseGrad(Elementwise);

impl CustomOp2 for ElementwiseGrad {
    fn name(&self) -> &'static str {
        "activation-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = super::contiguous_f32(sg, lg, "activation backward")?;
        let x = super::contiguous_f32(sx, lx, "activation backward")?;
        if g.len() != x.len() {
            candle_core::bail!(
                "activation backward: gradient {:?} for input {:?}",
                lg.shape(),
                lx.shape()
            );
        }
        let mut out = g.to_vec();
        out.par_chunks_mut(16384)
            .zip(x.par_chunks(16384))
            .for_each(|(o, x)| match self.0 {
                Elementwise::QuickGelu => vmath::quick_gelu_grad_mul(o, x),
                Elementwise::GeluErf => vmath::gelu_erf_grad_mul(o, x),
                // max(NaN, 0) is 0 in the forward, so a NaN input passes no gradient either.
                Elementwise::Relu => o
                    .iter_mut()
                    .zip(x)
                    .for_each(|(g, &x)| *g = if x > 0.0 { *g } else { 0.0 }),
            });
        Ok((CpuStorage::F32(out), lg.shape().clone()))
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
    use crate::kernels::testing::weighted_grads;
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
    fn relu_value_and_gradient_match_candle() {
        use candle_core::Var;
        let x = crate::kernels::testing::randn(&[2, 3, 33, 41], 1.0, 9);
        let g = crate::kernels::testing::randn(&[2, 3, 33, 41], 1.0, 10);
        let grad_of = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let v = Var::from_tensor(&x).unwrap();
            let y = f(v.as_tensor()).unwrap();
            let grads = weighted_grads(&y, &g);
            (y, grads.get(v.as_tensor()).unwrap().clone())
        };
        let (y, dx) = grad_of(&|t| relu(t));
        let (want_y, want_dx) = grad_of(&|t| t.relu());
        // Exact: no x is 0 in a random normal draw, where the two conventions differ.
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&y, &want_y), 0.0);
        assert_eq!(diff(&dx, &want_dx), 0.0);
        // And it is not the identity: about half the gradient is masked.
        let zeros = dx
            .eq(0f32)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap();
        let zeros = zeros.to_scalar::<f32>().unwrap();
        assert!((0.4..0.6).contains(&zeros), "{zeros}");
    }

    /// Value and both inputs' gradients equal candle's `(a + b).relu()` exactly, and the
    /// gradient is masked (about half is zero).
    #[test]
    fn add_relu_value_and_gradients_match_candle() {
        use candle_core::Var;
        let a = crate::kernels::testing::randn(&[2, 4, 37, 29], 1.0, 11);
        let b = crate::kernels::testing::randn(&[2, 4, 37, 29], 1.0, 12);
        let g = crate::kernels::testing::randn(&[2, 4, 37, 29], 1.0, 13);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let y = f(va.as_tensor(), vb.as_tensor()).unwrap();
            let grads = weighted_grads(&y, &g);
            let d = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            [y, d(&va), d(&vb)]
        };
        let got = run(&|a, b| add_relu(a, b));
        let want = run(&|a, b| (a + b)?.relu());
        for (name, (x, y)) in ["value", "da", "db"].iter().zip(got.iter().zip(&want)) {
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        let zeros = got[1].eq(0f32).unwrap().to_dtype(DType::F32).unwrap();
        let zeros = zeros.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((0.4..0.6).contains(&zeros), "{zeros}");
    }

    #[test]
    fn differentiable_activations_match_candle_gradients_in_f64() {
        use candle_core::Var;
        let x = crate::kernels::testing::randn(&[3, 7, 1001], 3.0, 11);
        let g = crate::kernels::testing::randn(&[3, 7, 1001], 1.0, 12);
        type Act = fn(&Tensor) -> candle_core::Result<Tensor>;
        let cases: [(Act, Act); 2] = [
            (quick_gelu_differentiable, |t| {
                t.mul(&candle_nn::ops::sigmoid(&(t * 1.702)?)?)
            }),
            (gelu_erf_differentiable, |t| t.gelu_erf()),
        ];
        for (i, (kernel, reference)) in cases.into_iter().enumerate() {
            let grad = |x: &Tensor, f: Act| {
                let v = Var::from_tensor(x).unwrap();
                let y = f(v.as_tensor()).unwrap();
                let grads = weighted_grads(&y, &g);
                (y, grads.get(v.as_tensor()).unwrap().clone())
            };
            let (y, dx) = grad(&x, kernel);
            let (want_y, want_dx) = grad(&x.to_dtype(DType::F64).unwrap(), reference);
            let (ey, edx) = (
                crate::kernels::testing::rel_err_vs_f64(&y, &want_y),
                crate::kernels::testing::rel_err_vs_f64(&dx, &want_dx),
            );
            assert!(
                ey < 1e-6 && edx < 1e-6,
                "case {i}: value {ey}, gradient {edx}"
            );
        }
    }

    #[test]
    fn geglu_refuses_an_odd_last_axis() {
        let p = Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap();
        let err = geglu(&p, 3).unwrap_err().to_string();
        assert!(err.contains("not 2 x 3"), "{err}");
    }
}
