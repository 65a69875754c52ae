//! Guidance losses, composed from ops whose backward is correct in candle 0.11.
//!
//! Embeddings are rows of (n, d) tensors. candle has no `asin`, so the spherical distance uses
//! a polynomial arcsine accurate to 2e-8 (Abramowitz & Stegun 4.4.46) built from sqrt,
//! multiply and add, which runs and differentiates on every device.

use candle_core::{Tensor, D};

use crate::models::clip::normalize;
use crate::Result;

/// Abramowitz & Stegun 4.4.46 coefficients: asin x = pi/2 - sqrt(1 - x) * sum a_k x^k.
const ASIN_COEFFS: [f64; 8] = [
    1.570_796_305_0,
    -0.214_598_801_6,
    0.088_978_987_4,
    -0.050_174_304_6,
    0.030_891_881_0,
    -0.017_088_125_6,
    0.006_670_090_1,
    -0.001_262_491_1,
];

/// arcsin of values in [0, 1] (|error| <= 2e-8), differentiable. Inputs are clamped to
/// [0, 1 - 1e-7] so the derivative stays finite at 1.
pub fn asin_unit(x: &Tensor) -> Result<Tensor> {
    let x = x.clamp(0f64, 1.0 - 1e-7)?;
    let mut poly = x.affine(ASIN_COEFFS[7], ASIN_COEFFS[6])?;
    for &a in ASIN_COEFFS[..6].iter().rev() {
        poly = (poly * &x)?.affine(1.0, a)?;
    }
    let root = x.affine(-1.0, 1.0)?.sqrt()?;
    Ok((root * poly)?.affine(-1.0, std::f64::consts::FRAC_PI_2)?)
}

/// Spherical distance loss of CLIP-guided diffusion, `2 asin(|a - b| / 2)^2` on normalised
/// rows: half the squared angle between the embeddings. `a`: (n, d), `b`: (m, d); result
/// (n, m).
pub fn spherical_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = normalize(a)?;
    let b = normalize(b)?;
    // |a - b|^2 = 2 - 2 a.b for unit rows; the small floor keeps sqrt's derivative finite
    // when a view equals a target exactly.
    let dots = a.matmul(&b.t()?)?;
    let chord = dots.affine(-2.0, 2.0)?.clamp(1e-12f64, 4.0)?.sqrt()?;
    let half = chord.affine(0.5, 0.0)?;
    Ok((asin_unit(&half)?.sqr()? * 2.0)?)
}

/// `1 - cos(a, b)` between rows of `a` (n, d) and `b` (m, d): (n, m).
pub fn cosine_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dots = normalize(a)?.matmul(&normalize(b)?.t()?)?;
    Ok(dots.affine(-1.0, 1.0)?)
}

/// Gram matrices of token features (n, tokens, channels) -> (n, channels, channels),
/// normalised by tokens * channels so layers of different widths weigh alike.
pub fn gram(features: &Tensor) -> Result<Tensor> {
    let (_, t, c) = features.dims3()?;
    let f = features.contiguous()?;
    Ok((f.t()?.matmul(&f)? / (t * c) as f64)?)
}

/// Mean squared difference of two tensors of the same shape, or of `a` against a `b` that
/// broadcasts to it.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.broadcast_sub(b)?.sqr()?.mean_all()?)
}

/// Total variation: mean squared difference of horizontally and vertically adjacent pixels
/// of (n, c, h, w).
pub fn total_variation(img: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = img.dims4()?;
    let dx = img
        .narrow(3, 1, w - 1)?
        .sub(&img.narrow(3, 0, w - 1)?)?
        .sqr()?
        .mean_all()?;
    let dy = img
        .narrow(2, 1, h - 1)?
        .sub(&img.narrow(2, 0, h - 1)?)?
        .sqr()?
        .mean_all()?;
    Ok((dx + dy)?)
}

/// Range penalty: mean squared distance of pixel values outside [0, 1] to the range.
pub fn range_penalty(img: &Tensor) -> Result<Tensor> {
    let over = img.affine(1.0, -1.0)?.relu()?;
    let under = img.affine(-1.0, 0.0)?.relu()?;
    Ok((over.sqr()? + under.sqr()?)?.mean_all()?)
}

/// Mean over the views (rows) of a (views, targets) matrix weighted per target: (targets,)
/// weights applied, summed over targets, averaged over views; a scalar.
pub fn weighted_mean(per_view: &Tensor, weights: &Tensor) -> Result<Tensor> {
    Ok(per_view
        .broadcast_mul(weights)?
        .sum(D::Minus1)?
        .mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn asin_matches_std_on_the_unit_interval() {
        let xs: Vec<f64> = (0..=1000).map(|i| i as f64 / 1000.0 * 0.9999).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let got = asin_unit(&t).unwrap().to_vec1::<f64>().unwrap();
        for (x, y) in xs.iter().zip(got) {
            assert!(
                (x.asin() - y).abs() < 5e-8,
                "asin({x}): {y} vs {}",
                x.asin()
            );
        }
    }

    #[test]
    fn spherical_distance_is_half_the_squared_angle() {
        let a = Tensor::new(&[[1f64, 0.0, 0.0], [0.0, 3.0, 0.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f64, 1.0, 0.0]], &Device::Cpu).unwrap();
        let d = spherical_distance(&a, &b)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let q = std::f64::consts::FRAC_PI_4;
        assert!((d[0][0] - q * q / 2.0).abs() < 1e-7, "{d:?}");
        assert!((d[1][0] - q * q / 2.0).abs() < 1e-7, "{d:?}");
    }

    #[test]
    fn spherical_distance_gradient_matches_finite_differences() {
        let a0 = [0.3f64, -0.7, 0.5, 0.1];
        let b = Tensor::new(&[[0.2f64, 0.4, -0.1, 0.9]], &Device::Cpu).unwrap();
        let a = Var::new(&[a0], &Device::Cpu).unwrap();
        let loss = spherical_distance(a.as_tensor(), &b)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let g = g.get(a.as_tensor()).unwrap().to_vec2::<f64>().unwrap()[0].clone();
        let f = |v: [f64; 4]| {
            let t = Tensor::new(&[v], &Device::Cpu).unwrap();
            scalar(&spherical_distance(&t, &b).unwrap().sum_all().unwrap())
        };
        for k in 0..4 {
            let (mut p, mut m) = (a0, a0);
            p[k] += 1e-6;
            m[k] -= 1e-6;
            let fd = (f(p) - f(m)) / 2e-6;
            assert!(
                (fd - g[k]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{k}: {fd} vs {}",
                g[k]
            );
        }
    }

    #[test]
    fn gram_tv_and_range() {
        let f = Tensor::new(&[[[1f64, 2.0], [3.0, 4.0]]], &Device::Cpu).unwrap();
        let g = gram(&f).unwrap().to_vec3::<f64>().unwrap();
        assert_eq!(
            g[0],
            vec![vec![10.0 / 4.0, 14.0 / 4.0], vec![14.0 / 4.0, 20.0 / 4.0]]
        );
        let img = Tensor::new(&[[[[0f64, 1.0], [0.0, 1.0]]]], &Device::Cpu).unwrap();
        // Horizontal steps of 1 (mean 1), no vertical change.
        assert!((scalar(&total_variation(&img).unwrap()) - 1.0).abs() < 1e-12);
        let out = Tensor::new(&[[[[-0.5f64, 0.5], [1.5, 1.0]]]], &Device::Cpu).unwrap();
        assert!((scalar(&range_penalty(&out).unwrap()) - 0.5 / 4.0).abs() < 1e-12);
    }
}
