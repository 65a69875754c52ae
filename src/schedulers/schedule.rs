//! The scalar arithmetic the schedulers share, written to reproduce diffusers' numbers: which
//! quantities torch holds as float32 (betas, alphas, alphas_cumprod, sigmas), where numpy works
//! in float64 (linspace, arange, interp) and how it rounds (half to even).

use super::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU kernel computes it:
/// a float32 step, the first half counted up from `start`, the second half down from `end`.
/// torch's x86-64 builds compile `start + step * i` with fused multiply-add (checked against
/// torch 2.15: all 1000 SD betas then agree bit for bit; without the fusion ~15-20% differ by
/// an ulp).
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The Nichol & Dhariwal cosine alpha_bar, exactly as diffusers' `betas_for_alpha_bar` writes
/// it in Python floats.
fn cosine_alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
        .cos()
        .powi(2)
}

/// diffusers' `betas_for_alpha_bar(n)` (cosine, max_beta 0.999), computed in float64 and stored
/// as float32. `i / n` is a true division here (Python 3), so every beta is finite.
pub fn squaredcos_cap_v2_betas(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            let beta = 1.0 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1);
            beta.min(0.999) as f32
        })
        .collect()
}

/// The float32 betas of a config (before any zero-SNR rescaling).
pub fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps;
    if let Some(trained) = &config.trained_betas {
        if trained.len() != n {
            return Err(Error::value(
                "scheduler config",
                format!(
                    "trained_betas has {} values but num_train_timesteps is {n}",
                    trained.len()
                ),
            ));
        }
        return Ok(trained.iter().map(|&b| b as f32).collect());
    }
    Ok(match config.beta_schedule {
        BetaSchedule::Linear => {
            torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
        }
        BetaSchedule::ScaledLinear => torch_linspace_f32(
            config.beta_start.sqrt() as f32,
            config.beta_end.sqrt() as f32,
            n,
        )
        .into_iter()
        .map(|b| b * b)
        .collect(),
        BetaSchedule::SquaredcosCapV2 => squaredcos_cap_v2_betas(n),
    })
}

/// `torch.cumprod` of a float32 tensor on the CPU: accumulated in float64, each output rounded
/// to float32.
pub fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `1.0 - betas` in float32.
fn one_minus(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&b| 1.0f32 - b).collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1) in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod_f32(&one_minus(betas));
    let mut sqrt: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let first = sqrt[0];
    let last = *sqrt.last().expect("non-empty betas");
    let scale = first / (first - last);
    for s in sqrt.iter_mut() {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut alphas = Vec::with_capacity(bar.len());
    alphas.push(bar[0]);
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    one_minus(&alphas)
}

/// The float32 `alphas_cumprod` of a config. `zero_snr_floor` is true for the schedulers that
/// set `alphas_cumprod[-1] = 2**-24` after zero-SNR rescaling (Euler, Euler a, DPM; not DDIM).
pub fn alphas_cumprod(config: &SchedulerConfig, zero_snr_floor: bool) -> Result<Vec<f32>> {
    let mut betas = betas(config)?;
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut ac = cumprod_f32(&one_minus(&betas));
    if config.rescale_betas_zero_snr && zero_snr_floor {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(ac)
}

/// The training sigmas `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, ascending
/// with the training timestep.
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0f32 - a) / a).sqrt())
        .collect()
}

/// numpy's round (`np.round`, `ndarray.round`): half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` in float64 (endpoint included).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for float64 values: its length is
/// `ceil((stop - start) / step)` and its values are `start + i * delta` with
/// `delta = (start + step) - start`, as numpy's fill loop computes them.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64.
pub fn np_interp_unit_grid(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    let y = slope * (x - j as f64) + fp[j];
    if y.is_nan() {
        slope * (x - (j + 1) as f64) + fp[j + 1]
    } else {
        y
    }
}

/// Inference timesteps of the DDIM, Euler and Euler-ancestral schedulers before their final
/// dtype conversion (DDIM: int64, Euler: float32), descending.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let n_train = num_train_timesteps;
    let n = num_inference_steps;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = np_linspace(0.0, (n_train - 1) as f64, n);
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) - 1.0)
                .collect()
        }
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`,
/// interpolating linearly in log-sigma. `log_sigmas` are the float32 logs of the training
/// sigmas (ascending).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // cumsum(dists >= 0).argmax(): the last index whose log-sigma is <= log_sigma (0 if none)
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_count = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best_count {
            best_count = count;
            best = i;
        }
    }
    let low_idx = best.min(n.saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_convert_to_karras` (rho 7) in float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// The largest value of a float32 list (`tensor.max()`).
pub fn max_f32(values: &[f32]) -> f32 {
    values.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_linspace_matches_endpoints() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert!((v[500] as f64 - (0.0001 + 500.0 * (0.02 - 0.0001) / 999.0)).abs() < 1e-8);
    }

    #[test]
    fn numpy_arange_and_round() {
        // np.arange(1000, 0, -1000/3) -> [1000, 666.67, 333.33]
        let a = np_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(a.len(), 3);
        assert_eq!(np_round(0.5), 0.0);
        assert_eq!(np_round(1.5), 2.0);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
    }

    #[test]
    fn interp_on_unit_grid() {
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(np_interp_unit_grid(0.0, &fp), 1.0);
        assert_eq!(np_interp_unit_grid(0.5, &fp), 2.0);
        assert_eq!(np_interp_unit_grid(1.25, &fp), 4.0);
        assert_eq!(np_interp_unit_grid(2.0, &fp), 7.0);
        assert_eq!(np_interp_unit_grid(5.0, &fp), 7.0);
    }

    #[test]
    fn sigma_to_t_inverts_training_sigmas() {
        let config = SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..Default::default()
        };
        let ac = alphas_cumprod(&config, true).unwrap();
        let sigmas = train_sigmas(&ac);
        let logs: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 10, 500, 998, 999] {
            let got = sigma_to_t(sigmas[t] as f64, &logs);
            assert!((got - t as f64).abs() < 1e-3, "t={t} got {got}");
        }
    }
}
