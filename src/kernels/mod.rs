//! CPU kernels for the operations where candle 0.11's CPU backend is slow: attention without
//! a materialised score tensor, GEGLU in one pass, and vectorised `exp`/GELU. Each one falls back to candle's
//! composition on other devices and dtypes, and is tested against that composition.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod vmath;
pub mod winograd;

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

    /// `t` in f64, for the reference computation.
    pub fn f64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }
}
