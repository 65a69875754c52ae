//! Speed measurements on real-size architectures with seeded random weights.

use std::time::Instant;

use candle_core::{DType, Device};

use crate::models::stable_diffusion::RandomArch;
use crate::noise::{NoiseGen, Stream};
use crate::Result;

/// One timed workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    /// What was timed, e.g. "unet_step_cfg" or "vae_decode".
    pub workload: String,
    /// Image side in pixels.
    pub size: usize,
    /// Median seconds over the timed repetitions (images per second for CLIP throughput).
    pub seconds: f64,
    /// All timed repetitions, in seconds.
    pub runs: Vec<f64>,
    /// Peak resident memory of the process during this workload, in bytes (Linux only).
    pub peak_rss_bytes: Option<u64>,
    /// Guided step time over the unguided step time, for guidance workloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_unguided: Option<f64>,
}

impl Measurement {
    /// A timed workload: the median of `runs`, and the process's peak memory since the last
    /// [`reset_peak_rss`].
    fn from_runs(workload: impl Into<String>, size: usize, mut runs: Vec<f64>) -> Self {
        Measurement {
            workload: workload.into(),
            size,
            seconds: median(&mut runs),
            runs,
            peak_rss_bytes: peak_rss_bytes(),
            ratio_to_unguided: None,
        }
    }
}

/// Peak resident set size since the last reset (Linux VmHWM).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak RSS counter so each workload reports its own peak (Linux >= 4.0).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<F: FnMut() -> Result<()>>(reps: usize, device: &Device, mut f: F) -> Result<Vec<f64>> {
    f()?; // warm-up: allocations, kernel loading
    device.synchronize()?;
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        runs.push(t.elapsed().as_secs_f64());
    }
    Ok(runs)
}

/// Random CFG-batch (2 rows) conditioning of the shapes the model's UNet takes.
fn random_conditioning(
    model: &crate::models::stable_diffusion::SdModel,
    g: &mut NoiseGen,
    dtype: DType,
) -> Result<crate::models::stable_diffusion::Conditioning> {
    let mut draw = |shape: &[usize]| -> Result<candle_core::Tensor> {
        Ok(g.randn(shape)?.to_dtype(dtype)?.to_device(&model.device)?)
    };
    let context = draw(&[2, 77, model.unet_spec.cross_attention_dim])?;
    let pooled = match model.unet_spec.added_cond {
        Some(a) => Some(draw(&[2, a.pooled_dim()])?),
        None => None,
    };
    Ok(crate::models::stable_diffusion::Conditioning { context, pooled })
}

/// Which parts to time.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub arch: RandomArch,
    pub sizes: Vec<usize>,
    pub reps: usize,
    pub unet: bool,
    pub vae: bool,
    pub device: Device,
    pub dtype: DType,
}

/// Times one UNet step with classifier-free guidance (batch 2) and one VAE decode per size,
/// calling `report` after each measurement.
pub fn run(plan: &BenchPlan, mut report: impl FnMut(&Measurement)) -> Result<Vec<Measurement>> {
    let model = crate::models::stable_diffusion::SdModel::random(
        plan.arch,
        0,
        &crate::models::stable_diffusion::LoadOptions {
            device: plan.device.clone(),
            dtype: plan.dtype,
            hub: crate::models::hub::HubOptions::from_env(),
        },
    )?;
    let mut out = Vec::new();
    let f = model.vae_spec.scale_factor;
    let c = model.vae_spec.config.latent_channels;
    for &size in &plan.sizes {
        let lat = size / f;
        let mut g = NoiseGen::new(0, Stream::InitialLatents);
        if plan.unet {
            reset_peak_rss();
            let x = g
                .randn(&[2, c, lat, lat])?
                .to_dtype(plan.dtype)?
                .to_device(&plan.device)?;
            let ctx = random_conditioning(&model, &mut g, plan.dtype)?;
            let runs = time(plan.reps, &plan.device, || {
                model.predict(&x, 500.0, &ctx)?;
                Ok(())
            })?;
            let m = Measurement::from_runs("unet_step_cfg_batch2", size, runs);
            report(&m);
            out.push(m);
        }
        if plan.vae {
            reset_peak_rss();
            let z = g.randn(&[1, c, lat, lat])?.to_device(&plan.device)?;
            let runs = time(plan.reps, &plan.device, || {
                model.decode(&z)?;
                Ok(())
            })?;
            let m = Measurement::from_runs("vae_decode", size, runs);
            report(&m);
            out.push(m);
        }
    }
    Ok(out)
}

/// Published CLIP architectures for throughput measurements with random weights.
pub fn clip_config_json(arch: &str) -> Result<&'static str> {
    match arch {
        "vit-b32" => Ok(
            r#"{"projection_dim":512,"text_config":{"hidden_size":512,"intermediate_size":2048,"num_attention_heads":8,"num_hidden_layers":12},"vision_config":{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,"num_hidden_layers":12,"image_size":224,"patch_size":32}}"#,
        ),
        "vit-l14" => Ok(
            r#"{"projection_dim":768,"text_config":{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,"num_hidden_layers":12},"vision_config":{"hidden_size":1024,"intermediate_size":4096,"num_attention_heads":16,"num_hidden_layers":24,"image_size":224,"patch_size":14}}"#,
        ),
        other => Err(crate::Error::value(
            "clip-arch",
            format!("unknown `{other}`: expected vit-b32 or vit-l14"),
        )),
    }
}

/// Images per second of CLIP image embedding (preprocessed pixels in, projected embeddings
/// out) for a published architecture with random weights, at `batch` images per forward.
pub fn clip_throughput(
    arch: &str,
    batch: usize,
    reps: usize,
    device: &Device,
    dtype: DType,
) -> Result<Measurement> {
    use crate::models::clip::{ClipConfig, ClipModel, NormMode};
    let path = std::path::Path::new(arch);
    let cfg = ClipConfig::from_json(
        &serde_json::from_str(clip_config_json(arch)?)
            .map_err(|e| crate::Error::Msg(e.to_string()))?,
        path,
    )?;
    let vb = crate::models::weights::RandomWeights::new(0).into_var_builder(dtype, device);
    let model = ClipModel::new(vb, &cfg, NormMode::Fused)?;
    let s = cfg.vision.image_size;
    reset_peak_rss();
    let x = NoiseGen::new(0, Stream::InitialLatents)
        .randn(&[batch, 3, s, s])?
        .to_dtype(dtype)?
        .to_device(device)?;
    let mut runs = time(reps, device, || {
        model.embed_image(&x)?;
        Ok(())
    })?;
    let sec = median(&mut runs);
    Ok(Measurement {
        workload: format!("clip_{arch}_images_per_s_batch{batch}"),
        size: s,
        seconds: batch as f64 / sec,
        runs,
        peak_rss_bytes: peak_rss_bytes(),
        ratio_to_unguided: None,
    })
}

/// What `bench --parts guidance` times.
#[derive(Debug, Clone)]
pub struct GuidanceBenchPlan {
    pub arch: RandomArch,
    pub sizes: Vec<usize>,
    pub reps: usize,
    /// Guide CLIP architecture (`vit-b32` or `vit-l14`), random weights.
    pub clip_arch: String,
    pub cutouts: usize,
    pub decoders: Vec<crate::guidance::DecoderKind>,
    pub device: Device,
    pub dtype: DType,
}

/// Times a sampling step without guidance (the UNet with classifier-free guidance, batch 2)
/// and with CLIP guidance through each decoder (the same UNet call plus the guidance
/// gradient: decode, cutouts, CLIP forward and backward), all with random weights.
pub fn guidance(
    plan: &GuidanceBenchPlan,
    mut report: impl FnMut(&Measurement),
) -> Result<Vec<Measurement>> {
    use crate::guidance::{
        DecoderKind, GuidanceConfig, GuidanceDecoder, Guide, GuideClip, LinearDecoder, TextTarget,
    };
    use crate::models::clip::{ClipConfig, ClipModel, NormMode};
    use crate::models::stable_diffusion::{LoadOptions, SdModel};
    use crate::models::taesd::{TaesdConfig, TaesdDecoder, SD_TAESD_CONFIG};
    use crate::models::weights::RandomWeights;

    let model = SdModel::random(
        plan.arch,
        0,
        &LoadOptions {
            device: plan.device.clone(),
            dtype: plan.dtype,
            hub: crate::models::hub::HubOptions::from_env(),
        },
    )?;
    let clip_cfg = ClipConfig::from_json(
        &serde_json::from_str(clip_config_json(&plan.clip_arch)?)
            .map_err(|e| crate::Error::Msg(e.to_string()))?,
        std::path::Path::new(&plan.clip_arch),
    )?;
    let random = |seed| RandomWeights::new(seed).into_var_builder(plan.dtype, &plan.device);
    let config = GuidanceConfig {
        clip: Some(format!("random:{}", plan.clip_arch)),
        prompts: vec![TextTarget {
            text: "target".into(),
            weight: 1.0,
        }],
        cutouts: plan.cutouts,
        // Random weights can overflow to NaN; the whole gradient is computed before the check,
        // so skipping keeps the timing honest.
        on_nonfinite: crate::guidance::OnNonFinite::Skip,
        ..Default::default()
    };
    let clip = GuideClip {
        model: ClipModel::new(random(3), &clip_cfg, NormMode::Differentiable)?,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_55, 0.261_302_6, 0.275_777_1],
        id: format!("random:{}", plan.clip_arch),
        files: Vec::new(),
    };
    let text = crate::models::clip::normalize(
        &NoiseGen::new(1, Stream::Guidance)
            .randn(&[1, clip_cfg.projection_dim])?
            .to_device(&plan.device)?,
    )?;
    let f = model.vae_spec.scale_factor;
    let c = model.vae_spec.config.latent_channels;
    let mut out = Vec::new();
    for &size in &plan.sizes {
        let lat = size / f;
        let mut g = NoiseGen::new(0, Stream::InitialLatents);
        let x = g
            .randn(&[2, c, lat, lat])?
            .to_dtype(plan.dtype)?
            .to_device(&plan.device)?;
        let ctx = random_conditioning(&model, &mut g, plan.dtype)?;
        let x0 = g.randn(&[1, c, lat, lat])?.to_device(&plan.device)?;
        reset_peak_rss();
        let runs = time(plan.reps, &plan.device, || {
            model.predict(&x, 500.0, &ctx)?;
            Ok(())
        })?;
        let m = Measurement::from_runs("step_unguided", size, runs);
        let unguided = m.seconds;
        report(&m);
        out.push(m);
        for &kind in &plan.decoders {
            let decoder = match kind {
                DecoderKind::Vae => GuidanceDecoder::Vae,
                DecoderKind::Taesd => {
                    let cfg =
                        TaesdConfig::from_json_str(SD_TAESD_CONFIG, std::path::Path::new("taesd"))?;
                    GuidanceDecoder::Taesd(Box::new(TaesdDecoder::new(random(7), &cfg)?))
                }
                DecoderKind::Linear => GuidanceDecoder::Linear(LinearDecoder::fit(&model)?),
            };
            let guide = Guide::new(
                GuidanceConfig {
                    decoder: kind,
                    ..config.clone()
                },
                &model,
                Some(clip.clone()),
                Some(text.clone()),
                decoder,
                0,
            )?;
            let mut rng = NoiseGen::new(0, Stream::Guidance);
            reset_peak_rss();
            let runs = time(plan.reps, &plan.device, || {
                model.predict(&x, 500.0, &ctx)?;
                guide.gradient(&model, &x0, &mut rng, None, 0)?;
                Ok(())
            })?;
            let name = format!("{kind}_{}_cutouts{}", plan.clip_arch, plan.cutouts);
            let mut m = Measurement::from_runs(format!("step_guided_{name}"), size, runs);
            m.ratio_to_unguided = Some(m.seconds / unguided);
            report(&m);
            out.push(m);
            // The guidance alone, without the UNet call whose time dominates the step.
            let runs = time(plan.reps, &plan.device, || {
                guide.gradient(&model, &x0, &mut rng, None, 0)?;
                Ok(())
            })?;
            let m = Measurement::from_runs(format!("guidance_only_{name}"), size, runs);
            report(&m);
            out.push(m);
        }
    }
    Ok(out)
}
