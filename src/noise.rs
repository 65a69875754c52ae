//! Seeded Gaussian noise drawn on the CPU, so a seed means the same noise on every device.
//!
//! Each use gets its own stream of the seed (initial latents, per-step noise, img2img noise),
//! so enabling one feature never shifts the noise another feature sees.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// What a noise stream is used for; each gets an independent ChaCha stream of the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The initial latents of text-to-image, which img2img also adds to the encoded init
    /// image (so a seed starts from the same noise in both).
    InitialLatents = 0,
    /// Noise injected by ancestral samplers and DDIM with eta > 0.
    Steps = 1,
    /// Random cutouts and augmentations of CLIP guidance (stream 2 is unused).
    Guidance = 3,
}

/// A seeded normal generator for one stream.
pub struct NoiseGen {
    rng: ChaCha8Rng,
}

impl NoiseGen {
    /// The generator for `stream` of `seed`.
    pub fn new(seed: u64, stream: Stream) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream as u64);
        NoiseGen { rng }
    }

    /// Standard normal values of `shape`, on the CPU in f32.
    pub fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// Uniform values in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        rand::Rng::random::<f64>(&mut self.rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_streams_differ() {
        let a = NoiseGen::new(42, Stream::InitialLatents)
            .randn(&[2, 3])
            .unwrap();
        let b = NoiseGen::new(42, Stream::InitialLatents)
            .randn(&[2, 3])
            .unwrap();
        let c = NoiseGen::new(42, Stream::Steps).randn(&[2, 3]).unwrap();
        let d = NoiseGen::new(43, Stream::InitialLatents)
            .randn(&[2, 3])
            .unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_ne!(v(&a), v(&d));
    }

    #[test]
    fn noise_is_standard_normal() {
        let t = NoiseGen::new(7, Stream::InitialLatents)
            .randn(&[20000])
            .unwrap();
        let v = t.to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
