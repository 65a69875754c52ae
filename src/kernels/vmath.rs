//! Vectorisable elementwise math for the CPU kernels: `exp`, the row softmax and the exact
//! (erf) GELU.
//!
//! candle 0.11 calls libm's scalar `expf`/`erff` per element; these are branch-free
//! polynomials that LLVM turns into AVX2 code inside the `target_feature` wrappers. They use
//! plain multiplies and adds (no fused multiply-add), so the scalar fallback and the vector
//! path give the same bits, and results do not depend on the CPU's features.

/// Lanes of the explicit accumulators (four AVX registers, so the reductions are not one
/// serial chain); reductions run in this fixed order whatever the CPU.
const LANES: usize = 32;

/// `exp(x)` to ~2 ulp over the f32 range (Cephes `expf`: `x = n ln2 + r`, degree-6
/// polynomial in `r`); below -87.3 it returns ~1e-38 instead of a denormal or zero.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let input = x;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // max/min rather than clamp: they are one vector instruction each (NaN is handled below).
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the exponent bits without a float-to-int conversion (which LLVM scalarises):
    // n + 127 is an integer in [1, 254], so adding 2^23 puts it exactly in the mantissa bits,
    // and shifting those bits up by 23 makes it the exponent field.
    let biased = (n + (8_388_608.0 + 127.0)).to_bits();
    let out = y * f32::from_bits(biased << 23);
    // NaN in, NaN out (max/min above would have turned it into a number).
    if input.is_nan() {
        input
    } else {
        out
    }
}

/// `erfc(x)` with relative error ~1e-7 where it is small (Numerical Recipes' `erfcc`: a
/// Chebyshev fit times `exp(-x^2)`, so the tail that GELU needs for negative inputs keeps its
/// relative accuracy, which `1 - erf` would lose).
#[inline(always)]
pub fn erfc(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77_f32;
    p = p * t + -0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t + -1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t + -0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t + -1.265_512_2;
    let a = t * exp(-z * z + p);
    if x >= 0.0 {
        a
    } else {
        2.0 - a
    }
}

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2 = x * erfc(-x / sqrt 2) / 2`, as torch's default
/// `gelu`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

/// Runs `$f` through its AVX2 instantiation when the CPU has it, else its portable one; both
/// are the same source, so the results are identical.
macro_rules! dispatch {
    ($f:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, the only feature the wrapper enables.
                return unsafe { avx2::$f($($arg),*) };
            }
        }
        portable::$f($($arg),*)
    }};
}

/// Softmax of one row in place (max subtracted first); returns nothing, the row sums to 1.
pub fn softmax_row(row: &mut [f32]) {
    dispatch!(softmax_row_impl(row))
}

/// `exp(x - max)` over the row in place, returning the sum (the caller divides later, e.g.
/// after a matrix product, where dividing is cheaper).
pub fn exp_shifted_row(row: &mut [f32]) -> f32 {
    dispatch!(exp_shifted_row_impl(row))
}

/// `xs[i] = gelu_erf(xs[i]) * other[i]`: GEGLU's gate times value, in one pass.
pub fn gelu_erf_mul(gate: &mut [f32], value: &[f32]) {
    dispatch!(gelu_erf_mul_impl(gate, value))
}

/// `xs[i] = xs[i] * sigmoid(xs[i])` in place (SiLU).
pub fn silu_inplace(xs: &mut [f32]) {
    dispatch!(silu_inplace_impl(xs))
}

/// `xs[i] = xs[i] * sigmoid(1.702 xs[i])` in place (CLIP's `quick_gelu`).
pub fn quick_gelu_inplace(xs: &mut [f32]) {
    dispatch!(quick_gelu_inplace_impl(xs))
}

/// `xs[i] = gelu_erf(xs[i])` in place.
pub fn gelu_erf_inplace(xs: &mut [f32]) {
    dispatch!(gelu_erf_inplace_impl(xs))
}

/// `g[i] *= quick_gelu'(x[i])`: the backward of `quick_gelu` in one pass.
pub fn quick_gelu_grad_mul(g: &mut [f32], x: &[f32]) {
    dispatch!(quick_gelu_grad_mul_impl(g, x))
}

/// `g[i] *= gelu_erf'(x[i])`: the backward of the exact GELU in one pass.
pub fn gelu_erf_grad_mul(g: &mut [f32], x: &[f32]) {
    dispatch!(gelu_erf_grad_mul_impl(g, x))
}

/// Defines the kernels once as generic source, instantiated as `portable` and `avx2`.
macro_rules! kernels {
    ($($attr:meta)?) => {
        #[allow(clippy::missing_safety_doc)]
        $(#[$attr])?
        pub fn softmax_row_impl(row: &mut [f32]) {
            let sum = exp_shifted_row_impl(row);
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
        }

        $(#[$attr])?
        pub fn exp_shifted_row_impl(row: &mut [f32]) -> f32 {
            let mut mx = [f32::NEG_INFINITY; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
                }
            }
            let mut m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for v in mx {
                m = m.max(v);
            }
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    c[i] = exp(c[i] - m);
                    acc[i] += c[i];
                }
            }
            let mut tail = 0f32;
            for x in chunks.into_remainder() {
                *x = exp(*x - m);
                tail += *x;
            }
            acc.iter().sum::<f32>() + tail
        }

        $(#[$attr])?
        pub fn gelu_erf_mul_impl(gate: &mut [f32], value: &[f32]) {
            for (g, v) in gate.iter_mut().zip(value) {
                *g = gelu_erf(*g) * v;
            }
        }

        $(#[$attr])?
        pub fn silu_inplace_impl(xs: &mut [f32]) {
            for x in xs.iter_mut() {
                *x = *x / (1.0 + exp(-*x));
            }
        }

        $(#[$attr])?
        pub fn quick_gelu_inplace_impl(xs: &mut [f32]) {
            for x in xs.iter_mut() {
                *x = *x / (1.0 + exp(-1.702 * *x));
            }
        }

        $(#[$attr])?
        pub fn quick_gelu_grad_mul_impl(g: &mut [f32], x: &[f32]) {
            for (g, &x) in g.iter_mut().zip(x) {
                let s = 1.0 / (1.0 + exp(-1.702 * x));
                *g *= s + 1.702 * x * s * (1.0 - s);
            }
        }

        $(#[$attr])?
        pub fn gelu_erf_grad_mul_impl(g: &mut [f32], x: &[f32]) {
            // d/dx x Phi(x) = Phi(x) + x phi(x).
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            for (g, &x) in g.iter_mut().zip(x) {
                let cdf = 0.5 * erfc(-x * std::f32::consts::FRAC_1_SQRT_2);
                *g *= cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x);
            }
        }

        $(#[$attr])?
        pub fn gelu_erf_inplace_impl(xs: &mut [f32]) {
            for x in xs.iter_mut() {
                *x = gelu_erf(*x);
            }
        }
    };
}

mod portable {
    use super::{erfc, exp, gelu_erf, LANES};
    kernels!();
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{erfc, exp, gelu_erf, LANES};
    kernels!(target_feature(enable = "avx2"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn exp_matches_libm_within_2_ulp() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), x.exp()));
            x += 0.0137;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(0.0) == 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), exp(88.3));
    }

    #[test]
    fn erfc_matches_reference_values() {
        // Python's math.erfc.
        for (x, want) in [
            (0.0f32, 1.0f64),
            (0.1, 0.887_537_083_981_715_2),
            (0.5, 0.479_500_122_186_953_5),
            (1.0, 0.157_299_207_050_285_13),
            (2.0, 0.004_677_734_981_047_265),
            (3.0, 2.209_049_699_858_543_8e-5),
            (-1.0, 1.842_700_792_949_715),
        ] {
            let rel = (erfc(x) as f64 - want).abs() / want;
            assert!(rel < 3e-7, "erfc({x}) = {}, relative error {rel}", erfc(x));
        }
    }

    #[test]
    fn vector_and_portable_paths_agree_bitwise() {
        let row: Vec<f32> = (0..1037)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        let mut a = row.clone();
        let mut b = row.clone();
        softmax_row(&mut a);
        portable::softmax_row_impl(&mut b);
        assert_eq!(a, b);
        let s: f64 = a.iter().map(|&x| x as f64).sum();
        assert!((s - 1.0).abs() < 1e-5);
        let mut a = row.clone();
        let mut b = row.clone();
        gelu_erf_mul(&mut a, &row);
        portable::gelu_erf_mul_impl(&mut b, &row);
        assert_eq!(a, b);
    }

    #[test]
    fn softmax_matches_f64() {
        let row: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let mut got = row.clone();
        softmax_row(&mut got);
        let m = row
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
        let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for (g, w) in got.iter().zip(&e) {
            assert!((*g as f64 - w / s).abs() < 1e-7 * (1.0 + w / s) * 10.0);
        }
    }

    #[test]
    fn gelu_matches_f64_erf_form() {
        // 0.5 x (1 + erf(x / sqrt 2)) in float64 (Python's math.erf).
        for (x, want) in [
            (-3.0f32, -0.004_049_694_094_890),
            (-1.0, -0.158_655_253_931_457),
            (-0.1, -0.046_017_216_272_297),
            (0.5, 0.345_731_230_637_007),
            (1.0, 0.841_344_746_068_543),
            (2.5, 2.484_475_836_685_56),
        ] {
            assert!(
                (gelu_erf(x) as f64 - want).abs() < 5e-7,
                "gelu({x}) = {}",
                gelu_erf(x)
            );
        }
    }
}
