//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and scheduler config,
//! from a diffusers folder, a hub repo, or a published architecture with random weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;

use super::clip::{ClipTextConfig, ClipTextTransformer, NormMode};
use super::hub::{HubOptions, ModelRepo};
use super::sd::{self, UNetJson, UNetSpec, VaeJson, VaeSpec};
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedCond, UNet};
use super::vae::{Mode, VaeDecoder};
use super::weights::{with_file, FileWeights, RandomWeights};
use crate::schedulers::SchedulerConfig;
use crate::{Error, Result};

/// Published architectures that can be built with seeded random weights to measure speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomArch {
    /// Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs).
    Sd15,
    /// Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1 configs, v-prediction).
    Sd21,
    /// Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs).
    Sdxl,
}

impl std::str::FromStr for RandomArch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sd15" => Ok(RandomArch::Sd15),
            "sd21" => Ok(RandomArch::Sd21),
            "sdxl" => Ok(RandomArch::Sdxl),
            other => Err(Error::value(
                "random-weights",
                format!("unknown architecture `{other}`: expected sd15, sd21 or sdxl"),
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
            RandomArch::Sdxl => "random:sdxl",
        }
    }

    /// UNet, VAE, text encoder, scheduler and (SDXL) second text encoder configs.
    fn configs(&self) -> ([&'static str; 4], Option<&'static str>) {
        match self {
            RandomArch::Sd15 => ([SD15_UNET, VAE, SD15_TEXT, SD15_SCHEDULER], None),
            RandomArch::Sd21 => ([SD21_UNET, VAE, SD21_TEXT, SD21_SCHEDULER], None),
            RandomArch::Sdxl => (
                [SDXL_UNET, SDXL_VAE, SD15_TEXT, SDXL_SCHEDULER],
                Some(SDXL_TEXT_2),
            ),
        }
    }
}

// The published config.json files of the two architectures (only what the loader reads).
const SD15_UNET: &str = r#"{"attention_head_dim":8,"block_out_channels":[320,640,1280,1280],"cross_attention_dim":768,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"in_channels":4,"out_channels":4,"sample_size":64,"norm_num_groups":32,"norm_eps":1e-05,"flip_sin_to_cos":true,"freq_shift":0,"downsample_padding":1,"mid_block_scale_factor":1}"#;
const SD21_UNET: &str = r#"{"attention_head_dim":[5,10,20,20],"block_out_channels":[320,640,1280,1280],"cross_attention_dim":1024,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"in_channels":4,"out_channels":4,"sample_size":96,"norm_num_groups":32,"norm_eps":1e-05,"flip_sin_to_cos":true,"freq_shift":0,"downsample_padding":1,"mid_block_scale_factor":1,"use_linear_projection":true,"upcast_attention":true}"#;
const VAE: &str = r#"{"block_out_channels":[128,256,512,512],"layers_per_block":2,"latent_channels":4,"norm_num_groups":32,"in_channels":3,"out_channels":3,"scaling_factor":0.18215}"#;
const SD15_TEXT: &str = r#"{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,"num_hidden_layers":12,"max_position_embeddings":77,"vocab_size":49408,"hidden_act":"quick_gelu","layer_norm_eps":1e-05,"projection_dim":768,"bos_token_id":0,"eos_token_id":2,"pad_token_id":1}"#;
const SD21_TEXT: &str = r#"{"hidden_size":1024,"intermediate_size":4096,"num_attention_heads":16,"num_hidden_layers":23,"max_position_embeddings":77,"vocab_size":49408,"hidden_act":"gelu","layer_norm_eps":1e-05,"projection_dim":512,"bos_token_id":0,"eos_token_id":2,"pad_token_id":1}"#;
const SDXL_UNET: &str = r#"{"act_fn":"silu","addition_embed_type":"text_time","addition_embed_type_num_heads":64,"addition_time_embed_dim":256,"attention_head_dim":[5,10,20],"block_out_channels":[320,640,1280],"center_input_sample":false,"class_embed_type":null,"class_embeddings_concat":false,"conv_in_kernel":3,"conv_out_kernel":3,"cross_attention_dim":2048,"cross_attention_norm":null,"down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],"downsample_padding":1,"dual_cross_attention":false,"encoder_hid_dim":null,"encoder_hid_dim_type":null,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,"mid_block_only_cross_attention":null,"mid_block_scale_factor":1,"mid_block_type":"UNetMidBlock2DCrossAttn","norm_eps":1e-05,"norm_num_groups":32,"num_attention_heads":null,"num_class_embeds":null,"only_cross_attention":false,"out_channels":4,"projection_class_embeddings_input_dim":2816,"resnet_out_scale_factor":1.0,"resnet_skip_time_act":false,"resnet_time_scale_shift":"default","sample_size":128,"time_cond_proj_dim":null,"time_embedding_act_fn":null,"time_embedding_dim":null,"time_embedding_type":"positional","timestep_post_act":null,"transformer_layers_per_block":[1,2,10],"up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],"upcast_attention":null,"use_linear_projection":true}"#;
const SDXL_VAE: &str = r#"{"act_fn":"silu","block_out_channels":[128,256,512,512],"force_upcast":true,"in_channels":3,"latent_channels":4,"layers_per_block":2,"norm_num_groups":32,"out_channels":3,"sample_size":1024,"scaling_factor":0.13025}"#;
const SDXL_TEXT_2: &str = r#"{"hidden_act":"gelu","hidden_size":1280,"intermediate_size":5120,"layer_norm_eps":1e-05,"max_position_embeddings":77,"num_attention_heads":20,"num_hidden_layers":32,"projection_dim":1280,"vocab_size":49408,"bos_token_id":0,"eos_token_id":2,"pad_token_id":1}"#;
const SDXL_SCHEDULER: &str = r#"{"_class_name":"EulerDiscreteScheduler","beta_end":0.012,"beta_schedule":"scaled_linear","beta_start":0.00085,"clip_sample":false,"interpolation_type":"linear","num_train_timesteps":1000,"prediction_type":"epsilon","sample_max_value":1.0,"set_alpha_to_one":false,"skip_prk_steps":true,"steps_offset":1,"timestep_spacing":"leading","trained_betas":null,"use_karras_sigmas":false}"#;
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

/// SDXL's second text encoder (`CLIPTextModelWithProjection`): a CLIP text tower whose
/// pooled output is projected, without bias, to the width the UNet's `add_embedding` takes.
pub struct PooledTextEncoder {
    pub tower: ClipTextTransformer,
    projection: candle_nn::Linear,
}

impl PooledTextEncoder {
    fn new(vb: candle_nn::VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        // transformers 4 writes the tower under `text_model.`, transformers 5 at the root; the
        // projection is at the root in both.
        let tower_vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        Ok(PooledTextEncoder {
            tower: ClipTextTransformer::new(tower_vb, cfg, NormMode::Fused)?,
            projection: candle_nn::linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?,
        })
    }
}

/// What the UNet is conditioned on, one row per prompt.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Token embeddings: (batch, tokens, cross_attention_dim).
    pub context: Tensor,
    /// SDXL: the second encoder's pooled, projected embedding, (batch, width).
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// The rows of several conditionings stacked in order (for CFG: unconditional first).
    pub fn cat(parts: &[&Conditioning]) -> Result<Self> {
        let context: Vec<&Tensor> = parts.iter().map(|c| &c.context).collect();
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|c| c.pooled.as_ref()).collect();
        Ok(Conditioning {
            context: Tensor::cat(&context, 0)?,
            pooled: match pooled {
                Some(p) if !p.is_empty() => Some(Tensor::cat(&p, 0)?),
                _ => None,
            },
        })
    }

    /// Zeros of the same shapes (diffusers' `force_zeros_for_empty_prompt` negative).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Conditioning {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }

    /// Number of rows.
    pub fn batch(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }
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
    /// SDXL's second text encoder; with it both encoders condition through their penultimate
    /// layer, as diffusers' SDXL pipelines do.
    pub text_encoder_2: Option<PooledTextEncoder>,
    pub scheduler_config: SchedulerConfig,
    /// Weight, config and tokenizer files used, relative name -> path (hashed into the
    /// sidecar and a run's fingerprint of the model).
    pub files: BTreeMap<String, PathBuf>,
    pub device: Device,
    pub dtype: DType,
    /// The VAE's dtype: f32 when the model runs in f16 and the VAE config says `force_upcast`.
    pub vae_dtype: DType,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL): an empty negative prompt
    /// conditions on zeros instead of the encoded empty string.
    pub force_zeros_for_empty_prompt: bool,
    tokenizer: PromptTokenizer,
    tokenizer_2: Option<PromptTokenizer>,
    origin: WeightOrigin,
    mean_encoder: std::sync::OnceLock<AutoEncoderKL>,
    /// The UNet call as a CUDA graph (`ARTGUIDE_CUDA_GRAPHS=1`).
    #[cfg(feature = "cuda")]
    graphs: Option<super::unet_graph::UnetGraphs>,
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
        let index_json: serde_json::Value = sd::read_json(&index)?;
        let has = |name: &str| index_json.get(name).is_some_and(|v| v[0].is_string());
        if !has("text_encoder") && has("text_encoder_2") {
            return Err(Error::field(
                &index,
                "text_encoder",
                "is null (an SDXL refiner?); expected a pipeline with a first text encoder",
            ));
        }
        let dual = has("text_encoder_2");
        let force_zeros_for_empty_prompt = index_json
            .get("force_zeros_for_empty_prompt")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let unet_cfg_path = get("unet/config.json")?;
        let vae_cfg_path = get("vae/config.json")?;
        let text_cfg_path = get("text_encoder/config.json")?;
        let sched_path = get("scheduler/scheduler_config.json")?;

        let unet_spec = sd::read_json::<UNetJson>(&unet_cfg_path)?.to_spec(&unet_cfg_path)?;
        let vae_spec = sd::read_json::<VaeJson>(&vae_cfg_path)?.to_spec(&vae_cfg_path)?;
        let text_cfg = ClipTextConfig::load(&text_cfg_path)?;
        let text_cfg_2 = match dual {
            true => {
                let p = get("text_encoder_2/config.json")?;
                Some((ClipTextConfig::load(&p)?, p))
            }
            false => None,
        };
        let scheduler_config = SchedulerConfig::from_file(&sched_path)?;
        check_text_widths(
            (&text_cfg, &text_cfg_path),
            text_cfg_2.as_ref().map(|(c, p)| (c, p.as_path())),
            &unet_spec,
            &unet_cfg_path,
        )?;
        let (tokenizer, tokenizer_files) = load_tokenizer(&repo, "tokenizer")?;
        let (tokenizer_2, tokenizer_2_files) = match dual {
            true => {
                let (t, f) = load_tokenizer(&repo, "tokenizer_2")?;
                (Some(t), f)
            }
            false => (None, BTreeMap::new()),
        };

        let (unet_rel, unet_w) = weight_file(&repo, "unet", "diffusion_pytorch_model")?;
        let (vae_rel, vae_w) = weight_file(&repo, "vae", "diffusion_pytorch_model")?;
        let (text_rel, text_w) = weight_file(&repo, "text_encoder", "model")?;
        let text_2 = match dual {
            true => Some(weight_file(&repo, "text_encoder_2", "model")?),
            false => None,
        };
        for (rel, p) in [
            (&unet_rel, &unet_w),
            (&vae_rel, &vae_w),
            (&text_rel, &text_w),
        ]
        .into_iter()
        .chain(text_2.as_ref().map(|(r, p)| (r, p)))
        {
            files.insert(rel.clone(), p.clone());
        }
        files.extend(tokenizer_files);
        files.extend(tokenizer_2_files);

        let (device, dtype) = (&opts.device, opts.dtype);
        // Each component's weights, and a handle that says which of them it read.
        let open = |w: &PathBuf, dtype| -> Result<_> {
            let weights = FileWeights::open(std::slice::from_ref(w))?;
            let usage = weights.usage();
            Ok((weights.into_var_builder(dtype, device), usage))
        };
        let (text_vb, text_usage) = open(&text_w, dtype)?;
        let text_encoder =
            ClipTextTransformer::new(text_vb.pp("text_model"), &text_cfg, NormMode::Fused)
                .map_err(|e| with_file(e, &text_w))?;
        // A CLIPTextModelWithProjection's projection is not on the hidden states' path.
        text_usage.check_all_read(&text_cfg_path, &["text_projection"])?;
        let text_encoder_2 = match (&text_2, &text_cfg_2) {
            (Some((_, w)), Some((cfg, cfg_path))) => {
                let (vb, usage) = open(w, dtype)?;
                let encoder = PooledTextEncoder::new(vb, cfg).map_err(|e| with_file(e, w))?;
                usage.check_all_read(cfg_path, &[])?;
                Some(encoder)
            }
            _ => None,
        };
        let vae_dtype = vae_dtype(&vae_spec, dtype);
        let (unet_vb, unet_usage) = open(&unet_w, dtype)?;
        let unet = UNet::new(unet_vb, &unet_spec).map_err(|e| with_file(e, &unet_w))?;
        unet_usage.check_all_read(&unet_cfg_path, &[])?;
        let (vae_vb, vae_usage) = open(&vae_w, vae_dtype)?;
        let vae = VaeDecoder::new(&vae_spec, vae_vb).map_err(|e| with_file(e, &vae_w))?;
        // The encoder is built on demand, for img2img.
        vae_usage.check_all_read(&vae_cfg_path, &["encoder", "quant_conv"])?;

        Ok(SdModel {
            id: repo.id(),
            unet,
            unet_spec,
            vae,
            vae_spec,
            text_encoder,
            text_encoder_2,
            scheduler_config,
            files,
            device: device.clone(),
            dtype,
            vae_dtype,
            force_zeros_for_empty_prompt,
            tokenizer: PromptTokenizer::Clip(Box::new(tokenizer)),
            tokenizer_2: tokenizer_2.map(|t| PromptTokenizer::Clip(Box::new(t))),
            origin: WeightOrigin::Files { vae: vec![vae_w] },
            mean_encoder: std::sync::OnceLock::new(),
            #[cfg(feature = "cuda")]
            graphs: super::unet_graph::UnetGraphs::for_device(device),
        })
    }

    /// Builds a published architecture with seeded random weights (for timing only).
    pub fn random(arch: RandomArch, seed: u64, opts: &LoadOptions) -> Result<Self> {
        let ([unet_j, vae_j, text_j, sched_j], text_2_j) = arch.configs();
        let origin = Path::new(arch.name());
        let unet_spec = sd::parse_json::<UNetJson>(unet_j, origin)?.to_spec(origin)?;
        let vae_spec = sd::parse_json::<VaeJson>(vae_j, origin)?.to_spec(origin)?;
        let text_cfg = ClipTextConfig::from_json(&sd::parse_json(text_j, origin)?, origin)?;
        let text_cfg_2 = text_2_j
            .map(|j| ClipTextConfig::from_json(&sd::parse_json(j, origin)?, origin))
            .transpose()?;
        let scheduler_config = SchedulerConfig::from_json_str(sched_j, origin)?;
        check_text_widths(
            (&text_cfg, origin),
            text_cfg_2.as_ref().map(|c| (c, origin)),
            &unet_spec,
            origin,
        )?;
        let (device, dtype) = (&opts.device, opts.dtype);
        let vae_dtype = vae_dtype(&vae_spec, dtype);
        let vb = |s: u64, dtype| RandomWeights::new(s).into_var_builder(dtype, device);
        let text_encoder =
            ClipTextTransformer::new(vb(seed, dtype).pp("text_model"), &text_cfg, NormMode::Fused)?;
        let text_encoder_2 = text_cfg_2
            .as_ref()
            .map(|c| PooledTextEncoder::new(vb(seed.wrapping_add(3), dtype), c))
            .transpose()?;
        let unet = UNet::new(vb(seed.wrapping_add(1), dtype), &unet_spec)?;
        let vae = VaeDecoder::new(&vae_spec, vb(seed.wrapping_add(2), vae_dtype))?;
        let bytes = |c: &ClipTextConfig| PromptTokenizer::Bytes {
            max_len: c.max_position_embeddings,
        };
        Ok(SdModel {
            id: arch.name().to_string(),
            unet,
            unet_spec,
            vae,
            vae_spec,
            text_encoder,
            text_encoder_2,
            scheduler_config,
            files: BTreeMap::new(),
            device: device.clone(),
            dtype,
            vae_dtype,
            force_zeros_for_empty_prompt: arch == RandomArch::Sdxl,
            tokenizer: bytes(&text_cfg),
            tokenizer_2: text_cfg_2.as_ref().map(bytes),
            origin: WeightOrigin::Random,
            mean_encoder: std::sync::OnceLock::new(),
            #[cfg(feature = "cuda")]
            graphs: super::unet_graph::UnetGraphs::for_device(device),
        })
    }

    /// Token ids of a prompt for the (first) text encoder, padded/truncated to its length
    /// (1 x 77).
    pub fn tokenize(&self, text: &str) -> Result<Tensor> {
        self.tokenize_with(&self.tokenizer, text)
    }

    fn tokenize_with(&self, tokenizer: &PromptTokenizer, text: &str) -> Result<Tensor> {
        let ids: Vec<u32> = match tokenizer {
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

    /// `(tokens, room)` when `text` has more tokens than the text encoder reads (`room`,
    /// the sequence length less the start and end tokens): the rest is cut off, as
    /// diffusers does. None when it fits.
    pub fn prompt_overflow(&self, text: &str) -> Result<Option<(usize, usize)>> {
        let (tokens, room) = match &self.tokenizer {
            PromptTokenizer::Clip(t) => (t.tokens(text)?.len(), t.max_length() - 2),
            PromptTokenizer::Bytes { max_len } => (text.len(), max_len - 2),
        };
        Ok((tokens > room).then_some((tokens, room)))
    }

    /// What the UNet is conditioned on for a prompt: the text encoder's last hidden state
    /// (1 x 77 x width, model dtype); for SDXL both encoders' penultimate hidden states side by
    /// side plus the second encoder's pooled projection, as diffusers' SDXL pipeline does.
    pub fn encode_prompt(&self, text: &str) -> Result<Conditioning> {
        let ids = self.tokenize(text)?;
        let Some(te2) = &self.text_encoder_2 else {
            return Ok(Conditioning {
                context: self.text_encoder.forward(&ids)?,
                pooled: None,
            });
        };
        let tok2 = self
            .tokenizer_2
            .as_ref()
            .ok_or_else(|| Error::Msg(format!("{}: text_encoder_2 has no tokenizer_2", self.id)))?;
        let penultimate = |t: &ClipTextTransformer| t.config().num_hidden_layers - 2;
        let (_, h1) = self
            .text_encoder
            .forward_with_hidden(&ids, &[penultimate(&self.text_encoder)])?;
        let ids2 = self.tokenize_with(tok2, text)?;
        let (last, h2) = te2
            .tower
            .forward_with_hidden(&ids2, &[penultimate(&te2.tower)])?;
        let pooled = te2.projection.forward(&te2.tower.pooled(&last, &ids2)?)?;
        Ok(Conditioning {
            context: Tensor::cat(&[&h1[0], &h2[0]], D::Minus1)?,
            pooled: Some(pooled),
        })
    }

    /// The negative (unconditional) conditioning: zeros shaped like `positive` when the prompt
    /// is empty and the model says `force_zeros_for_empty_prompt` (diffusers' SDXL default for
    /// no negative prompt), otherwise the encoded prompt.
    pub fn encode_negative(&self, text: &str, positive: &Conditioning) -> Result<Conditioning> {
        if text.is_empty() && self.force_zeros_for_empty_prompt {
            positive.zeros_like()
        } else {
            self.encode_prompt(text)
        }
    }

    /// The UNet's prediction for latents `x` (batch x C x h x w, model dtype) at `timestep`,
    /// one row of `cond` per row of `x`. SDXL's time ids are (H, W, 0, 0, H, W) in pixels:
    /// original size = target size, no crop, diffusers' defaults.
    pub fn predict(&self, x: &Tensor, timestep: f64, cond: &Conditioning) -> Result<Tensor> {
        let added = match (self.unet.added_cond(), &cond.pooled) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Error::Msg(format!(
                    "{}: the UNet needs a pooled text embedding (SDXL) and none was given",
                    self.id
                )))
            }
            (Some(_), Some(pooled)) => {
                let (b, _, h, w) = x.dims4()?;
                let f = self.vae_spec.scale_factor;
                let (hp, wp) = ((h * f) as f32, (w * f) as f32);
                Some(AddedCond {
                    text_embeds: pooled.clone(),
                    time_ids: vec![[hp, wp, 0.0, 0.0, hp, wp]; b],
                })
            }
        };
        #[cfg(feature = "cuda")]
        if let (Some(graphs), None) = (&self.graphs, &added) {
            return graphs.forward(&self.unet, x, timestep, &cond.context);
        }
        self.unet
            .forward_with(x, timestep, &cond.context, added.as_ref())
    }

    /// Decodes latents (N x 4 x h x w, already unscaled by the pipeline) to images in [0, 1]
    /// (N x 3 x H x W, f32).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents.to_dtype(self.vae_dtype)? / self.vae_spec.scaling_factor)?
            + self.vae_spec.shift_factor)?;
        let img = self.vae.decode(&z, Mode::Inference)?.to_dtype(DType::F32)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Encodes images in [-1, 1] (N x 3 x H x W) to scaled latents, using the latent mean so
    /// img2img is deterministic.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let dist = self
            .mean_encoder()?
            .encode(&images.to_dtype(self.vae_dtype)?)?;
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
        let encoder = sd::build_vae(&spec, w.into_var_builder(self.vae_dtype, &self.device))?;
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

/// The UNet's cross-attention width must be the text encoder's (SDXL: both encoders' side by
/// side), and SDXL's pooled width must be what `add_embedding` expects beside the time ids.
fn check_text_widths(
    text: (&ClipTextConfig, &Path),
    text_2: Option<(&ClipTextConfig, &Path)>,
    unet: &UNetSpec,
    unet_path: &Path,
) -> Result<()> {
    let (cfg, path) = text;
    for (c, p) in std::iter::once(text).chain(text_2) {
        if text_2.is_some() && c.num_hidden_layers < 2 {
            return Err(Error::field(
                p,
                "num_hidden_layers",
                format!(
                    "{}: SDXL conditions on the penultimate layer, so at least 2 are needed",
                    c.num_hidden_layers
                ),
            ));
        }
    }
    match (unet.added_cond, text_2) {
        (None, None) => {}
        (Some(a), Some((c2, _))) if c2.projection_dim == a.pooled_dim() => {}
        (Some(a), Some((c2, p2))) => {
            return Err(Error::field(
                p2,
                "projection_dim",
                format!(
                    "{} does not match the {} the UNet's add_embedding takes beside its time ids",
                    c2.projection_dim,
                    a.pooled_dim()
                ),
            ))
        }
        (Some(_), None) => {
            return Err(Error::field(
                unet_path,
                "addition_embed_type",
                "text_time needs a second text encoder (text_encoder_2 in model_index.json)",
            ))
        }
        (None, Some((_, p2))) => {
            return Err(Error::file(
                p2,
                "a second text encoder needs a UNet with addition_embed_type text_time",
            ))
        }
    }
    let width = cfg.hidden_size + text_2.map_or(0, |(c, _)| c.hidden_size);
    if width != unet.cross_attention_dim {
        let (p, what) = match text_2 {
            Some((_, p2)) => (
                p2,
                format!("{} + {}", cfg.hidden_size, width - cfg.hidden_size),
            ),
            None => (path, cfg.hidden_size.to_string()),
        };
        return Err(Error::field(
            p,
            "hidden_size",
            format!(
                "{what} does not match the UNet's cross_attention_dim {}",
                unet.cross_attention_dim
            ),
        ));
    }
    Ok(())
}

/// The VAE runs in f32 where f16 would overflow (`force_upcast`), else in the model dtype.
fn vae_dtype(spec: &VaeSpec, dtype: DType) -> DType {
    if spec.force_upcast && dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// A tokenizer folder (`tokenizer.json`, or `vocab.json` + `merges.txt`) of the model, with
/// the files of it that exist (relative name -> path), which decide the prompt's tokens as
/// much as the weights decide the image.
fn load_tokenizer(
    repo: &ModelRepo,
    dir: &str,
) -> Result<(ClipTokenizer, BTreeMap<String, PathBuf>)> {
    // Every tokenizer file there is, pulled into the cache too (hub repos).
    let mut files = BTreeMap::new();
    for name in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let rel = format!("{dir}/{name}");
        if let Some(p) = repo.find(&rel)? {
            files.insert(rel, p);
        }
    }
    let (json, vocab) = (format!("{dir}/tokenizer.json"), format!("{dir}/vocab.json"));
    let Some(first) = files.get(&json).or_else(|| files.get(&vocab)) else {
        return Err(repo.missing(&vocab));
    };
    let folder = first.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((ClipTokenizer::from_dir(&folder)?, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every published architecture's configs parse and fit together (widths, pooled size),
    /// without building the weights.
    #[test]
    fn random_arch_configs_are_consistent() {
        for name in ["sd15", "sd21", "sdxl"] {
            let arch: RandomArch = name.parse().unwrap();
            let ([unet_j, vae_j, text_j, sched_j], text_2_j) = arch.configs();
            let origin = Path::new(arch.name());
            let unet = sd::parse_json::<UNetJson>(unet_j, origin)
                .unwrap()
                .to_spec(origin)
                .unwrap();
            let vae = sd::parse_json::<VaeJson>(vae_j, origin)
                .unwrap()
                .to_spec(origin)
                .unwrap();
            let text = ClipTextConfig::from_json(&sd::parse_json(text_j, origin).unwrap(), origin)
                .unwrap();
            let text_2 = text_2_j.map(|j| {
                ClipTextConfig::from_json(&sd::parse_json(j, origin).unwrap(), origin).unwrap()
            });
            SchedulerConfig::from_json_str(sched_j, origin).unwrap();
            check_text_widths(
                (&text, origin),
                text_2.as_ref().map(|c| (c, origin)),
                &unet,
                origin,
            )
            .unwrap();
            assert_eq!(vae.scale_factor, 8);
            assert_eq!(unet.added_cond.is_some(), name == "sdxl", "{name}");
            assert_eq!(vae.force_upcast, name == "sdxl", "{name}");
        }
        let err = "sdxl-refiner"
            .parse::<RandomArch>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sdxl-refiner") && err.contains("sd15, sd21 or sdxl"),
            "{err}"
        );
    }

    #[test]
    fn force_upcast_only_lifts_f16() {
        let origin = Path::new("random:sdxl");
        let vae = sd::parse_json::<VaeJson>(SDXL_VAE, origin)
            .unwrap()
            .to_spec(origin)
            .unwrap();
        assert_eq!(vae_dtype(&vae, DType::F16), DType::F32);
        assert_eq!(vae_dtype(&vae, DType::BF16), DType::BF16);
        assert_eq!(vae_dtype(&vae, DType::F32), DType::F32);
    }
}
