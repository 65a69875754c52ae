//! `scheduler_config.json` as diffusers writes it.
//!
//! Every key diffusers' DDIM, Euler, Euler-ancestral and DPM-Solver multistep schedulers accept is
//! parsed here; any other key is ignored (diffusers configs carry many). A missing key (or `null`)
//! takes diffusers' default for that key. The one default that differs between the four
//! diffusers classes, `timestep_spacing`, stays `None` when the file does not give it: diffusers
//! records such keys as "default values used" and drops them when one scheduler class is built
//! from another's config, so each scheduler then falls back to its own class default
//! (`leading` for DDIM, `linspace` for the other three).

use std::borrow::Cow;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// How the training betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end)` in float32.
    #[serde(rename = "linear")]
    Linear,
    /// `torch.linspace(sqrt(beta_start), sqrt(beta_end)) ** 2` in float32 (Stable Diffusion).
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// The Nichol & Dhariwal cosine schedule, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    /// The added noise.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (SD 2.x 768 models).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample itself.
    #[serde(rename = "sample")]
    Sample,
}

/// How the inference timesteps are picked among the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "linspace")]
    Linspace,
    #[serde(rename = "trailing")]
    Trailing,
}

/// Euler's `interpolation_type`: how the inference sigmas are taken from the training sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InterpolationType {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "log_linear")]
    LogLinear,
}

/// The last sigma of Euler's and DPM-Solver's schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FinalSigmasType {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// Euler's `timestep_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepType {
    #[serde(rename = "discrete")]
    Discrete,
    #[serde(rename = "continuous")]
    Continuous,
}

/// DPM-Solver's `algorithm_type` (only `dpmsolver++` is implemented, as DPM++ 2M).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AlgorithmType {
    #[serde(rename = "dpmsolver++", alias = "deis")]
    DpmSolverPlusPlus,
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

/// DPM-Solver's `solver_type` for the second-order update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SolverType {
    #[serde(rename = "midpoint", alias = "logrho", alias = "bh1", alias = "bh2")]
    Midpoint,
    #[serde(rename = "heun")]
    Heun,
}

/// `scheduler_config.json` as diffusers writes it; unknown keys are ignored and missing keys
/// take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `None` when the file does not say: each scheduler then uses its diffusers class default
    /// (see [`SchedulerConfig::timestep_spacing_or`]).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// DDIM: the "previous" alpha_bar past the last step is 1 (true) or alpha_bar\[0\] (false).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub rescale_betas_zero_snr: bool,
    /// Dynamic thresholding (DDIM, DPM); not supported, `build` rejects `true`.
    pub thresholding: bool,
    /// Euler only.
    pub interpolation_type: InterpolationType,
    /// Euler and DPM: Karras et al. sigmas.
    pub use_karras_sigmas: bool,
    /// Euler and DPM; not supported, `build` rejects `true`.
    pub use_exponential_sigmas: bool,
    /// Euler and DPM; not supported, `build` rejects `true`.
    pub use_beta_sigmas: bool,
    /// DPM; not supported, `build` rejects `true`.
    pub use_lu_lambdas: bool,
    /// DPM; not supported, `build` rejects `true`.
    pub use_flow_sigmas: bool,
    /// Euler and DPM: overrides for the Karras sigma range.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Euler only.
    pub timestep_type: TimestepType,
    /// Euler and DPM.
    pub final_sigmas_type: FinalSigmasType,
    /// DPM: 1 or 2 are supported (DPM++ 2M uses 2).
    pub solver_order: usize,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
    /// DPM: `learned`/`learned_range` models (DeepFloyd IF) are not supported.
    pub variance_type: Option<String>,
    /// `_class_name`: the diffusers scheduler class the model ships with (what `auto` picks).
    pub class_name: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            rescale_betas_zero_snr: false,
            thresholding: false,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            class_name: None,
        }
    }
}

impl SchedulerConfig {
    /// Reads and parses a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `scheduler_config.json`; `origin` names the file in errors.
    pub fn from_json_str(s: &str, origin: &Path) -> Result<Self> {
        let text = quote_nonfinite_json(s);
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(origin, format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(origin, "expected a JSON object"))?;
        Self::from_json_map(obj, origin)
    }

    /// Parses an already-decoded JSON object (e.g. a config embedded in another file).
    pub fn from_json_map(obj: &Map<String, Value>, origin: &Path) -> Result<Self> {
        let f = Fields { obj, origin };
        let d = SchedulerConfig::default();
        let config = SchedulerConfig {
            num_train_timesteps: f
                .usize("num_train_timesteps")?
                .unwrap_or(d.num_train_timesteps),
            beta_start: f.f64("beta_start")?.unwrap_or(d.beta_start),
            beta_end: f.f64("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: f
                .choice(
                    "beta_schedule",
                    &[
                        ("linear", BetaSchedule::Linear),
                        ("scaled_linear", BetaSchedule::ScaledLinear),
                        ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                    ],
                )?
                .unwrap_or(d.beta_schedule),
            trained_betas: f.f64_list("trained_betas")?,
            prediction_type: f
                .choice(
                    "prediction_type",
                    &[
                        ("epsilon", PredictionType::Epsilon),
                        ("v_prediction", PredictionType::VPrediction),
                        ("sample", PredictionType::Sample),
                    ],
                )?
                .unwrap_or(d.prediction_type),
            timestep_spacing: f.choice(
                "timestep_spacing",
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("linspace", TimestepSpacing::Linspace),
                    ("trailing", TimestepSpacing::Trailing),
                ],
            )?,
            steps_offset: f.usize("steps_offset")?.unwrap_or(d.steps_offset),
            set_alpha_to_one: f.bool("set_alpha_to_one")?.unwrap_or(d.set_alpha_to_one),
            // DDIM's default (true) comes from pixel-space DDPMs; clamping latents to +-1 washes
            // images out. A model that ships another class (PNDM, Euler, ...) never clamps, so a
            // config of that class without the key does not clamp when read for DDIM either.
            clip_sample: f.bool("clip_sample")?.unwrap_or(
                d.clip_sample
                    && f.string("_class_name")?
                        .is_none_or(|c| c == "DDIMScheduler"),
            ),
            clip_sample_range: f.f64("clip_sample_range")?.unwrap_or(d.clip_sample_range),
            rescale_betas_zero_snr: f
                .bool("rescale_betas_zero_snr")?
                .unwrap_or(d.rescale_betas_zero_snr),
            thresholding: f.bool("thresholding")?.unwrap_or(d.thresholding),
            interpolation_type: f
                .choice(
                    "interpolation_type",
                    &[
                        ("linear", InterpolationType::Linear),
                        ("log_linear", InterpolationType::LogLinear),
                    ],
                )?
                .unwrap_or(d.interpolation_type),
            use_karras_sigmas: f.bool("use_karras_sigmas")?.unwrap_or(false),
            use_exponential_sigmas: f.bool("use_exponential_sigmas")?.unwrap_or(false),
            use_beta_sigmas: f.bool("use_beta_sigmas")?.unwrap_or(false),
            use_lu_lambdas: f.bool("use_lu_lambdas")?.unwrap_or(false),
            use_flow_sigmas: f.bool("use_flow_sigmas")?.unwrap_or(false),
            sigma_min: f.f64("sigma_min")?,
            sigma_max: f.f64("sigma_max")?,
            timestep_type: f
                .choice(
                    "timestep_type",
                    &[
                        ("discrete", TimestepType::Discrete),
                        ("continuous", TimestepType::Continuous),
                    ],
                )?
                .unwrap_or(d.timestep_type),
            final_sigmas_type: f
                .choice(
                    "final_sigmas_type",
                    &[
                        ("zero", FinalSigmasType::Zero),
                        ("sigma_min", FinalSigmasType::SigmaMin),
                    ],
                )?
                .unwrap_or(d.final_sigmas_type),
            solver_order: f.usize("solver_order")?.unwrap_or(d.solver_order),
            algorithm_type: f
                .choice(
                    "algorithm_type",
                    &[
                        ("dpmsolver++", AlgorithmType::DpmSolverPlusPlus),
                        ("dpmsolver", AlgorithmType::DpmSolver),
                        ("sde-dpmsolver++", AlgorithmType::SdeDpmSolverPlusPlus),
                        ("sde-dpmsolver", AlgorithmType::SdeDpmSolver),
                        // diffusers maps `deis` to `dpmsolver++` in DPMSolverMultistepScheduler
                        ("deis", AlgorithmType::DpmSolverPlusPlus),
                    ],
                )?
                .unwrap_or(d.algorithm_type),
            solver_type: f
                .choice(
                    "solver_type",
                    &[
                        ("midpoint", SolverType::Midpoint),
                        ("heun", SolverType::Heun),
                        // diffusers maps the UniPC/DEIS solver types to `midpoint`
                        ("logrho", SolverType::Midpoint),
                        ("bh1", SolverType::Midpoint),
                        ("bh2", SolverType::Midpoint),
                    ],
                )?
                .unwrap_or(d.solver_type),
            lower_order_final: f.bool("lower_order_final")?.unwrap_or(d.lower_order_final),
            euler_at_final: f.bool("euler_at_final")?.unwrap_or(d.euler_at_final),
            lambda_min_clipped: f
                .f64_nonfinite("lambda_min_clipped")?
                .unwrap_or(d.lambda_min_clipped),
            variance_type: f.string("variance_type")?,
            class_name: f.string("_class_name")?,
        };
        if config.num_train_timesteps == 0 {
            return Err(Error::field(
                origin,
                "num_train_timesteps",
                "must be at least 1",
            ));
        }
        // A beta outside (0, 1) makes some alpha_bar 0 or negative: the sampler divides by
        // it or takes its root, and the run ends in NaN with no hint of the cause.
        let beta_ok = |b: f64| b > 0.0 && b < 1.0;
        for (key, b) in [
            ("beta_start", config.beta_start),
            ("beta_end", config.beta_end),
        ] {
            if !beta_ok(b) {
                return Err(Error::field(
                    origin,
                    key,
                    format!("{b}: expected a value in (0, 1)"),
                ));
            }
        }
        for (key, sigma) in [
            ("sigma_min", config.sigma_min),
            ("sigma_max", config.sigma_max),
        ] {
            if let Some(x) = sigma.filter(|x| *x <= 0.0) {
                return Err(Error::field(
                    origin,
                    key,
                    format!("{x}: expected a positive number"),
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (config.sigma_min, config.sigma_max) {
            if lo >= hi {
                return Err(Error::field(
                    origin,
                    "sigma_min",
                    format!("{lo} is not below sigma_max {hi}"),
                ));
            }
        }
        if let Some(betas) = &config.trained_betas {
            if let Some((i, b)) = betas.iter().enumerate().find(|(_, &b)| !beta_ok(b)) {
                return Err(Error::field(
                    origin,
                    "trained_betas",
                    format!("value {i} is {b}: expected values in (0, 1)"),
                ));
            }
            if betas.len() != config.num_train_timesteps {
                return Err(Error::field(
                    origin,
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {}",
                        betas.len(),
                        config.num_train_timesteps
                    ),
                ));
            }
        }
        Ok(config)
    }

    /// The timestep spacing the file gives, or `default` (the scheduler class default).
    pub fn timestep_spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}

/// Typed access to the fields of a JSON object, with errors naming file and field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a Path,
}

impl Fields<'_> {
    /// The value of `key`, or None when it is absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, message: String) -> Error {
        Error::field(self.origin, key, message)
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if let Some(u) = v.as_u64() {
            return Ok(Some(u as usize));
        }
        // Python writes integral floats such as `1000.0` in some converted configs.
        if let Some(x) = v.as_f64() {
            if x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64 {
                return Ok(Some(x as usize));
            }
        }
        Err(self.err(key, format!("expected a non-negative integer, got {v}")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_f64()
            .map(Some)
            .ok_or_else(|| self.err(key, format!("expected a number, got {v}")))
    }

    /// A number that may also be `Infinity`, `-Infinity` or `NaN` (as Python's json writes them).
    fn f64_nonfinite(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if let Some(x) = v.as_f64() {
            return Ok(Some(x));
        }
        v.as_str()
            .and_then(parse_nonfinite)
            .map(Some)
            .ok_or_else(|| self.err(key, format!("expected a number, got {v}")))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.err(key, format!("expected true or false, got {v}")))
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| self.err(key, format!("expected a string, got {v}")))
    }

    fn f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.err(key, format!("expected a list of numbers or null, got {v}")))?;
        items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .ok_or_else(|| self.err(key, format!("item {i}: expected a number, got {x}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// One of a fixed set of strings; the error lists the accepted ones.
    fn choice<T: Copy>(&self, key: &str, accepted: &[(&str, T)]) -> Result<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = accepted
            .iter()
            .map(|(name, _)| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let s = v
            .as_str()
            .ok_or_else(|| self.err(key, format!("expected a string (one of {list}), got {v}")))?;
        accepted
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, t)| Some(*t))
            .ok_or_else(|| self.err(key, format!("unknown value `{s}`: expected one of {list}")))
    }
}

/// A non-finite float written as a string: `Infinity`/`-Infinity`/`NaN` (Python's json) or
/// `inf`/`-inf`/`nan` (Python's `str`), in any case.
pub fn parse_nonfinite(s: &str) -> Option<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (neg, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(&t)),
    };
    let x = match body {
        "inf" | "infinity" => f64::INFINITY,
        "nan" => f64::NAN,
        _ => return None,
    };
    Some(if neg { -x } else { x })
}

/// Python's `json` module writes non-finite floats as the bare tokens `NaN`, `Infinity` and
/// `-Infinity`, which are not JSON. This turns them (outside strings) into the strings
/// `"NaN"`, `"Infinity"` and `"-Infinity"` so that a standard parser accepts the text.
pub fn quote_nonfinite_json(s: &str) -> Cow<'_, str> {
    if !s.contains("NaN") && !s.contains("Infinity") {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    Cow::Owned(out)
}
