//! CLIP guidance and style-transfer losses inside the sampling loop.
//!
//! At a guided step the loop hands [`Guide::gradient`] the predicted clean latents x0. The
//! guide decodes them (VAE, TAESD or a linear map), cuts differentiable CLIP views, embeds
//! them with a CLIP vision tower built in [`NormMode::Differentiable`] (candle's fused layer
//! norm and softmax keep no gradient history), takes the loss and returns g = dL/dx0.
//! [`shift_prediction`] then moves the model output so the step lands as if
//! `eps <- eps + sqrt(1 - alpha_bar) * dL/dx_t`, the update of the published CLIP-guided
//! Stable Diffusion pipeline.
//!
//! One deliberate difference from that pipeline: the gradient is taken through x0 with the
//! UNet's output held fixed (dx0/dx_t = 1/sqrt(alpha_bar)) instead of back through the UNet.
//! Backpropagating through the UNet roughly triples the cost of every guided step and, on the
//! CPU at 512x512, needs more memory than the machine has; the x0 path carries the part of the
//! gradient that guidance relies on.

pub mod decoders;
pub mod losses;
pub mod views;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use decoders::{DecoderKind, GuidanceDecoder, LinearDecoder};

use crate::models::clip::{normalize, ClipModel, NormMode};
use crate::models::hub::HubOptions;
use crate::models::stable_diffusion::SdModel;
use crate::models::tokenizer::ClipTokenizer;
use crate::noise::NoiseGen;
use crate::probe::embed::ClipEncoder;
use crate::schedulers::PredictionType;
use crate::{Error, Result};

/// Default CLIP guidance scale (that of the diffusers community CLIP-guided pipeline).
pub const DEFAULT_SCALE: f64 = 100.0;
/// Default number of random cutouts per guided step.
pub const DEFAULT_CUTOUTS: usize = 4;
/// Default TAESD source: `auto`, the TAESD trained for the model's latents (see
/// [`decoders::taesd_source`]).
pub const DEFAULT_TAESD: &str = "auto";
/// Most cutouts a step may take (each is a CLIP forward and backward).
pub const MAX_CUTOUTS: usize = 64;

/// A text the guided image should move toward (positive weight) or away from (negative).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextTarget {
    pub text: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl TextTarget {
    /// How `TEXT:WEIGHT` was read, when that may not be what was meant: a number after a
    /// colon that follows a digit (`ratio 16:9`, `at 10:30` become weights 9 and 30), or a
    /// suffix that starts like a number but is not one (`blurry:-0.5x` stays text, weight 1).
    /// None for the unambiguous forms (`blurry:-0.5`, `style: baroque`).
    pub fn ambiguity(s: &str) -> Option<String> {
        let (text, w) = s.rsplit_once(':')?;
        let w = w.trim();
        if w.parse::<f64>().is_ok() {
            return text.ends_with(|c: char| c.is_ascii_digit()).then(|| {
                format!(
                    "read as text `{}` with weight {w}; end it with :1 to keep the colon in the text",
                    text.trim()
                )
            });
        }
        let number_like = !w.contains(char::is_whitespace)
            && w.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c))
            && w.contains(|c: char| c.is_ascii_digit());
        number_like.then(|| {
            format!(
                "`{w}` is not a number, so all of it is text with weight 1 (TEXT:WEIGHT takes a number, e.g. blurry:-0.5)"
            )
        })
    }
}

impl FromStr for TextTarget {
    type Err = Error;

    /// `TEXT` (weight 1) or `TEXT:WEIGHT`, e.g. `blurry, low quality:-0.5`.
    fn from_str(s: &str) -> Result<Self> {
        if let Some((text, w)) = s.rsplit_once(':') {
            if let Ok(weight) = w.trim().parse::<f64>() {
                if !weight.is_finite() {
                    return Err(Error::value(
                        "clip-prompt",
                        format!("`{s}`: the weight must be a finite number"),
                    ));
                }
                return Ok(TextTarget {
                    text: text.trim().to_string(),
                    weight,
                });
            }
        }
        Ok(TextTarget {
            text: s.trim().to_string(),
            weight: 1.0,
        })
    }
}

/// Style transfer: Gram matrices of CLIP vision features and the whole-image embedding of a
/// style image, and optionally the features of the content (init) image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StyleConfig {
    /// The style image.
    pub image: PathBuf,
    /// Weight of the Gram-matrix loss (relative squared error, summed over `layers`).
    pub weight: f64,
    /// Weight of the cosine distance between the views' and the style image's embeddings.
    pub embed_weight: f64,
    /// 0-based vision encoder layers for the Gram loss; default: 1/4, 1/2 and 3/4 of the depth.
    pub layers: Option<Vec<usize>>,
    /// Weight of the content term (needs an init image): relative squared error between
    /// the views' features and the same views of the init image.
    pub content_weight: f64,
    /// Layers of the content term; default: the middle layer.
    pub content_layers: Option<Vec<usize>>,
}

impl Default for StyleConfig {
    fn default() -> Self {
        StyleConfig {
            image: PathBuf::new(),
            weight: 1.0,
            embed_weight: 1.0,
            layers: None,
            content_weight: 0.0,
            content_layers: None,
        }
    }
}

/// What to do when a guidance gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop with an error naming the step.
    #[default]
    Error,
    /// Skip guidance for that step (a warning is shown) and go on unguided.
    Skip,
}

/// Every guidance setting, with the defaults in one place ([`GuidanceConfig::default`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuidanceConfig {
    /// The guide CLIP (a CLIPModel folder or hub id); needed by every CLIP term.
    pub clip: Option<String>,
    /// Text targets for the spherical-distance loss.
    pub prompts: Vec<TextTarget>,
    /// An image target for the cosine-distance loss.
    pub image: Option<PathBuf>,
    /// Weight of the image target relative to the text targets.
    pub image_weight: f64,
    /// Multiplies the CLIP text and image losses.
    pub scale: f64,
    /// Random cutouts per guided step; 0 uses one centred view of the whole image.
    pub cutouts: usize,
    /// Guide every k-th step of the guided range.
    pub every: usize,
    /// Guided range as fractions of the steps run: [start, end).
    pub start: f64,
    pub end: f64,
    /// Clamp each element of dL/dx0 to [-clamp, clamp].
    pub clamp: Option<f64>,
    /// Total-variation penalty on the decoded image.
    pub tv_weight: f64,
    /// Penalty on decoded pixel values outside [0, 1].
    pub range_weight: f64,
    /// Style transfer terms.
    pub style: Option<StyleConfig>,
    /// Which decoder the gradient goes through.
    pub decoder: DecoderKind,
    /// Where TAESD comes from when `decoder` is `taesd`.
    pub taesd: String,
    /// What a NaN/inf gradient does.
    pub on_nonfinite: OnNonFinite,
}

impl Default for GuidanceConfig {
    fn default() -> Self {
        GuidanceConfig {
            clip: None,
            prompts: Vec::new(),
            image: None,
            image_weight: 1.0,
            scale: DEFAULT_SCALE,
            cutouts: DEFAULT_CUTOUTS,
            every: 1,
            start: 0.0,
            end: 1.0,
            clamp: None,
            tv_weight: 0.0,
            range_weight: 0.0,
            style: None,
            decoder: DecoderKind::Vae,
            taesd: DEFAULT_TAESD.to_string(),
            on_nonfinite: OnNonFinite::Error,
        }
    }
}

fn finite(name: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::value(name, format!("{v}: expected a finite number")))
    }
}

/// The recipe field (under `guidance.`) of a command-line option that
/// [`GuidanceConfig::validate`] names, so a recipe's error names what its author wrote.
pub fn recipe_field(option: &str) -> &str {
    match option {
        "clip-guidance-scale" => "scale",
        "clip-image-weight" => "image_weight",
        "clip-prompt" | "clip-prompt weight" => "prompts",
        "guide-every" => "every",
        "guide-start/guide-end" => "start/end",
        "guide-clamp" => "clamp",
        "tv-weight" => "tv_weight",
        "range-weight" => "range_weight",
        "style-weight" => "style.weight",
        "style-embed-weight" => "style.embed_weight",
        "content-weight" => "style.content_weight",
        "style-image" => "style.image",
        other => other,
    }
}

impl GuidanceConfig {
    /// Whether the CLIP text/image terms contribute.
    pub fn has_clip_terms(&self) -> bool {
        self.scale != 0.0
            && (self.prompts.iter().any(|t| t.weight != 0.0)
                || (self.image.is_some() && self.image_weight != 0.0))
    }

    /// Whether the style terms contribute.
    pub fn has_style_terms(&self) -> bool {
        self.style
            .as_ref()
            .is_some_and(|s| s.weight != 0.0 || s.embed_weight != 0.0 || s.content_weight != 0.0)
    }

    /// Whether any term contributes: an inactive config leaves sampling untouched, so scale 0
    /// reproduces the unguided image exactly.
    pub fn is_active(&self) -> bool {
        self.has_clip_terms()
            || self.has_style_terms()
            || self.tv_weight != 0.0
            || self.range_weight != 0.0
    }

    /// Checks every field; errors name the command-line option.
    pub fn validate(&self) -> Result<()> {
        finite("clip-guidance-scale", self.scale)?;
        finite("clip-image-weight", self.image_weight)?;
        finite("tv-weight", self.tv_weight)?;
        finite("range-weight", self.range_weight)?;
        for t in &self.prompts {
            finite("clip-prompt weight", t.weight)?;
            if t.text.is_empty() {
                return Err(Error::value("clip-prompt", "empty text"));
            }
        }
        if self.cutouts > MAX_CUTOUTS {
            return Err(Error::value(
                "cutouts",
                format!("{}: expected at most {MAX_CUTOUTS}", self.cutouts),
            ));
        }
        if self.every == 0 {
            return Err(Error::value("guide-every", "0: expected at least 1"));
        }
        if !((0.0..1.0).contains(&self.start) && self.start < self.end && self.end <= 1.0) {
            return Err(Error::value(
                "guide-start/guide-end",
                format!(
                    "{}..{}: expected 0 <= start < end <= 1",
                    self.start, self.end
                ),
            ));
        }
        if let Some(c) = self.clamp {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::value(
                    "guide-clamp",
                    format!("{c}: expected a number > 0"),
                ));
            }
        }
        if let Some(s) = &self.style {
            finite("style-weight", s.weight)?;
            finite("style-embed-weight", s.embed_weight)?;
            finite("content-weight", s.content_weight)?;
            if s.image.as_os_str().is_empty() {
                return Err(Error::value("style-image", "no style image given"));
            }
        }
        if (self.has_clip_terms() || self.has_style_terms()) && self.clip.is_none() {
            return Err(Error::value(
                "clip",
                "CLIP guidance and style terms need a guide CLIP model (--clip)",
            ));
        }
        // Another decoder never reads it: a TAESD source given with it was meant for something.
        if self.decoder != DecoderKind::Taesd && self.taesd != DEFAULT_TAESD {
            return Err(Error::value(
                "taesd",
                format!(
                    "`{}` is given, but the guidance decoder is {}: a TAESD source applies only to the taesd decoder",
                    self.taesd, self.decoder
                ),
            ));
        }
        Ok(())
    }

    /// Why none of `steps` executed steps is guided, when none is: the range
    /// [start, end) falls between two steps (step k sits at k/steps).
    pub fn empty_window(&self, steps: usize) -> Option<String> {
        if self.guided_steps(steps).contains(&true) {
            return None;
        }
        Some(format!(
            "the guided range [{}, {}) holds none of the {steps} denoising steps (step k sits at k/{steps}); \
             widen the range or run more steps",
            self.start, self.end
        ))
    }

    /// Which of `steps` executed steps are guided.
    pub fn guided_steps(&self, steps: usize) -> Vec<bool> {
        let first = (self.start * steps as f64).ceil() as usize;
        (0..steps)
            .map(|k| {
                let pos = k as f64;
                k >= first && pos < self.end * steps as f64 && (k - first) % self.every == 0
            })
            .collect()
    }
}

/// The guide CLIP's fixed targets.
struct ClipTargets {
    /// (k, d) normalised text embeddings and their (k,) weights.
    text: Option<(Tensor, Tensor)>,
    /// (1, d) normalised image-target embedding.
    image: Option<Tensor>,
}

/// Style and content targets in the guide CLIP's feature space.
struct StyleTargets {
    layers: Vec<usize>,
    grams: Vec<Tensor>,
    embed: Tensor,
    content_layers: Vec<usize>,
}

/// The values of each loss term at one guided step (before weighting).
pub type LossParts = BTreeMap<String, f64>;

/// The result of one guided step.
pub struct StepGradient {
    /// dL/dx0, clamped; None when the step was skipped for a NaN/inf gradient.
    pub grad: Option<Tensor>,
    /// Each term's value.
    pub losses: LossParts,
    /// The weighted total.
    pub total: f64,
}

/// A loaded guide: CLIP model, targets and decoder.
pub struct Guide {
    pub config: GuidanceConfig,
    clip: Option<GuideClip>,
    targets: ClipTargets,
    style: Option<StyleTargets>,
    pub decoder: GuidanceDecoder,
    /// The dtype losses and gradients are computed in: f32, or f64 for an f64 model
    /// (finite-difference tests).
    dtype: DType,
}

impl fmt::Debug for Guide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guide")
            .field("config", &self.config)
            .field("clip", &self.clip.as_ref().map(|c| c.id.as_str()))
            .field("decoder", &self.decoder.kind())
            .finish()
    }
}

/// Default layers at 1/4, 1/2, 3/4 of the depth (0-based, distinct).
fn default_style_layers(depth: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=3).map(|k| (depth * k / 4).saturating_sub(1)).collect();
    v.dedup();
    v
}

/// The guide CLIP: a vision/text model built in [`NormMode::Differentiable`] and the pixel
/// normalisation of its preprocessor (cheap to clone: tensors are shared).
#[derive(Clone)]
pub struct GuideClip {
    pub model: ClipModel,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub id: String,
    /// The files it was loaded from, tokenizer files included (none for random weights).
    pub files: Vec<PathBuf>,
}

impl GuideClip {
    /// Loads a CLIPModel folder or hub id for guidance; returns it with its tokenizer.
    pub fn load(
        spec: &str,
        hub: &HubOptions,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<(Self, ClipTokenizer)> {
        let enc = ClipEncoder::load_with_norm(spec, hub, dtype, device, NormMode::Differentiable)?;
        // The tokenizer's too: it turns the text targets into ids.
        let files = enc
            .files()
            .iter()
            .chain(enc.tokenizer_files())
            .cloned()
            .collect();
        Ok((
            GuideClip {
                files,
                model: enc.model,
                mean: enc.preprocessor.mean,
                std: enc.preprocessor.std,
                id: enc.id,
            },
            enc.tokenizer,
        ))
    }

    /// Normalised text embeddings (k, d) of `texts`.
    pub fn embed_texts(
        &self,
        tokenizer: &ClipTokenizer,
        texts: &[&str],
        dtype: DType,
    ) -> Result<Tensor> {
        let device = self.model.logit_scale().device();
        let ids = tokenizer.encode_tensor(texts, device)?;
        Ok(normalize(&self.model.embed_text(&ids)?.to_dtype(dtype)?)?.detach())
    }
}

impl Guide {
    /// The files this guide read, by role (`clip/model.safetensors`, `taesd/config.json`,
    /// `image`, `style.image`): what an image's record hashes, so the record names the guide's
    /// weights and target images and not only their paths.
    pub fn input_files(&self) -> BTreeMap<String, PathBuf> {
        let mut files = BTreeMap::new();
        let named = |role: &str, p: &PathBuf| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            (format!("{role}/{}", name.unwrap_or_default()), p.clone())
        };
        if let Some(c) = &self.clip {
            files.extend(c.files.iter().map(|p| named("clip", p)));
        }
        if let GuidanceDecoder::Taesd(t) = &self.decoder {
            files.extend(t.files().iter().map(|p| named("taesd", p)));
        }
        if self.targets.image.is_some() {
            files.extend(self.config.image.clone().map(|p| ("image".to_string(), p)));
        }
        if let (Some(s), Some(_)) = (&self.config.style, &self.style) {
            files.insert("style.image".into(), s.image.clone());
        }
        files
    }

    /// The vision layers of the style (Gram) and content terms, with the defaults resolved for
    /// the guide CLIP's depth; None without style terms.
    pub fn style_layers(&self) -> Option<(&[usize], &[usize])> {
        self.style
            .as_ref()
            .map(|s| (s.layers.as_slice(), s.content_layers.as_slice()))
    }

    /// Loads the guide CLIP (differentiable), embeds the targets and prepares the decoder.
    pub fn load(
        config: GuidanceConfig,
        model: &SdModel,
        hub: &HubOptions,
        max_pixels: u64,
    ) -> Result<Self> {
        config.validate()?;
        let clip = match &config.clip {
            Some(spec) if config.has_clip_terms() || config.has_style_terms() => {
                Some(GuideClip::load(spec, hub, model.dtype, &model.device)?)
            }
            _ => None,
        };
        let decoder = GuidanceDecoder::load(config.decoder, &config.taesd, model, hub)?;
        Self::with_clip(config, model, clip.as_ref(), decoder, max_pixels)
    }

    /// A guide from a loaded CLIP (and its tokenizer, which embeds the text targets) and
    /// decoder.
    pub fn with_clip(
        config: GuidanceConfig,
        model: &SdModel,
        clip: Option<&(GuideClip, ClipTokenizer)>,
        decoder: GuidanceDecoder,
        max_pixels: u64,
    ) -> Result<Self> {
        let dtype = work_dtype(model.dtype);
        let text = match clip {
            Some((clip, tokenizer)) if config.scale != 0.0 => {
                let texts: Vec<&str> = config
                    .prompts
                    .iter()
                    .filter(|t| t.weight != 0.0)
                    .map(|t| t.text.as_str())
                    .collect();
                if texts.is_empty() {
                    None
                } else {
                    Some(clip.embed_texts(tokenizer, &texts, dtype)?)
                }
            }
            _ => None,
        };
        let clip = clip.map(|(c, _)| c.clone());
        Self::new(config, model, clip, text, decoder, max_pixels)
    }

    /// A guide from loaded parts. `text`: normalised embeddings (k, d) of the non-zero-weight
    /// `config.prompts`, in order. Image and style targets are read from their files here.
    pub fn new(
        config: GuidanceConfig,
        model: &SdModel,
        clip: Option<GuideClip>,
        text: Option<Tensor>,
        decoder: GuidanceDecoder,
        max_pixels: u64,
    ) -> Result<Self> {
        config.validate()?;
        let mut config = config;
        // Record the TAESD that was used, not `auto` (nor a TAESD for another decoder).
        if config.decoder == DecoderKind::Taesd {
            config.taesd = decoders::taesd_source(&config.taesd, model).to_string();
        }
        let dtype = work_dtype(model.dtype);
        if let GuidanceDecoder::Taesd(t) = &decoder {
            if t.scale_factor() != model.vae_spec.scale_factor {
                return Err(Error::value(
                    "guidance-decoder",
                    format!(
                        "TAESD `{}` upsamples {}x but {}'s VAE upsamples {}x",
                        config.taesd,
                        t.scale_factor(),
                        model.id,
                        model.vae_spec.scale_factor
                    ),
                ));
            }
        }
        let mut targets = ClipTargets {
            text: None,
            image: None,
        };
        let mut style = None;
        if let Some(clip) = &clip {
            let device = clip.model.logit_scale().device().clone();
            if let Some(e) = text {
                let w: Vec<f32> = config
                    .prompts
                    .iter()
                    .filter(|t| t.weight != 0.0)
                    .map(|t| t.weight as f32)
                    .collect();
                if w.len() != e.dim(0)? {
                    return Err(Error::value(
                        "clip-prompt",
                        format!(
                            "{} text embeddings for {} weighted prompts",
                            e.dim(0)?,
                            w.len()
                        ),
                    ));
                }
                let w = Tensor::from_vec(w, e.dim(0)?, &device)?.to_dtype(dtype)?;
                targets.text = Some((e.to_dtype(dtype)?.detach(), w));
            }
            if let (Some(p), true) = (&config.image, config.image_weight != 0.0) {
                let img = load_target_image(p, max_pixels, &device, dtype)?;
                let (pooled, _) = embed_views(clip, &centre_views(clip, &img)?, &[], dtype)?;
                targets.image = Some(normalize(&pooled)?.detach());
            }
            if let Some(s) = config.style.as_ref().filter(|_| config.has_style_terms()) {
                let depth = clip.model.config().vision.num_hidden_layers;
                let layers = s
                    .layers
                    .clone()
                    .unwrap_or_else(|| default_style_layers(depth));
                let content_layers = s
                    .content_layers
                    .clone()
                    .unwrap_or_else(|| vec![(depth / 2).saturating_sub(1)]);
                for (name, ls) in [
                    ("style-layers", &layers),
                    ("content-layers", &content_layers),
                ] {
                    if let Some(&bad) = ls.iter().find(|&&l| l >= depth) {
                        return Err(Error::value(
                            name,
                            format!(
                                "layer {bad}: the guide CLIP's vision tower has layers 0..{}",
                                depth - 1
                            ),
                        ));
                    }
                }
                let img = load_target_image(&s.image, max_pixels, &device, dtype)?;
                let (pooled, hidden) =
                    embed_views(clip, &centre_views(clip, &img)?, &layers, dtype)?;
                let grams = hidden
                    .iter()
                    .map(|h| Ok(losses::gram(h)?.detach()))
                    .collect::<Result<Vec<_>>>()?;
                style = Some(StyleTargets {
                    layers,
                    grams,
                    embed: normalize(&pooled)?.detach(),
                    content_layers,
                });
            }
        } else if config.has_clip_terms() || config.has_style_terms() {
            return Err(Error::value(
                "clip",
                "CLIP and style terms need a guide CLIP",
            ));
        }
        Ok(Guide {
            config,
            clip,
            targets,
            style,
            decoder,
            dtype,
        })
    }

    /// Bytes one CLIP view keeps for the backward pass (attention probabilities and about
    /// 16 activations of the hidden width per token and layer), if a CLIP is loaded.
    pub fn clip_view_bytes(&self) -> Option<f64> {
        let v = &self.clip.as_ref()?.model.config().vision;
        let tokens = (v.image_size / v.patch_size).pow(2) as f64 + 1.0;
        let layers = v.num_hidden_layers as f64;
        Some(
            layers
                * tokens
                * (16.0 * v.hidden_size as f64 + (v.num_attention_heads as f64) * tokens)
                * 4.0,
        )
    }

    /// The guide CLIP's id, if one is loaded.
    pub fn clip_id(&self) -> Option<&str> {
        self.clip.as_ref().map(|c| c.id.as_str())
    }

    /// The loss at predicted clean latents `x0` (1 x C x h x w), differentiable in `x0`.
    /// `content`: the init image (1 x 3 x H x W in [0, 1]) for the content term.
    pub fn loss(
        &self,
        model: &SdModel,
        x0: &Tensor,
        rng: &mut NoiseGen,
        content: Option<&Tensor>,
    ) -> Result<(Tensor, LossParts)> {
        let (total, terms) = self.loss_terms(model, x0, rng, content)?;
        let values = read_scalars(terms.iter().map(|(_, v)| v))?;
        let parts = terms.into_iter().map(|(n, _)| n).zip(values).collect();
        Ok((total, parts))
    }

    /// The weighted total and each unweighted term, all still on the device: reading them back
    /// waits for the GPU, so `gradient` does it once, after the backward pass is queued.
    fn loss_terms(
        &self,
        model: &SdModel,
        x0: &Tensor,
        rng: &mut NoiseGen,
        content: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let cfg = &self.config;
        let image = self.decoder.decode(model, x0, self.dtype)?;
        let mut parts: Vec<(String, Tensor)> = Vec::new();
        let mut terms: Vec<Tensor> = Vec::new();
        let mut add = |name: &str, value: Tensor, weight: f64| -> Result<()> {
            terms.push((&value * weight)?);
            parts.push((name.to_string(), value));
            Ok(())
        };
        if let Some(clip) = &self.clip {
            let (_, _, h, w) = image.dims4()?;
            let size = clip.model.config().vision.image_size;
            let boxes = if cfg.cutouts == 0 {
                vec![views::centre_box(h, w)]
            } else {
                views::random_boxes(h, w, size, cfg.cutouts, rng)
            };
            let vm = views::ViewMatrices::new(&boxes, h, w, size, self.dtype, image.device())?;
            let pixels = views::clip_normalise(&vm.apply(&image)?, &clip.mean, &clip.std)?;
            let mut layers: Vec<usize> = Vec::new();
            if let Some(s) = &self.style {
                layers.extend(&s.layers);
                layers.extend(&s.content_layers);
            }
            let (pooled, hidden) = embed_views(clip, &pixels, &layers, self.dtype)?;
            if let Some((text, weights)) = &self.targets.text {
                let d = losses::spherical_distance(&pooled, text)?;
                add("clip_text", losses::weighted_mean(&d, weights)?, cfg.scale)?;
            }
            if let Some(target) = &self.targets.image {
                let d = losses::cosine_distance(&pooled, target)?.mean_all()?;
                add("clip_image", d, cfg.scale * cfg.image_weight)?;
            }
            if let (Some(st), Some(s)) = (&self.style, &cfg.style) {
                let n_style = st.layers.len();
                if s.weight != 0.0 {
                    let mut total: Option<Tensor> = None;
                    for (h, g) in hidden[..n_style].iter().zip(&st.grams) {
                        let r = relative_error(&losses::gram(h)?, g)?;
                        total = Some(match total {
                            Some(t) => (t + r)?,
                            None => r,
                        });
                    }
                    if let Some(t) = total {
                        add("style_gram", t, s.weight)?;
                    }
                }
                if s.embed_weight != 0.0 {
                    let d = losses::cosine_distance(&pooled, &st.embed)?.mean_all()?;
                    add("style_embed", d, s.embed_weight)?;
                }
                if s.content_weight != 0.0 {
                    let content = content.ok_or_else(|| {
                        Error::value(
                            "content-weight",
                            "the content term needs an init image (--init-image)",
                        )
                    })?;
                    let cpix = views::clip_normalise(
                        &vm.apply(&content.to_dtype(self.dtype)?)?,
                        &clip.mean,
                        &clip.std,
                    )?;
                    let cfeat = clip
                        .model
                        .vision
                        .hidden_states(&cpix.to_dtype(model.dtype)?, &st.content_layers)?;
                    let mut total: Option<Tensor> = None;
                    for (h, c) in hidden[n_style..].iter().zip(&cfeat) {
                        let r = relative_error(h, &c.to_dtype(self.dtype)?.detach())?;
                        total = Some(match total {
                            Some(t) => (t + r)?,
                            None => r,
                        });
                    }
                    if let Some(t) = total {
                        add("content", t, s.content_weight)?;
                    }
                }
            }
        }
        if cfg.tv_weight != 0.0 {
            add("tv", losses::total_variation(&image)?, cfg.tv_weight)?;
        }
        if cfg.range_weight != 0.0 {
            add("range", losses::range_penalty(&image)?, cfg.range_weight)?;
        }
        let mut iter = terms.into_iter();
        let first = iter
            .next()
            .ok_or_else(|| Error::Msg("guidance has no active loss term".into()))?;
        let total = iter.try_fold(first, |a, b| a + b)?;
        Ok((total, parts))
    }

    /// g = dL/dx0 at `x0`, checked for NaN/inf (an error, or a skipped step, as configured)
    /// and clamped.
    pub fn gradient(
        &self,
        model: &SdModel,
        x0: &Tensor,
        rng: &mut NoiseGen,
        content: Option<&Tensor>,
        step: usize,
    ) -> Result<StepGradient> {
        let var = Var::from_tensor(&x0.to_dtype(self.dtype)?.detach())?;
        let (loss, terms) = self.loss_terms(model, var.as_tensor(), rng, content)?;
        let grads = loss.backward()?;
        let grad = grads.get(var.as_tensor()).cloned().ok_or_else(|| {
            Error::Msg("guidance loss has no gradient path to the latents (internal error)".into())
        })?;
        // One read-back per guided step (loss, gradient size, terms): each read waits for the
        // device, so reading before the backward would leave the GPU idle while it is queued.
        let magnitude = grad.abs()?.sum_all()?;
        let values = read_scalars(
            [&loss, &magnitude]
                .into_iter()
                .chain(terms.iter().map(|(_, v)| v)),
        )?;
        let (total, magnitude) = (values[0], values[1]);
        let losses: LossParts = terms
            .into_iter()
            .map(|(n, _)| n)
            .zip(values[2..].iter().copied())
            .collect();
        if !(magnitude.is_finite() && total.is_finite()) {
            return match self.config.on_nonfinite {
                OnNonFinite::Error => Err(Error::Msg(format!(
                    "guidance at step {}: the loss ({total}) or its gradient is NaN or infinite; \
                     lower the guidance scale, set a gradient clamp, or pass --skip-nonfinite-guidance",
                    step + 1
                ))),
                OnNonFinite::Skip => Ok(StepGradient {
                    grad: None,
                    losses,
                    total,
                }),
            };
        }
        let grad = match self.config.clamp {
            Some(c) => grad.clamp(-c, c)?,
            None => grad,
        };
        Ok(StepGradient {
            grad: Some(grad),
            losses,
            total,
        })
    }
}

/// Scalar tensors (any shape with one element) read back to the host in one transfer.
fn read_scalars<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Result<Vec<f64>> {
    let flat = ts
        .into_iter()
        .map(|t| t.flatten_all()?.to_dtype(DType::F64))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if flat.is_empty() {
        return Ok(Vec::new());
    }
    Ok(Tensor::cat(&flat, 0)?.to_vec1::<f64>()?)
}

/// Losses are computed in f32 (f64 when the model is f64).
fn work_dtype(model: DType) -> DType {
    if model == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `||a - b||^2 / ||b||^2` (scale-free, so layer weights are comparable), averaged over the
/// views when `b` is one target broadcast against several views in `a`: the loss, like the
/// CLIP terms, does not grow with the number of cutouts.
fn relative_error(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let views = (a.elem_count() / b.elem_count().max(1)).max(1) as f64;
    let num = a.broadcast_sub(b)?.sqr()?.sum_all()?;
    let den = b.sqr()?.sum_all()?.affine(views, 1e-12)?;
    Ok((num / den)?)
}

/// Reads an image target as 1 x 3 x H x W in [0, 1].
fn load_target_image(
    path: &Path,
    max_pixels: u64,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<Tensor> {
    let (t, _, _) = crate::output::load_image_rgb(path, max_pixels)?;
    Ok(t.unsqueeze(0)?.to_dtype(dtype)?.to_device(device)?)
}

/// The centred square view of an image at the CLIP size, normalised.
fn centre_views(clip: &GuideClip, image: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let size = clip.model.config().vision.image_size;
    let vm = views::ViewMatrices::new(
        &[views::centre_box(h, w)],
        h,
        w,
        size,
        image.dtype(),
        image.device(),
    )?;
    views::clip_normalise(&vm.apply(image)?, &clip.mean, &clip.std)
}

/// Projected image embeddings (n, d) and the requested hidden layers, in f32.
fn embed_views(
    clip: &GuideClip,
    pixels: &Tensor,
    layers: &[usize],
    out: DType,
) -> Result<(Tensor, Vec<Tensor>)> {
    let dtype = clip.model.logit_scale().dtype();
    let (pooled, hidden) = clip
        .model
        .vision
        .forward_with_hidden(&pixels.to_dtype(dtype)?, layers)?;
    let e = clip.model.project_image(&pooled)?.to_dtype(out)?;
    let hidden = hidden
        .into_iter()
        .map(|h| Ok(h.to_dtype(out)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((e, hidden))
}

/// Moves a model output so the scheduler's step sees `eps + sigma * g` (sigma =
/// sqrt((1 - alpha_bar) / alpha_bar)): the CLIP-guided pipeline's
/// `eps + sqrt(1 - alpha_bar) * dL/dx_t` with dL/dx_t = g / sqrt(alpha_bar). Equivalently the
/// predicted x0 moves by `-sigma^2 * g`, for every prediction type.
pub fn shift_prediction(
    pred: &Tensor,
    grad: &Tensor,
    prediction: PredictionType,
    alpha_bar: f64,
) -> Result<Tensor> {
    let sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt();
    let c = match prediction {
        PredictionType::Epsilon => sigma,
        PredictionType::VPrediction => sigma / alpha_bar.sqrt(),
        PredictionType::Sample => -sigma * sigma,
    };
    Ok((pred + (grad.to_dtype(pred.dtype())? * c)?)?)
}

#[cfg(test)]
mod tests;
