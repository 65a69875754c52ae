//! diffusers `EulerDiscreteScheduler` (no churn: s_churn = 0, the pipelines' default).

use candle_core::Tensor;

use super::config::{
    FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, TimestepType,
};
use super::ops::{self, cast, lin2, scale, up};
use super::schedule::{
    alphas_cumprod, karras_sigmas, max_f32, np_interp_unit_grid, sigma_to_t, spaced_timesteps,
    torch_linspace_f32, train_sigmas,
};
use super::{check_index, unsupported, Scheduler, SchedulerKind};
use crate::Result;

const KIND: SchedulerKind = SchedulerKind::Euler;

/// The Euler method on the probability-flow ODE in sigma space (Karras et al.).
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    timesteps: Vec<f64>,
    /// float32 sigmas (as f64), one per timestep plus the final one.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

/// Euler's and Euler-ancestral's float32 inference timesteps for `spacing` (before sigmas).
pub(super) fn float_timesteps(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    num_inference_steps: usize,
) -> Vec<f32> {
    let spacing = config.timestep_spacing_or(kind.default_timestep_spacing());
    // linspace: np.linspace(..., dtype=float32) rounds the float64 values to float32;
    // leading/trailing are whole numbers, offset after the float32 cast.
    spaced_timesteps(
        spacing,
        config.num_train_timesteps,
        num_inference_steps,
        config.steps_offset,
    )
    .into_iter()
    .map(|t| t as f32)
    .collect()
}

/// `np.interp(timesteps, arange, train_sigmas)` in float64.
pub(super) fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    timesteps
        .iter()
        .map(|&t| np_interp_unit_grid(t as f64, &fp))
        .collect()
}

/// `init_noise_sigma` of Euler and Euler a: the largest sigma for linspace/trailing spacing,
/// sqrt(max^2 + 1) for leading, in float32.
pub(super) fn init_noise_sigma(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    sigmas_f32: &[f32],
) -> f64 {
    let max = max_f32(sigmas_f32);
    match config.timestep_spacing_or(kind.default_timestep_spacing()) {
        super::TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        _ => max as f64,
    }
}

/// `sample / sqrt(sigma^2 + 1)`.
pub(super) fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    // (sigma**2 + 1) ** 0.5 on a float32 sigma
    let s32 = sigma as f32;
    let s = (s32 * s32 + 1.0).sqrt() as f64;
    cast(scale(&up(sample)?, 1.0 / s)?, sample.dtype())
}

/// x0 from the model output at noise level `sigma` (sample in unscaled sigma space).
pub(super) fn sigma_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sigma: f64,
    sample: &Tensor,
) -> Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => lin2(sample, 1.0, model_output, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// Euler-type img2img noising: `original + sigma * noise`, in the original's dtype.
pub(super) fn add_noise_at_sigma(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    ops::check_same_shape("noise", noise, original)?;
    let out = lin2(&up(original)?, 1.0, &up(noise)?, sigma)?;
    cast(out, original.dtype())
}

/// [`sigma_x0`] with the shape check and dtype round trip of the trait's `predict_x0`.
pub(super) fn predict_x0_at_sigma(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sigma: f64,
    sample: &Tensor,
) -> Result<Tensor> {
    ops::check_same_shape("model output", model_output, sample)?;
    let x0 = sigma_x0(prediction_type, &up(model_output)?, sigma, &up(sample)?)?;
    cast(x0, model_output.dtype())
}

/// alpha_bar = 1 / (1 + sigma^2) at `step_index` of a sigma list; past the last step, the
/// final sigma.
pub(super) fn alpha_bar_of_sigmas(sigmas: &[f64], step_index: usize) -> f64 {
    let s = sigmas[step_index.min(sigmas.len() - 1)];
    1.0 / (1.0 + s * s)
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if config.use_exponential_sigmas {
            return Err(unsupported(KIND, "`use_exponential_sigmas: true`"));
        }
        if config.use_beta_sigmas {
            return Err(unsupported(KIND, "`use_beta_sigmas: true`"));
        }
        if config.timestep_type == TimestepType::Continuous
            && config.prediction_type == PredictionType::VPrediction
        {
            return Err(unsupported(
                KIND,
                "`timestep_type: continuous` with `prediction_type: v_prediction`",
            ));
        }
        let n = num_inference_steps;
        let ac = alphas_cumprod(config, true)?;
        let train = train_sigmas(&ac);
        let mut timesteps = float_timesteps(config, KIND, n);
        let mut sigmas: Vec<f64> = match config.interpolation_type {
            InterpolationType::Linear => interp_sigmas(&timesteps, &train),
            InterpolationType::LogLinear => {
                // torch.linspace(log(sigmas[-1]), log(sigmas[0]), n + 1).exp(), float32; this
                // gives n + 1 sigmas before the final one is appended, as in diffusers.
                let hi = train[train.len() - 1].ln();
                let lo = train[0].ln();
                torch_linspace_f32(hi, lo, n + 1)
                    .into_iter()
                    .map(|l| l.exp() as f64)
                    .collect()
            }
        };
        if config.use_karras_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => ((1.0 - ac[0]) / ac[0]).sqrt() as f64,
        };
        sigmas.push(last);
        let sigmas_f32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        Ok(EulerScheduler {
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
}

impl Scheduler for EulerScheduler {
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
        false
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
        ops::check_noise(KIND, false, noise, sample)?;
        let out_dtype = model_output.dtype();
        let (m, x) = (up(model_output)?, up(sample)?);
        // gamma = 0 (no churn), so sigma_hat = sigma
        let x0 = sigma_x0(self.prediction_type, &m, sigma, &x)?;
        let derivative = scale(&x.sub(&x0)?, 1.0 / sigma)?;
        let dt = (self.sigmas[step_index + 1] as f32 - sigma as f32) as f64;
        let prev = x.add(&scale(&derivative, dt)?)?;
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
