//! diffusers `EulerAncestralDiscreteScheduler` ("Euler a").

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{
    add_noise_at_sigma, alpha_bar_of_sigmas, float_timesteps, init_noise_sigma, interp_sigmas,
    predict_x0_at_sigma, scale_by_sigma, sigma_x0,
};
use super::ops::{self, cast, scale, up};
use super::schedule::{alphas_cumprod, train_sigmas};
use super::{check_index, unsupported, Scheduler, SchedulerKind};
use crate::Result;

const KIND: SchedulerKind = SchedulerKind::EulerAncestral;

/// Euler steps to a lower noise level followed by fresh noise back up to the next sigma.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    /// float32 sigmas (as f64), one per timestep plus the final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError("prediction_type not implemented yet: sample")
            return Err(unsupported(KIND, "`prediction_type: sample`"));
        }
        // EulerAncestralDiscreteScheduler has no interpolation_type, karras, or final sigma
        // options: those config keys are ignored, as diffusers ignores them.
        let ac = alphas_cumprod(config, true)?;
        let train = train_sigmas(&ac);
        let timesteps = float_timesteps(config, KIND, num_inference_steps);
        let mut sigmas = interp_sigmas(&timesteps, &train);
        sigmas.push(0.0);
        let sigmas_f32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        Ok(EulerAncestralScheduler {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas: sigmas_f32.iter().map(|&s| s as f64).collect(),
            init_noise_sigma: init_noise_sigma(config, KIND, &sigmas_f32),
            prediction_type: config.prediction_type,
        })
    }

    fn sigma(&self, step_index: usize) -> Result<f64> {
        check_index(KIND, step_index, self.timesteps.len())?;
        Ok(self.sigmas[step_index])
    }

    /// (sigma_up, sigma_down) for the step from `sigma_from` to `sigma_to`.
    fn ancestral_sigmas(sigma_from: f64, sigma_to: f64) -> (f64, f64) {
        let up2 = sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from);
        let sigma_up = up2.max(0.0).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        (sigma_up, sigma_down)
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigma(step_index)?)
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        ops::check_same_shape("model output", model_output, sample)?;
        let noise = ops::check_noise(KIND, true, noise, sample)?.expect("checked");
        let out_dtype = model_output.dtype();
        let (m, x) = (up(model_output)?, up(sample)?);
        let x0 = sigma_x0(self.prediction_type, &m, sigma, &x)?;
        let (sigma_up, sigma_down) = Self::ancestral_sigmas(sigma, self.sigmas[step_index + 1]);
        let derivative = scale(&x.sub(&x0)?, 1.0 / sigma)?;
        let dt = sigma_down - sigma;
        let prev = x.add(&scale(&derivative, dt)?)?;
        let prev = prev.add(&scale(&up(noise)?, sigma_up)?)?;
        cast(prev, out_dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        add_noise_at_sigma(original, noise, self.sigma(step_index)?)
    }

    fn alpha_bar(&self, step_index: usize) -> f64 {
        alpha_bar_of_sigmas(&self.sigmas, step_index)
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn predict_x0(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        predict_x0_at_sigma(
            self.prediction_type,
            model_output,
            self.sigma(step_index)?,
            sample,
        )
    }
}
