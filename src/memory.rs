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
