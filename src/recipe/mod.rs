//! Recipes: YAML files describing experiments (subjects x targets x seeds x arms), read with a
//! strict schema, checked field by field, and expanded into a plan of images.
//!
//! Relative paths in a recipe (model folders, suite, style and init images) are resolved
//! against the recipe file's folder, so a recipe and its assets move together; a model or
//! CLIP spec that is not an existing path is taken as a hub id.

pub mod plan;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::guidance::GuidanceConfig;
use crate::{Error, Result};

pub use plan::{Plan, PlanItem};

/// A whole recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The run's name: a plain folder name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The Stable Diffusion model: a diffusers folder or a hub id.
    pub model: String,
    /// The CLIP that guides (a CLIPModel folder or hub id); arms inherit it.
    #[serde(default)]
    pub guide_clip: Option<String>,
    /// The held-out CLIP that judges every image (may differ from the guide).
    pub probe_clip: String,
    /// The probe suite YAML.
    pub suite: PathBuf,
    /// Generation settings shared by every experiment.
    #[serde(default)]
    pub generation: Generation,
    /// The experiments, run in order.
    pub experiments: Vec<Experiment>,
}

/// Generation settings; every field has a default (stated in [`Generation::default`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Generation {
    pub steps: usize,
    pub guidance_scale: f64,
    /// auto (the model's own scheduler class; ddim when artguide lacks it), ddim, euler, euler-a
    /// or dpmpp-2m.
    pub scheduler: String,
    pub eta: f64,
    /// Image size; default: the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub negative_prompt: String,
    /// img2img init image (also the content image of style transfer).
    pub init_image: Option<PathBuf>,
    /// img2img strength; only with `init_image` (default: [`DEFAULT_STRENGTH`], via
    /// [`Generation::strength`]).
    pub strength: Option<f64>,
}

/// img2img strength when a recipe with an init image gives none (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.75;

impl Generation {
    /// The img2img strength to use.
    pub fn strength(&self) -> f64 {
        self.strength.unwrap_or(DEFAULT_STRENGTH)
    }

    /// The UNet steps each image really runs: img2img skips the first part of the schedule.
    pub fn denoising_steps(&self) -> crate::Result<usize> {
        Ok(match &self.init_image {
            Some(_) => {
                self.steps - crate::schedulers::img2img_start_index(self.steps, self.strength())?
            }
            None => self.steps,
        })
    }
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            steps: 30,
            guidance_scale: 7.5,
            scheduler: "auto".into(),
            eta: 0.0,
            width: None,
            height: None,
            negative_prompt: String::new(),
            init_image: None,
            strength: None,
        }
    }
}

/// One experiment: a grid of subjects x targets x seeds, each cell generated once per arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// A plain folder name, unique in the recipe.
    pub name: String,
    /// Prompt template: `{subject}` and `{target}` are replaced per cell.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    pub subjects: Vec<String>,
    /// Explicit targets.
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    /// Targets as the product of label lists (e.g. style x period for probe sets).
    #[serde(default)]
    pub target_grid: Option<TargetGrid>,
    pub seeds: Seeds,
    /// The arms; an arm without `guidance` is the baseline. Default: one baseline arm.
    #[serde(default = "default_arms")]
    pub arms: Vec<Arm>,
}

fn default_prompt() -> String {
    "{subject}".into()
}

fn default_arms() -> Vec<Arm> {
    vec![Arm {
        name: "baseline".into(),
        guidance: None,
    }]
}

/// A target: its text (for `{target}`) and the intended label of each probe it aims at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub text: String,
    pub labels: BTreeMap<String, String>,
}

/// Targets as a product: `labels: {style: [Baroque, Cubism], period: [17th, 20th]}` gives
/// four targets; `text` names each probe as `{style}`, `{period}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGrid {
    pub text: String,
    pub labels: BTreeMap<String, Vec<String>>,
}

/// Seeds: a list, or `{start, count}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Seeds {
    List(Vec<u64>),
    Range(SeedRange),
}

/// `count` consecutive seeds from `start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRange {
    pub start: u64,
    pub count: usize,
}

impl<'de> Deserialize<'de> for Seeds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // By hand so a bad value is reported at the `seeds` field, not as "no variant".
        let v = serde_yaml::Value::deserialize(d)?;
        if let Ok(list) = serde_yaml::from_value::<Vec<u64>>(v.clone()) {
            return Ok(Seeds::List(list));
        }
        let mapping = v.is_mapping();
        serde_yaml::from_value::<SeedRange>(v)
            .map(Seeds::Range)
            .map_err(|e| {
                // The range's own complaint only where a range was meant (a missing `count`);
                // for a value of another type it would say "expected a map" alone.
                let detail = if mapping {
                    format!(": {e}")
                } else {
                    String::new()
                };
                serde::de::Error::custom(format!(
                    "expected a list of seeds (non-negative integers) or {{start, count}}{detail}"
                ))
            })
    }
}

impl Seeds {
    /// The seeds in order.
    pub fn values(&self) -> Vec<u64> {
        match self {
            Seeds::List(v) => v.clone(),
            Seeds::Range(r) => (0..r.count as u64).map(|i| r.start + i).collect(),
        }
    }
}

/// An arm: a name and its guidance (none = the unguided baseline). Guidance prompts may use
/// `{subject}` and `{target}`; `clip` defaults to the recipe's `guide_clip`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub name: String,
    #[serde(default)]
    pub guidance: Option<GuidanceConfig>,
}

/// A recipe read from a file, with its text and folder.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    pub path: PathBuf,
    /// The file's exact text (copied into the run folder).
    pub text: String,
}

/// Most images one recipe may plan (a typo guard; split bigger studies into recipes).
pub const MAX_IMAGES: usize = 1_000_000;

/// Whether `s` is usable as one path component of the output folder.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `expected struct SeedRange` (a Rust type name) as `expected a map`, with the rest kept.
fn without_struct_names(msg: &str) -> String {
    const RUST: &str = "expected struct ";
    let mut out = String::new();
    let mut rest = msg;
    while let Some(i) = rest.find(RUST) {
        out.push_str(&rest[..i]);
        out.push_str("expected a map");
        let after = &rest[i + RUST.len()..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

/// serde_yaml's message with its location moved to the front, as `file:line:column: ...`.
fn yaml_error(path: &Path, e: serde_yaml::Error) -> Error {
    // Rust type names mean nothing to a recipe's author.
    let msg = [
        ("expected usize", "expected a whole number >= 0"),
        ("expected u64", "expected a whole number >= 0"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ]
    .iter()
    .fold(e.to_string(), |m, (rust, plain)| m.replace(rust, plain));
    let msg = without_struct_names(&msg);
    match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            let msg = msg.replace(&suffix, "");
            Error::file(
                format!("{}:{}:{}", path.display(), loc.line(), loc.column()),
                msg,
            )
        }
        None => Error::file(path, msg),
    }
}

impl LoadedRecipe {
    /// Reads, parses and checks a recipe file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::error::read_yaml_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses and checks recipe text that came from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let recipe: Recipe = serde_yaml::from_str(text).map_err(|e| yaml_error(path, e))?;
        let loaded = LoadedRecipe {
            recipe,
            path: path.to_path_buf(),
            text: text.to_string(),
        };
        loaded.check()?;
        Ok(loaded)
    }

    /// Whether `text`, a run folder's recipe copy, is this recipe: the same text, or text
    /// that reads as the same recipe (comments, layout, key order and number spellings aside).
    pub fn is_copy(&self, text: &str) -> bool {
        text == self.text || serde_yaml::from_str::<Recipe>(text).is_ok_and(|r| r == self.recipe)
    }

    /// The folder relative paths are resolved against.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new(""))
    }

    /// A path field resolved against the recipe's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir().join(p)
        }
    }

    /// Every model spec the recipe names, as written: the SD model, the probe CLIP, the guide
    /// CLIP and each arm's own guide CLIP.
    pub fn model_specs(&self) -> Vec<String> {
        let r = &self.recipe;
        let arms = r
            .experiments
            .iter()
            .flat_map(|e| &e.arms)
            .filter_map(|a| a.guidance.as_ref().and_then(|g| g.clip.clone()));
        let mut v: Vec<String> = [Some(r.model.clone()), Some(r.probe_clip.clone())]
            .into_iter()
            .chain([r.guide_clip.clone()])
            .flatten()
            .chain(arms)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Each spec of [`model_specs`](Self::model_specs) as this process resolves it (the ids
    /// a run made now records); specs that do not resolve here are left out.
    pub fn resolved_specs(&self) -> BTreeMap<String, String> {
        self.model_specs()
            .into_iter()
            .filter_map(|s| Some((s.clone(), self.resolve_model("model", &s).ok()?)))
            .collect()
    }

    /// A model or CLIP spec: the resolved path when it exists, else the spec as a hub id.
    /// A spec that can only be a path (starts with `.` or `/`, or has more than one `/`) and
    /// does not exist is an error naming the field.
    pub fn resolve_model(&self, field: &str, spec: &str) -> Result<String> {
        let p = self.resolve(Path::new(spec));
        if p.exists() {
            return Ok(p.display().to_string());
        }
        let path_like = spec.starts_with('.')
            || spec.starts_with('/')
            || spec.matches('/').count() != 1
            || spec.contains('\\');
        if path_like {
            return Err(Error::field(
                &self.path,
                field,
                format!("`{spec}`: no such folder ({})", p.display()),
            ));
        }
        Ok(spec.to_string())
    }

    fn field_err(&self, field: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::field(&self.path, field, msg)
    }

    /// An error about a generation option (`width`, `init-image`, `eta`...) as an error of
    /// the recipe's `generation` field that set it; other errors unchanged.
    pub fn generation_error(&self, e: Error) -> Error {
        match e {
            Error::Value { name, message } => {
                let g = &self.recipe.generation;
                let field = name.replace('-', "_");
                // An unset width or height is the init image's.
                let from_image = match field.as_str() {
                    "width" => g.width.is_none(),
                    "height" => g.height.is_none(),
                    _ => false,
                };
                match (&g.init_image, field.as_str()) {
                    (Some(p), "init_image") => self.field_err(
                        "generation.init_image",
                        format!("{}: {message}", p.display()),
                    ),
                    (Some(p), _) if from_image => self.field_err(
                        "generation.init_image",
                        format!(
                            "{}: the image's {field}: {message}; crop or resize the image, or \
                             set generation.width and height",
                            p.display()
                        ),
                    ),
                    _ => self.field_err(format!("generation.{field}"), message),
                }
            }
            e => e,
        }
    }

    /// The files the recipe reads besides models (the suite, the init image, guidance and
    /// style images), each as written and resolved.
    pub fn input_files(&self) -> Vec<(String, PathBuf)> {
        let r = &self.recipe;
        let arms = r.experiments.iter().flat_map(|e| &e.arms);
        let guidance = arms.filter_map(|a| a.guidance.as_ref());
        std::iter::once(&r.suite)
            .chain(&r.generation.init_image)
            .chain(guidance.flat_map(|g| g.image.iter().chain(g.style.as_ref().map(|s| &s.image))))
            .map(|p| (p.display().to_string(), self.resolve(p)))
            .collect()
    }

    fn must_exist(&self, field: &str, p: &Path) -> Result<()> {
        let r = self.resolve(p);
        if r.is_file() {
            Ok(())
        } else if r.is_dir() {
            Err(self.field_err(
                field,
                format!("{}: is a folder; expected a file", p.display()),
            ))
        } else {
            Err(self.field_err(
                field,
                format!("{}: no such file ({})", p.display(), r.display()),
            ))
        }
    }

    /// Semantic checks after parsing: names, counts, files, guidance settings.
    fn check(&self) -> Result<()> {
        let r = &self.recipe;
        if !plain_name(&r.name) {
            return Err(self.field_err(
                "name",
                format!(
                    "`{}` must be a plain folder name (letters, digits, - _ .), so the run stays inside the output folder",
                    r.name
                ),
            ));
        }
        self.resolve_model("model", &r.model)?;
        self.resolve_model("probe_clip", &r.probe_clip)?;
        if let Some(g) = &r.guide_clip {
            self.resolve_model("guide_clip", g)?;
        }
        self.must_exist("suite", &r.suite)?;
        let g = &r.generation;
        // generate's own model-free checks, named as the recipe's fields.
        crate::generate::check_counts(g.steps, 1, g.guidance_scale, g.eta)
            .map_err(|e| self.generation_error(e))?;
        for (field, v) in [
            ("generation.width", g.width),
            ("generation.height", g.height),
        ] {
            if v == Some(0) {
                return Err(self.field_err(field, "0: expected a positive image size in pixels"));
            }
        }
        let scheduler = g
            .scheduler
            .parse::<crate::schedulers::SchedulerChoice>()
            .map_err(|e| self.field_err("generation.scheduler", e.to_string()))?;
        // Settings that the rest of the generation section would leave silently unused.
        if let crate::schedulers::SchedulerChoice::Kind(kind) = scheduler {
            if g.eta != 0.0 && kind != crate::schedulers::SchedulerKind::Ddim {
                return Err(self.field_err(
                    "generation.eta",
                    format!(
                        "{}: eta applies to the ddim scheduler only, and generation.scheduler is {}",
                        g.eta,
                        kind.cli_name()
                    ),
                ));
            }
        }
        if !g.negative_prompt.is_empty() && g.guidance_scale <= 1.0 {
            return Err(self.field_err(
                "generation.negative_prompt",
                format!(
                    "is set, but generation.guidance_scale {} (<= 1) turns classifier-free guidance \
                     off, and the negative prompt acts only through it: raise the scale or remove it",
                    g.guidance_scale
                ),
            ));
        }
        if let Some(p) = &g.init_image {
            self.must_exist("generation.init_image", p)?;
            if !(g.strength() > 0.0 && g.strength() <= 1.0) {
                return Err(self.field_err(
                    "generation.strength",
                    format!("{}: expected a number in (0, 1]", g.strength()),
                ));
            }
            if let Err(e) = g.denoising_steps() {
                let message = match e {
                    crate::Error::Value { message, .. } => message,
                    e => e.to_string(),
                };
                return Err(self.field_err("generation.strength", message));
            }
        } else if g.strength.is_some() {
            // Without an init image it would be silently unused.
            return Err(self.field_err(
                "generation.strength",
                "is set, but it applies only to img2img: add generation.init_image or remove it",
            ));
        }
        if r.experiments.is_empty() {
            return Err(self.field_err("experiments", "is empty: expected at least one"));
        }
        let mut names = HashSet::new();
        let mut total = 0usize;
        for (i, e) in r.experiments.iter().enumerate() {
            let at = |f: &str| format!("experiments[{i}] ({}).{f}", e.name);
            if !plain_name(&e.name) {
                return Err(self.field_err(
                    format!("experiments[{i}].name"),
                    format!(
                        "`{}` must be a plain folder name (letters, digits, - _ .)",
                        e.name
                    ),
                ));
            }
            if !names.insert(e.name.as_str()) {
                return Err(self.field_err(at("name"), "duplicate experiment name"));
            }
            if e.subjects.is_empty() {
                return Err(self.field_err(at("subjects"), "is empty: expected at least one"));
            }
            if !e.targets.is_empty() && e.target_grid.is_some() {
                return Err(self.field_err(
                    at("target_grid"),
                    "give either `targets` or `target_grid`, not both",
                ));
            }
            if let Some(grid) = &e.target_grid {
                if grid.labels.is_empty() || grid.labels.values().any(Vec::is_empty) {
                    return Err(self.field_err(
                        at("target_grid.labels"),
                        "needs at least one probe with at least one label",
                    ));
                }
            }
            let has_targets = !e.targets.is_empty() || e.target_grid.is_some();
            // A placeholder the plan does not fill would reach the prompt as written, and
            // `{target}` without targets as nothing at all.
            let fillable =
                |field: String, text: &str| -> Result<()> {
                    for name in placeholders(text) {
                        match name {
                            "subject" => {}
                            "target" if has_targets => {}
                            "target" => return Err(self.field_err(
                                field,
                                "uses {target}, but the experiment has no targets or target_grid",
                            )),
                            other => {
                                return Err(self.field_err(
                                    field,
                                    format!(
                                        "unknown placeholder {{{other}}}: expected {{subject}} or \
                                     {{target}}"
                                    ),
                                ))
                            }
                        }
                    }
                    Ok(())
                };
            fillable(at("prompt"), &e.prompt)?;
            for (k, a) in e.arms.iter().enumerate() {
                for (j, t) in a.guidance.iter().flat_map(|g| &g.prompts).enumerate() {
                    fillable(at(&format!("arms[{k}].guidance.prompts[{j}]")), &t.text)?;
                }
            }
            if let Some(grid) = &e.target_grid {
                if let Some(p) = placeholders(&grid.text)
                    .into_iter()
                    .find(|p| !grid.labels.contains_key(*p))
                {
                    return Err(self.field_err(
                        at("target_grid.text"),
                        format!("{{{p}}} is not a probe of target_grid.labels"),
                    ));
                }
            }
            // Repeated cells would be counted as independent pairs (pseudo-replication).
            if let Some(d) = first_duplicate(&e.subjects) {
                return Err(self.field_err(at("subjects"), format!("has `{d}` twice")));
            }
            if let Some(d) = first_duplicate(&e.targets) {
                return Err(self.field_err(at("targets"), format!("has `{}` twice", d.text)));
            }
            for (probe, labels) in e.target_grid.iter().flat_map(|g| &g.labels) {
                if let Some(d) = first_duplicate(labels) {
                    return Err(self.field_err(
                        at(&format!("target_grid.labels.{probe}")),
                        format!("has `{d}` twice"),
                    ));
                }
            }
            // Checked before the seeds are listed: a huge count would not fit in memory.
            if let Seeds::Range(range) = &e.seeds {
                if range.count > MAX_IMAGES {
                    return Err(self.field_err(
                        at("seeds.count"),
                        format!("{}: at most {MAX_IMAGES} images per recipe", range.count),
                    ));
                }
                if range.count > 0 && range.start.checked_add(range.count as u64 - 1).is_none() {
                    return Err(self.field_err(
                        at("seeds"),
                        format!(
                            "start {} + count {} passes the largest seed, {}",
                            range.start,
                            range.count,
                            u64::MAX
                        ),
                    ));
                }
            }
            let seeds = e.seeds.values();
            if seeds.is_empty() {
                return Err(self.field_err(at("seeds"), "is empty: expected at least one seed"));
            }
            if seeds.iter().collect::<HashSet<_>>().len() != seeds.len() {
                return Err(self.field_err(at("seeds"), "has duplicate seeds"));
            }
            if e.arms.is_empty() {
                return Err(self.field_err(at("arms"), "is empty: expected at least one arm"));
            }
            let mut arm_names = HashSet::new();
            let mut baselines = 0;
            for (k, a) in e.arms.iter().enumerate() {
                let at_arm =
                    |f: &str| format!("experiments[{i}] ({}).arms[{k}] ({}).{f}", e.name, a.name);
                if !plain_name(&a.name) {
                    return Err(self.field_err(
                        format!("experiments[{i}] ({}).arms[{k}].name", e.name),
                        format!(
                            "`{}` must be a plain folder name (letters, digits, - _ .)",
                            a.name
                        ),
                    ));
                }
                if !arm_names.insert(a.name.as_str()) {
                    return Err(self.field_err(at_arm("name"), "duplicate arm name"));
                }
                match &a.guidance {
                    None => baselines += 1,
                    Some(gc) => {
                        let mut gc = gc.clone();
                        if gc.clip.is_none() {
                            gc.clip = r.guide_clip.clone();
                        }
                        gc.validate().map_err(|err| match err {
                            crate::Error::Value { name, message } => self.field_err(
                                at_arm(&format!(
                                    "guidance.{}",
                                    crate::guidance::recipe_field(&name)
                                )),
                                message,
                            ),
                            err => self.field_err(at_arm("guidance"), err.to_string()),
                        })?;
                        if !gc.is_active() {
                            return Err(self.field_err(
                                at_arm("guidance"),
                                "guides toward nothing: every term is missing or has scale or weight 0 \
                                 (give prompts, image, style, tv_weight or range_weight a non-zero \
                                 weight; an arm without guidance is the baseline)",
                            ));
                        }
                        // Only reached once the generation section has passed its checks.
                        if let Some(why) = g.denoising_steps().ok().and_then(|n| gc.empty_window(n))
                        {
                            return Err(self.field_err(at_arm("guidance.start/end"), why));
                        }
                        if let Some(c) = &gc.clip {
                            self.resolve_model(&at_arm("guidance.clip"), c)?;
                        }
                        if let Some(p) = &gc.image {
                            self.must_exist(&at_arm("guidance.image"), p)?;
                        }
                        if let Some(s) = &gc.style {
                            self.must_exist(&at_arm("guidance.style.image"), &s.image)?;
                            if s.content_weight != 0.0 && g.init_image.is_none() {
                                return Err(self.field_err(
                                    at_arm("guidance.style.content_weight"),
                                    "the content term needs generation.init_image",
                                ));
                            }
                        }
                        if gc.decoder == crate::guidance::DecoderKind::Taesd
                            && gc.taesd != crate::guidance::DEFAULT_TAESD
                        {
                            self.resolve_model(&at_arm("guidance.taesd"), &gc.taesd)?;
                        }
                    }
                }
            }
            if baselines > 1 {
                return Err(self.field_err(
                    at("arms"),
                    "more than one arm without guidance: exactly one baseline is allowed",
                ));
            }
            let targets = e.targets.len().max(
                e.target_grid
                    .as_ref()
                    .map(|g| g.labels.values().map(Vec::len).product())
                    .unwrap_or(1),
            );
            total = total.saturating_add(
                e.subjects
                    .len()
                    .saturating_mul(targets.max(1))
                    .saturating_mul(seeds.len())
                    .saturating_mul(e.arms.len()),
            );
        }
        if total > MAX_IMAGES {
            return Err(self.field_err(
                "experiments",
                format!("plan {total} images; at most {MAX_IMAGES} per recipe"),
            ));
        }
        Ok(())
    }
}

/// The `{name}` placeholders of a template, in order.
fn placeholders(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('}') else { break };
        let name = &rest[..close];
        if !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || "_-".contains(c))
        {
            out.push(name);
            rest = &rest[close + 1..];
        }
    }
    out
}

/// The first value that occurs twice.
fn first_duplicate<T: PartialEq>(values: &[T]) -> Option<&T> {
    values
        .iter()
        .enumerate()
        .find(|(i, v)| values[..*i].contains(v))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests;
