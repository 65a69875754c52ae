//! Layers with constant weights inside a differentiated graph (guidance): the backward pass
//! reaches only the layer's input.
//!
//! candle's backward of `matmul` and `conv2d` always computes the second operand's gradient
//! too, even when it is a constant weight, then adds it into a zero tensor of the weight's
//! size. For a convolution that weight gradient is a conv2d whose kernel is the whole
//! activation map, the slowest thing in a guided step through the VAE or TAESD. Here the
//! forward value is computed without a graph (so by the fast kernels) and a custom op ties
//! it to the input with a backward that computes `dL/dx` alone.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::Result;

/// The input gradient of a layer: `dL/dy -> dL/dx`.
pub type InputGrad = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// `value(x)` for a layer whose weights are constants. When `x` is part of a graph, the result
/// is too, with `grad` as the whole backward of the layer; otherwise it is just `value(x)`.
pub fn input_only(
    x: &Tensor,
    value: impl FnOnce(&Tensor) -> Result<Tensor>,
    grad: impl FnOnce() -> Result<InputGrad>,
) -> Result<Tensor> {
    if !x.track_op() {
        return value(x);
    }
    let y = value(&x.detach())?;
    Ok(x.apply_op2(&y, InputOnly { grad: grad()? })?)
}

struct InputOnly {
    grad: InputGrad,
}

/// The op's output: a contiguous copy of the value (a custom op must return new storage).
fn copy_of<S, D>(s: &S, l: &Layout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage<Device = D>,
    D: BackendDevice<Storage = S>,
{
    // SAFETY: copy_strided_src writes every element of the new buffer.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, l.shape().clone()))
}

impl CustomOp2 for InputOnly {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_of(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_of(y, yl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.grad)(grad_res)?), None))
    }
}
