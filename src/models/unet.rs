//! artguide's own Stable Diffusion UNet, written to match diffusers' `UNet2DConditionModel`
//! (0.42.1) term for term, with diffusers' parameter names so checkpoints load unchanged.
//!
//! Differences from candle-transformers' UNet, each of which moves outputs away from
//! diffusers':
//! - GEGLU uses the exact erf GELU (`torch.nn.functional.gelu` default), not the tanh
//!   approximation (that alone left ~3e-4 on the tiny reference models; ours is ~4e-6);
//! - the sinusoidal timestep embedding is computed in f32 whatever the activation dtype and
//!   cast afterwards, as diffusers does (in f16, `t * freq` for t near 1000 loses ~0.5 rad);
//! - the resnets of down/up blocks use `norm_num_groups` (candle's use 32 whatever the config).
//!
//! Attention and GEGLU go through `crate::kernels` (blocked attention and a one-pass GEGLU on
//! the CPU in f32; candle's composition elsewhere, with the scale folded into Q and the
//! softmax in f32 for f16/bf16, diffusers' `upcast_attention` concern).
//!
//! Inference only: candle's fused LayerNorm and `softmax_last_dim` have no backward pass, so
//! gradients through this UNet would be incomplete.
//!
//! Layout: `down_blocks.{i}` = resnets (+ attentions) (+ `downsamplers.0.conv`),
//! `mid_block` = resnets.0, then (attentions.k, resnets.k+1) pairs, `up_blocks.{i}` = resnets
//! over the skip connections (+ attentions) (+ `upsamplers.0.conv`).

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

use crate::kernels::conv::Conv2d;
use crate::kernels::linear::Linear;
use crate::kernels::norm::GroupNorm;

use crate::models::sd::{AddedCondSpec, UNetSpec};
use crate::Result;

/// Diffusers' `Transformer2DModel` GroupNorm epsilon (hard-coded there, not `norm_eps`).
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// Diffusers' `BasicTransformerBlock` LayerNorm epsilon (`norm_eps` default).
const LAYER_NORM_EPS: f64 = 1e-5;

fn conv3x3(
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Conv2d::new(candle_nn::conv2d(cin, cout, 3, cfg, vb)?)
}

/// A 1x1 convolution loaded from its `(out, in, 1, 1)` checkpoint weight and run as a linear
/// layer on channels-last tokens (the same sum, without an NCHW round trip).
fn conv1x1_as_linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (cout, cin, 1, 1),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bound = 1. / (cin as f64).sqrt();
    let b = vb.get_with_hints(
        cout,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Linear::new(candle_nn::Linear::new(w.reshape((cout, cin))?, Some(b)))
}

/// Diffusers' `ResnetBlock2D` with `time_embedding_norm = "default"` and SiLU.
#[derive(Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(candle_nn::conv2d(
                cin,
                cout,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)?)
        } else {
            None
        };
        Ok(ResnetBlock {
            norm1: GroupNorm::new(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: Linear::new(candle_nn::linear(temb, cout, vb.pp("time_emb_proj"))?)?,
            norm2: GroupNorm::new(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `temb_act` is `silu(emb)`, shared by every resnet (diffusers recomputes it each time).
    fn forward(&self, xs: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(xs)?;
        let h = self.conv1.forward(&h)?;
        let t = self.time_emb_proj.forward(temb_act)?;
        let (tb, tc) = t.dims2()?;
        let h = h.broadcast_add(&t.reshape((tb, tc, 1, 1))?)?;
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// Diffusers' `Attention` with the default processor: `softmax(Q K^T / sqrt(d)) V`.
#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let dim_head = query_dim / heads;
        let inner = dim_head * heads;
        Ok(Attention {
            to_q: Linear::new(candle_nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?)?,
            to_k: Linear::new(candle_nn::linear_no_bias(
                context_dim,
                inner,
                vb.pp("to_k"),
            )?)?,
            to_v: Linear::new(candle_nn::linear_no_bias(
                context_dim,
                inner,
                vb.pp("to_v"),
            )?)?,
            to_out: Linear::new(candle_nn::linear(inner, query_dim, vb.pp("to_out.0"))?)?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
        })
    }

    /// `xs`: (batch, tokens, query_dim); `context`: (batch, ctx_tokens, context_dim), or None
    /// for self-attention.
    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = crate::kernels::attention::attention(&q, &k, &v, self.heads, self.scale)?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// `FeedForward` with `activation_fn = "geglu"`: `net.0.proj` (to 2 x inner), value times
/// exact-GELU(gate), then `net.2`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        let vb = vb.pp("net");
        Ok(FeedForward {
            proj: Linear::new(candle_nn::linear(dim, inner * 2, vb.pp("0").pp("proj"))?)?,
            out: Linear::new(candle_nn::linear(inner, dim, vb.pp("2"))?)?,
            inner,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = crate::kernels::activation::geglu(&self.proj.forward(xs)?, self.inner)?;
        Ok(self.out.forward(&h)?)
    }
}

/// Diffusers' `BasicTransformerBlock` with `norm_type = "layer_norm"`.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: candle_nn::layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: candle_nn::layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: candle_nn::layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + xs)?)
    }
}

/// Diffusers' `Transformer2DModel` on continuous inputs: GroupNorm (eps 1e-6), `proj_in`
/// (1x1 conv, or linear with `use_linear_projection`), transformer blocks, `proj_out`, residual.
#[derive(Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl Transformer2D {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
    ) -> Result<Self> {
        let (proj_in, proj_out) = if linear_projection {
            (
                Linear::new(candle_nn::linear(channels, channels, vb.pp("proj_in"))?)?,
                Linear::new(candle_nn::linear(channels, channels, vb.pp("proj_out"))?)?,
            )
        } else {
            (
                conv1x1_as_linear(channels, channels, vb.pp("proj_in"))?,
                conv1x1_as_linear(channels, channels, vb.pp("proj_out"))?,
            )
        };
        let vbb = vb.pp("transformer_blocks");
        let blocks = (0..depth)
            .map(|k| TransformerBlock::new(vbb.pp(k), channels, context_dim, heads))
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2D {
            norm: GroupNorm::new(groups, channels, TRANSFORMER_NORM_EPS, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = self.norm.forward(xs)?;
        // NCHW -> (b, h*w, c) tokens.
        let t = t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&t)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let t = self.proj_out.forward(&t)?;
        let t = t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        Ok((t + xs)?)
    }
}

/// A down block: resnets, each followed by a transformer in cross-attention blocks, then an
/// optional stride-2 conv. Returns the skip states the up path consumes.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<(Conv2d, bool)>,
}

impl DownBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some((conv, pad_right)) = &self.downsampler {
            xs = if *pad_right {
                // downsample_padding = 0: diffusers pads (0, 1, 0, 1) before the conv.
                let p = xs
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                conv.forward(&p)?
            } else {
                conv.forward(&xs)?
            };
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

impl MidBlock {
    fn forward(&self, xs: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, temb_act)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = attn.forward(&xs, context)?;
            xs = resnet.forward(&xs, temb_act)?;
        }
        Ok(xs)
    }
}

/// An up block: each resnet takes the running state concatenated with one skip state (the most
/// recent first), optionally followed by a transformer; then nearest 2x (or to the skip size)
/// upsampling and a conv.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| crate::Error::Msg("UNet: ran out of skip connections".into()))?;
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = resnet.forward(&xs, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, h, w) = xs.dims4()?;
            let (th, tw) = upsample_size.unwrap_or((2 * h, 2 * w));
            xs = conv.forward(&xs.upsample_nearest2d(th, tw)?)?;
        }
        Ok(xs)
    }
}

/// SDXL's added conditioning for one batch: the pooled text embedding of the second text
/// encoder and the six size/crop ids per row.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// (batch, pooled width).
    pub text_embeds: Tensor,
    /// One row per batch row: original (h, w), crop (top, left), target (h, w), in pixels.
    /// Host values, because their sinusoidal embedding is computed on the host.
    pub time_ids: Vec<[f32; crate::models::sd::AddedCondSpec::TIME_IDS]>,
}

/// `add_time_proj` + `add_embedding` (`TimestepEmbedding`: linear, SiLU, linear).
#[derive(Debug)]
struct AddEmbedding {
    spec: AddedCondSpec,
    linear_1: Linear,
    linear_2: Linear,
}

/// Diffusers' `get_timestep_embedding` in f32 for each value, `dim` wide per value: rows of
/// `[cos | sin]` (or `[sin | cos]`), zero-padded when `dim` is odd.
fn sinusoidal(values: &[f32], dim: usize, flip_sin_to_cos: bool, shift: f64) -> Vec<f32> {
    let half = dim / 2;
    // torch: exponent = -ln(10000) * arange(half, f32) / (half - shift), all in f32;
    // timesteps.float() * exp(exponent).
    let neg_ln = -(10000f64.ln()) as f32;
    let denom = half as f32 - shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_ln * i as f32) / denom).exp())
        .collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &t in values {
        let args = freqs.iter().map(|f| t * f);
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (
                args.clone().map(f32::cos).collect(),
                args.map(f32::sin).collect(),
            )
        } else {
            (
                args.clone().map(f32::sin).collect(),
                args.map(f32::cos).collect(),
            )
        };
        out.extend(first);
        out.extend(second);
        out.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    out
}

/// Stable Diffusion's conditional UNet (SD 1.x / 2.x / XL layouts), diffusers-exact.
#[derive(Debug)]
pub struct UNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<AddEmbedding>,
    time_channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet from the spec the loader produces from `unet/config.json`.
    pub fn new(vb: VarBuilder, spec: &UNetSpec) -> Result<Self> {
        let cfg = &spec.config;
        let blocks = &cfg.blocks;
        let n = blocks.len();
        if n == 0 {
            return Err(crate::Error::Msg("UNet spec has no blocks".into()));
        }
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let ctx_dim = cfg.cross_attention_dim;
        let lin = cfg.use_linear_projection;
        let c0 = blocks[0].out_channels;
        let temb = c0 * 4;

        let conv_in = conv3x3(spec.in_channels, c0, 1, 1, vb.pp("conv_in"))?;
        let vt = vb.pp("time_embedding");
        let time_linear_1 = Linear::new(candle_nn::linear(c0, temb, vt.pp("linear_1"))?)?;
        let time_linear_2 = Linear::new(candle_nn::linear(temb, temb, vt.pp("linear_2"))?)?;
        let add_embedding = match spec.added_cond {
            Some(a) => {
                let va = vb.pp("add_embedding");
                Some(AddEmbedding {
                    spec: a,
                    linear_1: Linear::new(candle_nn::linear(
                        a.input_dim,
                        temb,
                        va.pp("linear_1"),
                    )?)?,
                    linear_2: Linear::new(candle_nn::linear(temb, temb, va.pp("linear_2"))?)?,
                })
            }
            None => None,
        };

        let vd = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        let mut cin = c0;
        for (i, bc) in blocks.iter().enumerate() {
            let vbi = vd.pp(i);
            let cout = bc.out_channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(
                    vbi.pp("resnets").pp(j),
                    rin,
                    cout,
                    temb,
                    groups,
                    eps,
                    1.0,
                )?);
                if let Some(depth) = bc.use_cross_attn {
                    attentions.push(Transformer2D::new(
                        vbi.pp("attentions").pp(j),
                        cout,
                        bc.attention_head_dim,
                        depth,
                        ctx_dim,
                        groups,
                        lin,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                let pad = cfg.downsample_padding;
                let conv = conv3x3(cout, cout, 2, pad, vbi.pp("downsamplers.0.conv"))?;
                Some((conv, pad == 0))
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
            cin = cout;
        }

        let last = blocks[n - 1];
        let cl = last.out_channels;
        let vm = vb.pp("mid_block");
        let mid_depth = last.use_cross_attn.unwrap_or(1);
        let msf = cfg.mid_block_scale_factor;
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock::new(vm.pp("resnets.0"), cl, cl, temb, groups, eps, msf)?,
                ResnetBlock::new(vm.pp("resnets.1"), cl, cl, temb, groups, eps, msf)?,
            ],
            attentions: vec![Transformer2D::new(
                vm.pp("attentions.0"),
                cl,
                last.attention_head_dim,
                mid_depth,
                ctx_dim,
                groups,
                lin,
            )?],
        };

        let vu = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = cl;
        for i in 0..n {
            let bc = blocks[n - 1 - i];
            let cout = bc.out_channels;
            // The last resnet's skip comes from the previous level of the down path (conv_in's
            // output for the final block): diffusers' `input_channel`.
            let cskip_last = blocks[(n - 1 - i).saturating_sub(1)].out_channels;
            let vbi = vu.pp(i);
            let layers = cfg.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { cskip_last } else { cout };
                let rin = if j == 0 { prev } else { cout };
                resnets.push(ResnetBlock::new(
                    vbi.pp("resnets").pp(j),
                    rin + skip,
                    cout,
                    temb,
                    groups,
                    eps,
                    1.0,
                )?);
                if let Some(depth) = bc.use_cross_attn {
                    attentions.push(Transformer2D::new(
                        vbi.pp("attentions").pp(j),
                        cout,
                        bc.attention_head_dim,
                        depth,
                        ctx_dim,
                        groups,
                        lin,
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(conv3x3(cout, cout, 1, 1, vbi.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
            prev = cout;
        }

        Ok(UNet {
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            time_channels: c0,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            center_input_sample: cfg.center_input_sample,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, c0, eps, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(c0, spec.out_channels, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// Diffusers' `get_timestep_embedding` for one timestep, in f32: a (1, channels) tensor,
    /// the input of [`UNet::forward_embedded`].
    pub fn timestep_embedding(&self, timestep: f64, device: &Device) -> Result<Tensor> {
        let dim = self.time_channels;
        let emb = sinusoidal(
            &[timestep as f32],
            dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        Ok(Tensor::from_vec(emb, (1, dim), device)?)
    }

    /// The added-conditioning spec, when this is an SDXL-style UNet.
    pub fn added_cond(&self) -> Option<AddedCondSpec> {
        self.add_embedding.as_ref().map(|a| a.spec)
    }

    /// SDXL's `aug_emb`: `add_embedding(cat(text_embeds, sinusoidal(time_ids)))`, (batch, temb).
    fn added_embedding(
        &self,
        a: &AddEmbedding,
        cond: &AddedCond,
        dtype: candle_core::DType,
    ) -> Result<Tensor> {
        let (b, pooled) = cond.text_embeds.dims2()?;
        let nids = AddedCondSpec::TIME_IDS;
        if pooled != a.spec.pooled_dim() || cond.time_ids.len() != b {
            return Err(crate::Error::Msg(format!(
                "UNet added conditioning: text_embeds {:?} and {} rows of time ids, expected (b, {}) and b rows",
                cond.text_embeds.dims(),
                cond.time_ids.len(),
                a.spec.pooled_dim(),
            )));
        }
        let ids: Vec<f32> = cond.time_ids.iter().flatten().copied().collect();
        let d = a.spec.time_embed_dim;
        let emb = sinusoidal(&ids, d, self.flip_sin_to_cos, self.freq_shift);
        let time_embeds = Tensor::from_vec(emb, (b, nids * d), cond.text_embeds.device())?;
        let add = Tensor::cat(
            &[
                cond.text_embeds.to_dtype(candle_core::DType::F32)?,
                time_embeds,
            ],
            1,
        )?
        .to_dtype(dtype)?;
        let h = a.linear_1.forward(&add)?.silu()?;
        Ok(a.linear_2.forward(&h)?)
    }

    /// Predicts noise (or v) for `sample` (batch, in_channels, h, w) at `timestep`, applied to
    /// every batch row, conditioned on `encoder_hidden_states` (batch, tokens, cross_dim).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(sample, timestep, encoder_hidden_states, None)
    }

    /// [`UNet::forward`] with SDXL's added conditioning, which an SDXL-style UNet requires
    /// and any other refuses.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let t_emb = self.timestep_embedding(timestep, sample.device())?;
        self.forward_embedded(sample, &t_emb, encoder_hidden_states, added)
    }

    /// [`UNet::forward_with`] from the timestep's sinusoidal embedding
    /// ([`UNet::timestep_embedding`]), which is made on the host: a CUDA graph of this call
    /// (`unet_graph`) takes it as a device input instead of replaying its first upload.
    pub fn forward_embedded(
        &self,
        sample: &Tensor,
        t_emb: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (_, _, height, width) = sample.dims4()?;
        let dtype = sample.dtype();
        let n_up = self.up_blocks.len() - 1;
        let factor = 1usize << n_up;
        let forward_upsample_size = height % factor != 0 || width % factor != 0;

        let xs = if self.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };

        // 1. time: one row, broadcast over the batch where it is added.
        let t_emb = t_emb.to_dtype(dtype)?;
        let emb = self.time_linear_1.forward(&t_emb)?.silu()?;
        let emb = self.time_linear_2.forward(&emb)?;
        let emb = match (&self.add_embedding, added) {
            (Some(a), Some(cond)) => emb.broadcast_add(&self.added_embedding(a, cond, dtype)?)?,
            (None, None) => emb,
            (Some(_), None) => {
                return Err(crate::Error::Msg(
                    "this UNet needs SDXL added conditioning (pooled text embeds and time ids)"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(crate::Error::Msg(
                    "this UNet has no add_embedding; it takes no added conditioning".into(),
                ))
            }
        };
        let temb_act = emb.silu()?;

        let context = encoder_hidden_states.to_dtype(dtype)?;

        // 2-3. conv_in and down path.
        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb_act, &context, &mut skips)?;
        }

        // 4. mid.
        xs = self.mid_block.forward(&xs, &temb_act, &context)?;

        // 5. up.
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len().saturating_sub(block.resnets.len());
            let upsample_size = if i < n_up && forward_upsample_size {
                let (_, _, h, w) = skips[remaining - 1].dims4()?;
                Some((h, w))
            } else {
                None
            };
            xs = block.forward(&xs, &temb_act, &context, &mut skips, upsample_size)?;
        }

        // 6. out.
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::sd::{parse_json, UNetJson};
    use crate::models::weights::RandomWeights;
    use candle_core::DType;
    use std::path::Path;

    fn spec(json: &str) -> UNetSpec {
        let p = Path::new("unet/config.json");
        parse_json::<UNetJson>(json, p).unwrap().to_spec(p).unwrap()
    }

    /// A 3-level tiny UNet; `variant` flips the less common options diffusers supports.
    fn tiny_json(linear: bool, variant: bool) -> String {
        let (pad, center, shift) = if variant { (0, true, 1) } else { (1, false, 0) };
        format!(
            r#"{{"attention_head_dim":[2,4,4],"block_out_channels":[32,64,64],"cross_attention_dim":24,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
            "layers_per_block":1,"in_channels":4,"out_channels":4,"norm_num_groups":32,
            "norm_eps":1e-05,"use_linear_projection":{linear},"transformer_layers_per_block":[1,2,1],
            "downsample_padding":{pad},"center_input_sample":{center},"freq_shift":{shift}}}"#
        )
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Odd latent sides (not divisible by 2^(blocks-1)) run through the forward_upsample_size
    /// path, for both projection kinds, and agree with candle-transformers' UNet over the same
    /// weights up to its tanh-GELU difference.
    #[test]
    fn unet_tiny_random_odd_sizes_match_candle() {
        for (linear, variant) in [(false, false), (true, false), (false, true)] {
            let spec = spec(&tiny_json(linear, variant));
            let vb = RandomWeights::new(7).into_var_builder(DType::F32, &Device::Cpu);
            let ours = UNet::new(vb.clone(), &spec).unwrap();
            let theirs = crate::models::sd::build_unet(&spec, vb).unwrap();
            for (h, w) in [(13, 11), (8, 8), (6, 10)] {
                let x = randn(&[2, 4, h, w], 1);
                let ctx = randn(&[2, 5, 24], 2);
                let a = ours.forward(&x, 601.0, &ctx).unwrap();
                assert_eq!(a.dims(), &[2, 4, h, w]);
                let b = theirs.forward(&x, 601.0, &ctx).unwrap();
                let d = max_abs(&a, &b);
                let scale = max_abs(&b, &b.zeros_like().unwrap());
                eprintln!("linear={linear} variant={variant} {h}x{w}: ours vs candle max diff {d} (scale {scale})");
                // candle's tanh-approximate GELU leaves a few 1e-4 here.
                assert!(
                    d < 2e-3 * scale.max(1.0),
                    "linear={linear} variant={variant} {h}x{w}: ours vs candle max diff {d} (output scale {scale})"
                );
                assert!(a
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .all(|v| v.is_finite()));
            }
        }
    }

    /// f16 activations run and stay close to f32.
    #[test]
    fn unet_f16_close_to_f32() {
        let spec = spec(&tiny_json(false, false));
        let x = randn(&[1, 4, 8, 12], 3);
        let ctx = randn(&[1, 7, 24], 4);
        let f32_out = UNet::new(
            RandomWeights::new(9).into_var_builder(DType::F32, &Device::Cpu),
            &spec,
        )
        .unwrap()
        .forward(&x, 999.0, &ctx)
        .unwrap();
        let f16_out = UNet::new(
            RandomWeights::new(9).into_var_builder(DType::F16, &Device::Cpu),
            &spec,
        )
        .unwrap()
        .forward(&x.to_dtype(DType::F16).unwrap(), 999.0, &ctx)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        let d = max_abs(&f32_out, &f16_out);
        let scale = max_abs(&f32_out, &f32_out.zeros_like().unwrap());
        eprintln!("f16 vs f32 max diff {d} (scale {scale})");
        assert!(d < 2e-2 * scale.max(1.0), "f16 vs f32: {d} (scale {scale})");
    }
}

/// Speed against candle-transformers' UNet: SD 1.5 layout, random weights (shared tensors),
/// batch 2, 32x32 latents, f32 CPU. `cargo test --lib unet_speed -- --ignored --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;
    use crate::models::sd::{parse_json, UNetJson};
    use crate::models::weights::RandomWeights;
    use candle_core::{DType, Shape};
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::Init;
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::Instant;

    const SD15_UNET: &str = r#"{"attention_head_dim":8,"block_out_channels":[320,640,1280,1280],"cross_attention_dim":768,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"layers_per_block":2,"in_channels":4,"out_channels":4,"sample_size":64,"norm_num_groups":32,"norm_eps":1e-05,"flip_sin_to_cos":true,"freq_shift":0,"downsample_padding":1,"mid_block_scale_factor":1}"#;

    /// RandomWeights drawn once per name, so both UNets share the same tensors (and memory).
    struct Shared {
        inner: RandomWeights,
        cache: Mutex<HashMap<String, Tensor>>,
    }

    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            init: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let mut cache = self.cache.lock().unwrap();
            if let Some(t) = cache.get(name) {
                if t.shape() == &s {
                    return Ok(t.clone());
                }
            }
            let t = self.inner.get(s, name, init, dtype, dev)?;
            cache.insert(name.to_string(), t.clone());
            Ok(t)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            Err(candle_core::Error::Msg(format!(
                "need a shape for `{name}`"
            )))
        }

        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    #[test]
    #[ignore = "slow: builds two SD 1.5 UNets and times them"]
    fn unet_speed_vs_candle_sd15() {
        let p = Path::new("unet/config.json");
        let spec = parse_json::<UNetJson>(SD15_UNET, p)
            .unwrap()
            .to_spec(p)
            .unwrap();
        let backend = Shared {
            inner: RandomWeights::new(0),
            cache: Mutex::new(HashMap::new()),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        let t0 = Instant::now();
        let theirs = crate::models::sd::build_unet(&spec, vb.clone()).unwrap();
        let ours = UNet::new(vb, &spec).unwrap();
        eprintln!("weights + build: {:.1} s", t0.elapsed().as_secs_f64());
        let x = (Tensor::arange(0f32, (2 * 4 * 32 * 32) as f32, &Device::Cpu)
            .unwrap()
            .reshape((2, 4, 32, 32))
            .unwrap()
            * 0.37)
            .unwrap()
            .sin()
            .unwrap();
        let ctx = (Tensor::arange(0f32, (2 * 77 * 768) as f32, &Device::Cpu)
            .unwrap()
            .reshape((2, 77, 768))
            .unwrap()
            * 0.11)
            .unwrap()
            .cos()
            .unwrap();
        let run_theirs = || {
            let t = Instant::now();
            let y = theirs.forward(&x, 500.0, &ctx).unwrap();
            (t.elapsed().as_secs_f64(), y)
        };
        let run_ours = || {
            let t = Instant::now();
            let y = ours.forward(&x, 500.0, &ctx).unwrap();
            (t.elapsed().as_secs_f64(), y)
        };
        let (w_c, yc) = run_theirs();
        let (w_o, yo) = run_ours();
        eprintln!("warm-up: candle {w_c:.2} s, ours {w_o:.2} s");
        let d = (&yc - &yo)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("max |candle - ours| = {d:.3e}");
        // Interleaved so machine noise hits both alike; UNET_SPEED_RUNS overrides the count.
        let runs: usize = std::env::var("UNET_SPEED_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let mut tc = Vec::new();
        let mut to = Vec::new();
        for _ in 0..runs {
            tc.push(run_theirs().0);
            to.push(run_ours().0);
        }
        let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
        eprintln!("best: candle {:.2} s, ours {:.2} s", min(&tc), min(&to));
        eprintln!("candle-transformers UNet: {tc:.2?} s; ours: {to:.2?} s");
    }
}
