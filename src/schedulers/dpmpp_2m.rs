//! diffusers `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`: DPM-Solver++
//! (2M) of Lu et al., data prediction, multistep, order 2.

use candle_core::Tensor;

use super::config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing,
};
use super::euler::alpha_bar_of_sigmas;
use super::ops::{self, cast, lin2, scale, up};
use super::schedule::{
    alphas_cumprod, karras_sigmas, np_arange, np_interp_unit_grid, np_linspace, np_round,
    sigma_to_t, train_sigmas,
};
use super::{check_index, unsupported, Scheduler, SchedulerKind};
use crate::{Error, Result};

const KIND: SchedulerKind = SchedulerKind::DpmPlusPlus2M;

/// DPM-Solver++ 2M. Keeps the previous step's x0 prediction as a tensor.
#[derive(Debug, Clone)]
pub struct DpmPlusPlus2MScheduler {
    /// Integer timesteps (as f64 for the trait).
    timesteps: Vec<f64>,
    /// float32 sigmas (as f64), one per timestep plus the final one.
    sigmas: Vec<f64>,
    prediction_type: PredictionType,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    /// The x0 prediction of the previous step (in the compute dtype).
    previous_x0: Option<Tensor>,
    /// diffusers' `lower_order_nums`: how many steps have run, capped at the solver order.
    lower_order_nums: usize,
    /// The step index `step` expects next for the history to apply.
    next_index: Option<usize>,
}

/// `(alpha_t, sigma_t)` of the VP formulation for a sigma of the VE (Karras) one.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)` (infinite for sigma 0).
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

impl DpmPlusPlus2MScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if config.algorithm_type != AlgorithmType::DpmSolverPlusPlus {
            return Err(unsupported(
                KIND,
                format!(
                    "`algorithm_type: {}` (only dpmsolver++ is DPM++ 2M)",
                    match config.algorithm_type {
                        AlgorithmType::DpmSolver => "dpmsolver",
                        AlgorithmType::SdeDpmSolver => "sde-dpmsolver",
                        AlgorithmType::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
                        AlgorithmType::DpmSolverPlusPlus => "dpmsolver++",
                    }
                ),
            ));
        }
        if !(1..=2).contains(&config.solver_order) {
            return Err(unsupported(
                KIND,
                format!(
                    "`solver_order: {}` (1 or 2 are supported)",
                    config.solver_order
                ),
            ));
        }
        for (set, what) in [
            (config.thresholding, "`thresholding: true`"),
            (
                config.use_exponential_sigmas,
                "`use_exponential_sigmas: true`",
            ),
            (config.use_beta_sigmas, "`use_beta_sigmas: true`"),
            (config.use_lu_lambdas, "`use_lu_lambdas: true`"),
            (config.use_flow_sigmas, "`use_flow_sigmas: true`"),
        ] {
            if set {
                return Err(unsupported(KIND, what));
            }
        }
        if let Some(v) = &config.variance_type {
            if v == "learned" || v == "learned_range" {
                return Err(unsupported(KIND, format!("`variance_type: {v}`")));
            }
        }
        let n_train = config.num_train_timesteps;
        let n = num_inference_steps;
        let ac = alphas_cumprod(config, true)?;
        let train = train_sigmas(&ac);

        // lambda_min_clipped: searchsorted(flip(lambda_t), lambda_min_clipped), lambda_t in f32
        let lambdas: Vec<f32> = ac
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0f32 - a).sqrt().ln())
            .collect();
        let clipped_idx = lambdas
            .iter()
            .rev()
            .position(|&l| (l as f64) >= config.lambda_min_clipped)
            .unwrap_or(lambdas.len());
        let last_timestep = n_train - clipped_idx;

        let spacing = config.timestep_spacing_or(KIND.default_timestep_spacing());
        let mut timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(np_round)
                    .collect();
                t.reverse();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) - 1.0)
                    .collect()
            }
        };

        let mut sigmas: Vec<f64> = if config.use_karras_sigmas {
            // karras on the flipped (descending) training sigmas, then timesteps from sigmas
            let sigma_min = config.sigma_min.unwrap_or(train[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(train[train.len() - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if config.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                        t.trunc() // no round; astype(int64) truncates
                    } else {
                        np_round(t)
                    }
                })
                .collect();
            sigmas
        } else {
            let fp: Vec<f64> = train.iter().map(|&s| s as f64).collect();
            timesteps
                .iter()
                .map(|&t| np_interp_unit_grid(t, &fp))
                .collect()
        };
        if let Some(&bad) = timesteps.iter().find(|&&t| t < 0.0 || t >= n_train as f64) {
            return Err(Error::value(
                "scheduler config",
                format!(
                    "DPM++ 2M timestep {bad} (from timestep_spacing {spacing:?}, steps_offset {}) \
                     is outside the {n_train} training timesteps",
                    config.steps_offset
                ),
            ));
        }
        let last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => ((1.0 - ac[0]) / ac[0]).sqrt() as f64,
        };
        sigmas.push(last);
        Ok(DpmPlusPlus2MScheduler {
            timesteps,
            sigmas: sigmas.iter().map(|&s| s as f32 as f64).collect(),
            prediction_type: config.prediction_type,
            solver_order: config.solver_order,
            solver_type: config.solver_type,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigmas_zero: config.final_sigmas_type == FinalSigmasType::Zero,
            previous_x0: None,
            lower_order_nums: 0,
            next_index: None,
        })
    }

    fn sigma(&self, step_index: usize) -> Result<f64> {
        check_index(KIND, step_index, self.timesteps.len())?;
        Ok(self.sigmas[step_index])
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the data (x0) prediction.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sigma: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction_type {
            // (sample - sigma_t * eps) / alpha_t
            PredictionType::Epsilon => {
                scale(&sample.sub(&scale(model_output, sigma_t)?)?, 1.0 / alpha_t)
            }
            PredictionType::Sample => Ok(model_output.clone()),
            PredictionType::VPrediction => lin2(sample, alpha_t, model_output, -sigma_t),
        }
    }
}

impl Scheduler for DpmPlusPlus2MScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(KIND, step_index, self.timesteps.len())?;
        Ok(sample.clone())
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
        let sigma_s0 = self.sigma(step_index)?;
        ops::check_same_shape("model output", model_output, sample)?;
        ops::check_noise(KIND, false, noise, sample)?;
        // The multistep history only carries over between consecutive step indices.
        if self.next_index != Some(step_index) {
            self.previous_x0 = None;
            self.lower_order_nums = 0;
        }
        let len = self.timesteps.len();
        let lower_order_final = step_index == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigmas_zero);
        let out_dtype = model_output.dtype();
        let (m, x) = (up(model_output)?, up(sample)?);
        let x0 = self.convert_model_output(&m, sigma_s0, &x)?;

        let sigma_next = self.sigmas[step_index + 1];
        let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
        let (alpha_s0, sigma_s0v) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0v);
        let h = lambda_t - lambda_s0;
        // exp(-h) - 1, exactly -1 when sigma_next is 0 (h infinite)
        let em1 = (-h).exp() - 1.0;
        let ratio = sigma_t / sigma_s0v;

        let first_order = self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = match (&self.previous_x0, first_order) {
            (Some(x0_prev), false) => {
                // multistep_dpm_solver_second_order_update
                let sigma_s1 = self.sigmas[step_index - 1];
                let (alpha_s1, sigma_s1v) = alpha_sigma(sigma_s1);
                let lambda_s1 = lambda(alpha_s1, sigma_s1v);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                // D0 = m0, D1 = (1/r0) * (m0 - m1)
                let d1 = scale(&x0.sub(x0_prev)?, 1.0 / r0)?;
                let base = lin2(&x, ratio, &x0, -alpha_t * em1)?;
                let c1 = match self.solver_type {
                    SolverType::Midpoint => -0.5 * (alpha_t * em1),
                    SolverType::Heun => alpha_t * (em1 / h + 1.0),
                };
                base.add(&scale(&d1, c1)?)?
            }
            _ => {
                // dpm_solver_first_order_update
                if ratio == 0.0 {
                    scale(&x0, -alpha_t * em1)?
                } else {
                    lin2(&x, ratio, &x0, -alpha_t * em1)?
                }
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.previous_x0 = Some(x0);
        self.next_index = Some(step_index + 1);
        cast(prev, out_dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        ops::check_same_shape("noise", noise, original)?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let out = lin2(&up(original)?, alpha_t, &up(noise)?, sigma_t)?;
        cast(out, original.dtype())
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
        let sigma = self.sigma(step_index)?;
        ops::check_same_shape("model output", model_output, sample)?;
        let x0 = self.convert_model_output(&up(model_output)?, sigma, &up(sample)?)?;
        cast(x0, model_output.dtype())
    }
}
