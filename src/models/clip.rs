//! CLIP text and vision towers, configured from Hugging Face `config.json`.
//!
//! One implementation serves the Stable Diffusion text encoder (a `CLIPTextModel` folder:
//! `config.json` + `model.safetensors`), CLIP probes and CLIP guidance (a `CLIPModel` folder:
//! `config.json` with `text_config` / `vision_config`, `model.safetensors`). Parameter names
//! are those of transformers' `modeling_clip.py`, and the arithmetic follows it operation by
//! operation (attention scores scaled after `q @ k^T`, additive causal mask of the dtype's
//! minimum, pooled text output at the EOS position chosen exactly as transformers does).
//!
//! [`NormMode`] picks how layer norm and softmax are computed. candle's fused kernels
//! (`candle_nn::ops::layer_norm`, `softmax_last_dim`) are fast but have no backward: a graph
//! through them silently loses its gradient. Guidance needs d(loss)/d(pixels) through the
//! vision tower, so [`NormMode::Differentiable`] uses ops whose backward is correct: on the
//! CPU in f32 a layer norm and a blocked attention with their own backward
//! (`kernels::norm`, `kernels::attention`), elsewhere compositions of primitive ops.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::kernels;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// How layer norm and softmax are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormMode {
    /// candle's fused kernels: fastest, for inference only. They have no backward, so
    /// gradients through a tower built in this mode are silently dropped (missing, or wrong
    /// where a residual path survives). F64 has no fused CPU kernel; in F64 this mode falls
    /// back to the composed ops.
    #[default]
    Fused,
    /// Layer norm and attention with a correct backward; use it for guidance. On the CPU in
    /// f32 they are kernels with their own backward (the text tower's masked attention stays
    /// composed); elsewhere layer norm and softmax are composed from mean/sub/sqr/sqrt/div/
    /// mul/add and exp/sum (softmax subtracts a detached row maximum).
    Differentiable,
}

/// Activation named by `hidden_act` in a CLIP config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU with erf (LAION / open_clip models).
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation of GELU.
    #[serde(rename = "gelu_new")]
    GeluNew,
    /// Tanh approximation of GELU (same formula as `gelu_new`).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluPytorchTanh,
}

impl ClipActivation {
    /// Every name accepted in `hidden_act`.
    pub const NAMES: [&'static str; 4] = ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"];

    /// The activation for a `hidden_act` name, if known.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" => Some(Self::GeluNew),
            "gelu_pytorch_tanh" => Some(Self::GeluPytorchTanh),
            _ => None,
        }
    }

    /// The `hidden_act` name of this activation.
    pub fn name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
            Self::GeluNew => "gelu_new",
            Self::GeluPytorchTanh => "gelu_pytorch_tanh",
        }
    }

    /// Applies the activation (every variant has a correct backward in candle).
    pub fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs.mul(&candle_nn::ops::sigmoid(&(xs * 1.702)?)?),
            Self::Gelu => xs.gelu_erf(),
            Self::GeluNew | Self::GeluPytorchTanh => xs.gelu(),
        }
    }
}

/// Shapes and ids of a CLIP text tower (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (from the top level of a `CLIPModel` config).
    pub projection_dim: usize,
    pub eos_token_id: u32,
    pub bos_token_id: u32,
    pub pad_token_id: u32,
}

/// Shapes of a CLIP vision tower (transformers' `CLIPVisionConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// Output width of `visual_projection` (from the top level of a `CLIPModel` config).
    pub projection_dim: usize,
}

/// A whole `CLIPModel` config: both towers, the shared projection width and the initial
/// logit scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

// transformers' defaults (CLIPTextConfig / CLIPVisionConfig / CLIPConfig `__init__`).
const TEXT_DEFAULTS: [(&str, usize); 8] = [
    ("hidden_size", 512),
    ("intermediate_size", 2048),
    ("num_hidden_layers", 12),
    ("num_attention_heads", 8),
    ("max_position_embeddings", 77),
    ("vocab_size", 49408),
    ("projection_dim", 512),
    ("pad_token_id", 1),
];
const TEXT_BOS: usize = 49406;
const TEXT_EOS: usize = 49407;
const VISION_DEFAULTS: [(&str, usize); 8] = [
    ("hidden_size", 768),
    ("intermediate_size", 3072),
    ("num_hidden_layers", 12),
    ("num_attention_heads", 12),
    ("image_size", 224),
    ("patch_size", 32),
    ("num_channels", 3),
    ("projection_dim", 512),
];
const DEFAULT_PROJECTION_DIM: usize = 512;
const DEFAULT_LOGIT_SCALE_INIT: f64 = 2.6592;
const DEFAULT_LAYER_NORM_EPS: f64 = 1e-5;

/// The shape fields a stand-alone (`CLIPTextModel` / `CLIPVisionModel`) config must carry.
/// transformers always writes them at the top level; inside a `CLIPModel` config the
/// sub-configs are written as a diff against the defaults, so there a missing field takes
/// transformers' default, exactly as `from_pretrained` does.
const REQUIRED_SHAPE_FIELDS: [&str; 4] = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
];

fn default_of(table: &[(&str, usize)], name: &str) -> usize {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no default for {name}"))
}

/// One object of a config file, with the path and key prefix used in error messages.
struct Section<'a> {
    path: &'a Path,
    prefix: &'static str,
    obj: &'a Map<String, Value>,
    /// Inside a `CLIPModel` config: every field falls back to transformers' default.
    nested: bool,
}

impl Section<'_> {
    fn name(&self, field: &str) -> String {
        format!("{}{}", self.prefix, field)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str, default: usize) -> Result<usize> {
        let required = !self.nested && REQUIRED_SHAPE_FIELDS.contains(&field);
        match self.get(field) {
            None if required => Err(Error::field(
                self.path,
                self.name(field),
                "missing; a CLIP config must give it",
            )),
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    Error::field(
                        self.path,
                        self.name(field),
                        format!("expected a non-negative integer, found {v}"),
                    )
                }),
        }
    }

    fn positive(&self, field: &str, default: usize) -> Result<usize> {
        let n = self.usize(field, default)?;
        if n == 0 {
            return Err(Error::field(
                self.path,
                self.name(field),
                "must be positive",
            ));
        }
        Ok(n)
    }

    fn token_id(&self, field: &str, default: usize) -> Result<u32> {
        let n = self.usize(field, default)?;
        u32::try_from(n)
            .map_err(|_| Error::field(self.path, self.name(field), format!("{n} is too large")))
    }

    fn f64(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::field(
                    self.path,
                    self.name(field),
                    format!("expected a number, found {v}"),
                )
            }),
        }
    }

    fn activation(&self) -> Result<ClipActivation> {
        match self.get("hidden_act") {
            None => Ok(ClipActivation::QuickGelu),
            Some(Value::String(s)) => ClipActivation::from_name(s).ok_or_else(|| {
                Error::field(
                    self.path,
                    self.name("hidden_act"),
                    format!(
                        "unknown activation `{s}`; expected one of {}",
                        ClipActivation::NAMES.join(", ")
                    ),
                )
            }),
            Some(v) => Err(Error::field(
                self.path,
                self.name("hidden_act"),
                format!("expected a string, found {v}"),
            )),
        }
    }

    fn heads_divide(&self, hidden: usize, heads: usize) -> Result<()> {
        if hidden % heads != 0 {
            return Err(Error::field(
                self.path,
                self.name("num_attention_heads"),
                format!("{heads} heads do not divide hidden_size {hidden}"),
            ));
        }
        Ok(())
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::file(path, "expected a JSON object"));
    }
    Ok(value)
}

/// Whether a config object is a `CLIPModel` config (holding both towers).
fn is_clip_model(obj: &Map<String, Value>) -> bool {
    obj.contains_key("text_config")
        || obj.contains_key("vision_config")
        || obj.get("model_type").and_then(Value::as_str) == Some("clip")
}

/// The sub-config `key` of a `CLIPModel` config (an absent one means all defaults).
fn sub_config<'a>(
    path: &Path,
    obj: &'a Map<String, Value>,
    key: &str,
    empty: &'a Map<String, Value>,
) -> Result<&'a Map<String, Value>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(empty),
        Some(Value::Object(m)) => Ok(m),
        Some(v) => Err(Error::field(
            path,
            key,
            format!("expected an object, found {v}"),
        )),
    }
}

/// Top-level `projection_dim` and `logit_scale_init_value` of a `CLIPModel` config.
fn top_level(path: &Path, obj: &Map<String, Value>) -> Result<(usize, f64)> {
    let top = Section {
        path,
        prefix: "",
        obj,
        nested: true,
    };
    Ok((
        top.positive("projection_dim", DEFAULT_PROJECTION_DIM)?,
        top.f64("logit_scale_init_value", DEFAULT_LOGIT_SCALE_INIT)?,
    ))
}

impl ClipTextConfig {
    /// Reads a `CLIPTextModel` config.json (e.g. a Stable Diffusion `text_encoder/`) or a
    /// `CLIPModel` config.json (its `text_config`, with the top-level `projection_dim`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read_json(path)?, path)
    }

    /// As [`ClipTextConfig::load`], from an already parsed file; `path` names it in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
        if is_clip_model(obj) {
            let empty = Map::new();
            let sub = sub_config(path, obj, "text_config", &empty)?;
            let (projection_dim, _) = top_level(path, obj)?;
            let section = Section {
                path,
                prefix: "text_config.",
                obj: sub,
                nested: true,
            };
            Self::from_section(&section, Some(projection_dim))
        } else {
            let section = Section {
                path,
                prefix: "",
                obj,
                nested: false,
            };
            Self::from_section(&section, None)
        }
    }

    fn from_section(s: &Section<'_>, projection_dim: Option<usize>) -> Result<Self> {
        let d = |n| default_of(&TEXT_DEFAULTS, n);
        let hidden_size = s.positive("hidden_size", d("hidden_size"))?;
        let num_attention_heads = s.positive("num_attention_heads", d("num_attention_heads"))?;
        s.heads_divide(hidden_size, num_attention_heads)?;
        Ok(Self {
            hidden_size,
            intermediate_size: s.positive("intermediate_size", d("intermediate_size"))?,
            num_hidden_layers: s.usize("num_hidden_layers", d("num_hidden_layers"))?,
            num_attention_heads,
            max_position_embeddings: s
                .positive("max_position_embeddings", d("max_position_embeddings"))?,
            vocab_size: s.positive("vocab_size", d("vocab_size"))?,
            hidden_act: s.activation()?,
            layer_norm_eps: s.f64("layer_norm_eps", DEFAULT_LAYER_NORM_EPS)?,
            projection_dim: match projection_dim {
                Some(p) => p,
                None => s.positive("projection_dim", d("projection_dim"))?,
            },
            eos_token_id: s.token_id("eos_token_id", TEXT_EOS)?,
            bos_token_id: s.token_id("bos_token_id", TEXT_BOS)?,
            pad_token_id: s.token_id("pad_token_id", d("pad_token_id"))?,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl ClipVisionConfig {
    /// Reads a `CLIPVisionModel` config.json or a `CLIPModel` config.json (its
    /// `vision_config`, with the top-level `projection_dim`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read_json(path)?, path)
    }

    /// As [`ClipVisionConfig::load`], from an already parsed file; `path` names it in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
        if is_clip_model(obj) {
            let empty = Map::new();
            let sub = sub_config(path, obj, "vision_config", &empty)?;
            let (projection_dim, _) = top_level(path, obj)?;
            let section = Section {
                path,
                prefix: "vision_config.",
                obj: sub,
                nested: true,
            };
            Self::from_section(&section, Some(projection_dim))
        } else {
            let section = Section {
                path,
                prefix: "",
                obj,
                nested: false,
            };
            Self::from_section(&section, None)
        }
    }

    fn from_section(s: &Section<'_>, projection_dim: Option<usize>) -> Result<Self> {
        let d = |n| default_of(&VISION_DEFAULTS, n);
        let hidden_size = s.positive("hidden_size", d("hidden_size"))?;
        let num_attention_heads = s.positive("num_attention_heads", d("num_attention_heads"))?;
        s.heads_divide(hidden_size, num_attention_heads)?;
        let image_size = s.positive("image_size", d("image_size"))?;
        let patch_size = s.positive("patch_size", d("patch_size"))?;
        if patch_size > image_size {
            return Err(Error::field(
                s.path,
                s.name("patch_size"),
                format!("{patch_size} is larger than image_size {image_size}"),
            ));
        }
        Ok(Self {
            hidden_size,
            intermediate_size: s.positive("intermediate_size", d("intermediate_size"))?,
            num_hidden_layers: s.usize("num_hidden_layers", d("num_hidden_layers"))?,
            num_attention_heads,
            image_size,
            patch_size,
            num_channels: s.positive("num_channels", d("num_channels"))?,
            hidden_act: s.activation()?,
            layer_norm_eps: s.f64("layer_norm_eps", DEFAULT_LAYER_NORM_EPS)?,
            projection_dim: match projection_dim {
                Some(p) => p,
                None => s.positive("projection_dim", d("projection_dim"))?,
            },
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per side of the (square) input.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens the encoder sees: one class token plus one per patch.
    pub fn num_positions(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }
}

impl ClipConfig {
    /// Reads a `CLIPModel` config.json; a config of a single tower is an error.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read_json(path)?, path)
    }

    /// As [`ClipConfig::load`], from an already parsed file; `path` names it in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
        if !is_clip_model(obj) {
            return Err(Error::field(
                path,
                "text_config",
                "missing: not a CLIPModel config (it has neither text_config nor vision_config)",
            ));
        }
        let (projection_dim, logit_scale_init_value) = top_level(path, obj)?;
        Ok(Self {
            text: ClipTextConfig::from_json(value, path)?,
            vision: ClipVisionConfig::from_json(value, path)?,
            projection_dim,
            logit_scale_init_value,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------

/// Layer norm over the last dimension, fused or composed from differentiable ops.
pub fn layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    mode: NormMode,
) -> candle_core::Result<Tensor> {
    if mode == NormMode::Fused && xs.dtype() != DType::F64 {
        // No backward: see NormMode::Fused.
        return candle_nn::ops::layer_norm(&xs.contiguous()?, weight, bias, eps as f32);
    }
    kernels::norm::layer_norm_differentiable(xs, weight, bias, eps)
        .map_err(candle_core::Error::wrap)
}

/// Softmax over the last dimension, fused or composed from differentiable ops
/// (`exp(x - max) / sum`, the row maximum detached: it cancels in the exact derivative).
pub fn softmax_last_dim(xs: &Tensor, mode: NormMode) -> candle_core::Result<Tensor> {
    if mode == NormMode::Fused && xs.dtype() != DType::F64 {
        // No backward: see NormMode::Fused.
        return candle_nn::ops::softmax_last_dim(&xs.contiguous()?);
    }
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// L2-normalises the last dimension (differentiable).
pub fn normalize(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    mode: NormMode,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, mode: NormMode, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
            mode,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(xs, &self.weight, &self.bias, self.eps, self.mode)
    }
}

/// A linear layer with its weight packed once (CPU f32): a tower's layers see few rows per
/// call, where packing per call shows. In a graph (the guide's vision tower) the first
/// backward also packs the transpose, for the input gradient.
fn layer(l: Linear) -> candle_core::Result<kernels::linear::Linear> {
    kernels::linear::Linear::packed(l).map_err(candle_core::Error::wrap)
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: kernels::linear::Linear,
    k_proj: kernels::linear::Linear,
    v_proj: kernels::linear::Linear,
    out_proj: kernels::linear::Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    mode: NormMode,
}

impl Attention {
    fn new(
        hidden: usize,
        heads: usize,
        mode: NormMode,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let head_dim = hidden / heads;
        Ok(Self {
            q_proj: layer(candle_nn::linear(hidden, hidden, vb.pp("q_proj"))?)?,
            k_proj: layer(candle_nn::linear(hidden, hidden, vb.pp("k_proj"))?)?,
            v_proj: layer(candle_nn::linear(hidden, hidden, vb.pp("v_proj"))?)?,
            out_proj: layer(candle_nn::linear(hidden, hidden, vb.pp("out_proj"))?)?,
            num_heads: heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
            mode,
        })
    }

    fn split_heads(&self, xs: &Tensor, b: usize, s: usize) -> candle_core::Result<Tensor> {
        xs.reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `xs`: (batch, seq, hidden); `mask`: additive (seq, seq) or none.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if mask.is_none() && (self.mode == NormMode::Fused || xs.dtype() == DType::F32) {
            // Without a mask (the vision tower): the blocked CPU kernel on the (batch, seq,
            // heads*dim) projections, with its own backward when differentiable; candle's
            // composition on other devices (in f16 the differentiable path stays composed,
            // transformers' eager order).
            let (q, k, v) = (
                self.q_proj.forward(xs)?,
                self.k_proj.forward(xs)?,
                self.v_proj.forward(xs)?,
            );
            let out = match self.mode {
                NormMode::Fused => {
                    kernels::attention::attention(&q, &k, &v, self.num_heads, self.scale)
                }
                NormMode::Differentiable => {
                    kernels::attention::differentiable(&q, &k, &v, self.num_heads, self.scale)
                }
            }
            .map_err(candle_core::Error::wrap)?;
            return self.out_proj.forward(&out);
        }
        let (b, s, hidden) = xs.dims3()?;
        let q = self.split_heads(&self.q_proj.forward(xs)?, b, s)?;
        let k = self.split_heads(&self.k_proj.forward(xs)?, b, s)?;
        let v = self.split_heads(&self.v_proj.forward(xs)?, b, s)?;
        // transformers' eager attention: (q @ k^T) * scale, then the mask, then softmax.
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = softmax_last_dim(&scores, self.mode)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, hidden))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    fc1: kernels::linear::Linear,
    fc2: kernels::linear::Linear,
    act: ClipActivation,
    mode: NormMode,
}

impl Mlp {
    fn new(
        hidden: usize,
        intermediate: usize,
        act: ClipActivation,
        mode: NormMode,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: layer(candle_nn::linear(hidden, intermediate, vb.pp("fc1"))?)?,
            fc2: layer(candle_nn::linear(intermediate, hidden, vb.pp("fc2"))?)?,
            act,
            mode,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward(xs)?;
        let h = match (self.mode, self.act) {
            (NormMode::Fused, ClipActivation::QuickGelu) => kernels::activation::quick_gelu(&h),
            (NormMode::Fused, ClipActivation::Gelu) => kernels::activation::gelu_erf(&h),
            (NormMode::Differentiable, ClipActivation::QuickGelu) => {
                Ok(kernels::activation::quick_gelu_differentiable(&h)?)
            }
            (NormMode::Differentiable, ClipActivation::Gelu) => {
                Ok(kernels::activation::gelu_erf_differentiable(&h)?)
            }
            _ => Ok(self.act.forward(&h)?),
        }
        .map_err(candle_core::Error::wrap)?;
        self.fc2.forward(&h)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

/// Shape parameters shared by both towers' encoders.
struct EncoderShape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    act: ClipActivation,
    eps: f64,
}

impl EncoderLayer {
    fn new(shape: &EncoderShape, mode: NormMode, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(shape.hidden, shape.eps, mode, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(shape.hidden, shape.heads, mode, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(shape.hidden, shape.eps, mode, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(
                shape.hidden,
                shape.intermediate,
                shape.act,
                mode,
                vb.pp("mlp"),
            )?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        xs + h
    }
}

#[derive(Clone, Debug)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(shape: &EncoderShape, mode: NormMode, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..shape.layers)
            .map(|i| EncoderLayer::new(shape, mode, vb.pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Runs the layers, keeping the outputs of the layers listed in `keep` (in that order).
    /// Stops after the last kept layer when `run_all` is false.
    fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        keep: &[usize],
        run_all: bool,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let stop = if run_all {
            self.layers.len()
        } else {
            keep.iter().map(|&i| i + 1).max().unwrap_or(0)
        };
        let mut kept: Vec<Option<Tensor>> = vec![None; keep.len()];
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate().take(stop) {
            xs = layer.forward(&xs, mask)?;
            for (slot, &k) in kept.iter_mut().zip(keep) {
                if k == i {
                    *slot = Some(xs.clone());
                }
            }
        }
        let kept = kept
            .into_iter()
            .map(|t| t.expect("validated layer index"))
            .collect();
        Ok((xs, kept))
    }
}

fn check_layers(layers: &[usize], available: usize) -> Result<()> {
    if let Some(&bad) = layers.iter().find(|&&i| i >= available) {
        return Err(Error::value(
            "layers",
            format!(
                "encoder layer {bad} does not exist; the tower has {available} layers (0-based)"
            ),
        ));
    }
    Ok(())
}

/// Additive causal mask (seq, seq): 0 on and below the diagonal, the dtype's minimum above
/// (transformers uses `torch.finfo(dtype).min`).
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let min = match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        _ => f32::MIN as f64,
    };
    let values: Vec<f64> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { min } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

/// Reads `model.safetensors` of a model folder into a VarBuilder, with the handle that says
/// which tensors the model built from it read.
fn load_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, crate::models::weights::Usage)> {
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(Error::file(
            dir,
            "expected model.safetensors in this folder (a transformers CLIP checkpoint)",
        ));
    }
    // Memory-mapped, with the header checked up front and errors naming file and tensor.
    let file = crate::models::weights::FileWeights::open(&[weights])?;
    let usage = file.usage();
    Ok((file.into_var_builder(dtype, device), usage))
}

/// Wraps a weight-loading failure with the file it came from.
fn weights_error(dir: &Path) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| {
        Error::file(
            dir.join("model.safetensors"),
            format!("bad or missing weights: {e}"),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Text tower
// ---------------------------------------------------------------------------------------

/// CLIP's text transformer (transformers' `CLIPTextTransformer`).
#[derive(Clone, Debug)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
    mode: NormMode,
}

impl ClipTextTransformer {
    /// Builds the tower from weights under `vb`, which must point at the tower itself:
    /// `vb.pp("text_model")` for `CLIPModel` checkpoints and for `CLIPTextModel` ones written
    /// by transformers 4 (e.g. SD 1.5's `text_encoder/`), `vb` itself for `CLIPTextModel`
    /// checkpoints written by transformers 5 ([`ClipTextTransformer::from_dir`] tells them
    /// apart). Names below it: `embeddings.token_embedding.weight`,
    /// `embeddings.position_embedding.weight`, `encoder.layers.{i}.…`, `final_layer_norm`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, norm: NormMode) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        let shape = EncoderShape {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            encoder: Encoder::new(&shape, norm, vb.pp("encoder"))?,
            final_layer_norm: LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                norm,
                vb.pp("final_layer_norm"),
            )?,
            config: cfg.clone(),
            mode: norm,
        })
    }

    /// Loads a `CLIPTextModel` folder (`config.json` + `model.safetensors`, e.g. SD's
    /// `text_encoder/`), converting the weights to `dtype`.
    pub fn from_dir(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        norm: NormMode,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ClipTextConfig::load(dir.join("config.json"))?;
        let (vb, usage) = load_weights(dir, dtype, device)?;
        // Checkpoints written by transformers 4 put the tower under `text_model.`; those
        // written by transformers 5 store its tensors at the root.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let tower = Self::new(vb, &cfg, norm).map_err(|e| match e {
            Error::Candle(e) => weights_error(dir)(e),
            other => other,
        })?;
        // A CLIPModel folder's other parts are not the text tower's.
        usage.check_all_read(
            &dir.join("config.json"),
            &[
                "vision_model",
                "visual_projection",
                "text_projection",
                "logit_scale",
            ],
        )?;
        Ok(tower)
    }

    /// The config this tower was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The norm mode this tower was built with.
    pub fn norm_mode(&self) -> NormMode {
        self.mode
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2().map_err(|_| {
            Error::value(
                "input_ids",
                format!("expected shape (batch, seq), got {:?}", ids.dims()),
            )
        })?;
        if seq == 0 || seq > self.config.max_position_embeddings {
            return Err(Error::value(
                "input_ids",
                format!(
                    "sequence length {seq} is outside 1..={} (max_position_embeddings)",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let tokens = self.token_embedding.forward(ids)?;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        Ok(tokens.broadcast_add(&positions)?)
    }

    /// `last_hidden_state` (after the final layer norm): what Stable Diffusion conditions on.
    /// `ids`: (batch, seq) of u32 or i64.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_hidden(ids, &[])?.0)
    }

    /// `last_hidden_state` and the raw outputs (before the final layer norm) of the listed
    /// encoder layers, 0-based: layer `i` is transformers' `hidden_states[i + 1]`.
    pub fn forward_with_hidden(
        &self,
        ids: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        check_layers(layers, self.encoder.layers.len())?;
        let xs = self.embed(ids)?;
        let seq = xs.dim(1)?;
        let mask = causal_mask(seq, xs.dtype(), xs.device())?;
        let (xs, hidden) = self.encoder.forward(&xs, Some(&mask), layers, true)?;
        Ok((self.final_layer_norm.forward(&xs)?, hidden))
    }

    /// Positions (one per row) of the pooled token, as transformers picks them: with the
    /// legacy `eos_token_id == 2` the argmax of the ids (first maximum), otherwise the first
    /// position holding `eos_token_id` (0 when none does, like `argmax` of an all-false row).
    pub fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let eos = self.config.eos_token_id as i64;
        Ok(rows
            .iter()
            .map(|row| {
                if self.config.eos_token_id == 2 {
                    let mut best = 0;
                    for (i, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    row.iter().position(|&v| v == eos).unwrap_or(0)
                }
            })
            .collect())
    }

    /// `pooler_output`: the row of `hidden` (batch, seq, dim) at each sequence's EOS position
    /// (see [`ClipTextTransformer::eos_positions`]). Differentiable in `hidden`.
    pub fn pooled(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, s, d) = hidden.dims3()?;
        let positions = self.eos_positions(ids)?;
        if positions.len() != b {
            return Err(Error::value(
                "input_ids",
                format!(
                    "{} rows of ids for a batch of {b} hidden states",
                    positions.len()
                ),
            ));
        }
        let flat: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| (row * s + p) as u32)
            .collect();
        let index = Tensor::from_vec(flat, b, hidden.device())?;
        Ok(hidden.reshape((b * s, d))?.index_select(&index, 0)?)
    }
}

// ---------------------------------------------------------------------------------------
// Vision tower
// ---------------------------------------------------------------------------------------

/// CLIP's vision transformer (transformers' `CLIPVisionTransformer`).
#[derive(Clone, Debug)]
pub struct ClipVisionTransformer {
    patch_embedding: kernels::linear::Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
    mode: NormMode,
}

impl ClipVisionTransformer {
    /// Builds the tower from weights under `vb`, which must point at the tower itself
    /// (`vb.pp("vision_model")` for transformers checkpoints). Names below it:
    /// `embeddings.patch_embedding.weight` (conv, no bias), `embeddings.class_embedding`,
    /// `embeddings.position_embedding.weight`, `pre_layrnorm` (sic), `encoder.layers.{i}.…`,
    /// `post_layernorm`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig, norm: NormMode) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let patch_embedding = emb.pp("patch_embedding").get(
            (
                cfg.hidden_size,
                cfg.num_channels,
                cfg.patch_size,
                cfg.patch_size,
            ),
            "weight",
        )?;
        // (hidden, channels * p * p): a row per output channel, in the unfolded patches'
        // (channel, row, column) order.
        let patch_embedding = layer(Linear::new(
            patch_embedding.reshape((cfg.hidden_size, ()))?,
            None,
        ))?;
        let class_embedding = emb.get(cfg.hidden_size, "class_embedding")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.num_positions(), cfg.hidden_size), "weight")?;
        let shape = EncoderShape {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let ln =
            |name: &str| LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, norm, vb.pp(name));
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm: ln("pre_layrnorm")?,
            encoder: Encoder::new(&shape, norm, vb.pp("encoder"))?,
            post_layernorm: ln("post_layernorm")?,
            config: cfg.clone(),
            mode: norm,
        })
    }

    /// The config this tower was built from.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The norm mode this tower was built with.
    pub fn norm_mode(&self) -> NormMode {
        self.mode
    }

    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let dims = pixels.dims();
        let ok = dims.len() == 4
            && dims[1] == cfg.num_channels
            && dims[2] == cfg.image_size
            && dims[3] == cfg.image_size;
        if !ok {
            return Err(Error::value(
                "pixels",
                format!(
                    "expected (batch, {}, {}, {}) normalised pixels, got {dims:?}",
                    cfg.num_channels, cfg.image_size, cfg.image_size
                ),
            ));
        }
        let b = dims[0];
        // The patch convolution (stride = kernel, no padding) as a Linear over the unfolded
        // patches: candle's conv2d backward (the input's gradient and the kernel's) took
        // ~100 ms of a guided step's 4-view ViT-B/32 pass; the GEMM takes a few.
        let (p, grid) = (cfg.patch_size, cfg.grid_size());
        let patches = pixels
            .narrow(2, 0, grid * p)?
            .narrow(3, 0, grid * p)?
            .reshape((b, cfg.num_channels, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, grid * grid, cfg.num_channels * p * p))?;
        let patches = self.patch_embedding.forward(&patches)?;
        let class = self
            .class_embedding
            .reshape((1, 1, cfg.hidden_size))?
            .broadcast_as((b, 1, cfg.hidden_size))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?;
        let xs = xs.broadcast_add(&self.position_embedding)?;
        Ok(self.pre_layrnorm.forward(&xs)?)
    }

    /// `pooler_output`: `post_layernorm` of the class token. `pixels`: (batch, channels,
    /// image_size, image_size), already normalised with CLIP's mean and std.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_hidden(pixels, &[])?.0)
    }

    /// The pooled output and the outputs of the listed encoder layers (0-based, each
    /// (batch, tokens, hidden), class token first): layer `i` is transformers'
    /// `hidden_states[i + 1]`.
    pub fn forward_with_hidden(
        &self,
        pixels: &Tensor,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        check_layers(layers, self.encoder.layers.len())?;
        let xs = self.embed(pixels)?;
        let (xs, hidden) = self.encoder.forward(&xs, None, layers, true)?;
        let cls = xs.narrow(1, 0, 1)?.squeeze(1)?;
        Ok((self.post_layernorm.forward(&cls)?, hidden))
    }

    /// Only the outputs of the listed encoder layers, stopping after the deepest one.
    pub fn hidden_states(&self, pixels: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        check_layers(layers, self.encoder.layers.len())?;
        let xs = self.embed(pixels)?;
        Ok(self.encoder.forward(&xs, None, layers, false)?.1)
    }
}

// ---------------------------------------------------------------------------------------
// Both towers
// ---------------------------------------------------------------------------------------

/// transformers' `CLIPModel`: both towers, their projections and the logit scale.
#[derive(Clone, Debug)]
pub struct ClipModel {
    pub text: ClipTextTransformer,
    pub vision: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    logit_scale: Tensor,
    config: ClipConfig,
}

impl ClipModel {
    /// Builds the model from weights under `vb`, pointing at the checkpoint's root
    /// (`text_model.…`, `vision_model.…`, `text_projection.weight`,
    /// `visual_projection.weight`, `logit_scale`).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig, norm: NormMode) -> Result<Self> {
        let text = ClipTextTransformer::new(vb.pp("text_model"), &cfg.text, norm)?;
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision, norm)?;
        let text_projection = candle_nn::linear_no_bias(
            cfg.text.hidden_size,
            cfg.projection_dim,
            vb.pp("text_projection"),
        )?;
        let visual_projection = candle_nn::linear_no_bias(
            cfg.vision.hidden_size,
            cfg.projection_dim,
            vb.pp("visual_projection"),
        )?;
        let logit_scale = vb.get_with_hints(
            (),
            "logit_scale",
            candle_nn::Init::Const(cfg.logit_scale_init_value),
        )?;
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
            logit_scale,
            config: cfg.clone(),
        })
    }

    /// Loads a `CLIPModel` folder (`config.json` + `model.safetensors`).
    pub fn from_dir(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        norm: NormMode,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ClipConfig::load(dir.join("config.json"))?;
        let (vb, usage) = load_weights(dir, dtype, device)?;
        let model = Self::new(vb, &cfg, norm).map_err(|e| match e {
            Error::Candle(e) => weights_error(dir)(e),
            other => other,
        })?;
        usage.check_all_read(&dir.join("config.json"), &[])?;
        Ok(model)
    }

    /// The config this model was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The learned logit scale (a scalar, before `exp`).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// Projected text features (`get_text_features`): (batch, projection_dim), not normalised.
    pub fn embed_text(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text.forward(ids)?;
        let pooled = self.text.pooled(&hidden, ids)?;
        Ok(self.text_projection.forward(&pooled)?)
    }

    /// Projected image features (`get_image_features`): (batch, projection_dim), not
    /// normalised. Differentiable in `pixels` when built with [`NormMode::Differentiable`].
    pub fn embed_image(&self, pixels: &Tensor) -> Result<Tensor> {
        self.project_image(&self.vision.forward(pixels)?)
    }

    /// `visual_projection` applied to a pooled vision output.
    pub fn project_image(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(self.visual_projection.forward(pooled)?)
    }

    /// `text_projection` applied to a pooled text output.
    pub fn project_text(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(self.text_projection.forward(pooled)?)
    }

    /// `logits_per_image` of transformers: `exp(logit_scale) * norm(image) @ norm(text)^T`,
    /// (images, texts).
    pub fn logits_per_image(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let img = normalize(image_embeds)?;
        let txt = normalize(text_embeds)?;
        let scale = self.logit_scale.exp()?;
        Ok(img.matmul(&txt.t()?)?.broadcast_mul(&scale)?)
    }
}

#[cfg(test)]
mod tests;
