//! CPU kernels for the operations where candle 0.11's CPU backend is slow: attention without
//! a materialised score tensor, GEGLU in one pass, and vectorised `exp`/GELU. Each one falls back to candle's
//! composition on other devices and dtypes, and is tested against that composition.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod frozen;
pub mod linear;
pub mod norm;
pub mod sgemm;
pub mod upsample;
pub mod vmath;
pub mod winograd;

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// The f32 data of a contiguous CPU tensor; `op` names the kernel in the error.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("{op} needs contiguous inputs"),
    }
}

/// A raw pointer to an output buffer that parallel tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every user writes only its own task's region, and the buffer outlives the tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `run(task, parallelism)` for each of `tasks` independent GEMM tasks: spread over the
/// cores with single-threaded GEMMs when there are enough tasks (two per core), else one after
/// another with each GEMM using every core (a small image, batch 1, CLIP's few rows).
fn for_each_task(tasks: usize, run: impl Fn(usize, gemm::Parallelism) + Send + Sync) {
    let threads = rayon::current_num_threads();
    if tasks >= 2 * threads {
        (0..tasks)
            .into_par_iter()
            .for_each(|t| run(t, gemm::Parallelism::None));
    } else {
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        (0..tasks).for_each(|t| run(t, par));
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Tensor};

    use crate::noise::{NoiseGen, Stream};

    /// Seeded normal values, so a failing case fails every time.
    pub fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
        let t = NoiseGen::new(seed, Stream::InitialLatents)
            .randn(shape)
            .unwrap();
        (t * std).unwrap()
    }

    /// Largest |got - want| over the largest |want|, with `want` computed in f64 by `reference`
    /// from the same inputs, so the figure is the kernel's own f32 error.
    pub fn rel_err_vs_f64(got: &Tensor, want: &Tensor) -> f64 {
        let want = want.to_dtype(DType::F64).unwrap();
        let diff = (got.to_dtype(DType::F64).unwrap() - &want).unwrap();
        let num = diff
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let den = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        num / den
    }

    /// The gradients of `sum(y * r)`, `r` taken to `y`'s dtype: a fixed random weighting, so
    /// every element of `dL/dy` differs.
    pub fn weighted_grads(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
        let r = r.to_dtype(y.dtype()).unwrap();
        (y * r).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// `t` in f64, for the reference computation.
    pub fn f64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }
}
