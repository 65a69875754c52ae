//! artguide's own VAE decoder (diffusers' `AutoencoderKL.decode`: `post_quant_conv`, then
//! `decoder.*`), with diffusers' parameter names, old (`query`/`proj_attn`) and new
//! (`to_q`/`to_out.0`) attention names alike.
//!
//! It exists for speed and for exact gradients: in [`Mode::Inference`] convolutions and the
//! mid-block attention run through `crate::kernels` (candle 0.11's CPU convolution builds a
//! whole-image im2col: 1.2 GB for one 128-channel 3x3 layer at 512x512, and is 2-4x slower);
//! in [`Mode::Differentiable`] every op is one whose backward candle gets right (plain
//! `softmax`, candle's `conv2d`, a broadcast upsample), which CLIP guidance through the VAE
//! needs. The encoder (img2img only) stays candle-transformers' (`sd::build_vae`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};

use crate::kernels;
use crate::kernels::conv::Conv2d;
use crate::kernels::norm::GroupNorm;
use crate::models::sd::VaeSpec;
use crate::models::taesd::upsample_nearest;
use crate::Result;

/// diffusers' `resnet_eps` for the VAE (the GroupNorms of resnets, attention and output).
const EPS: f64 = 1e-6;

/// Which ops the decoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fastest ops; no gradient.
    Inference,
    /// Ops with correct backward passes (for guidance).
    Differentiable,
}

/// A convolution with "same" padding, as every VAE decoder layer is.
#[derive(Debug, Clone)]
struct Conv(Conv2d);

impl Conv {
    fn new(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        Ok(Conv(Conv2d::new(candle_nn::conv2d(
            cin, cout, k, cfg, vb,
        )?)?))
    }

    /// Both modes: in a differentiated graph the layer's backward reaches only its input.
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
    }
}

fn group_norm(groups: usize, channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(groups, channels, EPS, vb)
}

/// `SiLU(GroupNorm(x))`, fused for inference.
fn norm_silu(norm: &GroupNorm, x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => norm.forward_silu(x),
        Mode::Differentiable => norm.forward_differentiable(x, true),
    }
}

#[derive(Debug, Clone)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Resnet {
            norm1: group_norm(groups, cin, vb.pp("norm1"))?,
            conv1: Conv::new(cin, cout, 3, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, vb.pp("norm2"))?,
            conv2: Conv::new(cout, cout, 3, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(Conv::new(cin, cout, 1, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = norm_silu(&self.norm1, x, mode)?;
        let h = self.conv1.forward(&h, mode)?;
        let h = norm_silu(&self.norm2, &h, mode)?;
        let h = self.conv2.forward(&h, mode)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x, mode)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// The mid block's single-head self-attention over pixels, with its GroupNorm and residual.
#[derive(Debug, Clone)]
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    channels: usize,
}

/// A projection stored as `(c, c)` (diffusers) or `(c, c, 1, 1)` (checkpoints converted from
/// the original 1x1 convolutions).
fn projection(c: usize, vb: VarBuilder) -> Result<Linear> {
    let w = match vb.get((c, c), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
    };
    Ok(Linear::new(w, Some(vb.get(c, "bias")?)))
}

impl Attention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let [q, k, v, o] = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Attention {
            norm: group_norm(groups, c, vb.pp("group_norm"))?,
            q: projection(c, vb.pp(q))?,
            k: projection(c, vb.pp(k))?,
            v: projection(c, vb.pp(v))?,
            out: projection(c, vb.pp(o))?,
            channels: c,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = match mode {
            Mode::Inference => self.norm.forward(x)?,
            Mode::Differentiable => self.norm.forward_differentiable(x, false)?,
        };
        let tokens = normed
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&tokens)?,
            self.k.forward(&tokens)?,
            self.v.forward(&tokens)?,
        );
        let scale = 1.0 / (self.channels as f64).sqrt();
        let a = match mode {
            Mode::Inference => kernels::attention::attention(&q, &k, &v, 1, scale)?,
            Mode::Differentiable => kernels::attention::differentiable(&q, &k, &v, 1, scale)?,
        };
        let a = self
            .out
            .forward(&a)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((a + x)?)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv>,
}

/// The VAE decoder, from diffusion latents already divided by `scaling_factor` (and shifted)
/// to an image in [-1, 1] (not clamped).
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid: (Resnet, Attention, Resnet),
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    dtype: DType,
}

impl VaeDecoder {
    /// Builds the decoder from the VAE's root variable builder (`post_quant_conv.*`,
    /// `decoder.*`); shapes come from `spec`.
    pub fn new(spec: &VaeSpec, vb: VarBuilder) -> Result<Self> {
        let cfg = &spec.config;
        let (lc, g) = (cfg.latent_channels, cfg.norm_num_groups);
        let chans: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = chans[0];
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv::new(lc, lc, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let d = vb.pp("decoder");
        let m = d.pp("mid_block");
        let mid = (
            Resnet::new(top, top, g, m.pp("resnets.0"))?,
            Attention::new(top, g, m.pp("attentions.0"))?,
            Resnet::new(top, top, g, m.pp("resnets.1"))?,
        );
        let mut up = Vec::with_capacity(chans.len());
        let mut cin = top;
        for (i, &cout) in chans.iter().enumerate() {
            let vbi = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let from = if j == 0 { cin } else { cout };
                    Resnet::new(from, cout, g, vbi.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < chans.len() {
                Some(Conv::new(cout, cout, 3, vbi.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        let c0 = cfg.block_out_channels[0];
        Ok(VaeDecoder {
            post_quant_conv,
            conv_in: Conv::new(lc, top, 3, d.pp("conv_in"))?,
            mid,
            up,
            norm_out: group_norm(g, c0, d.pp("conv_norm_out"))?,
            conv_out: Conv::new(c0, spec.out_channels, 3, d.pp("conv_out"))?,
            dtype: vb.dtype(),
        })
    }

    /// Decodes `z` (N x latent_channels x h x w, in the VAE's latent space) to N x C x H x W.
    pub fn decode(&self, z: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut x = z.to_dtype(self.dtype)?;
        if let Some(c) = &self.post_quant_conv {
            x = c.forward(&x, mode)?;
        }
        x = self.conv_in.forward(&x, mode)?;
        x = self.mid.0.forward(&x, mode)?;
        x = self.mid.1.forward(&x, mode)?;
        x = self.mid.2.forward(&x, mode)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x, mode)?;
            }
            if let Some(c) = &block.upsample {
                x = c.forward(&upsample_nearest(&x, 2)?, mode)?;
            }
        }
        let x = norm_silu(&self.norm_out, &x, mode)?;
        self.conv_out.forward(&x, mode)
    }
}
