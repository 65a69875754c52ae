//! The sampling loop: text-to-image and img2img with classifier-free guidance, any scheduler.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::guidance::{shift_prediction, Guide};
use crate::models::stable_diffusion::{Conditioning, SdModel};
use crate::noise::{NoiseGen, Stream};
use crate::progress::Progress;
use crate::schedulers::{self, SchedulerKind, SchedulerOptions};
use crate::{Error, Result};

/// Everything one generation call needs besides the model.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; at or below 1 the unconditional pass is skipped.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// DDIM eta (0 = deterministic DDIM).
    pub eta: f64,
    /// Seed of the first image; image i uses seed + i.
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub num_images: usize,
    /// img2img: the init image (N x 3 x H x W in [-1, 1]) and how much of it to repaint.
    pub init_image: Option<Tensor>,
    pub strength: f64,
    /// Exact initial noise (N x C x h x w), overriding the seed's noise.
    pub latents: Option<Tensor>,
    /// CLIP / style guidance; None (or an inactive config) samples unguided.
    pub guide: Option<std::sync::Arc<Guide>>,
}

/// One finished image.
pub struct Generated {
    /// Index within the call.
    pub index: usize,
    /// The seed this image's noise came from.
    pub seed: u64,
    /// Decoded image, 3 x H x W f32 in [0, 1], on the CPU.
    pub image: Tensor,
    /// Final latents before VAE decode, 1 x C x h x w f32, on the CPU.
    pub latents: Tensor,
    /// Seconds spent per phase.
    pub timings: BTreeMap<String, f64>,
    /// Timesteps that were run.
    pub timesteps: Vec<f64>,
    /// Guided steps: (step within the run, weighted guidance loss), in order; a step whose
    /// gradient was not finite and was skipped is recorded with its loss too.
    pub guidance_losses: Vec<(usize, f64)>,
    /// Guided steps skipped because their gradient was NaN or infinite.
    pub guidance_skipped: usize,
}

/// Reads `--latents FILE.safetensors`: tensor `latents`, N x C x h x w.
pub fn load_latents(path: &Path, expect: (usize, usize, usize)) -> Result<Tensor> {
    if path.is_dir() {
        return Err(Error::file(
            path,
            "is a folder; expected a safetensors file",
        ));
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::file(path, format!("not a readable safetensors file: {e}")))?;
    let t = tensors
        .get("latents")
        .ok_or_else(|| Error::file(path, "has no tensor named `latents`"))?;
    let dims = t.dims();
    let (c, h, w) = expect;
    if dims.len() != 4 || dims[1..] != [c, h, w] || dims[0] == 0 {
        return Err(Error::field(
            path,
            "latents",
            format!("shape {dims:?}, expected N x {c} x {h} x {w} for this model and size, N >= 1"),
        ));
    }
    let t = t.to_dtype(DType::F32)?;
    if !t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Err(Error::field(
            path,
            "latents",
            "holds NaN or infinite values",
        ));
    }
    Ok(t)
}

/// Checks options against the model before any work starts.
pub fn validate(model: &SdModel, opts: &GenerateOptions) -> Result<(usize, usize, usize)> {
    check_counts(opts.steps, opts.num_images, opts.guidance_scale, opts.eta)?;
    let shape = model.latent_shape(opts.width, opts.height)?;
    if let Some(l) = &opts.latents {
        if l.dim(0)? < opts.num_images {
            return Err(Error::value(
                "latents",
                format!(
                    "holds {} rows but {} images were asked for",
                    l.dim(0)?,
                    opts.num_images
                ),
            ));
        }
    }
    if let Some(img) = &opts.init_image {
        let (_, _, h, w) = img.dims4()?;
        if (w, h) != (opts.width, opts.height) {
            return Err(Error::value(
                "init-image",
                format!(
                    "is {w}x{h}, but the images are {}x{} (width x height); the init image is \
                     not resized: resize it or leave the size unset",
                    opts.width, opts.height
                ),
            ));
        }
        schedulers::img2img_start_index(opts.steps, opts.strength)?;
    }
    Ok(shape)
}

/// The checks that need no model (steps, image count, CFG scale, DDIM eta), so a command or
/// a recipe can make them before the slow model load.
pub fn check_counts(steps: usize, num_images: usize, guidance_scale: f64, eta: f64) -> Result<()> {
    if steps == 0 {
        return Err(Error::value("steps", "0: expected at least 1"));
    }
    if num_images == 0 {
        return Err(Error::value("num-images", "0: expected at least 1"));
    }
    if !guidance_scale.is_finite() || guidance_scale < 0.0 {
        return Err(Error::value(
            "guidance-scale",
            format!("{guidance_scale}: expected a finite number >= 0"),
        ));
    }
    if !eta.is_finite() || eta < 0.0 {
        return Err(Error::value(
            "eta",
            format!("{eta}: expected a finite number >= 0"),
        ));
    }
    Ok(())
}

/// Runs the sampling loop, handing each finished image to `on_image` as soon as it exists.
pub fn generate(
    model: &SdModel,
    opts: &GenerateOptions,
    progress: &Progress,
    mut on_image: impl FnMut(Generated) -> Result<()>,
) -> Result<()> {
    let (c, h, w) = validate(model, opts)?;
    crate::resources::check(model, opts)?;
    let dev = &model.device;
    let cfg = opts.guidance_scale > 1.0;

    let t0 = Instant::now();
    let cond = model.encode_prompt(&opts.prompt)?;
    let context = if cfg {
        let uncond = model.encode_negative(&opts.negative_prompt, &cond)?;
        // diffusers' order: unconditional first.
        Conditioning::cat(&[&uncond, &cond])?
    } else {
        cond
    };
    let text_s = t0.elapsed().as_secs_f64();

    let start = match &opts.init_image {
        Some(_) => schedulers::img2img_start_index(opts.steps, opts.strength)?,
        None => 0,
    };

    for index in 0..opts.num_images {
        let seed = opts.seed.wrapping_add(index as u64);
        let mut timings = BTreeMap::new();
        timings.insert("text_encoder".to_string(), text_s);
        let mut scheduler = schedulers::build(
            opts.scheduler,
            &model.scheduler_config,
            opts.steps,
            &SchedulerOptions { eta: opts.eta },
        )?;
        let timesteps = scheduler.timesteps().to_vec();

        let noise = match &opts.latents {
            Some(l) => l.narrow(0, index, 1)?,
            None => NoiseGen::new(seed, Stream::InitialLatents).randn(&[1, c, h, w])?,
        }
        .to_device(dev)?;
        let mut latents = match &opts.init_image {
            Some(img) => {
                let t = Instant::now();
                let row = img
                    .narrow(0, index.min(img.dim(0)? - 1), 1)?
                    .to_device(dev)?;
                let init = model.encode_mean(&row)?;
                timings.insert("vae_encode".into(), t.elapsed().as_secs_f64());
                scheduler.add_noise(&init, &noise, start)?
            }
            None => (noise * scheduler.init_noise_sigma())?,
        };

        let mut step_noise = NoiseGen::new(seed, Stream::Steps);
        let guide = opts.guide.as_deref().filter(|g| g.config.is_active());
        let guided = guide
            .map(|g| g.config.guided_steps(timesteps.len() - start))
            .unwrap_or_default();
        let mut guide_rng = NoiseGen::new(seed, Stream::Guidance);
        let content = match (&opts.init_image, guide) {
            (Some(img), Some(_)) => Some(
                img.narrow(0, index.min(img.dim(0)? - 1), 1)?
                    .to_device(dev)?
                    .affine(0.5, 0.5)?,
            ),
            _ => None,
        };
        let mut guidance_losses = Vec::new();
        let mut guidance_skipped = 0;
        let mut guidance_s = 0.0;
        let t_loop = Instant::now();
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler
                .scale_model_input(&input, i)?
                .to_dtype(model.dtype)?;
            let pred = model.predict(&input, t, &context)?.to_dtype(DType::F32)?;
            let pred = if cfg {
                let u = pred.narrow(0, 0, 1)?;
                let c = pred.narrow(0, 1, 1)?;
                (&u + ((c - &u)? * opts.guidance_scale)?)?
            } else {
                pred
            };
            let pred = match guide {
                Some(g) if guided[i - start] => {
                    let tg = Instant::now();
                    let x0 = scheduler.predict_x0(&pred, i, &latents)?;
                    let sg = g.gradient(model, &x0, &mut guide_rng, content.as_ref(), i - start)?;
                    guidance_losses.push((i - start, sg.total));
                    let out = match &sg.grad {
                        Some(grad) => shift_prediction(
                            &pred,
                            grad,
                            scheduler.prediction_type(),
                            scheduler.alpha_bar(i),
                        )?,
                        None => {
                            guidance_skipped += 1;
                            progress.warn(
                                &format!(
                                    "image {}: guidance gradient at step {} is NaN or infinite; step left unguided",
                                    index + 1,
                                    i + 1 - start
                                ),
                                serde_json::json!({"event": "guidance_skipped", "index": index, "step": i - start}),
                            );
                            pred
                        }
                    };
                    guidance_s += tg.elapsed().as_secs_f64();
                    out
                }
                _ => pred,
            };
            let n = if scheduler.needs_noise() {
                Some(step_noise.randn(latents.dims())?.to_device(dev)?)
            } else {
                None
            };
            latents = scheduler.step(&pred, i, &latents, n.as_ref())?;
            crate::interrupt::check()?;
            let step = format!("step {}/{}", i + 1 - start, timesteps.len() - start);
            progress.tick(&if opts.num_images > 1 {
                format!("image {}/{} {step}", index + 1, opts.num_images)
            } else {
                step
            });
        }
        timings.insert("denoise".into(), t_loop.elapsed().as_secs_f64());
        if guide.is_some() {
            timings.insert("guidance".into(), guidance_s);
        }
        check_finite(&latents, "final latents", model.dtype)?;

        let t = Instant::now();
        let image = model
            .decode(&latents)?
            .squeeze(0)?
            .to_device(&Device::Cpu)?;
        // Clamped to bytes, a NaN would be written as black.
        check_finite(&image, "decoded image", model.vae_dtype)?;
        timings.insert("vae_decode".into(), t.elapsed().as_secs_f64());
        on_image(Generated {
            index,
            seed,
            image,
            latents: latents.to_device(&Device::Cpu)?,
            timings,
            timesteps: timesteps[start..].to_vec(),
            guidance_losses,
            guidance_skipped,
        })?;
    }
    Ok(())
}

/// The name of a dtype as the CLI spells it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// A short, stable fingerprint of the model (from its UNet weights' SHA-256) for the web UI's
/// `Model hash` field; `random` for random-weight models.
pub fn model_hash(hashes: &BTreeMap<String, String>) -> String {
    let unet = hashes
        .iter()
        .find(|(k, _)| k.starts_with("unet/") && !k.ends_with(".json"))
        .map(|(_, v)| v.as_str());
    match unet {
        Some(h) => crate::output::short_hash(h),
        None => "random".into(),
    }
}

/// The parameters recorded with a generated image (PNG `parameters` text and sidecar),
/// including the guidance settings and per-step losses when guided.
pub fn generation_params(
    model: &SdModel,
    opts: &GenerateOptions,
    g: &Generated,
    model_hash: String,
    init_image: Option<String>,
) -> crate::output::GenerationParams {
    let mut params = crate::output::GenerationParams {
        prompt: opts.prompt.clone(),
        negative_prompt: opts.negative_prompt.clone(),
        seed: g.seed,
        steps: opts.steps as u32,
        guidance_scale: opts.guidance_scale,
        scheduler: opts.scheduler.to_string(),
        sampler: opts.scheduler.webui_name().to_string(),
        width: opts.width as u32,
        height: opts.height as u32,
        model: model.id.clone(),
        model_hash,
        dtype: dtype_name(model.dtype).into(),
        device: crate::models::device_kind(&model.device).into(),
        strength: opts.init_image.as_ref().map(|_| opts.strength),
        init_image,
        batch_index: g.index as u32,
        extra: BTreeMap::from([("timesteps".to_string(), serde_json::json!(g.timesteps))]),
    };
    if opts.scheduler == SchedulerKind::Ddim {
        // DDIM's eta changes the image (its per-step noise); the other samplers ignore it.
        params
            .extra
            .insert("eta".into(), serde_json::json!(opts.eta));
    }
    if let Some(guide) = opts.guide.as_ref().filter(|g| g.config.is_active()) {
        let mut v = serde_json::to_value(&guide.config).unwrap_or_default();
        // The layers used, not `null` for "the default for this CLIP's depth".
        if let Some((style, content)) = guide.style_layers() {
            v["style"]["layers"] = serde_json::json!(style);
            v["style"]["content_layers"] = serde_json::json!(content);
        }
        v["losses"] = serde_json::json!(g.guidance_losses);
        v["skipped_steps"] = g.guidance_skipped.into();
        params.extra.insert("guidance".into(), v);
        params.extra.insert(
            "Guidance".into(),
            serde_json::json!(format!(
                "{} {} x{}",
                guide.clip_id().unwrap_or("none"),
                guide.config.decoder,
                guide.config.scale
            )),
        );
    }
    params
}

/// Adds the SHA-256 of the files an image was made from beyond the SD model's own: the init
/// image (`init_image_sha256`) and, when guided, every file the guide read (`guidance.files_sha256`:
/// its CLIP, TAESD and target images), so the record says which weights and images they were.
pub fn record_input_files(
    params: &mut crate::output::GenerationParams,
    opts: &GenerateOptions,
    init_image: Option<&Path>,
) -> Result<()> {
    let cache = crate::models::file_hash::HashCache::default();
    if let Some(p) = init_image {
        params
            .extra
            .insert("init_image_sha256".into(), cache.sha256(p)?.into());
    }
    if let (Some(guide), Some(record)) = (&opts.guide, params.extra.get_mut("guidance")) {
        let files = guide.input_files();
        if !files.is_empty() {
            record["files_sha256"] = serde_json::json!(cache.sha256_files(&files)?);
        }
    }
    Ok(())
}

/// Refuses NaN or infinite values, which would otherwise be written out as a black image.
pub fn check_finite(t: &Tensor, what: &str, dtype: DType) -> Result<()> {
    let s = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        let cause = if dtype == DType::F32 {
            "the model's weights or configs may be broken"
        } else {
            "the activations may have overflowed (try --dtype f32), or the weights are broken"
        };
        return Err(Error::Msg(format!(
            "{what} contain NaN or infinite values; refusing to write the image: {cause}"
        )));
    }
    Ok(())
}

/// Reads an init image file as a 1 x 3 x H x W tensor in [-1, 1].
pub fn load_init_image(path: &Path, max_pixels: u64) -> Result<Tensor> {
    let (t, _, _) = crate::output::load_image_rgb(path, max_pixels)?;
    Ok(((t.unsqueeze(0)? * 2.0)? - 1.0)?)
}
