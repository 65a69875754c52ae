//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and scheduler config,
//! from a diffusers folder, a hub repo, or a published architecture with random weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;

use super::clip::{ClipTextConfig, ClipTextTransformer, NormMode};
use super::hub::{HubOptions, ModelRepo};
use super::sd::{self, UNetJson, UNetSpec, VaeJson, VaeSpec};
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::{Mode, VaeDecoder};
use super::weights::{FileWeights, RandomWeights};
use crate::schedulers::SchedulerConfig;
use crate::{Error, Result};

/// Published architectures that can be built with seeded random weights to measure speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomArch {
    /// Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs).
    Sd15,
    /// Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1 configs, v-prediction).
    Sd21,
}

impl std::str::FromStr for RandomArch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sd15" => Ok(RandomArch::Sd15),
            "sd21" => Ok(RandomArch::Sd21),
            "sdxl" => Err(Error::value(
                "random-weights",
                "`sdxl` is not available: candle 0.11's UNet has no SDXL added-condition embedding; expected sd15 or sd21",
            )),
            other => Err(Error::value(
                "random-weights",
                format!("unknown architecture `{other}`: expected sd15 or sd21"),
            )),
        }
    }
}

impl RandomArch {
    /// Name used in metadata.
    pub fn name(&self) -> &'static str {
        match self {
            RandomArch::Sd15 => "random:sd15",
            RandomArch::Sd21 => "random:sd21",
        }
    }

    fn configs(&self) -> [&'static str; 4] {
        match self {
            RandomArch::Sd15 => [SD15_UNET, VAE, SD15_TEXT, SD15_SCHEDULER],
            RandomArch::Sd21 => [SD21_UNET, VAE, SD21_TEXT, SD21_SCHEDULER],
        }
    }
}

// The published config.json files of the two architectures (only what the loader reads).
const SD15_UNET: &str = r#"{"attention_head_dim":8,"block_out_channels":[320,640,1280,1280],"cross_attention_dim":768,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"in_channels":4,"out_channels":4,"sample_size":64,"norm_num_groups":32,"norm_eps":1e-05,"flip_sin_to_cos":true,"freq_shift":0,"downsample_padding":1,"mid_block_scale_factor":1}"#;
const SD21_UNET: &str = r#"{"attention_head_dim":[5,10,20,20],"block_out_channels":[320,640,1280,1280],"cross_attention_dim":1024,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"in_channels":4,"out_channels":4,"sample_size":96,"norm_num_groups":32,"norm_eps":1e-05,"flip_sin_to_cos":true,"freq_shift":0,"downsample_padding":1,"mid_block_scale_factor":1,"use_linear_projection":true,"upcast_attention":true}"#;
const VAE: &str = r#"{"block_out_channels":[128,256,512,512],"layers_per_block":2,"latent_channels":4,"norm_num_groups":32,"in_channels":3,"out_channels":3,"scaling_factor":0.18215}"#;
const SD15_TEXT: &str = r#"{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,"num_hidden_layers":12,"max_position_embeddings":77,"vocab_size":49408,"hidden_act":"quick_gelu","layer_norm_eps":1e-05,"projection_dim":768,"bos_token_id":0,"eos_token_id":2,"pad_token_id":1}"#;
const SD21_TEXT: &str = r#"{"hidden_size":1024,"intermediate_size":4096,"num_attention_heads":16,"num_hidden_layers":23,"max_position_embeddings":77,"vocab_size":49408,"hidden_act":"gelu","layer_norm_eps":1e-05,"projection_dim":512,"bos_token_id":0,"eos_token_id":2,"pad_token_id":1}"#;
const SD15_SCHEDULER: &str = r#"{"beta_end":0.012,"beta_schedule":"scaled_linear","beta_start":0.00085,"clip_sample":false,"num_train_timesteps":1000,"set_alpha_to_one":false,"steps_offset":1}"#;
const SD21_SCHEDULER: &str = r#"{"beta_end":0.012,"beta_schedule":"scaled_linear","beta_start":0.00085,"clip_sample":false,"num_train_timesteps":1000,"set_alpha_to_one":false,"steps_offset":1,"prediction_type":"v_prediction"}"#;

/// Device and precision to load a model with, and how to reach the hub.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    pub hub: HubOptions,
}

/// Turns prompts into token ids.
enum PromptTokenizer {
    Clip(Box<ClipTokenizer>),
    /// Random-weight models have no vocabulary: bytes stand in for tokens (timing only).
    Bytes {
        max_len: usize,
    },
}

/// Where the weights come from, kept for the img2img encoder built on demand.
enum WeightOrigin {
    Files { vae: Vec<PathBuf> },
    Random,
}

/// A Stable Diffusion model ready to sample.
pub struct SdModel {
    /// Folder path, hub id, or `random:<arch>`.
    pub id: String,
    pub unet: UNet,
    pub unet_spec: UNetSpec,
    /// The VAE decoder (the encoder is built on demand for img2img, see `encode_mean`).
    pub vae: VaeDecoder,
    pub vae_spec: VaeSpec,
    pub text_encoder: ClipTextTransformer,
    pub scheduler_config: SchedulerConfig,
    /// Weight and config files used, relative name -> path (hashed into the sidecar).
    pub files: BTreeMap<String, PathBuf>,
    pub device: Device,
    pub dtype: DType,
    tokenizer: PromptTokenizer,
    origin: WeightOrigin,
    mean_encoder: std::sync::OnceLock<AutoEncoderKL>,
}

/// Weight files of a component: safetensors first, then the fp16 variant, then a pickle.
fn weight_file(repo: &ModelRepo, component: &str, stem: &str) -> Result<(String, PathBuf)> {
    let candidates = [
        format!("{component}/{stem}.safetensors"),
        format!("{component}/{stem}.fp16.safetensors"),
        format!("{component}/{stem}.bin"),
    ];
    for rel in &candidates {
        if let Some(p) = repo.find(rel)? {
            return Ok((rel.clone(), p));
        }
    }
    Err(repo.missing(&candidates[0]))
}

impl SdModel {
    /// Loads a model from a diffusers folder or hub repo id.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let repo = ModelRepo::open(spec, &opts.hub)?;
        let mut files = BTreeMap::new();
        let mut get = |rel: &str| -> Result<PathBuf> {
            let p = repo.get(rel)?;
            files.insert(rel.to_string(), p.clone());
            Ok(p)
        };
        let index = get("model_index.json")?;
        let _: serde_json::Value = sd::read_json(&index)?;
        let unet_cfg_path = get("unet/config.json")?;
        let vae_cfg_path = get("vae/config.json")?;
        let text_cfg_path = get("text_encoder/config.json")?;
        let sched_path = get("scheduler/scheduler_config.json")?;

        let unet_spec = sd::read_json::<UNetJson>(&unet_cfg_path)?.to_spec(&unet_cfg_path)?;
        let vae_spec = sd::read_json::<VaeJson>(&vae_cfg_path)?.to_spec(&vae_cfg_path)?;
        let text_cfg = ClipTextConfig::load(&text_cfg_path)?;
        let scheduler_config = SchedulerConfig::from_file(&sched_path)?;
        check_text_width(&text_cfg, &unet_spec, &text_cfg_path)?;

        let tokenizer_dir = match repo.find("tokenizer/tokenizer.json")? {
            Some(p) => p,
            None => repo.get("tokenizer/vocab.json")?,
        };
        // Pull the other tokenizer files into the cache too (hub repos).
        for rel in [
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
        ] {
            repo.find(rel)?;
        }
        let tokenizer_dir = tokenizer_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;

        let (unet_rel, unet_w) = weight_file(&repo, "unet", "diffusion_pytorch_model")?;
        let (vae_rel, vae_w) = weight_file(&repo, "vae", "diffusion_pytorch_model")?;
        let (text_rel, text_w) = weight_file(&repo, "text_encoder", "model")?;
        for (rel, p) in [
            (&unet_rel, &unet_w),
            (&vae_rel, &vae_w),
            (&text_rel, &text_w),
        ] {
            files.insert(rel.clone(), p.clone());
        }

        let (device, dtype) = (&opts.device, opts.dtype);
        let text_vb =
            FileWeights::open(std::slice::from_ref(&text_w))?.into_var_builder(dtype, device);
        let text_encoder =
            ClipTextTransformer::new(text_vb.pp("text_model"), &text_cfg, NormMode::Fused)
                .map_err(|e| with_file(e, &text_w))?;
        let unet_vb =
            FileWeights::open(std::slice::from_ref(&unet_w))?.into_var_builder(dtype, device);
        let unet = UNet::new(unet_vb, &unet_spec).map_err(|e| with_file(e, &unet_w))?;
        let vae_vb =
            FileWeights::open(std::slice::from_ref(&vae_w))?.into_var_builder(dtype, device);
        let vae = VaeDecoder::new(&vae_spec, vae_vb).map_err(|e| with_file(e, &vae_w))?;

        Ok(SdModel {
            id: repo.id(),
            unet,
            unet_spec,
            vae,
            vae_spec,
            text_encoder,
            scheduler_config,
            files,
            device: device.clone(),
            dtype,
            tokenizer: PromptTokenizer::Clip(Box::new(tokenizer)),
            origin: WeightOrigin::Files { vae: vec![vae_w] },
            mean_encoder: std::sync::OnceLock::new(),
        })
    }

    /// Builds a published architecture with seeded random weights (for timing only).
    pub fn random(arch: RandomArch, seed: u64, opts: &LoadOptions) -> Result<Self> {
        let [unet_j, vae_j, text_j, sched_j] = arch.configs();
        let origin = Path::new(arch.name());
        let unet_spec = sd::parse_json::<UNetJson>(unet_j, origin)?.to_spec(origin)?;
        let vae_spec = sd::parse_json::<VaeJson>(vae_j, origin)?.to_spec(origin)?;
        let text_cfg = ClipTextConfig::from_json(&sd::parse_json(text_j, origin)?, origin)?;
        let scheduler_config = SchedulerConfig::from_json_str(sched_j, origin)?;
        let (device, dtype) = (&opts.device, opts.dtype);
        let vb = |s: u64| RandomWeights::new(s).into_var_builder(dtype, device);
        let text_encoder =
            ClipTextTransformer::new(vb(seed).pp("text_model"), &text_cfg, NormMode::Fused)?;
        let unet = UNet::new(vb(seed.wrapping_add(1)), &unet_spec)?;
        let vae = VaeDecoder::new(&vae_spec, vb(seed.wrapping_add(2)))?;
        Ok(SdModel {
            id: arch.name().to_string(),
            unet,
            unet_spec,
            vae,
            vae_spec,
            text_encoder,
            scheduler_config,
            files: BTreeMap::new(),
            device: device.clone(),
            dtype,
            tokenizer: PromptTokenizer::Bytes {
                max_len: text_cfg.max_position_embeddings,
            },
            origin: WeightOrigin::Random,
            mean_encoder: std::sync::OnceLock::new(),
        })
    }

    /// Token ids of a prompt, padded/truncated to the text encoder's length (1 x 77).
    pub fn tokenize(&self, text: &str) -> Result<Tensor> {
        let ids: Vec<u32> = match &self.tokenizer {
            PromptTokenizer::Clip(t) => t.encode(text)?,
            PromptTokenizer::Bytes { max_len } => {
                let mut ids = vec![49406u32];
                ids.extend(text.bytes().map(|b| b as u32 + 256).take(max_len - 2));
                ids.push(49407);
                ids.resize(*max_len, 49407);
                ids
            }
        };
        let n = ids.len();
        Ok(Tensor::from_vec(ids, (1, n), &self.device)?)
    }

    /// Text encoder hidden states for a prompt (1 x 77 x width), in the model dtype.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenize(text)?;
        self.text_encoder.forward(&ids)
    }

    /// Decodes latents (N x 4 x h x w, already unscaled by the pipeline) to images in [0, 1]
    /// (N x 3 x H x W, f32).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents.to_dtype(self.dtype)? / self.vae_spec.scaling_factor)?
            + self.vae_spec.shift_factor)?;
        let img = self.vae.decode(&z, Mode::Inference)?.to_dtype(DType::F32)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Encodes images in [-1, 1] (N x 3 x H x W) to scaled latents, using the latent mean so
    /// img2img is deterministic.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let dist = self.mean_encoder()?.encode(&images.to_dtype(self.dtype)?)?;
        // std is exactly zero, so this "sample" is the mean.
        let mean = dist.sample()?.to_dtype(DType::F32)?;
        Ok(((mean - self.vae_spec.shift_factor)? * self.vae_spec.scaling_factor)?)
    }

    /// The VAE whose `encode` returns the mean (see `sd::mean_encoder_overrides`), built on
    /// first use and kept for the following images.
    fn mean_encoder(&self) -> Result<&AutoEncoderKL> {
        if let Some(e) = self.mean_encoder.get() {
            return Ok(e);
        }
        let WeightOrigin::Files { vae } = &self.origin else {
            return Err(Error::value(
                "init-image",
                "img2img needs real VAE weights; random-weight models only time text-to-image",
            ));
        };
        let mut w = FileWeights::open(vae)?;
        let quant_conv = if self.vae_spec.config.use_quant_conv {
            let get = |name| SimpleBackend::get_unchecked(&w, name, DType::F32, &Device::Cpu);
            Some((get("quant_conv.weight")?, get("quant_conv.bias")?))
        } else {
            None
        };
        let (spec, overrides) = sd::mean_encoder_overrides(&self.vae_spec, quant_conv)?;
        for (name, t) in overrides {
            w = w.with_override(&name, t);
        }
        let encoder = sd::build_vae(&spec, w.into_var_builder(self.dtype, &self.device))?;
        Ok(self.mean_encoder.get_or_init(|| encoder))
    }

    /// Latent shape for an image of `width` x `height`, checking divisibility.
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<(usize, usize, usize)> {
        let f = self.vae_spec.scale_factor;
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::value(
                    name,
                    format!(
                        "{v} is not a positive multiple of the VAE scale factor {f} of {}",
                        self.id
                    ),
                ));
            }
        }
        Ok((self.vae_spec.config.latent_channels, height / f, width / f))
    }

    /// Default image side: the UNet's sample_size times the VAE factor (512 for SD 1.5).
    pub fn default_size(&self) -> usize {
        self.unet_spec.sample_size.unwrap_or(64) * self.vae_spec.scale_factor
    }
}

fn check_text_width(cfg: &ClipTextConfig, unet: &UNetSpec, path: &Path) -> Result<()> {
    if cfg.hidden_size != unet.cross_attention_dim {
        return Err(Error::field(
            path,
            "hidden_size",
            format!(
                "{} does not match the UNet's cross_attention_dim {}",
                cfg.hidden_size, unet.cross_attention_dim
            ),
        ));
    }
    Ok(())
}

/// candle's shape errors from our weight backend already name the tensor; add the file.
fn with_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Candle(c) if !c.to_string().contains(&path.display().to_string()) => {
            Error::file(path, c.to_string())
        }
        other => other,
    }
}
