//! Process-wide allocator settings for tensor work.
//!
//! glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh `mmap`
//! and returns them with `munmap` on free. Activations of real-size models are larger than
//! that (CLIP ViT-L/14's MLP output at batch 16 is 67 MB), so every such layer paid one page
//! fault and one page clear per 4 KiB: 9.6% of ViT-L/14's probe time was in the kernel.
//! Keeping large blocks on the heap lets them be reused from one layer to the next.

/// Keeps large allocations on the heap instead of mmap/munmap per allocation (glibc only;
/// elsewhere nothing changes). Call once at start-up, before large allocations.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's thresholds; it is called before worker threads
    // allocate anything large, and any value is valid for these parameters.
    unsafe {
        // 1 GiB: anything a layer allocates stays on the heap...
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        // ...and freed memory is not trimmed back to the system after every layer.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The environment variable that turns `tune_cuda_device` (CUDA builds) on.
pub const CUDA_TUNING_VAR: &str = "ARTGUIDE_CUDA_TUNING";

/// The `ARTGUIDE_CUDA_TUNING` switch as set in the environment (default off until measured
/// on a GPU: `bench/gpu.sh`'s `artguide-tuned` variant).
pub fn cuda_tuning_switch() -> crate::Result<bool> {
    let value = std::env::var(CUDA_TUNING_VAR).ok();
    crate::kernels::parse_switch(CUDA_TUNING_VAR, value.as_deref(), false)
}

/// The GPU counterpart of [`tune_allocator`], for a device just opened. candle allocates
/// stream-ordered from the device's default memory pool, whose release threshold is 0: the
/// driver hands every free block back to the system at each synchronisation, so each step
/// maps its activations afresh. Here the pool keeps what a step frees. Also stops candle
/// from creating two CUDA events per buffer: it runs everything on one stream, so cudarc
/// never waits on them, and each costs driver calls per allocation.
#[cfg(feature = "cuda")]
pub fn tune_cuda_device(device: &candle_core::Device) -> crate::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(());
    };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let fail = |what: &str, e: sys::CUresult| {
        crate::Error::Msg(format!("{CUDA_TUNING_VAR}: {what} failed ({e:?})"))
    };
    ctx.bind_to_thread()
        .map_err(|e| crate::Error::Msg(format!("{CUDA_TUNING_VAR}: {e:?}")))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver calls on the device the context was made for; `threshold`
    // outlives the call that reads it.
    unsafe {
        let rc = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("cuDeviceGetDefaultMemPool", rc));
        }
        let mut threshold = u64::MAX;
        let rc = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("setting the memory pool's release threshold", rc));
        }
        // SAFETY: candle uses the per-thread default stream only (artguide never makes a
        // second stream), so no buffer is shared across streams.
        dev.disable_event_tracking();
    }
    Ok(())
}
