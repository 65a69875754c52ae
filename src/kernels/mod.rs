//! Kernels for the operations where candle 0.11 is slow. On the CPU: attention without a
//! materialised score tensor, GEGLU in one pass, vectorised `exp`/GELU, GEMMs, Winograd
//! convolutions. On CUDA, behind `ARTGUIDE_CUDA_KERNELS` ([`CudaKernel`]): `cuda` and
//! [`head_gemm`]. Each falls back to candle's composition on other devices and dtypes, and is
//! tested against that composition.

pub mod activation;
pub mod attention;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod frozen;
pub mod head_gemm;
pub mod linear;
pub mod norm;
pub mod sgemm;
pub mod upsample;
pub mod vmath;
pub mod winograd;

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// The environment variable that turns artguide's own CUDA kernels on (`kernels::cuda`).
pub const CUDA_KERNELS_VAR: &str = "ARTGUIDE_CUDA_KERNELS";

/// Reads an on/off switch's value: 1/on/true/yes or 0/off/false/no (any case, spaces
/// ignored); unset or empty means `default`. Anything else is an error naming the variable,
/// so a typo does not silently mean the default.
pub fn parse_switch(var: &str, value: Option<&str>, default: bool) -> crate::Result<bool> {
    let Some(v) = value.map(|v| v.trim().to_ascii_lowercase()) else {
        return Ok(default);
    };
    match v.as_str() {
        "" => Ok(default),
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => Err(crate::Error::Msg(format!(
            "{var}={v:?}: expected 1/on/true/yes or 0/off/false/no"
        ))),
    }
}

/// A group of artguide's own CUDA kernels, named in `ARTGUIDE_CUDA_KERNELS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaKernel {
    /// im2col convolution (with its bias).
    Conv,
    /// GroupNorm (+SiLU), forward and backward.
    Norm,
    /// The bias adds of Linear layers and of candle's convolutions.
    Bias,
    /// Linear layers with a bias as one cuBLASLt GEMM, the bias in its epilogue (f16, bf16).
    Linear,
    /// GEGLU, quick_gelu, exact GELU.
    Activation,
    /// Attention without head copies (cuBLAS strided GEMMs).
    Attention,
    /// Nearest upsampling and its backward.
    Upsample,
}

impl CudaKernel {
    /// Every group, in the order the names are listed.
    pub const ALL: [CudaKernel; 7] = [
        CudaKernel::Conv,
        CudaKernel::Norm,
        CudaKernel::Bias,
        CudaKernel::Linear,
        CudaKernel::Activation,
        CudaKernel::Attention,
        CudaKernel::Upsample,
    ];

    /// The group's name in `ARTGUIDE_CUDA_KERNELS`.
    pub fn name(self) -> &'static str {
        match self {
            CudaKernel::Conv => "conv",
            CudaKernel::Norm => "norm",
            CudaKernel::Bias => "bias",
            CudaKernel::Linear => "linear",
            CudaKernel::Activation => "activation",
            CudaKernel::Attention => "attention",
            CudaKernel::Upsample => "upsample",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of kernel groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaKernels(u8);

impl CudaKernels {
    /// No group: candle's compositions everywhere.
    pub const NONE: CudaKernels = CudaKernels(0);
    /// Every group.
    pub const ALL: CudaKernels = CudaKernels((1 << CudaKernel::ALL.len()) - 1);

    /// Whether `k` is in the set.
    pub fn contains(self, k: CudaKernel) -> bool {
        self.0 & k.bit() != 0
    }
}

/// Reads `ARTGUIDE_CUDA_KERNELS`'s value: an on/off word ([`parse_switch`]; `all`, `none`
/// too) or a comma list of group names, so a kernel that fails on a GPU can be left out
/// while the others run. Unset or empty means none (the kernels are checked on the CPU by
/// emulation but not yet measured on a GPU). Anything else is an error naming the variable.
pub fn parse_kernels(var: &str, value: Option<&str>) -> crate::Result<CudaKernels> {
    let v = value.unwrap_or("").trim().to_ascii_lowercase();
    if let Ok(on) = parse_switch(var, Some(&v), false) {
        return Ok(if on {
            CudaKernels::ALL
        } else {
            CudaKernels::NONE
        });
    }
    match v.as_str() {
        "all" => return Ok(CudaKernels::ALL),
        "none" => return Ok(CudaKernels::NONE),
        _ => {}
    }
    let mut set = CudaKernels::NONE;
    for name in v.split(',').map(str::trim) {
        match CudaKernel::ALL.iter().find(|k| k.name() == name) {
            Some(k) => set.0 |= k.bit(),
            None => {
                let names: Vec<_> = CudaKernel::ALL.iter().map(|k| k.name()).collect();
                return Err(crate::Error::Msg(format!(
                    "{var}={v:?}: expected 1/on/true/yes/all, 0/off/false/no/none, or a comma list of {}",
                    names.join(", ")
                )));
            }
        }
    }
    Ok(set)
}

/// The `ARTGUIDE_CUDA_KERNELS` setting in the environment.
pub fn cuda_kernels_switch() -> crate::Result<CudaKernels> {
    let value = std::env::var(CUDA_KERNELS_VAR).ok();
    parse_kernels(CUDA_KERNELS_VAR, value.as_deref())
}

/// Whether `t` goes through artguide's kernel group `k`: it is on CUDA and the group is on.
#[cfg(feature = "cuda")]
pub(crate) fn on_cuda_kernel(t: &candle_core::Tensor, k: CudaKernel) -> bool {
    t.device().is_cuda() && cuda_kernels().contains(k)
}

/// The kernel groups CUDA tensors go through; read once per process (a bad value reads as
/// none here: `--device cuda` refuses it first, in `commands::device`).
pub fn cuda_kernels() -> CudaKernels {
    static ON: std::sync::OnceLock<CudaKernels> = std::sync::OnceLock::new();
    *ON.get_or_init(|| cuda_kernels_switch().unwrap_or_default())
}

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

#[cfg(test)]
mod tests {
    use super::parse_switch;

    #[test]
    fn switches_read_one_way_and_refuse_typos() {
        for (value, want) in [
            (None, false),
            (Some(""), false),
            (Some("  "), false),
            (Some("1"), true),
            (Some(" ON "), true),
            (Some("True"), true),
            (Some("yes"), true),
            (Some("0"), false),
            (Some("off"), false),
            (Some("FALSE"), false),
            (Some("no"), false),
        ] {
            assert_eq!(parse_switch("V", value, false).unwrap(), want, "{value:?}");
        }
        assert!(parse_switch("V", None, true).unwrap());
        assert!(parse_switch("V", Some(""), true).unwrap());
        let err = parse_switch("V", Some("2"), false).unwrap_err().to_string();
        assert_eq!(err, "V=\"2\": expected 1/on/true/yes or 0/off/false/no");
    }

    #[test]
    fn kernel_groups_are_named_one_by_one() {
        use super::{parse_kernels, CudaKernel, CudaKernels};
        for (value, want) in [
            (None, CudaKernels::NONE),
            (Some(" "), CudaKernels::NONE),
            (Some("1"), CudaKernels::ALL),
            (Some("All"), CudaKernels::ALL),
            (Some("off"), CudaKernels::NONE),
            (Some("none"), CudaKernels::NONE),
        ] {
            assert_eq!(parse_kernels("V", value).unwrap(), want, "{value:?}");
        }
        let set = parse_kernels("V", Some(" conv , Attention")).unwrap();
        for k in CudaKernel::ALL {
            let on = matches!(k, CudaKernel::Conv | CudaKernel::Attention);
            assert_eq!(set.contains(k), on, "{k:?}");
        }
        let every: Vec<_> = CudaKernel::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            parse_kernels("V", Some(&every.join(","))).unwrap(),
            CudaKernels::ALL
        );
        let err = parse_kernels("V", Some("conv,gemm"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "V=\"conv,gemm\": expected 1/on/true/yes/all, 0/off/false/no/none, or a comma list of \
             conv, norm, bias, linear, activation, attention, upsample"
        );
    }
}
