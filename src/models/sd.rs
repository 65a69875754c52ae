//! Stable Diffusion components built from a diffusers folder's config files: the UNet and
//! VAE come from candle-transformers, configured from `unet/config.json` and
//! `vae/config.json`; nothing about a model's shape is hard-coded here.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, path)
}

/// Parses JSON text that came from `path`.
pub fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        // serde names the field in "missing field `x`" / "unknown variant"; keep its words.
        Error::file(path, format!("invalid config: {msg}"))
    })
}

/// An int-or-list config value, as diffusers allows for per-block settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// One value for every block.
    One(usize),
    /// One value per block.
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, path: &Path, field: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::field(
                path,
                field,
                format!("has {} entries, expected one per block ({n})", v.len()),
            )),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_1() -> usize {
    1
}
fn d_silu() -> String {
    "silu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_32() -> usize {
    32
}
fn d_4() -> usize {
    4
}
fn d_3() -> usize {
    3
}
fn d_one_f() -> f64 {
    1.0
}
fn d_scaling() -> f64 {
    0.18215
}

/// `unet/config.json` as diffusers writes it (the fields candle's UNet can honour).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetJson {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    /// Absent: diffusers' default mid block; `null`: no mid block (`Some(None)`).
    #[serde(default, deserialize_with = "present")]
    pub mid_block_type: Option<Option<String>>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    /// Accepted for diffusers' configs (null in SDXL's); attention softmax always runs in f32.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    /// SDXL's added conditioning: `text_time` (pooled text embedding + size/crop ids) or null.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each SDXL time id (256 for SDXL).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: pooled text width + 6 x `addition_time_embed_dim`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Fields whose non-default values candle's UNet cannot honour; checked, then refused.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// The UNet's candle config plus the channel counts it needs.
#[derive(Debug, Clone)]
pub struct UNetSpec {
    pub config: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub cross_attention_dim: usize,
    pub sample_size: Option<usize>,
    /// SDXL's `text_time` added conditioning, when the config asks for it.
    pub added_cond: Option<AddedCondSpec>,
}

/// Shape of SDXL's `text_time` added conditioning (`add_time_proj` + `add_embedding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedCondSpec {
    /// Width of the sinusoidal embedding of each time id.
    pub time_embed_dim: usize,
    /// `add_embedding.linear_1` input width: pooled text width + time ids x `time_embed_dim`.
    pub input_dim: usize,
}

impl AddedCondSpec {
    /// Number of SDXL time ids: original (h, w), crop (top, left), target (h, w).
    pub const TIME_IDS: usize = 6;

    /// The pooled text width the UNet expects beside the time ids.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim - Self::TIME_IDS * self.time_embed_dim
    }
}

/// A field that is present, even as `null` (`Some(None)`), told apart from one that is absent
/// (`None`, through `#[serde(default)]`).
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

impl UNetJson {
    /// Translates diffusers' config into candle's, refusing what candle's UNet cannot run.
    pub fn to_spec(&self, path: &Path) -> Result<UNetSpec> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::field(path, "block_out_channels", "is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::field(
                path,
                "down_block_types",
                format!(
                    "down ({}) and up ({}) block lists must both have one entry per block_out_channels ({n})",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        if self.act_fn != "silu" {
            return Err(Error::field(
                path,
                "act_fn",
                format!("`{}` is not supported; expected silu", self.act_fn),
            ));
        }
        match &self.mid_block_type {
            Some(Some(m)) if m != "UNetMidBlock2DCrossAttn" => {
                return Err(Error::field(
                    path,
                    "mid_block_type",
                    format!("`{m}` is not supported; expected UNetMidBlock2DCrossAttn"),
                ))
            }
            // diffusers then builds no mid block; artguide's UNet always has one.
            Some(None) => {
                return Err(Error::field(
                    path,
                    "mid_block_type",
                    "null (a UNet without a mid block) is not supported; expected UNetMidBlock2DCrossAttn",
                ))
            }
            _ => {}
        }
        let added_cond = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let time_embed_dim = self.addition_time_embed_dim.ok_or_else(|| {
                    Error::field(
                        path,
                        "addition_time_embed_dim",
                        "is missing; `text_time` added conditioning needs it",
                    )
                })?;
                let input_dim = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    Error::field(
                        path,
                        "projection_class_embeddings_input_dim",
                        "is missing; `text_time` added conditioning needs it",
                    )
                })?;
                if time_embed_dim == 0 || input_dim <= AddedCondSpec::TIME_IDS * time_embed_dim {
                    return Err(Error::field(
                        path,
                        "projection_class_embeddings_input_dim",
                        format!(
                            "{input_dim} leaves no room for a pooled text embedding beside {} time ids of width {time_embed_dim} (an SDXL refiner's aesthetic-score ids are not supported)",
                            AddedCondSpec::TIME_IDS
                        ),
                    ));
                }
                Some(AddedCondSpec {
                    time_embed_dim,
                    input_dim,
                })
            }
            Some(other) => {
                return Err(Error::field(
                    path,
                    "addition_embed_type",
                    format!("`{other}` is not supported; expected text_time or null"),
                ))
            }
        };
        for key in [
            "class_embed_type",
            "num_class_embeds",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
        ] {
            if let Some(v) = self.rest.get(key) {
                if !v.is_null() {
                    return Err(Error::field(
                        path,
                        key,
                        format!("{v} is not supported (class- and image-conditioned UNets are not implemented); expected null"),
                    ));
                }
            }
        }
        for (key, expect) in [
            ("only_cross_attention", Value::Bool(false)),
            ("dual_cross_attention", Value::Bool(false)),
            ("resnet_time_scale_shift", Value::String("default".into())),
            ("time_embedding_type", Value::String("positional".into())),
            ("conv_in_kernel", Value::from(3)),
            ("conv_out_kernel", Value::from(3)),
        ] {
            if let Some(v) = self.rest.get(key) {
                if !v.is_null() && *v != expect {
                    return Err(Error::field(
                        path,
                        key,
                        format!("{v} is not supported; expected {expect}"),
                    ));
                }
            }
        }
        let heads = match (&self.num_attention_heads, &self.attention_head_dim) {
            // diffusers' `attention_head_dim` historically holds the number of heads.
            (Some(h), _) => h.expand(n, path, "num_attention_heads")?,
            (None, Some(h)) => h.expand(n, path, "attention_head_dim")?,
            (None, None) => vec![8; n],
        };
        let cross = self
            .cross_attention_dim
            .expand(n, path, "cross_attention_dim")?;
        if cross.iter().any(|&c| c != cross[0]) {
            return Err(Error::field(
                path,
                "cross_attention_dim",
                "per-block values that differ are not supported",
            ));
        }
        let tlayers = match &self.transformer_layers_per_block {
            Some(t) => t.expand(n, path, "transformer_layers_per_block")?,
            None => vec![1; n],
        };
        if self.sample_size == Some(0) {
            // Else the default image size is 0 and the error would name --width.
            return Err(Error::field(
                path,
                "sample_size",
                "0: expected the latent size the model was trained at (64 for SD 1.5)",
            ));
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let down = &self.down_block_types[i];
            let up = &self.up_block_types[n - 1 - i];
            let cross_attn = match down.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(Error::field(
                        path,
                        "down_block_types",
                        format!(
                        "`{other}` is not supported; expected CrossAttnDownBlock2D or DownBlock2D"
                    ),
                    ))
                }
            };
            let up_cross = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(Error::field(
                        path,
                        "up_block_types",
                        format!(
                            "`{other}` is not supported; expected CrossAttnUpBlock2D or UpBlock2D"
                        ),
                    ))
                }
            };
            if cross_attn != up_cross {
                return Err(Error::field(
                    path,
                    "up_block_types",
                    "must mirror down_block_types (cross-attention in the same blocks)",
                ));
            }
            if self.norm_num_groups == 0 || self.block_out_channels[i] % self.norm_num_groups != 0 {
                return Err(Error::field(
                    path,
                    "norm_num_groups",
                    format!(
                        "{} does not divide block_out_channels[{i}] = {}",
                        self.norm_num_groups, self.block_out_channels[i]
                    ),
                ));
            }
            if heads[i] == 0 || self.block_out_channels[i] % heads[i] != 0 {
                return Err(Error::field(
                    path,
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block_out_channels[{i}] = {}",
                        heads[i], self.block_out_channels[i]
                    ),
                ));
            }
            blocks.push(BlockConfig {
                out_channels: self.block_out_channels[i],
                use_cross_attn: cross_attn.then_some(tlayers[i]),
                attention_head_dim: heads[i],
            });
        }
        Ok(UNetSpec {
            config: UNet2DConditionModelConfig {
                center_input_sample: self.center_input_sample,
                flip_sin_to_cos: self.flip_sin_to_cos,
                freq_shift: self.freq_shift,
                blocks,
                layers_per_block: self.layers_per_block,
                downsample_padding: self.downsample_padding,
                mid_block_scale_factor: self.mid_block_scale_factor,
                norm_num_groups: self.norm_num_groups,
                norm_eps: self.norm_eps,
                cross_attention_dim: cross[0],
                sliced_attention_size: None,
                use_linear_projection: self.use_linear_projection,
            },
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            cross_attention_dim: cross[0],
            sample_size: self.sample_size,
            added_cond,
        })
    }
}

/// `vae/config.json` as diffusers writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeJson {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub use_quant_conv: Option<bool>,
    #[serde(default)]
    pub use_post_quant_conv: Option<bool>,
    #[serde(default)]
    pub mid_block_add_attention: Option<bool>,
    /// SDXL's VAE overflows in f16 (diffusers decodes it in f32 when this is set).
    #[serde(default)]
    pub force_upcast: Option<bool>,
    #[serde(default = "d_silu")]
    pub act_fn: String,
}

/// The VAE's candle config plus the numbers the pipeline needs.
#[derive(Debug, Clone)]
pub struct VaeSpec {
    pub config: AutoEncoderKLConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// Pixels per latent along each side: 2^(number of blocks - 1).
    pub scale_factor: usize,
    /// Decode in f32 when the model runs in f16 (`force_upcast`).
    pub force_upcast: bool,
}

impl VaeJson {
    /// Translates diffusers' VAE config into candle's.
    pub fn to_spec(&self, path: &Path) -> Result<VaeSpec> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::field(path, "block_out_channels", "is empty"));
        }
        if self.act_fn != "silu" {
            return Err(Error::field(
                path,
                "act_fn",
                format!("`{}` is not supported; expected silu", self.act_fn),
            ));
        }
        if self.mid_block_add_attention == Some(false) {
            return Err(Error::field(
                path,
                "mid_block_add_attention",
                "false is not supported; expected true",
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(Error::field(
                path,
                "scaling_factor",
                format!("{}: expected a positive number", self.scaling_factor),
            ));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(Error::field(
                path,
                "norm_num_groups",
                format!(
                    "{} does not divide block_out_channels entry {c}",
                    self.norm_num_groups
                ),
            ));
        }
        Ok(VaeSpec {
            config: AutoEncoderKLConfig {
                block_out_channels: self.block_out_channels.clone(),
                layers_per_block: self.layers_per_block,
                latent_channels: self.latent_channels,
                norm_num_groups: self.norm_num_groups,
                use_quant_conv: self.use_quant_conv.unwrap_or(true),
                use_post_quant_conv: self.use_post_quant_conv.unwrap_or(true),
            },
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            scaling_factor: self.scaling_factor,
            shift_factor: self.shift_factor.unwrap_or(0.0),
            scale_factor: 1 << (n - 1),
            force_upcast: self.force_upcast.unwrap_or(false),
        })
    }
}

/// Builds candle-transformers' UNet. Generation uses our own (`models::unet`); this one is
/// kept so tests can show where candle's differs from diffusers.
pub fn build_unet(spec: &UNetSpec, vb: VarBuilder) -> Result<UNet2DConditionModel> {
    Ok(UNet2DConditionModel::new(
        vb,
        spec.in_channels,
        spec.out_channels,
        false,
        spec.config.clone(),
    )?)
}

/// Builds the VAE used for decoding.
pub fn build_vae(spec: &VaeSpec, vb: VarBuilder) -> Result<AutoEncoderKL> {
    Ok(AutoEncoderKL::new(
        vb,
        spec.in_channels,
        spec.out_channels,
        spec.config.clone(),
    )?)
}

/// Tensor overrides that make candle's VAE encoder return the latent mean exactly.
///
/// candle's `encode` only offers a noisy `sample()` = mean + std * randn with private fields.
/// Rewriting `quant_conv` so the log-variance half is a huge negative constant makes std
/// exactly 0 (exp underflows in every float type), so `sample()` returns the mean: the
/// deterministic "argmax" latents diffusers' img2img can be told to use. If the checkpoint has
/// no quant_conv, an identity one is supplied.
pub fn mean_encoder_overrides(
    spec: &VaeSpec,
    quant_conv: Option<(Tensor, Tensor)>,
) -> Result<(VaeSpec, Vec<(String, Tensor)>)> {
    let lc = spec.config.latent_channels;
    let (w, b) = match quant_conv {
        Some((w, b)) => (w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
        None => (
            Tensor::eye(2 * lc, DType::F32, &Device::Cpu)?.reshape((2 * lc, 2 * lc, 1, 1))?,
            Tensor::zeros(2 * lc, DType::F32, &Device::Cpu)?,
        ),
    };
    let w_mean = w.narrow(0, 0, lc)?;
    let w = Tensor::cat(
        &[
            w_mean,
            Tensor::zeros((lc, 2 * lc, 1, 1), DType::F32, w.device())?,
        ],
        0,
    )?;
    let b = Tensor::cat(
        &[
            b.narrow(0, 0, lc)?,
            Tensor::full(-1.0e4f32, lc, b.device())?,
        ],
        0,
    )?;
    let mut spec = spec.clone();
    spec.config.use_quant_conv = true;
    Ok((
        spec,
        vec![
            ("quant_conv.weight".into(), w),
            ("quant_conv.bias".into(), b),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15_UNET: &str = r#"{"_class_name":"UNet2DConditionModel","act_fn":"silu","attention_head_dim":8,"block_out_channels":[320,640,1280,1280],"center_input_sample":false,"cross_attention_dim":768,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,"mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#;

    #[test]
    fn sd15_unet_config_maps_to_candle() {
        let j: UNetJson = parse_json(SD15_UNET, Path::new("unet/config.json")).unwrap();
        let s = j.to_spec(Path::new("unet/config.json")).unwrap();
        assert_eq!(s.config.blocks.len(), 4);
        assert_eq!(s.config.blocks[0].use_cross_attn, Some(1));
        assert_eq!(s.config.blocks[3].use_cross_attn, None);
        assert_eq!(s.config.blocks[2].attention_head_dim, 8);
        assert_eq!(s.cross_attention_dim, 768);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let text = SD15_UNET.replace("\"act_fn\":\"silu\"", "\"addition_embed_type\":\"image\"");
        let j: UNetJson = parse_json(&text, Path::new("u/config.json")).unwrap();
        let err = j
            .to_spec(Path::new("u/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("u/config.json") && err.contains("addition_embed_type"),
            "{err}"
        );

        let text = SD15_UNET.replace("\"attention_head_dim\":8", "\"attention_head_dim\":[8,8]");
        let j: UNetJson = parse_json(&text, Path::new("u/config.json")).unwrap();
        let err = j
            .to_spec(Path::new("u/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attention_head_dim") && err.contains("one per block"),
            "{err}"
        );

        let err = parse_json::<UNetJson>("{\"in_channels\":4}", Path::new("u/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("u/config.json") && err.contains("block_out_channels"),
            "{err}"
        );
    }

    #[test]
    fn sdxl_text_time_is_read_and_checked() {
        let p = Path::new("u/config.json");
        let sdxl = SD15_UNET.replace(
            "\"act_fn\":\"silu\"",
            "\"addition_embed_type\":\"text_time\",\"addition_time_embed_dim\":256,\"projection_class_embeddings_input_dim\":2816",
        );
        let s = parse_json::<UNetJson>(&sdxl, p)
            .unwrap()
            .to_spec(p)
            .unwrap();
        let a = s.added_cond.unwrap();
        assert_eq!((a.time_embed_dim, a.pooled_dim()), (256, 1280));
        // The refiner's 5 ids (aesthetic score) leave a different pooled width; a config
        // whose ids alone fill the input is refused, naming the field.
        let bad = sdxl.replace("2816", "1536");
        let err = parse_json::<UNetJson>(&bad, p)
            .unwrap()
            .to_spec(p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("projection_class_embeddings_input_dim") && err.contains("1536"),
            "{err}"
        );
        let missing = sdxl.replace("\"addition_time_embed_dim\":256,", "");
        let err = parse_json::<UNetJson>(&missing, p)
            .unwrap()
            .to_spec(p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("addition_time_embed_dim"), "{err}");
    }

    #[test]
    fn mean_override_zeroes_the_variance() {
        let spec = VaeJson {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: Some(false),
            use_post_quant_conv: None,
            mid_block_add_attention: None,
            force_upcast: None,
            act_fn: "silu".into(),
        }
        .to_spec(Path::new("vae/config.json"))
        .unwrap();
        assert_eq!(spec.scale_factor, 2);
        let (spec2, ov) = mean_encoder_overrides(&spec, None).unwrap();
        assert!(spec2.config.use_quant_conv);
        let b: Vec<f32> = ov[1].1.to_vec1().unwrap();
        assert_eq!(&b[..4], &[0.0; 4]);
        assert!(b[4..].iter().all(|&v| v == -1.0e4));
        // exp(0.5 * -1e4) is exactly zero in f32: std vanishes.
        assert_eq!((0.5f32 * -1.0e4).exp(), 0.0);
    }
}
