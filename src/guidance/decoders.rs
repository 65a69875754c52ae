//! Guidance decoders: latents -> image in [0, 1], differentiable in the latents.
//!
//! The full VAE decoder is exact but dominates the cost of a guided step (its backward at
//! 512x512 does not fit in 24 GiB on the CPU). TAESD (`AutoencoderTiny`) is a 1 M-parameter
//! approximation; the linear decoder maps each latent pixel to an RGB colour with a 3 x C
//! matrix fitted to the model's own VAE, then repeats it over the VAE's pixel block.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::views::resample_matrix;
use crate::models::stable_diffusion::SdModel;
use crate::models::taesd::{upsample_nearest, TaesdDecoder};
use crate::models::vae::Mode;
use crate::noise::{NoiseGen, Stream};
use crate::{Error, Result};

/// The TAESD for `spec`: itself, or for `auto` the one trained on the model's latents:
/// `madebyollin/taesdxl` for SDXL-style models (text + time conditioning; their VAE's
/// latents differ from SD 1/2's although the upscale factor is the same), else
/// `madebyollin/taesd`.
pub fn taesd_source<'a>(spec: &'a str, model: &SdModel) -> &'a str {
    match spec {
        super::DEFAULT_TAESD if model.unet.added_cond().is_some() => "madebyollin/taesdxl",
        super::DEFAULT_TAESD => "madebyollin/taesd",
        other => other,
    }
}

/// Which decoder guidance differentiates through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    /// The model's own VAE decoder.
    #[default]
    Vae,
    /// The tiny autoencoder TAESD (madebyollin/taesd, taesdxl or a local folder).
    Taesd,
    /// A per-pixel linear latent-to-RGB map fitted to the model's VAE.
    Linear,
}

impl DecoderKind {
    /// The command-line / recipe names.
    pub const NAMES: [&'static str; 3] = ["vae", "taesd", "linear"];

    /// This kind's name.
    pub fn name(self) -> &'static str {
        match self {
            DecoderKind::Vae => "vae",
            DecoderKind::Taesd => "taesd",
            DecoderKind::Linear => "linear",
        }
    }
}

impl fmt::Display for DecoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DecoderKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vae" => Ok(DecoderKind::Vae),
            "taesd" => Ok(DecoderKind::Taesd),
            "linear" => Ok(DecoderKind::Linear),
            other => Err(Error::value(
                "guidance-decoder",
                format!("`{other}`: expected one of vae, taesd, linear"),
            )),
        }
    }
}

/// A decoder ready to use inside the guided step (cheap to clone: tensors are shared).
#[derive(Clone)]
pub enum GuidanceDecoder {
    /// The model's VAE (borrowed from the model at decode time).
    Vae,
    /// TAESD.
    Taesd(Box<TaesdDecoder>),
    /// The fitted linear map.
    Linear(LinearDecoder),
}

impl GuidanceDecoder {
    /// Builds a decoder of `kind` for `model`; `taesd` names TAESD's folder or hub id.
    pub fn load(
        kind: DecoderKind,
        taesd: &str,
        model: &SdModel,
        hub: &crate::models::hub::HubOptions,
    ) -> Result<Self> {
        Ok(match kind {
            DecoderKind::Vae => GuidanceDecoder::Vae,
            DecoderKind::Linear => GuidanceDecoder::Linear(LinearDecoder::fit(model)?),
            DecoderKind::Taesd => GuidanceDecoder::Taesd(Box::new(TaesdDecoder::load(
                taesd_source(taesd, model),
                hub,
                model.dtype,
                &model.device,
            )?)),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> DecoderKind {
        match self {
            GuidanceDecoder::Vae => DecoderKind::Vae,
            GuidanceDecoder::Taesd(_) => DecoderKind::Taesd,
            GuidanceDecoder::Linear(_) => DecoderKind::Linear,
        }
    }

    /// Decodes diffusion-space latents (N x C x h x w) to images (N x 3 x H x W in `dtype`,
    /// nominally in [0, 1] but not clamped, so out-of-range pixels keep their gradient).
    pub fn decode(&self, model: &SdModel, latents: &Tensor, dtype: DType) -> Result<Tensor> {
        let img = match self {
            GuidanceDecoder::Vae => {
                let spec = &model.vae_spec;
                let z = latents
                    .affine(1.0 / spec.scaling_factor, spec.shift_factor)?
                    .to_dtype(model.vae_dtype)?;
                model
                    .vae
                    .decode(&z, Mode::Differentiable)?
                    .to_dtype(dtype)?
            }
            GuidanceDecoder::Taesd(t) => {
                t.decode(&latents.to_dtype(model.dtype)?)?.to_dtype(dtype)?
            }
            GuidanceDecoder::Linear(l) => return l.decode(&latents.to_dtype(dtype)?),
        };
        Ok(img.affine(0.5, 0.5)?)
    }
}

/// latent -> RGB in [0, 1] as `weight @ z + bias` per latent pixel, repeated over the VAE's
/// `factor` x `factor` pixel block.
#[derive(Clone, Debug)]
pub struct LinearDecoder {
    /// (3, C)
    weight: Tensor,
    /// (1, 3, 1, 1)
    bias: Tensor,
    factor: usize,
    /// Fraction of the pooled VAE image's variance the fit explains, per channel.
    pub r_squared: [f64; 3],
}

/// Side of the calibration latents (latent pixels) used to fit the linear decoder.
const CALIBRATION_SIDE: usize = 16;
/// Calibration images decoded by the VAE.
const CALIBRATION_IMAGES: usize = 2;

impl LinearDecoder {
    /// Fits the map to the model's VAE: decodes seeded smooth random latents (a 4 x 4 random
    /// field upsampled bilinearly plus a little white noise, which resembles image latents more
    /// than white noise does), averages the image over each latent pixel's block and solves
    /// the least-squares problem per colour channel.
    pub fn fit(model: &SdModel) -> Result<Self> {
        let c = model.vae_spec.config.latent_channels;
        let f = model.vae_spec.scale_factor;
        let s = CALIBRATION_SIDE;
        let mut rng = NoiseGen::new(0x11ea7, Stream::Guidance);
        let coarse = rng.randn(&[CALIBRATION_IMAGES * c, 1, 4, 4])?;
        let up = Tensor::from_vec(resample_matrix(4, 0, 4, s), (s, 4), &Device::Cpu)?;
        let smooth = up
            .broadcast_matmul(&coarse)?
            .broadcast_matmul(&up.t()?)?
            .reshape((CALIBRATION_IMAGES, c, s, s))?;
        let latents = (smooth + (rng.randn(&[CALIBRATION_IMAGES, c, s, s])? * 0.3)?)?;
        let img = GuidanceDecoder::Vae
            .decode(model, &latents.to_device(&model.device)?, DType::F32)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?;
        // Mean over each f x f block: (n, 3, s, s).
        let pooled = img
            .reshape((CALIBRATION_IMAGES, 3, s, f, s, f))?
            .mean(5)?
            .mean(3)?;
        // Rows = latent pixels; columns = C channels + 1.
        let x = latents
            .to_dtype(DType::F64)?
            .permute((0, 2, 3, 1))?
            .reshape((CALIBRATION_IMAGES * s * s, c))?
            .to_vec2::<f64>()?;
        let y = pooled
            .permute((0, 2, 3, 1))?
            .reshape((CALIBRATION_IMAGES * s * s, 3))?
            .to_vec2::<f64>()?;
        let (w, b, r2) = least_squares(&x, &y)?;
        let weight = Tensor::from_vec(w, (3, c), &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(&model.device)?;
        let bias = Tensor::from_vec(b, (1, 3, 1, 1), &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(&model.device)?;
        Ok(Self {
            weight,
            bias,
            factor: f,
            r_squared: r2,
        })
    }

    /// Latents (N x C x h x w) to images (N x 3 x h*f x w*f), in the latents' dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = latents.dims4()?;
        let z = latents.reshape((n, c, h * w))?;
        let rgb = self
            .weight
            .to_dtype(latents.dtype())?
            .broadcast_matmul(&z)?
            .reshape((n, 3, h, w))?
            .broadcast_add(&self.bias.to_dtype(latents.dtype())?)?;
        Ok(upsample_nearest(&rgb, self.factor)?)
    }
}

/// Least squares with an intercept for each column of `y` on the columns of `x`, by the
/// normal equations (C + 1 unknowns, so tiny) with a small ridge for safety. Returns the
/// weights (3 x C, row-major), the intercepts and R^2 per output column.
fn least_squares(x: &[Vec<f64>], y: &[Vec<f64>]) -> Result<(Vec<f64>, Vec<f64>, [f64; 3])> {
    let c = x.first().map(Vec::len).unwrap_or(0);
    let k = c + 1;
    let mut ata = vec![vec![0f64; k]; k];
    let mut aty = vec![[0f64; 3]; k];
    for (row, out) in x.iter().zip(y) {
        let a: Vec<f64> = row.iter().copied().chain(std::iter::once(1.0)).collect();
        for i in 0..k {
            for j in 0..k {
                ata[i][j] += a[i] * a[j];
            }
            for ch in 0..3 {
                aty[i][ch] += a[i] * out[ch];
            }
        }
    }
    for (i, r) in ata.iter_mut().enumerate().take(c) {
        r[i] += 1e-6 * x.len() as f64;
    }
    let sol = solve(ata, aty)
        .ok_or_else(|| Error::Msg("linear guidance decoder: the VAE fit is singular".into()))?;
    let mut weight = vec![0f64; 3 * c];
    let mut bias = vec![0f64; 3];
    for ch in 0..3 {
        for i in 0..c {
            weight[ch * c + i] = sol[i][ch];
        }
        bias[ch] = sol[c][ch];
    }
    let mut r2 = [0f64; 3];
    for (ch, r) in r2.iter_mut().enumerate() {
        let mean = y.iter().map(|v| v[ch]).sum::<f64>() / y.len() as f64;
        let (mut ss_res, mut ss_tot) = (0f64, 0f64);
        for (row, out) in x.iter().zip(y) {
            let pred = bias[ch] + (0..c).map(|i| weight[ch * c + i] * row[i]).sum::<f64>();
            ss_res += (out[ch] - pred).powi(2);
            ss_tot += (out[ch] - mean).powi(2);
        }
        *r = if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            0.0
        };
    }
    Ok((weight, bias, r2))
}

/// Gaussian elimination with partial pivoting for A X = B, B with 3 columns.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<[f64; 3]>) -> Option<Vec<[f64; 3]>> {
    let n = a.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..n {
            let f = a[r][col] / a[col][col];
            let (top, bottom) = a.split_at_mut(r);
            for (x, p) in bottom[0][col..].iter_mut().zip(&top[col][col..]) {
                *x -= f * p;
            }
            let pivot_b = b[col];
            for (x, p) in b[r].iter_mut().zip(pivot_b) {
                *x -= f * p;
            }
        }
    }
    let mut x = vec![[0f64; 3]; n];
    for r in (0..n).rev() {
        for ch in 0..3 {
            let s: f64 = (r + 1..n).map(|cc| a[r][cc] * x[cc][ch]).sum();
            x[r][ch] = (b[r][ch] - s) / a[r][r];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_an_exact_linear_map() {
        let mut rng = NoiseGen::new(1, Stream::Guidance);
        let xs = rng.randn(&[50, 4]).unwrap().to_dtype(DType::F64).unwrap();
        let x = xs.to_vec2::<f64>().unwrap();
        let w = [
            [0.3, -0.2, 0.5, 0.1],
            [0.0, 0.4, -0.3, 0.2],
            [-0.5, 0.1, 0.2, 0.7],
        ];
        let b = [0.5, 0.4, 0.6];
        let y: Vec<Vec<f64>> = x
            .iter()
            .map(|r| {
                (0..3)
                    .map(|ch| b[ch] + (0..4).map(|i| w[ch][i] * r[i]).sum::<f64>())
                    .collect()
            })
            .collect();
        let (gw, gb, r2) = least_squares(&x, &y).unwrap();
        for ch in 0..3 {
            assert!((gb[ch] - b[ch]).abs() < 1e-4, "{gb:?}");
            for i in 0..4 {
                assert!((gw[ch * 4 + i] - w[ch][i]).abs() < 1e-4, "{gw:?}");
            }
            assert!(r2[ch] > 0.999_999, "{r2:?}");
        }
    }
}
