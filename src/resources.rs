//! Up-front memory estimates: a request that cannot fit is refused with the estimate, before
//! any large allocation, instead of being killed by the operating system.
//!
//! The estimates count the dominant transient buffers (the weights are already resident when
//! they are checked): the UNet's materialised self-attention scores at the finest level that
//! has attention, the VAE decoder's im2col buffer at full resolution, and with guidance the
//! activations kept for the backward pass of the decoder and of the CLIP tower per cutout.
//! The per-pixel guidance constants are calibrated on SD 1.5 on the CPU, from the guided
//! step's peak above the unguided step's in the same process (BENCHMARKS.md, session 5: VAE
//! 2.8 GiB more at 256x256 and 7.4 GiB at 512, i.e. ~25 kB per pixel plus ~1.3 GB of flipped
//! weights; TAESD 8.3 GiB at 512 with 6.3 GiB for the unguided step, session 2).

use crate::generate::GenerateOptions;
use crate::guidance::DecoderKind;
use crate::models::stable_diffusion::SdModel;
use crate::{Error, Result};

/// Guidance backward through the SD VAE decoder, bytes per output pixel, for the SD VAE's
/// channel sum (128 + 256 + 512 + 512); scaled by a model's own channel sum.
/// 36 kB covers the measured 512x512 total (7.97 GB) with ~18% to spare; before the layers
/// back-propagated to their inputs only (session 5) it was 147 kB.
const VAE_BACKWARD_BYTES_PER_PIXEL: f64 = 36_000.0;
const SD_VAE_CHANNEL_SUM: f64 = 1408.0;
/// Guidance backward through TAESD (64 channels), bytes per output pixel.
const TAESD_BACKWARD_BYTES_PER_PIXEL: f64 = 8_000.0;

/// What dominates an estimate.
#[derive(Debug, Clone)]
pub struct Estimate {
    pub bytes: u64,
    /// The largest single part, for the message.
    pub largest: String,
}

/// Peak transient memory of one image of `opts` on `model`, in bytes.
pub fn estimate(model: &SdModel, opts: &GenerateOptions) -> Estimate {
    let dsize = model.dtype.size_in_bytes() as f64;
    let f = model.vae_spec.scale_factor.max(1);
    let (h, w) = (opts.height / f, opts.width / f);
    let batch = if opts.guidance_scale > 1.0 { 2.0 } else { 1.0 };
    let mut parts: Vec<(String, f64)> = Vec::new();
    // Self-attention scores at the finest level with attention.
    let blocks = &model.unet_spec.config.blocks;
    if let Some((level, b)) = blocks
        .iter()
        .enumerate()
        .find(|(_, b)| b.use_cross_attn.is_some())
    {
        let tokens = ((h >> level) * (w >> level)) as f64;
        let heads = b.attention_head_dim.max(1) as f64;
        // Scores and their softmax, both materialised.
        parts.push((
            format!("UNet self-attention at {}x{}", opts.width, opts.height),
            2.0 * batch * heads * tokens * tokens * dsize,
        ));
    }
    let pixels = (opts.width * opts.height) as f64;
    let c0 = model
        .vae_spec
        .config
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(128) as f64;
    // im2col of a 3x3 conv at full resolution plus input and output.
    parts.push((
        format!("VAE decode at {}x{}", opts.width, opts.height),
        pixels * c0 * (9.0 + 3.0) * dsize,
    ));
    if let Some(g) = opts.guide.as_ref().filter(|g| g.config.is_active()) {
        let c = &g.config;
        let decoder = match c.decoder {
            DecoderKind::Vae => {
                let sum: usize = model.vae_spec.config.block_out_channels.iter().sum();
                pixels * VAE_BACKWARD_BYTES_PER_PIXEL * sum as f64 / SD_VAE_CHANNEL_SUM
            }
            DecoderKind::Taesd => pixels * TAESD_BACKWARD_BYTES_PER_PIXEL,
            DecoderKind::Linear => pixels * 3.0 * 4.0 * 4.0,
        };
        let clip = g.clip_view_bytes().unwrap_or(0.0) * c.cutouts.max(1) as f64;
        parts.push((
            format!(
                "guidance backward through the {} decoder at {}x{} with {} cutouts",
                c.decoder, opts.width, opts.height, c.cutouts
            ),
            decoder + clip,
        ));
    }
    let total: f64 = parts.iter().map(|p| p.1).sum();
    let largest = parts
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|p| p.0.clone())
        .unwrap_or_default();
    Estimate {
        bytes: total as u64,
        largest,
    }
}

/// Memory the system can still give, from /proc/meminfo (`MemAvailable`); None elsewhere.
pub fn available_bytes() -> Option<u64> {
    if let Ok(v) = std::env::var("ARTGUIDE_MEMORY_LIMIT_MB") {
        return v.trim().parse::<u64>().ok().map(|mb| mb << 20);
    }
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    }
}

/// Refuses `opts` on a CPU model when the estimate exceeds the available memory.
pub fn check(model: &SdModel, opts: &GenerateOptions) -> Result<()> {
    if model.device.is_cuda() {
        return Ok(());
    }
    let Some(avail) = available_bytes() else {
        return Ok(());
    };
    let est = estimate(model, opts);
    if est.bytes > avail {
        let hint = if opts.guide.is_some() {
            "; try --guidance-decoder taesd or linear, fewer --cutouts, or a smaller size"
        } else {
            "; try a smaller --width/--height"
        };
        return Err(Error::value(
            "size",
            format!(
                "{}x{} needs about {} of working memory (mostly {}), but {} is available{hint}",
                opts.width,
                opts.height,
                gib(est.bytes as f64),
                est.largest,
                gib(avail as f64)
            ),
        ));
    }
    Ok(())
}
