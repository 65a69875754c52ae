//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// artguide: Stable Diffusion, CLIP guidance and CLIP perceptual probes for AI-art research.
#[derive(Debug, Parser)]
#[command(name = "artguide", version = crate::BUILD_VERSION, about, args_override_self = true)]
pub struct Cli {
    /// No progress output.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Progress and results as JSON lines on stdout.
    #[arg(long, global = true, conflicts_with = "quiet")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments, exiting with clap's message on bad ones.
    pub fn parse_args() -> Self {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let json = args.iter().any(|a| a == "--json");
        Self::try_parse_args(args).unwrap_or_else(|e| {
            // A script reading --json lines learns of a bad argument as of any failure.
            if json && e.use_stderr() {
                let text = e.to_string();
                let line = text.lines().next().unwrap_or("");
                let message = line.strip_prefix("error: ").unwrap_or(line);
                crate::commands::print_json_error(message, false);
            }
            e.exit()
        })
    }

    /// Parses `args` (the program name first). A negative number after a numeric option is
    /// read as its value, so `--width -64` is refused by `--width` itself rather than
    /// reported as an unknown flag `-6`.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut cmd = Self::command().mut_subcommands(|c| c.allow_negative_numbers(true));
        cmd.build();
        // Before clap: `--prompt --seed 3` would otherwise fail on the stray `3` without
        // naming the prompt.
        let sub_name = args
            .iter()
            .skip(1)
            .filter_map(|a| a.to_str())
            .find(|a| cmd.find_subcommand(a).is_some())
            .map(str::to_string);
        if let Some(sub) = sub_name.as_deref().and_then(|n| cmd.find_subcommand_mut(n)) {
            let texts = text_options(sub);
            let flags = flag_names(sub);
            for w in args.windows(2) {
                let (Some(opt), Some(next)) = (w[0].to_str(), w[1].to_str()) else {
                    continue;
                };
                if texts.iter().any(|(_, long)| long == opt) {
                    refuse_flag(sub, &flags, opt, next)?;
                }
            }
        }
        // A value bound with `=` (`--prompt=--quiet`) is the user's explicit text: kept.
        let matches = cmd
            .try_get_matches_from_mut(args)
            .map_err(|e| explain_negative(&mut cmd, sub_name.as_deref(), e))?;
        Self::from_arg_matches(&matches)
    }
}

/// A negative or fractional number given to a count option (`--steps -1`, `--seed -1`,
/// `--cutouts 2.5`): clap's "invalid digit found in string" becomes what was expected.
fn explain_negative(cmd: &mut clap::Command, sub: Option<&str>, e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |k| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let (Some(arg), Some(value)) = (
        text(ContextKind::InvalidArg),
        text(ContextKind::InvalidValue),
    ) else {
        return e;
    };
    let integer = e.to_string().contains("invalid digit found in string");
    if e.kind() != ErrorKind::ValueValidation || !integer {
        return e;
    }
    // Only generate's seed makes images; other commands' seeds drive resampling.
    let hint = if sub == Some("generate") && arg.starts_with("--seed") && value.starts_with('-') {
        " (there is no random seed: every image's seed is explicit, so it can be made again)"
    } else {
        ""
    };
    // The subcommand's own usage line, as clap's message had.
    let message =
        format!("invalid value '{value}' for '{arg}': expected a whole number >= 0{hint}");
    if let Some(sub) = sub.and_then(|name| cmd.find_subcommand_mut(name)) {
        return sub.error(ErrorKind::ValueValidation, message);
    }
    cmd.error(ErrorKind::ValueValidation, message)
}

/// Every flag of `cmd` (long and short, `--help` and `--` included).
fn flag_names(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .flat_map(|a| {
            let long = a.get_long().map(|l| format!("--{l}"));
            let short = a.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short)
        })
        .chain(["--help", "-h", "--"].map(String::from))
        .collect()
}

/// `cmd`'s text options, those taking values that begin with `-`: (id, `--long`).
fn text_options(cmd: &clap::Command) -> Vec<(String, String)> {
    cmd.get_arguments()
        .filter(|a| a.is_allow_hyphen_values_set())
        .filter_map(|a| Some((a.get_id().to_string(), format!("--{}", a.get_long()?))))
        .collect()
}

/// Refuses `value` for the text option `long` when it is one of the command's flags.
fn refuse_flag(
    cmd: &mut clap::Command,
    flags: &[String],
    long: &str,
    value: &str,
) -> Result<(), clap::Error> {
    let name = value.split('=').next().unwrap_or(value);
    if flags.iter().any(|f| f == name) {
        return Err(cmd.error(
            clap::error::ErrorKind::InvalidValue,
            format!("{long} needs a value, but the next argument is the flag '{value}'"),
        ));
    }
    Ok(())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images with Stable Diffusion.
    Generate(Box<GenerateArgs>),
    /// Print the generation parameters stored in an image.
    Inspect {
        /// PNG written by artguide or a web UI.
        image: PathBuf,
    },
    /// Time UNet steps and VAE decodes of a real-size architecture with random weights.
    Bench(BenchArgs),
    /// How separable two sets of image embeddings are: a cross-validated logistic probe.
    Separate(SeparateArgs),
    /// Agreement of a score with human ratings: Spearman, Kendall, Pearson with bootstrap CIs.
    Agree(AgreeArgs),
    /// CLIP image embeddings of image files to .npy (L2-normalised, rows x dims, f32).
    Embed(EmbedArgs),
    /// Ask CLIP a suite of zero-shot questions (style, period, defects, ...) about images.
    Probe(ProbeArgs),
    /// Run a recipe: generate, probe and record every image of its experiments (resumable).
    Run(RecipeArgs),
    /// Join the folders of a sharded run into one run.
    Merge(MergeArgs),
    /// Paired guided-vs-baseline statistics of runs: summary.json, summary.csv, targets.csv, report.html.
    Compare(CompareArgs),
    /// Run a recipe as an AI-art probe set: images, labels.csv, clip_scores.csv and a blinded
    /// annotation sheet (annotation.csv + annotation.html, images under neutral ids in sheet/)
    /// for human raters.
    Probeset(RecipeArgs),
}

/// `artguide run`.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe YAML (see recipes/README.md).
    pub recipe: PathBuf,
    /// Run folder (default: outputs/<recipe name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only shard I of N (whole grid cells, every N-th from the I-th), e.g. `--shard 0/4`.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Print the plan (images, steps, estimated time) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Reuse an output folder that holds another recipe's run.
    #[arg(long)]
    pub force: bool,
    /// Largest style / init image accepted, in pixels, checked before decoding.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `artguide compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run folders (each with results.json).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where summary.json, summary.csv, targets.csv and report.html go (default: the first run folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Bootstrap resamples for the intervals.
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `artguide merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The recipe the shards ran.
    pub recipe: PathBuf,
    /// The merged run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Shard run folders.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// Reuse an output folder that holds another recipe's run.
    #[arg(long)]
    pub force: bool,
}

/// `artguide probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// A transformers CLIPModel folder or hub id.
    #[arg(long)]
    pub clip: String,
    /// A second, held-out CLIP: probe the same images with it too and report per probe how
    /// often its top label agrees with --clip's.
    #[arg(long)]
    pub probe_clip: Option<String>,
    /// Probe suite YAML (e.g. probes/art.yaml).
    #[arg(long)]
    pub suite: PathBuf,
    /// Write results JSON here (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write one CSV row per image, probe and label.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// True labels (CSV with columns image, probe, label): report accuracy, top-k, per-class
    /// recall and the confusion matrix per probe.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// k of the top-k accuracy.
    #[arg(long, default_value_t = 3, requires = "labels")]
    pub top_k: usize,
    /// Embedding cache folder (default: $XDG_CACHE_HOME/artguide/clip-embeddings).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Do not read or write the embedding cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// What to do with an unreadable image.
    #[arg(long, value_enum, default_value = "fail")]
    pub on_error: OnErrorArg,
    /// Largest image accepted, in pixels, checked before decoding.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub run: RunArgs,
    /// Image files or folders.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// What to do with an unreadable image.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OnErrorArg {
    /// Stop with an error naming the file.
    Fail,
    /// Warn, leave it out and go on.
    Skip,
}

/// `artguide embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A transformers CLIPModel folder or hub id (e.g. openai/clip-vit-large-patch14-336).
    #[arg(long)]
    pub clip: String,
    /// Output .npy file.
    #[arg(long)]
    pub out: PathBuf,
    /// CSV listing which image each row is (default: the output path with .csv).
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// What to do with an unreadable image.
    #[arg(long, value_enum, default_value = "fail")]
    pub on_error: OnErrorArg,
    /// Largest image accepted, in pixels, checked before decoding.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub run: RunArgs,
    /// Image files or folders.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// `artguide separate`.
#[derive(Debug, Args)]
pub struct SeparateArgs {
    /// Embeddings of class A (.npy, rows x dims, f16/f32/f64).
    #[arg(long)]
    pub class_a: PathBuf,
    /// Embeddings of class B (.npy, same width).
    #[arg(long)]
    pub class_b: PathBuf,
    /// Cross-validation folds (stratified).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Seed of the fold shuffle.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Inverse L2 regularisation strength, as scikit-learn's C.
    #[arg(long, default_value_t = 1.0)]
    pub c: f64,
    /// Write each row's out-of-fold P(A) here (columns class,row,fold,p_a).
    #[arg(long)]
    pub scores: Option<PathBuf>,
    /// Name of class A in the scores file.
    #[arg(long, default_value = "a")]
    pub label_a: String,
    /// Name of class B in the scores file.
    #[arg(long, default_value = "b")]
    pub label_b: String,
}

/// `artguide agree`.
#[derive(Debug, Args)]
pub struct AgreeArgs {
    /// CSV with a key column and the score column.
    #[arg(long)]
    pub scores: PathBuf,
    /// CSV with a key column and the rating column; one per rater (their mean is used, and
    /// their agreement reported).
    #[arg(long, num_args = 1.., required = true)]
    pub ratings: Vec<PathBuf>,
    /// Column of the scores file to correlate.
    #[arg(long)]
    pub score_column: String,
    /// Column of the ratings file to correlate.
    #[arg(long)]
    pub rating_column: String,
    /// Column matching the two files (default: the first column they share).
    #[arg(long)]
    pub key: Option<String>,
    /// Keep only score rows where COLUMN equals VALUE, e.g. `class=a`.
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    pub filter: Option<String>,
    /// A column of the ratings file(s) naming the rater, for one file holding every rater's
    /// rows (long format).
    #[arg(long, value_name = "COLUMN")]
    pub rater_column: Option<String>,
    /// Compare labels, not numbers (e.g. `top_style` with the `perceived_style` raters
    /// chose): agreement share, Cohen's kappa, Krippendorff's nominal alpha.
    #[arg(long)]
    pub nominal: bool,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Device choice.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Floating-point precision.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

/// Where and how to run a model.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// cpu or cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Precision of the model weights and activations (default: f32 on cpu, f16 on cuda).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
}

/// `artguide generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers model folder or a Hugging Face repo id (e.g. stabilityai/sd-turbo).
    #[arg(long, required_unless_present = "random_weights")]
    pub model: Option<String>,
    /// Build a published architecture with seeded random weights instead (timing only): sd15, sd21 or sdxl.
    #[arg(long, conflicts_with = "model")]
    pub random_weights: Option<String>,
    /// The prompt.
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional prompt).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub negative_prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less disables it, as for SD-Turbo).
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// auto (the model's own scheduler class; ddim when artguide lacks it), ddim, euler, euler-a
    /// or dpmpp-2m.
    #[arg(long, default_value = "auto")]
    pub scheduler: String,
    /// DDIM eta (0 is deterministic DDIM).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Seed of the first image; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Number of images (default 1, or the rows of --latents).
    #[arg(long)]
    pub num_images: Option<usize>,
    /// img2img: start from this image.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// img2img: how much of the init image to repaint, in (0, 1].
    #[arg(long, default_value_t = 0.75, requires = "init_image")]
    pub strength: f64,
    /// Exact initial noise: a safetensors file with tensor `latents` (N x 4 x h x w).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// Also write NAME.safetensors with `image` (H x W x 3 in [0,1]) and `latents`.
    #[arg(long)]
    pub save_tensors: bool,
    /// Largest init image accepted, in pixels, checked before decoding.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_pixels: u64,
    #[command(flatten)]
    pub guidance: GuidanceArgs,
    /// Probe each generated image with this (held-out) CLIP and --probe-suite; the answers go
    /// into the sidecar, next to the guide CLIP's own answers when guidance is on.
    #[arg(long, requires = "probe_suite")]
    pub probe_clip: Option<String>,
    /// Probe suite YAML for --probe-clip (e.g. probes/art.yaml).
    #[arg(long, requires = "probe_clip")]
    pub probe_suite: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// CLIP and style guidance options of `artguide generate`.
#[derive(Debug, Args)]
#[command(next_help_heading = "CLIP and style guidance")]
// What guides: the other guidance options only tune these, so given alone they are refused
// rather than silently unused.
#[command(group = clap::ArgGroup::new("guides").multiple(true).args(
    ["clip_prompts", "clip_image", "style_image", "tv_weight", "range_weight"]))]
#[command(group = clap::ArgGroup::new("clip_targets").multiple(true).args(["clip_prompts", "clip_image"]))]
pub struct GuidanceArgs {
    /// Guide CLIP: a transformers CLIPModel folder or hub id (e.g. openai/clip-vit-base-patch32).
    #[arg(long)]
    pub clip: Option<String>,
    /// Text target of CLIP guidance, `TEXT` or `TEXT:WEIGHT` (negative weights push away);
    /// repeat for several.
    #[arg(long = "clip-prompt", allow_hyphen_values = true)]
    pub clip_prompts: Vec<String>,
    /// Image target of CLIP guidance (cosine distance to its CLIP embedding).
    #[arg(long)]
    pub clip_image: Option<PathBuf>,
    /// Weight of --clip-image relative to the text targets.
    #[arg(long, default_value_t = 1.0, requires = "clip_image")]
    pub clip_image_weight: f64,
    /// Scale of the CLIP text/image loss (0 samples exactly as unguided).
    #[arg(long, default_value_t = crate::guidance::DEFAULT_SCALE, requires = "clip_targets")]
    pub clip_guidance_scale: f64,
    /// Random cutouts per guided step (0: one centred view of the whole image).
    #[arg(long, default_value_t = crate::guidance::DEFAULT_CUTOUTS, requires = "guides")]
    pub cutouts: usize,
    /// Guide every k-th step.
    #[arg(long, default_value_t = 1, requires = "guides")]
    pub guide_every: usize,
    /// Start of the guided range, as a fraction of the steps.
    #[arg(long, default_value_t = 0.0, requires = "guides")]
    pub guide_start: f64,
    /// End of the guided range, as a fraction of the steps.
    #[arg(long, default_value_t = 1.0, requires = "guides")]
    pub guide_end: f64,
    /// Clamp each element of the guidance gradient to [-F, F].
    #[arg(long, requires = "guides")]
    pub guide_clamp: Option<f64>,
    /// Total-variation penalty weight on the decoded image (default 0: none).
    #[arg(long)]
    pub tv_weight: Option<f64>,
    /// Penalty weight on decoded pixels outside [0, 1] (default 0: none).
    #[arg(long)]
    pub range_weight: Option<f64>,
    /// Style image: Gram-matrix loss on CLIP vision layers plus embedding cosine distance.
    #[arg(long)]
    pub style_image: Option<PathBuf>,
    /// Weight of the Gram-matrix style loss.
    #[arg(long, default_value_t = 1.0, requires = "style_image")]
    pub style_weight: f64,
    /// Weight of the style image's embedding cosine distance.
    #[arg(long, default_value_t = 1.0, requires = "style_image")]
    pub style_embed_weight: f64,
    /// Vision layers (0-based) of the Gram loss (default: 1/4, 1/2, 3/4 of the depth).
    #[arg(long, value_delimiter = ',', requires = "style_image")]
    pub style_layers: Option<Vec<usize>>,
    /// Weight of the content term keeping the init image's CLIP features (img2img).
    #[arg(long, default_value_t = 0.0, requires = "style_image")]
    pub content_weight: f64,
    /// Decoder the guidance gradient goes through: vae, taesd or linear.
    #[arg(long, default_value = "vae", requires = "guides")]
    pub guidance_decoder: String,
    /// TAESD folder or hub id for --guidance-decoder taesd; auto: madebyollin/taesdxl for SDXL-style
    /// models, madebyollin/taesd otherwise.
    #[arg(long, default_value = crate::guidance::DEFAULT_TAESD, requires = "guides")]
    pub taesd: String,
    /// Skip (with a warning) a guided step whose gradient is NaN/inf instead of stopping.
    #[arg(long, requires = "guides")]
    pub skip_nonfinite_guidance: bool,
}

/// `--shard I/N`: whole numbers with 0 <= I < N.
fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let parsed = s.split_once('/').and_then(|(i, n)| {
        Some((
            i.trim().parse::<usize>().ok()?,
            n.trim().parse::<usize>().ok()?,
        ))
    });
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => Err("expected I/N with 0 <= I < N, e.g. 0/4".to_string()),
    }
}

/// `artguide bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architecture with random weights: sd15, sd21 or sdxl.
    #[arg(long, default_value = "sd15")]
    pub arch: String,
    /// Image sizes (square, pixels) to time.
    #[arg(long, value_delimiter = ',', default_values_t = vec![256usize, 512])]
    pub sizes: Vec<usize>,
    /// Timed repetitions per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// What to time: unet, vae, clip, guidance.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["unet".to_string(), "vae".to_string()])]
    pub parts: Vec<String>,
    /// CLIP architectures for `--parts clip`: vit-b32, vit-l14.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["vit-b32".to_string(), "vit-l14".to_string()])]
    pub clip_arch: Vec<String>,
    /// Images per CLIP forward for `--parts clip`.
    #[arg(long, default_value_t = 64)]
    pub clip_batch: usize,
    /// Guidance decoders for `--parts guidance`: vae, taesd, linear.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["vae".to_string(), "taesd".to_string(), "linear".to_string()])]
    pub guidance_decoders: Vec<String>,
    /// Guide CLIP architecture for `--parts guidance`: vit-b32 or vit-l14.
    #[arg(long, default_value = "vit-b32")]
    pub guide_clip: String,
    /// Cutouts per guided step for `--parts guidance`.
    #[arg(long, default_value_t = 4)]
    pub cutouts: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_number_is_refused_by_its_own_option() {
        let err = Cli::try_parse_args(["artguide", "generate", "--prompt", "x", "--width", "-64"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'-64'") && err.contains("--width"), "{err}");
        let err = Cli::try_parse_args(["artguide", "generate", "--prompt", "x", "--steps", "-1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'-1'") && err.contains("--steps"), "{err}");
        assert!(err.contains("expected a whole number >= 0"), "{err}");
        let err = Cli::try_parse_args(["artguide", "generate", "--prompt", "x", "--seed", "-1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("there is no random seed"), "{err}");
        let err =
            Cli::try_parse_args(["artguide", "generate", "--prompt", "x", "--cutouts", "2.5"])
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("'2.5'") && err.contains("whole number"),
            "{err}"
        );
        // Options that only tune guidance are refused without anything to guide toward.
        let base = ["artguide", "generate", "--model", "m", "--prompt", "x"];
        let with =
            |extra: &[&str]| Cli::try_parse_args(base.iter().chain(extra).copied()).map(|_| ());
        let err = with(&["--clip-guidance-scale", "300"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--clip-prompt"), "{err}");
        assert!(with(&["--guidance-decoder", "taesd", "--cutouts", "2"]).is_err());
        assert!(with(&["--tv-weight", "1", "--guide-end", "0.5"]).is_ok());
        assert!(with(&["--clip-prompt", "a", "--clip-guidance-scale", "300"]).is_ok());
        assert!(with(&["--clip-image-weight", "2", "--clip-prompt", "a"]).is_err());
        // A bad --shard is a bad argument (exit 2, as clap's), named with what was expected.
        for bad in ["4/4", "-1/4", "1/0", "a/b", "3"] {
            let err =
                Cli::try_parse_args(["artguide", "run", "r.yaml", "--shard", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(
                err.to_string().contains("expected I/N with 0 <= I < N"),
                "{err}"
            );
        }
        match Cli::try_parse_args(["artguide", "run", "r.yaml", "--shard", " 1 / 4"]) {
            Ok(Cli {
                command: Command::Run(r),
                ..
            }) => assert_eq!(r.shard, Some((1, 4))),
            other => panic!("{other:?}"),
        }
        // Counts that must be at least 1, and top-k only with labels to score.
        let err = Cli::try_parse_args([
            "artguide", "probe", "--clip", "c", "--suite", "s", "--top-k", "2", "i.png",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--labels"), "{err}");
        // A negative float reaches the option's own checks instead of the flag parser.
        let cli = Cli::try_parse_args([
            "artguide", "generate", "--model", "m", "--prompt", "x", "--eta", "-1",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err());
    }

    fn generate(args: &[&str]) -> Result<GenerateArgs, String> {
        let all = ["artguide", "generate", "--model", "m"].iter().chain(args);
        match Cli::try_parse_args(all) {
            Ok(Cli {
                command: Command::Generate(g),
                ..
            }) => Ok(*g),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn prompts_may_start_with_a_hyphen_but_not_be_a_flag() {
        let g = generate(&[
            "--prompt",
            "-dark",
            "--negative-prompt",
            "- blurry",
            "--clip-prompt",
            "-x:2",
        ])
        .unwrap();
        assert_eq!(g.prompt, "-dark");
        assert_eq!(g.negative_prompt, "- blurry");
        assert_eq!(g.guidance.clip_prompts, ["-x:2"]);
        let err = generate(&["--prompt", "--quiet"]).unwrap_err();
        assert!(
            err.contains("--prompt needs a value") && err.contains("'--quiet'"),
            "{err}"
        );
        let err = generate(&["--prompt", "x", "--negative-prompt", "--seed"]).unwrap_err();
        assert!(
            err.contains("--negative-prompt needs") && err.contains("'--seed'"),
            "{err}"
        );
        let err = generate(&["--prompt", "x", "--clip-prompt", "--steps=3"]).unwrap_err();
        assert!(
            err.contains("--clip-prompt needs a value") && err.contains("'--steps=3'"),
            "{err}"
        );
        let err = generate(&["--prompt", "--seed", "3"]).unwrap_err();
        assert!(
            err.contains("--prompt needs a value") && err.contains("'--seed'"),
            "{err}"
        );
        let err = generate(&["--prompt", "x", "--negative-prompt", "--"]).unwrap_err();
        assert!(err.contains("--negative-prompt needs a value"), "{err}");
        let err = generate(&["--prompt", "-h"]).unwrap_err();
        assert!(err.contains("--prompt needs a value"), "{err}");
        // Bound with `=`, a value that looks like a flag is the text asked for.
        let g = generate(&["--prompt=--quiet", "--clip-prompt=--steps:2"]).unwrap();
        assert_eq!(g.prompt, "--quiet");
        assert_eq!(g.guidance.clip_prompts, ["--steps:2"]);
    }
}
