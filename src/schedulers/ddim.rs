//! diffusers `DDIMScheduler`.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::ops::{self, cast, check_noise, lin2, scale, up};
use super::schedule::{alphas_cumprod, np_linspace, np_round, spaced_timesteps};
use super::{check_index, unsupported, Scheduler, SchedulerKind};
use crate::{Error, Result};

const KIND: SchedulerKind = SchedulerKind::Ddim;

/// DDIM (Song et al.), with eta for stochastic sampling.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    /// float32 alphas_cumprod over the training timesteps.
    alphas_cumprod: Vec<f32>,
    /// alpha_bar used past the last step (1, or alphas_cumprod\[0\]).
    final_alpha_cumprod: f32,
    /// Integer timesteps (as f64 for the trait).
    timesteps: Vec<f64>,
    /// `num_train_timesteps // num_inference_steps`: diffusers' distance to the previous
    /// timestep, whatever the spacing.
    step_gap: usize,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    eta: f64,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize, eta: f64) -> Result<Self> {
        if config.thresholding {
            return Err(unsupported(KIND, "`thresholding: true`"));
        }
        if !eta.is_finite() || eta < 0.0 {
            return Err(Error::value(
                "eta",
                format!("{eta} must be a finite number >= 0"),
            ));
        }
        let n_train = config.num_train_timesteps;
        let n = num_inference_steps;
        if n == 0 || n > n_train {
            return Err(Error::value(
                "steps",
                format!("{n} inference steps must be between 1 and {n_train}"),
            ));
        }
        let alphas_cumprod = alphas_cumprod(config, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = config.timestep_spacing_or(KIND.default_timestep_spacing());
        let timesteps: Vec<f64> = match spacing {
            // DDIM rounds its linspace to integers (DPM and Euler differ)
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, (n_train - 1) as f64, n)
                    .into_iter()
                    .map(np_round)
                    .collect();
                t.reverse();
                t
            }
            s => spaced_timesteps(s, n_train, n, config.steps_offset),
        };
        if let Some(&bad) = timesteps.iter().find(|&&t| t < 0.0 || t >= n_train as f64) {
            return Err(Error::value(
                "scheduler config",
                format!(
                    "DDIM timestep {bad} (from timestep_spacing {spacing:?}, steps_offset {}) is \
                     outside the {n_train} training timesteps",
                    config.steps_offset
                ),
            ));
        }
        Ok(DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_gap: n_train / n,
            prediction_type: config.prediction_type,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
            eta,
        })
    }

    fn timestep(&self, step_index: usize) -> Result<usize> {
        check_index(KIND, step_index, self.timesteps.len())?;
        Ok(self.timesteps[step_index] as usize)
    }

    /// alpha_bar at `t` and at the previous timestep `t - step_gap`.
    fn alphas(&self, t: usize) -> (f64, f64) {
        let a_t = self.alphas_cumprod[t] as f64;
        let a_prev = if t >= self.step_gap {
            self.alphas_cumprod[t - self.step_gap]
        } else {
            self.final_alpha_cumprod
        } as f64;
        (a_t, a_prev)
    }

    /// (pred_original_sample, pred_epsilon), with x0 clipped when `clip_sample`.
    fn predictions(
        &self,
        model_output: &Tensor,
        a_t: f64,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                // (sample - sqrt(b) * eps) / sqrt(a)
                let x0 = scale(&sample.sub(&scale(model_output, sb)?)?, 1.0 / sa)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = scale(&sample.sub(&scale(model_output, sa)?)?, 1.0 / sb)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => (
                lin2(sample, sa, model_output, -sb)?,
                lin2(model_output, sa, sample, sb)?,
            ),
        };
        let x0 = match self.clip_sample {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        Ok((x0, eps))
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(KIND, step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn needs_noise(&self) -> bool {
        self.eta > 0.0
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = self.timestep(step_index)?;
        ops::check_same_shape("model output", model_output, sample)?;
        let noise = check_noise(KIND, self.needs_noise(), noise, sample)?;
        let out_dtype = model_output.dtype();
        let (m, x) = (up(model_output)?, up(sample)?);
        let (a_t, a_prev) = self.alphas(t);
        let (x0, eps) = self.predictions(&m, a_t, &x)?;
        // diffusers' _get_variance, then std_dev_t = eta * sqrt(variance)
        let variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction = (1.0 - a_prev - std_dev_t * std_dev_t).sqrt();
        let mut prev = lin2(&x0, a_prev.sqrt(), &eps, direction)?;
        if let Some(noise) = noise {
            prev = prev.add(&scale(&up(noise)?, std_dev_t)?)?;
        }
        cast(prev, out_dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = self.timestep(step_index)?;
        ops::check_same_shape("noise", noise, original)?;
        let a = self.alphas_cumprod[t] as f64;
        let out = lin2(&up(original)?, a.sqrt(), &up(noise)?, (1.0 - a).sqrt())?;
        cast(out, original.dtype())
    }

    fn alpha_bar(&self, step_index: usize) -> f64 {
        match self.timesteps.get(step_index) {
            Some(&t) => self.alphas_cumprod[t as usize] as f64,
            // past the last step: the level the last step goes to
            None => self.final_alpha_cumprod as f64,
        }
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
        let t = self.timestep(step_index)?;
        ops::check_same_shape("model output", model_output, sample)?;
        let a_t = self.alphas_cumprod[t] as f64;
        let (x0, _) = self.predictions(&up(model_output)?, a_t, &up(sample)?)?;
        cast(x0, model_output.dtype())
    }
}
