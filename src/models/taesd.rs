//! TAESD, diffusers' `AutoencoderTiny`: its decoder only, built from the folder's
//! `config.json` and used as a cheap decoder for CLIP guidance, so every op here has a
//! backward that candle 0.11 gets right.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::kernels::activation::{add_relu, relu};
use crate::kernels::conv::Conv2d;
use serde::Deserialize;

use super::hub::{HubOptions, ModelRepo};
use super::sd::{parse_json, read_json};
use super::weights::{with_file, FileWeights};
use crate::{Error, Result};

fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_2f() -> f64 {
    2.0
}
fn d_stage_channels() -> Vec<usize> {
    vec![64; 4]
}
fn d_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn d_relu() -> String {
    "relu".into()
}
fn d_nearest() -> String {
    "nearest".into()
}

/// `config.json` of an `AutoencoderTiny` as diffusers writes it; defaults are diffusers'.
#[derive(Debug, Clone, Deserialize)]
struct TaesdJson {
    #[serde(default, rename = "_class_name")]
    class_name: Option<String>,
    #[serde(default = "d_4")]
    latent_channels: usize,
    #[serde(default = "d_3")]
    out_channels: usize,
    #[serde(default = "d_stage_channels")]
    decoder_block_out_channels: Vec<usize>,
    #[serde(default = "d_decoder_blocks")]
    num_decoder_blocks: Vec<usize>,
    // A float so that `2.0` is read and then checked, rather than failing in serde.
    #[serde(default = "d_2f")]
    upsampling_scaling_factor: f64,
    #[serde(default = "d_relu")]
    act_fn: String,
    #[serde(default = "d_nearest")]
    upsample_fn: String,
    #[serde(default)]
    scaling_factor: Option<f64>,
    #[serde(default)]
    shift_factor: Option<f64>,
}

/// The decoder half of an `AutoencoderTiny` config, checked against what is implemented.
#[derive(Debug, Clone, PartialEq)]
pub struct TaesdConfig {
    /// Channels of the latents it decodes.
    pub latent_channels: usize,
    /// Channels of the decoded image.
    pub out_channels: usize,
    /// Channels of each decoder stage.
    pub decoder_block_out_channels: Vec<usize>,
    /// `AutoencoderTinyBlock`s in each decoder stage.
    pub num_decoder_blocks: Vec<usize>,
    /// Nearest-neighbour upsampling factor between consecutive stages.
    pub upsampling_scaling_factor: usize,
    /// Latents are divided by this before decoding (1.0 for TAESD).
    pub scaling_factor: f64,
    /// Added after the division (0.0 unless the config says otherwise).
    pub shift_factor: f64,
}

impl TaesdConfig {
    /// Reads and checks a `config.json`; errors name the file and field.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_json(read_json(path)?, path)
    }

    /// Parses and checks config text that came from `path`.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        Self::from_json(parse_json(text, path)?, path)
    }

    fn from_json(j: TaesdJson, path: &Path) -> Result<Self> {
        if let Some(c) = &j.class_name {
            if c != "AutoencoderTiny" {
                return Err(Error::field(
                    path,
                    "_class_name",
                    format!("`{c}` is not supported; expected AutoencoderTiny"),
                ));
            }
        }
        // diffusers' get_activation lowercases the name.
        if !j.act_fn.eq_ignore_ascii_case("relu") {
            return Err(Error::field(
                path,
                "act_fn",
                format!("`{}` is not supported; expected relu", j.act_fn),
            ));
        }
        if j.upsample_fn != "nearest" {
            return Err(Error::field(
                path,
                "upsample_fn",
                format!("`{}` is not supported; expected nearest", j.upsample_fn),
            ));
        }
        let f = j.upsampling_scaling_factor;
        if !(f >= 1.0 && f.fract() == 0.0 && f <= 64.0) {
            return Err(Error::field(
                path,
                "upsampling_scaling_factor",
                format!("{f} is not supported; expected a positive integer"),
            ));
        }
        let n = j.decoder_block_out_channels.len();
        if n == 0 {
            return Err(Error::field(
                path,
                "decoder_block_out_channels",
                "is empty; expected one entry per decoder stage",
            ));
        }
        if j.num_decoder_blocks.len() != n {
            return Err(Error::field(
                path,
                "num_decoder_blocks",
                format!(
                    "has {} entries; expected one per decoder_block_out_channels entry ({n})",
                    j.num_decoder_blocks.len()
                ),
            ));
        }
        // DecoderTiny's conv after each stage keeps that stage's width, so the next stage only
        // accepts its input when every stage has the same width.
        let c0 = j.decoder_block_out_channels[0];
        if c0 == 0 || j.decoder_block_out_channels.iter().any(|&c| c != c0) {
            return Err(Error::field(
                path,
                "decoder_block_out_channels",
                format!(
                    "{:?} is not supported; expected the same positive width for every stage",
                    j.decoder_block_out_channels
                ),
            ));
        }
        for (field, v) in [
            ("latent_channels", j.latent_channels),
            ("out_channels", j.out_channels),
        ] {
            if v == 0 {
                return Err(Error::field(path, field, "is 0; expected a positive count"));
            }
        }
        let scaling_factor = j.scaling_factor.unwrap_or(1.0);
        if !scaling_factor.is_finite() || scaling_factor == 0.0 {
            return Err(Error::field(
                path,
                "scaling_factor",
                format!("{scaling_factor} is not usable; expected a finite non-zero number"),
            ));
        }
        let shift_factor = j.shift_factor.unwrap_or(0.0);
        if !shift_factor.is_finite() {
            return Err(Error::field(
                path,
                "shift_factor",
                format!("{shift_factor} is not usable; expected a finite number"),
            ));
        }
        Ok(TaesdConfig {
            latent_channels: j.latent_channels,
            out_channels: j.out_channels,
            decoder_block_out_channels: j.decoder_block_out_channels,
            num_decoder_blocks: j.num_decoder_blocks,
            upsampling_scaling_factor: f as usize,
            scaling_factor,
            shift_factor,
        })
    }

    /// Pixels per latent along each side: the upsampling factor once between each pair of
    /// stages.
    pub fn scale_factor(&self) -> usize {
        let stages = self.decoder_block_out_channels.len() as u32;
        self.upsampling_scaling_factor.pow(stages - 1)
    }
}

/// diffusers' `AutoencoderTinyBlock` with equal widths: relu(conv(relu(conv(relu(conv(x))))) + x).
#[derive(Debug, Clone)]
struct Block {
    convs: [Conv2d; 3],
}

impl Block {
    fn new(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        let cfg = conv3x3();
        let vb = vb.pp("conv");
        // nn.Sequential indices: the ReLUs sit at 1 and 3.
        let conv = |i: usize| fast(candle_nn::conv2d(channels, channels, 3, cfg, vb.pp(i))?);
        Ok(Block {
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = relu(&self.convs[0].forward(x)?)?;
        let h = relu(&self.convs[1].forward(&h)?)?;
        let h = self.convs[2].forward(&h)?;
        // The skip is nn.Identity because the block's input and output widths are equal.
        add_relu(&h, x)
    }
}

/// One decoder stage: its blocks, the upsampling (all but the last stage), then a conv.
#[derive(Debug, Clone)]
struct Stage {
    blocks: Vec<Block>,
    upsample: bool,
    conv: Conv2d,
}

/// candle's layer as the kernel layer (Winograd on the CPU; input-only backward).
fn fast(layer: candle_nn::Conv2d) -> candle_core::Result<Conv2d> {
    Conv2d::new(layer).map_err(candle_core::Error::wrap)
}

fn conv3x3() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

/// Nearest-neighbour upsampling by an integer factor, out[i, j] = x[i / s, j / s], whose
/// backward sums each s x s patch (own kernels where they apply, else a broadcast); candle's
/// `upsample_nearest2d` backward overwrites gradient already accumulated on its input.
pub fn upsample_nearest(x: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    // On the CPU in f32: one copy loop, and the patch sum as the whole backward.
    if crate::kernels::upsample::applies(x) {
        use crate::kernels::{frozen, upsample};
        return frozen::input_only(
            x,
            |x| Ok(upsample::nearest(x, s)?),
            || {
                Ok(Box::new(move |_: &Tensor, g: &Tensor| {
                    upsample::patch_sum(g, s)
                }))
            },
        )
        .map_err(candle_core::Error::wrap);
    }
    #[cfg(feature = "cuda")]
    if crate::kernels::on_cuda_kernel(x, crate::kernels::CudaKernel::Upsample) {
        // In a graph, the patch-sum kernel is the whole backward.
        return crate::kernels::frozen::input_only(
            x,
            |x| Ok(crate::kernels::cuda::upsample_nearest(x, s)?),
            || {
                Ok(Box::new(move |_: &Tensor, g: &Tensor| {
                    crate::kernels::cuda::patch_sum(g, s)
                }))
            },
        )
        .map_err(candle_core::Error::wrap);
    }
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, s, w, s))?
        .reshape((n, c, h * s, w * s))
}

/// The TAESD decoder: diffusion-space latents to an image in [-1, 1], differentiable.
#[derive(Debug, Clone)]
pub struct TaesdDecoder {
    conv_in: Conv2d,
    stages: Vec<Stage>,
    config: TaesdConfig,
    dtype: DType,
    /// The config and weight files it was loaded from (none for random weights).
    files: Vec<PathBuf>,
}

/// Weight file names tried in order: diffusers' default, then its fp16 variant.
const WEIGHT_FILES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

impl TaesdDecoder {
    /// Loads `config.json` and the weights from a local folder or a hub repo id (for example
    /// `madebyollin/taesd`), in `dtype` on `device`.
    pub fn load(spec: &str, hub: &HubOptions, dtype: DType, device: &Device) -> Result<Self> {
        let repo = ModelRepo::open(spec, hub)?;
        let config_path = repo.get("config.json")?;
        let config = TaesdConfig::load(&config_path)?;
        let weights = weight_file(&repo)?;
        let file = FileWeights::open(std::slice::from_ref(&weights))?;
        let usage = file.usage();
        let decoder = Self::new(file.into_var_builder(dtype, device), &config)
            .map_err(|e| with_file(e, &weights))?;
        usage.check_all_read(&config_path, &["encoder"])?;
        Ok(TaesdDecoder {
            files: vec![config_path, weights],
            ..decoder
        })
    }

    /// The config and weight files it was loaded from (none when built from a VarBuilder).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Builds the decoder from weights named as in diffusers' checkpoint (`decoder.layers.*`,
    /// relative to `vb`).
    pub fn new(vb: VarBuilder, config: &TaesdConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let vb = vb.pp("decoder").pp("layers");
        let width = config.decoder_block_out_channels[0];
        let conv_in = fast(candle_nn::conv2d(
            config.latent_channels,
            width,
            3,
            conv3x3(),
            vb.pp(0),
        )?)?;
        // Indices follow DecoderTiny's nn.Sequential, where the activation after conv_in and
        // each nn.Upsample also take an index.
        let mut index = 2;
        let n = config.decoder_block_out_channels.len();
        let mut stages = Vec::with_capacity(n);
        for (i, (&channels, &num_blocks)) in config
            .decoder_block_out_channels
            .iter()
            .zip(&config.num_decoder_blocks)
            .enumerate()
        {
            let is_final = i + 1 == n;
            let mut blocks = Vec::with_capacity(num_blocks);
            for _ in 0..num_blocks {
                blocks.push(Block::new(vb.pp(index), channels)?);
                index += 1;
            }
            if !is_final {
                index += 1;
            }
            let conv = if is_final {
                fast(candle_nn::conv2d(
                    channels,
                    config.out_channels,
                    3,
                    conv3x3(),
                    vb.pp(index),
                )?)?
            } else {
                fast(candle_nn::conv2d_no_bias(
                    channels,
                    channels,
                    3,
                    conv3x3(),
                    vb.pp(index),
                )?)?
            };
            index += 1;
            stages.push(Stage {
                blocks,
                upsample: !is_final,
                conv,
            });
        }
        Ok(TaesdDecoder {
            files: Vec::new(),
            conv_in,
            stages,
            config: config.clone(),
            dtype,
        })
    }

    /// Decodes diffusion-space latents (N x C x h x w, the tensor a pipeline divides by the
    /// VAE's scaling factor) to an image in [-1, 1] (N x out_channels x H x W) in the
    /// decoder's dtype, as `AutoencoderTiny.decode(latents / scaling_factor + shift_factor)`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(self.dtype)?;
        let z = ((z / self.config.scaling_factor)? + self.config.shift_factor)?;
        // DecoderTiny's soft clamp of the latents to (-3, 3).
        let x = ((z / 3.0)?.tanh()? * 3.0)?;
        let mut x = relu(&self.conv_in.forward(&x)?)?;
        for stage in &self.stages {
            for block in &stage.blocks {
                x = block.forward(&x)?;
            }
            if stage.upsample {
                x = upsample_nearest(&x, self.config.upsampling_scaling_factor)?;
            }
            x = stage.conv.forward(&x)?;
        }
        // The decoder is trained to output [0, 1]; diffusers returns [-1, 1].
        Ok(((x * 2.0)? - 1.0)?)
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    /// The config the decoder was built from.
    pub fn config(&self) -> &TaesdConfig {
        &self.config
    }
}

/// The first weight file present; the error names the default one (and the fp16 variant).
fn weight_file(repo: &ModelRepo) -> Result<PathBuf> {
    for rel in WEIGHT_FILES {
        if let Some(p) = repo.find(rel)? {
            return Ok(p);
        }
    }
    Err(match repo.missing(WEIGHT_FILES[0]) {
        Error::File { path, message } => Error::file(
            path,
            format!("{message} (nor {} beside it)", WEIGHT_FILES[1]),
        ),
        other => other,
    })
}

/// madebyollin/taesd's published `config.json` (SD 1.x/2.x latents, 8x decoder), for timing
/// the real architecture with random weights.
pub const SD_TAESD_CONFIG: &str = r#"{"_class_name":"AutoencoderTiny","act_fn":"relu","decoder_block_out_channels":[64,64,64,64],"encoder_block_out_channels":[64,64,64,64],"force_upcast":false,"in_channels":3,"latent_channels":4,"latent_magnitude":3,"latent_shift":0.5,"num_decoder_blocks":[3,3,3,1],"num_encoder_blocks":[1,3,3,3],"out_channels":3,"scaling_factor":1.0,"upsampling_scaling_factor":2}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    const TAESD: &str = SD_TAESD_CONFIG;

    fn parse(text: &str) -> Result<TaesdConfig> {
        TaesdConfig::from_json_str(text, Path::new("taesd/config.json"))
    }

    #[test]
    fn real_config_parses() {
        let c = parse(TAESD).unwrap();
        assert_eq!(c.scale_factor(), 8);
        assert_eq!(c.latent_channels, 4);
        assert_eq!(c.num_decoder_blocks, vec![3, 3, 3, 1]);
        assert_eq!((c.scaling_factor, c.shift_factor), (1.0, 0.0));
        // Everything left out takes diffusers' defaults.
        assert_eq!(parse("{}").unwrap(), c);
    }

    #[test]
    fn unsupported_values_are_named() {
        for (from, to, field) in [
            ("\"act_fn\":\"relu\"", "\"act_fn\":\"gelu\"", "act_fn"),
            (
                "\"act_fn\":\"relu\"",
                "\"upsample_fn\":\"bilinear\"",
                "upsample_fn",
            ),
            (
                "\"upsampling_scaling_factor\":2",
                "\"upsampling_scaling_factor\":1.5",
                "upsampling_scaling_factor",
            ),
            (
                "\"num_decoder_blocks\":[3,3,3,1]",
                "\"num_decoder_blocks\":[3,3,1]",
                "num_decoder_blocks",
            ),
            (
                "\"decoder_block_out_channels\":[64,64,64,64]",
                "\"decoder_block_out_channels\":[64,64,64,32]",
                "decoder_block_out_channels",
            ),
            ("AutoencoderTiny", "AutoencoderKL", "_class_name"),
            (
                "\"scaling_factor\":1.0",
                "\"scaling_factor\":0",
                "scaling_factor",
            ),
        ] {
            let text = TAESD.replace(from, to);
            assert_ne!(text, TAESD);
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("taesd/config.json") && err.contains(&format!("`{field}`")),
                "{err}"
            );
        }
        // diffusers lowercases the activation name.
        assert!(parse(&TAESD.replace("\"relu\"", "\"ReLU\"")).is_ok());
        assert_eq!(
            parse(&TAESD.replace(
                "\"upsampling_scaling_factor\":2",
                "\"upsampling_scaling_factor\":2.0"
            ))
            .unwrap()
            .upsampling_scaling_factor,
            2
        );
    }

    #[test]
    fn nearest_upsampling_matches_candle_forward_and_sums_gradients() {
        let dev = Device::Cpu;
        // f64 runs the broadcast composition, f32 the CPU kernels.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(
                &Tensor::arange(0f64, 2.0 * 3.0 * 4.0 * 5.0, &dev)
                    .unwrap()
                    .reshape((2, 3, 4, 5))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            for s in [1, 2, 3] {
                let y = upsample_nearest(x.as_tensor(), s).unwrap();
                let want = x.as_tensor().upsample_nearest2d(4 * s, 5 * s).unwrap();
                let diff: f64 = (&y - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert_eq!(diff, 0.0, "{dtype:?} factor {s}");

                // Another path into x checks that the upsampling's gradient adds to it.
                let w = Tensor::randn(0f64, 1.0, y.shape(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let u = Tensor::randn(0f64, 1.0, x.shape(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let loss = ((&y * &w).unwrap().sum_all().unwrap()
                    + (x.as_tensor() * &u).unwrap().sum_all().unwrap())
                .unwrap();
                let g = loss.backward().unwrap().remove(x.as_tensor()).unwrap();
                // d/dx = the sum of w over each s x s patch, plus u.
                let pooled = w
                    .to_dtype(DType::F64)
                    .unwrap()
                    .reshape((2, 3, 4, s, 5, s))
                    .unwrap()
                    .sum(5)
                    .unwrap()
                    .sum(3)
                    .unwrap();
                let want = (pooled + u.to_dtype(DType::F64).unwrap()).unwrap();
                let err: f64 = (g.to_dtype(DType::F64).unwrap() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(err < tol, "{dtype:?} factor {s}: {err}");
            }
        }
    }
}
