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
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::Result;

/// The input gradient of a layer: `(x, dL/dy) -> dL/dx`.
pub type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

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
    let op = InputOnly {
        value: std::sync::Mutex::new(Some(y)),
        grad: grad()?,
    };
    Ok(x.apply_op1(op)?)
}

/// The op holds the value only until its forward has copied it, so the graph keeps one copy
/// of each layer output, as candle's own layers do.
struct InputOnly {
    value: std::sync::Mutex<Option<Tensor>>,
    grad: InputGrad,
}

impl InputOnly {
    fn take(&self) -> candle_core::Result<Tensor> {
        match self.value.lock() {
            Ok(mut v) => v.take(),
            Err(_) => None,
        }
        .ok_or_else(|| candle_core::Error::Msg("frozen layer: forward ran twice".into()))
    }
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

impl CustomOp1 for InputOnly {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => copy_of(s, layout),
            _ => candle_core::bail!("frozen layer: value and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => copy_of(s, layout),
            _ => candle_core::bail!("frozen layer: value and input on different devices"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.grad)(x, grad_res)?))
    }
}
