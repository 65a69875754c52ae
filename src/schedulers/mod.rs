//! Noise schedulers matching Hugging Face diffusers 0.42.1: DDIM, Euler, Euler ancestral and
//! DPM-Solver++ 2M.
//!
//! The schedule itself (timesteps, sigmas, alpha_bar) is computed on the host exactly as
//! diffusers computes it, float32 where torch holds float32 and float64 where numpy works in
//! float64. Each step's coefficients are plain `f64`s applied with tensor affine/add ops, so the
//! step works on any dtype (f16/bf16 are computed in f32 and cast back, as diffusers upcasts
//! the Euler and DPM steps) and any device, without reading tensors back to the host.
//!
//! Step indices replace diffusers' internal step counter: `step_index` is the position in
//! [`Scheduler::timesteps`]. For img2img start at [`img2img_start_index`], which is what
//! diffusers' `set_begin_index` does.

pub mod config;
mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
pub mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, SolverType, TimestepSpacing, TimestepType,
};
pub use ddim::DdimScheduler;
pub use dpmpp_2m::DpmPlusPlus2MScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;

use crate::{Error, Result};

/// Which sampling algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// diffusers `DDIMScheduler`.
    Ddim,
    /// diffusers `EulerDiscreteScheduler`.
    Euler,
    /// diffusers `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers `DPMSolverMultistepScheduler` (dpmsolver++, order 2).
    DpmPlusPlus2M,
}

impl SchedulerKind {
    /// All kinds, in CLI order.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
    ];

    /// The command-line name: `ddim`, `euler`, `euler-a`, `dpmpp-2m`.
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPlusPlus2M => "dpmpp-2m",
        }
    }

    /// The name AUTOMATIC1111's web UI gives the sampler (for "parameters" text chunks).
    pub fn webui_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPlusPlus2M => "DPM++ 2M",
        }
    }

    /// The diffusers class this kind mirrors.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPlusPlus2M => "DPMSolverMultistepScheduler",
        }
    }

    /// The diffusers default `timestep_spacing` of this kind's class, used when the config file
    /// does not give one.
    pub fn default_timestep_spacing(self) -> TimestepSpacing {
        match self {
            SchedulerKind::Ddim => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Accepts the CLI names (and, for convenience, the web UI names), ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim();
        SchedulerKind::ALL
            .into_iter()
            .find(|k| {
                k.cli_name().eq_ignore_ascii_case(wanted)
                    || k.webui_name().eq_ignore_ascii_case(wanted)
            })
            .ok_or_else(|| {
                Error::value(
                    "scheduler",
                    format!(
                        "unknown scheduler `{s}`: expected one of ddim, euler, euler-a, dpmpp-2m"
                    ),
                )
            })
    }
}

/// A requested scheduler: `auto` (the model's own, as diffusers' pipelines do) or a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerChoice {
    /// The class the model folder's `scheduler_config.json` names, or DDIM when artguide does not
    /// have that class (SD 1.5 ships PNDM).
    Auto,
    /// This kind, configured from the model's file whatever class the file names.
    Kind(SchedulerKind),
}

/// The scheduler a [`SchedulerChoice`] came to for one model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedScheduler {
    pub kind: SchedulerKind,
    /// For `auto`: how the kind was chosen, e.g. "euler-a: the model's
    /// EulerAncestralDiscreteScheduler"; None when the kind was asked for by name.
    pub reason: Option<String>,
}

impl SchedulerKind {
    /// The kind mirroring a diffusers scheduler class, if artguide has it.
    pub fn from_diffusers_class(class: &str) -> Option<SchedulerKind> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.diffusers_class() == class)
    }
}

impl SchedulerChoice {
    /// What `auto` falls back to when the model's class is missing or not implemented.
    pub const FALLBACK: SchedulerKind = SchedulerKind::Ddim;

    /// The kind to build for a model whose scheduler config is `config`.
    pub fn resolve(self, config: &SchedulerConfig) -> ResolvedScheduler {
        let kind = match self {
            SchedulerChoice::Kind(kind) => return ResolvedScheduler { kind, reason: None },
            SchedulerChoice::Auto => config
                .class_name
                .as_deref()
                .and_then(SchedulerKind::from_diffusers_class),
        };
        let (kind, reason) = match (kind, config.class_name.as_deref()) {
            (Some(k), Some(class)) => (k, format!("{k}: the model's {class}")),
            (_, Some(class)) => (
                Self::FALLBACK,
                format!(
                    "{}: the model's {class} is not implemented (ddim, euler, euler-a, dpmpp-2m are)",
                    Self::FALLBACK
                ),
            ),
            (_, None) => (
                Self::FALLBACK,
                format!(
                    "{}: the model's scheduler_config.json names no _class_name",
                    Self::FALLBACK
                ),
            ),
        };
        ResolvedScheduler {
            kind,
            reason: Some(reason),
        }
    }
}

impl fmt::Display for SchedulerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchedulerChoice::Auto => f.write_str("auto"),
            SchedulerChoice::Kind(k) => k.fmt(f),
        }
    }
}

impl FromStr for SchedulerChoice {
    type Err = Error;

    /// `auto`, or a [`SchedulerKind`] name, ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(SchedulerChoice::Auto);
        }
        s.parse().map(SchedulerChoice::Kind).map_err(|_| {
            Error::value(
                "scheduler",
                format!("unknown scheduler `{s}`: expected auto, ddim, euler, euler-a or dpmpp-2m"),
            )
        })
    }
}

/// Options that are not part of the model's scheduler config.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerOptions {
    /// DDIM's eta: 0 is deterministic DDIM, 1 is DDPM-like. Ignored by the other schedulers.
    pub eta: f64,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions { eta: 0.0 }
    }
}

/// A noise scheduler set up for a fixed number of inference steps.
pub trait Scheduler: Send {
    /// The model's timestep inputs, as diffusers holds them (Euler's linspace spacing gives
    /// fractional ones).
    fn timesteps(&self) -> &[f64];
    /// Euler/DPM sigmas including the trailing value; None for DDIM.
    fn sigmas(&self) -> Option<&[f64]>;
    /// The standard deviation of the initial noise: multiply N(0,1) noise by this.
    fn init_noise_sigma(&self) -> f64;
    /// The model input for a sample at `step_index` (Euler: divided by sqrt(sigma^2 + 1)).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;
    /// Whether `step` needs a noise tensor: true for euler-a, and for DDIM with eta > 0.
    fn needs_noise(&self) -> bool;
    /// One step from `timesteps()[step_index]` to the next. `noise` (same shape as sample,
    /// N(0,1)) must be Some exactly when `needs_noise()`; the sampling loop draws it from its own
    /// seeded CPU generator so seeds mean the same on every device. The result has the model
    /// output's dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// img2img: noise the clean latents to the level of `timesteps()[step_index]`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// alpha_bar (cumulative product of alphas) at the timestep of `step_index`; sigma-based
    /// schedulers give 1/(1+sigma^2). An index past the last step gives the level the last step
    /// ends at.
    fn alpha_bar(&self, step_index: usize) -> f64;
    /// What the model predicts.
    fn prediction_type(&self) -> PredictionType;
    /// x0 predicted from the model output at `step_index`, in the sample's (unscaled) space.
    fn predict_x0(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor>;
}

/// Builds a scheduler of `kind` from a model's scheduler config, set up for
/// `num_inference_steps` steps.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    opts: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    check_steps(config, num_inference_steps)?;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps, opts.eta)?),
        SchedulerKind::Euler => Box::new(EulerScheduler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(EulerAncestralScheduler::new(config, num_inference_steps)?)
        }
        SchedulerKind::DpmPlusPlus2M => {
            Box::new(DpmPlusPlus2MScheduler::new(config, num_inference_steps)?)
        }
    })
}

/// img2img truncation as diffusers' `get_timesteps`: the first step index to run for
/// `strength` in (0, 1]. All four schedulers have order 1, so this is also the step index at
/// which [`Scheduler::add_noise`] noises the init latents.
pub fn img2img_start_index(num_inference_steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::value(
            "strength",
            format!("{strength} is outside (0, 1]"),
        ));
    }
    // init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    let init_timestep = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    if init_timestep == 0 {
        return Err(Error::value(
            "strength",
            format!(
                "{strength} with {num_inference_steps} steps leaves no denoising step to run \
                 (int({num_inference_steps} * {strength}) = 0); raise the strength or the steps"
            ),
        ));
    }
    Ok(num_inference_steps - init_timestep)
}

fn check_steps(config: &SchedulerConfig, num_inference_steps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::value(
            "steps",
            "the number of inference steps must be at least 1",
        ));
    }
    if num_inference_steps > config.num_train_timesteps {
        return Err(Error::value(
            "steps",
            format!(
                "{num_inference_steps} inference steps is more than the model's {} training timesteps",
                config.num_train_timesteps
            ),
        ));
    }
    Ok(())
}

/// An error for a config setting a scheduler does not support.
fn unsupported(kind: SchedulerKind, what: impl fmt::Display) -> Error {
    Error::value(
        "scheduler config",
        format!(
            "{what} is not supported by the {kind} scheduler ({})",
            kind.diffusers_class()
        ),
    )
}

fn check_index(kind: SchedulerKind, step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(Error::value(
            "step index",
            format!("{kind}: step index {step_index} is past the last of {len} steps"),
        ));
    }
    Ok(())
}

/// Tensor arithmetic helpers: scalars in f64, applied with affine ops, in at least f32.
pub(crate) mod ops {
    use super::*;

    /// The dtype a step computes in: f16/bf16 are upcast to f32.
    pub fn compute_dtype(dtype: DType) -> DType {
        match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        }
    }

    /// `t` in its compute dtype.
    pub fn up(t: &Tensor) -> Result<Tensor> {
        let d = compute_dtype(t.dtype());
        Ok(if d == t.dtype() {
            t.clone()
        } else {
            t.to_dtype(d)?
        })
    }

    /// `t` cast to `dtype` (no-op when already there).
    pub fn cast(t: Tensor, dtype: DType) -> Result<Tensor> {
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    /// `t * c`.
    pub fn scale(t: &Tensor, c: f64) -> Result<Tensor> {
        Ok(t.affine(c, 0.0)?)
    }

    /// `a * ca + b * cb`.
    pub fn lin2(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
        Ok(a.affine(ca, 0.0)?.add(&b.affine(cb, 0.0)?)?)
    }

    pub fn check_same_shape(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dims() != b.dims() {
            return Err(Error::value(
                what,
                format!(
                    "shape {:?} does not match the sample's {:?}",
                    a.dims(),
                    b.dims()
                ),
            ));
        }
        Ok(())
    }

    /// Checks the noise argument against `needs_noise` and the sample shape.
    pub fn check_noise<'a>(
        kind: SchedulerKind,
        needs: bool,
        noise: Option<&'a Tensor>,
        sample: &Tensor,
    ) -> Result<Option<&'a Tensor>> {
        match (needs, noise) {
            (true, None) => Err(Error::value(
                "noise",
                format!("the {kind} scheduler needs a noise tensor for each step"),
            )),
            (false, Some(_)) => Err(Error::value(
                "noise",
                format!("the {kind} scheduler takes no noise in this configuration"),
            )),
            (true, Some(n)) => {
                check_same_shape("noise", n, sample)?;
                Ok(Some(n))
            }
            (false, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
