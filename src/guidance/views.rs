//! Differentiable CLIP views of a decoded image: crops and resizes written as matrix products.
//!
//! candle 0.11's `upsample_bilinear2d` has no backward and `avg_pool2d` / `max_pool2d` have
//! wrong or partial ones, so every view is `Ah @ image @ Aw^T` with host-built resampling
//! matrices: the crop is folded into the matrix (zero weight outside the box), and matmul's
//! backward is exact.

use candle_core::{DType, Device, Tensor};

use crate::noise::NoiseGen;
use crate::Result;

/// A square crop of an image: top-left corner and side, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub size: usize,
}

/// Resampling weights (out x in) taking `[offset, offset + len)` of an axis of length `input`
/// to `out` samples with a triangle (bilinear) filter widened when shrinking, so shrinking
/// averages every covered pixel instead of skipping pixels (antialiasing as PIL does it).
pub fn resample_matrix(input: usize, offset: usize, len: usize, out: usize) -> Vec<f32> {
    assert!(offset + len <= input && len > 0 && out > 0);
    let scale = len as f64 / out as f64;
    let support = scale.max(1.0);
    let mut m = vec![0f32; out * input];
    for i in 0..out {
        let centre = offset as f64 + (i as f64 + 0.5) * scale;
        let lo = ((centre - support).floor().max(offset as f64)) as usize;
        let hi = ((centre + support).ceil() as usize).min(offset + len);
        let mut row: Vec<(usize, f64)> = (lo..hi)
            .map(|j| {
                let d = ((j as f64 + 0.5 - centre) / support).abs();
                (j, (1.0 - d).max(0.0))
            })
            .filter(|(_, w)| *w > 0.0)
            .collect();
        if row.is_empty() {
            // Upsampling right at the border: the nearest pixel inside the crop.
            let j = (centre.floor() as usize).clamp(offset, offset + len - 1);
            row.push((j, 1.0));
        }
        let total: f64 = row.iter().map(|(_, w)| w).sum();
        for (j, w) in row {
            m[i * input + j] = (w / total) as f32;
        }
    }
    m
}

/// The centred square crop CLIP's own preprocessing would keep (after its resize).
pub fn centre_box(height: usize, width: usize) -> CropBox {
    let size = height.min(width);
    CropBox {
        top: (height - size) / 2,
        left: (width - size) / 2,
        size,
    }
}

/// `n` random square crops from `rng`, sides uniform between `min(side, clip_size)` and the
/// image's short side (the cutout scheme of the CLIP-guided diffusion pipelines).
pub fn random_boxes(
    height: usize,
    width: usize,
    clip_size: usize,
    n: usize,
    rng: &mut NoiseGen,
) -> Vec<CropBox> {
    let max = height.min(width);
    let min = max.min(clip_size);
    (0..n)
        .map(|_| {
            let size = (min + (rng.uniform() * (max - min + 1) as f64) as usize).min(max);
            let top = (rng.uniform() * (height - size + 1) as f64) as usize;
            let left = (rng.uniform() * (width - size + 1) as f64) as usize;
            CropBox {
                top: top.min(height - size),
                left: left.min(width - size),
                size,
            }
        })
        .collect()
}

/// Resampling matrices of a set of crops: `rows` (n, 1, S, H) and `cols` (W, n * S), the
/// column matrices of all views side by side.
pub struct ViewMatrices {
    rows: Tensor,
    cols: Tensor,
}

impl ViewMatrices {
    /// Matrices taking each box of an `height` x `width` image to `size` x `size`.
    pub fn new(
        boxes: &[CropBox],
        height: usize,
        width: usize,
        size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = boxes.len();
        let mut rows = Vec::with_capacity(n * size * height);
        let mut cols = Vec::with_capacity(n * size * width);
        for b in boxes {
            rows.extend(resample_matrix(height, b.top, b.size, size));
            cols.extend(resample_matrix(width, b.left, b.size, size));
        }
        let rows = Tensor::from_vec(rows, (n, 1, size, height), &Device::Cpu)?;
        let cols = Tensor::from_vec(cols, (n * size, width), &Device::Cpu)?
            .t()?
            .contiguous()?;
        Ok(Self {
            rows: rows.to_dtype(dtype)?.to_device(device)?,
            cols: cols.to_dtype(dtype)?.to_device(device)?,
        })
    }

    /// The views (n, C, S, S) of `image` (1, C, H, W); differentiable in `image`.
    pub fn apply(&self, image: &Tensor) -> Result<Tensor> {
        let (n, _, s, _) = self.rows.dims4()?;
        let (_, c, h, w) = image.dims4()?;
        // Columns first, all views in one product: (C*H, W) @ (W, n*S).
        let x = image
            .reshape((c * h, w))?
            .matmul(&self.cols)?
            .reshape((c, h, n, s))?
            .permute((2, 0, 1, 3))?
            .contiguous()?;
        let rows = self.rows.broadcast_as((n, c, s, h))?.contiguous()?;
        Ok(rows.matmul(&x)?)
    }
}

/// CLIP's per-channel normalisation of views in [0, 1].
pub fn clip_normalise(views: &Tensor, mean: &[f32; 3], std: &[f32; 3]) -> Result<Tensor> {
    let dev = views.device();
    let dtype = views.dtype();
    let m = Tensor::new(mean.as_slice(), dev)?
        .to_dtype(dtype)?
        .reshape((1, 3, 1, 1))?;
    let s = Tensor::new(std.as_slice(), dev)?
        .to_dtype(dtype)?
        .reshape((1, 3, 1, 1))?;
    Ok(views.broadcast_sub(&m)?.broadcast_div(&s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::taesd::upsample_nearest;
    use crate::noise::Stream;

    #[test]
    fn identity_resample_is_identity() {
        let m = resample_matrix(5, 0, 5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert_eq!(m[i * 5 + j], if i == j { 1.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn halving_averages_pixel_pairs_and_rows_sum_to_one() {
        // Away from the borders (where the filter is cut and renormalised, as in PIL), a linear
        // ramp shrunk by 2 gives the midpoint of each pair, and the filter spans 4 pixels.
        let m = resample_matrix(8, 0, 8, 4);
        let ramp: Vec<f64> = (0..8).map(|j| j as f64).collect();
        for i in 0..4 {
            let row = &m[i * 8..(i + 1) * 8];
            let sum: f64 = row.iter().map(|&w| w as f64).sum();
            assert!((sum - 1.0).abs() < 1e-6);
            if i == 1 || i == 2 {
                let v: f64 = row.iter().zip(&ramp).map(|(&w, x)| w as f64 * x).sum();
                assert!((v - (2 * i) as f64 - 0.5).abs() < 1e-5, "{i}: {v}");
                assert_eq!(row.iter().filter(|&&w| w > 0.0).count(), 4, "{row:?}");
            }
        }
    }

    #[test]
    fn crop_weights_stay_inside_the_box() {
        let m = resample_matrix(10, 3, 4, 6);
        for i in 0..6 {
            for j in 0..10 {
                if !(3..7).contains(&j) {
                    assert_eq!(m[i * 10 + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn views_of_a_constant_image_are_constant_and_boxes_fit() {
        let mut rng = NoiseGen::new(3, Stream::Guidance);
        let boxes = random_boxes(12, 20, 8, 5, &mut rng);
        for b in &boxes {
            assert!(b.size >= 8 && b.size <= 12, "{b:?}");
            assert!(b.top + b.size <= 12 && b.left + b.size <= 20, "{b:?}");
        }
        let vm = ViewMatrices::new(&boxes, 12, 20, 8, DType::F32, &Device::Cpu).unwrap();
        let img = Tensor::full(0.25f32, (1, 3, 12, 20), &Device::Cpu).unwrap();
        let v = vm.apply(&img).unwrap();
        assert_eq!(v.dims(), &[5, 3, 8, 8]);
        for x in v.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((x - 0.25).abs() < 1e-6);
        }
    }

    #[test]
    fn nearest_upsampling_repeats_and_sums_gradients() {
        let x = candle_core::Var::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = upsample_nearest(x.as_tensor(), 3).unwrap();
        assert_eq!(y.dims(), &[1, 1, 6, 6]);
        assert_eq!(
            y.get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .get(5)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[5],
            4.0
        );
        // d(sum y)/dx = 9 for every pixel; twice used, 18.
        let loss = (y.sum_all().unwrap() + y.sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(gx, vec![18.0; 4]);
    }
}
