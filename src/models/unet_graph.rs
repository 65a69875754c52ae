//! The UNet call replayed as a CUDA graph (`ARTGUIDE_CUDA_GRAPHS=1`, off until measured on a
//! GPU: `bench/gpu.sh`'s `artguide-graphs` variant).
//!
//! A UNet step is about a thousand kernel launches, each with candle's host-side cost
//! (layouts, allocation, launch); on an H100 the GPU can finish a launch sooner than the host
//! issues the next. A graph replays the whole call with one launch. At the first call of a
//! shape the call runs eagerly (its result is returned, and it loads every kernel and fills
//! candle's cache of small host uploads), then the same call is captured on fixed input
//! tensors and launched once. Later calls of that shape copy their inputs into the fixed
//! tensors, launch the graph and copy its output out. The timestep enters as its sinusoidal
//! embedding (`UNet::forward_embedded`): the UNet makes it on the host, and a captured upload
//! would replay the first step's timestep. SDXL's added conditioning (also made on the host)
//! is not graphed, nor is a call inside a differentiated graph.
//!
//! Graph memory: everything the call allocates is freed inside it (the result is copied into
//! a fixed output tensor made before the capture), so a failed capture leaves nothing behind
//! and graph memory is trimmed when a new shape replaces a graph.
//!
//! Threads: cudarc's `CudaGraph` is neither `Send` nor `Sync`, so neither are these graphs nor
//! (with `--features cuda`) `SdModel`; that keeps a graph launched on the thread that captured
//! it, whose per-thread stream orders it after the input copies. Do not add `unsafe impl
//! Send`: the mutex only gives the interior mutability.

use candle_core::Device;
#[cfg(feature = "cuda")]
use candle_core::Tensor;

#[cfg(feature = "cuda")]
use super::unet::UNet;
use crate::Result;

/// The environment variable that turns UNet graphs on.
pub const CUDA_GRAPHS_VAR: &str = "ARTGUIDE_CUDA_GRAPHS";

/// The `ARTGUIDE_CUDA_GRAPHS` switch as set in the environment (default off).
pub fn cuda_graphs_switch() -> Result<bool> {
    let value = std::env::var(CUDA_GRAPHS_VAR).ok();
    crate::kernels::parse_switch(CUDA_GRAPHS_VAR, value.as_deref(), false)
}

/// One model's UNet graph (the last shape called).
pub struct UnetGraphs {
    #[cfg(feature = "cuda")]
    state: std::sync::Mutex<imp::State>,
}

impl UnetGraphs {
    /// Graphs for a model on `device`: on CUDA with the switch on, else none.
    pub fn for_device(device: &Device) -> Option<Self> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() && cuda_graphs_switch().unwrap_or(false) {
            return Some(Self::new());
        }
        let _ = device;
        None
    }

    /// Graphs regardless of the switch (the GPU tests compare them with eager calls).
    #[cfg(feature = "cuda")]
    pub fn new() -> Self {
        UnetGraphs {
            state: std::sync::Mutex::new(imp::State::Empty),
        }
    }

    /// `unet.forward(x, timestep, context)` through the graph of this shape (captured at the
    /// first call of a shape). Inputs that track gradients run eagerly.
    #[cfg(feature = "cuda")]
    pub fn forward(
        &self,
        unet: &UNet,
        x: &Tensor,
        timestep: f64,
        context: &Tensor,
    ) -> Result<Tensor> {
        let temb = unet.timestep_embedding(timestep, x.device())?;
        if x.track_op() || context.track_op() {
            return unet.forward_embedded(x, &temb, context, None);
        }
        let mut state = self
            .state
            .lock()
            .map_err(|_| crate::Error::Msg("UNet graph: a previous call panicked".into()))?;
        imp::forward(&mut state, unet, x, &temb, context)
    }
}

#[cfg(feature = "cuda")]
impl Default for UnetGraphs {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;

    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Device, Tensor};

    use super::{UNet, CUDA_GRAPHS_VAR};
    use crate::Result;

    pub(super) enum State {
        Empty,
        Ready(Box<Captured>),
        /// A capture failed: eager from then on (said once).
        Off,
    }

    /// What a captured call depends on.
    #[derive(PartialEq)]
    struct Key {
        x: Vec<usize>,
        context: Vec<usize>,
        dtypes: (DType, DType),
    }

    impl Key {
        fn of(x: &Tensor, context: &Tensor) -> Self {
            Key {
                x: x.dims().to_vec(),
                context: context.dims().to_vec(),
                dtypes: (x.dtype(), context.dtype()),
            }
        }
    }

    /// A captured call: fixed input and output tensors (allocated outside the graph, which
    /// reads and writes them) and the graph.
    pub(super) struct Captured {
        key: Key,
        x: Tensor,
        temb: Tensor,
        context: Tensor,
        out: Tensor,
        graph: CudaGraph,
    }

    impl Captured {
        fn replay(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
            self.x.slice_set(&x.contiguous()?, 0, 0)?;
            self.temb.slice_set(&temb.contiguous()?, 0, 0)?;
            self.context.slice_set(&context.contiguous()?, 0, 0)?;
            self.graph.launch().w()?;
            // A copy: the next launch rewrites `out`.
            Ok(self.out.copy()?)
        }
    }

    pub(super) fn forward(
        state: &mut State,
        unet: &UNet,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let key = Key::of(x, context);
        match state {
            State::Off => return unet.forward_embedded(x, temb, context, None),
            State::Ready(c) if c.key == key => return c.replay(x, temb, context),
            _ => {}
        }
        let Device::Cuda(dev) = x.device() else {
            return unet.forward_embedded(x, temb, context, None);
        };
        // A new shape: the old graph goes first, its memory with it.
        if matches!(std::mem::replace(state, State::Empty), State::Ready(_)) {
            trim_graph_memory(dev);
        }
        // Small host uploads (candle's layouts for strided kernels) are cached from here on,
        // so the capture finds them on the device instead of copying from the host.
        let _cache = dev.enable_cuda_graph_htod_cache();
        let y = unet.forward_embedded(x, temb, context, None)?;
        match capture(dev, unet, key, x, temb, context, &y) {
            Ok(c) => *state = State::Ready(Box::new(c)),
            Err(e) => {
                eprintln!(
                    "warning: {CUDA_GRAPHS_VAR}: the UNet call could not be captured as a CUDA \
                     graph ({e}); it runs without graphs"
                );
                *state = State::Off;
            }
        }
        Ok(y)
    }

    fn capture(
        dev: &candle_core::CudaDevice,
        unet: &UNet,
        key: Key,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        like: &Tensor,
    ) -> Result<Captured> {
        // Fixed, contiguous inputs and output, allocated before the capture: the graph then
        // frees everything it allocates, so a failure anywhere leaves no graph memory behind.
        let fixed = |t: &Tensor| -> Result<Tensor> {
            let f = Tensor::zeros(t.shape(), t.dtype(), t.device())?;
            f.slice_set(&t.contiguous()?, 0, 0)?;
            Ok(f)
        };
        let (xi, ti, ci, out) = (fixed(x)?, fixed(temb)?, fixed(context)?, fixed(like)?);
        dev.synchronize()?;
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let capturing = Capturing(stream.clone());
        let recorded = unet
            .forward_embedded(&xi, &ti, &ci, None)
            .and_then(|y| Ok(out.slice_set(&y, 0, 0)?));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        drop(capturing);
        recorded?;
        let graph = graph
            .w()?
            .ok_or_else(|| crate::Error::Msg("the capture recorded no work".into()))?;
        Ok(Captured {
            key,
            x: xi,
            temb: ti,
            context: ci,
            out,
            graph,
        })
    }

    /// Ends a capture still open when dropped (an error or a panic inside it, or cudarc's
    /// `end_capture` returning an error it had stored before ending the capture), so the
    /// stream runs eagerly again; the partial graph is destroyed unlaunched.
    struct Capturing(Arc<CudaStream>);

    impl Drop for Capturing {
        fn drop(&mut self) {
            if matches!(
                self.0.capture_status(),
                Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
                    | Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED)
            ) {
                let mut graph: sys::CUgraph = std::ptr::null_mut();
                // SAFETY: ends the capture begun on this stream by `capture`; the partial
                // graph is destroyed at once and never launched.
                unsafe {
                    sys::cuStreamEndCapture(self.0.cu_stream(), &mut graph);
                    if !graph.is_null() {
                        sys::cuGraphDestroy(graph);
                    }
                }
            }
        }
    }

    /// Gives the memory of dropped graphs back to the device.
    fn trim_graph_memory(dev: &candle_core::CudaDevice) {
        let stream = dev.cuda_stream();
        // SAFETY: a plain driver call on the device of this context; a failure only keeps
        // the memory cached.
        unsafe {
            sys::cuDeviceGraphMemTrim(stream.context().cu_device());
        }
    }
}
