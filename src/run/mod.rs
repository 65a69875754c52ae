//! Executing a recipe: the plan's items generated, probed and recorded, resumable and
//! shardable.
//!
//! A run folder holds `recipe.yaml` (the recipe as run), `images/<experiment>/<cell>/<arm>.png`
//! with its `.json` sidecar, `manifest.json` (each finished item's PNG hash and probe
//! answers) and, once every item of the run (or shard) is done, `results.json`. Every file is
//! written to a hidden temporary name and renamed, and an item enters the manifest only after
//! its files exist, so a run killed at any point resumes to the same bytes: finished items
//! (manifest entry + matching PNG hash) are skipped, anything else is made again.

pub mod results;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::generate::{self, GenerateOptions};
use crate::guidance::{GuidanceDecoder, Guide, GuideClip};
use crate::models::stable_diffusion::{LoadOptions, SdModel};
use crate::models::tokenizer::ClipTokenizer;
use crate::probe::embed::ClipEncoder;
use crate::probe::runner::{ProbeAnswer, Prober};
use crate::probe::suite::Suite;
use crate::progress::Progress;
use crate::recipe::{LoadedRecipe, Plan, PlanItem};
use crate::schedulers::{SchedulerChoice, SchedulerKind};
use crate::{Error, Result};
use results::{RunItem, RunResults, SuiteProbe, RESULTS_FILE};

/// File name of the manifest inside a run folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the recipe copy inside a run folder.
pub const RECIPE_FILE: &str = "recipe.yaml";

/// Files `compare` and `probeset` write into a run folder from its images.
const DERIVED_FILES: [&str; 7] = [
    "summary.json",
    "summary.csv",
    "targets.csv",
    "report.html",
    "labels.csv",
    "clip_scores.csv",
    "annotation.html",
];

/// One finished item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub sha256: String,
    pub probes: BTreeMap<String, Vec<ProbeAnswer>>,
}

/// The finished items of a run folder, by item id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Model ids the answers were made with: the SD model, probe CLIP and guide CLIP.
    pub model: String,
    pub probe_clip: String,
    pub guide_clip: Option<String>,
    /// The scheduler the items were made with (what `auto` resolved to for the model); empty
    /// in manifests written before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scheduler: String,
    /// What the items were made with beyond the recipe, empty in older manifests: the
    /// content fingerprint of each model id above (and of every guide CLIP), so a resume or
    /// merge that finds other weights behind a spec is refused whatever the paths; the
    /// device kind (`cpu`, `cuda`) and dtype, which change the images' bytes.
    #[serde(default, skip_serializing_if = "MadeWith::is_empty")]
    pub made_with: MadeWith,
    /// How `--shard` assigns items in the build that wrote this folder ([`SHARD_SPLIT`]);
    /// empty in manifests of builds that split shards by item index.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shard_split: String,
    pub items: BTreeMap<String, ManifestEntry>,
}

/// This build's `--shard` assignment: whole grid cells (see `PlanItem::in_shard`).
pub const SHARD_SPLIT: &str = "cell";

/// The weights, device and precision a run's items were made with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MadeWith {
    /// Model id -> sha256 over its files (the SD model's weight, config and tokenizer files;
    /// a CLIP's configs and weights).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fingerprints: BTreeMap<String, String>,
    /// The recipe's input files (suite, init and guidance images), as the recipe writes
    /// them -> sha256: a file edited between a run and its resume would mix two versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dtype: String,
}

impl MadeWith {
    /// Whether nothing is recorded (a manifest from before these were).
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
            && self.files.is_empty()
            && self.device.is_empty()
            && self.dtype.is_empty()
    }

    /// The first way `other` differs from `self` where both say something, as
    /// (what, ours, theirs): a model with other weights, another device or dtype.
    pub fn conflict(&self, other: &MadeWith) -> Option<(String, String, String)> {
        for (id, fp) in &self.fingerprints {
            if let Some(o) = other.fingerprints.get(id).filter(|o| *o != fp) {
                return Some((format!("the weights of {id}"), short(fp), short(o)));
            }
        }
        for (file, fp) in &self.files {
            if let Some(o) = other.files.get(file).filter(|o| *o != fp) {
                return Some((format!("the file {file}"), short(fp), short(o)));
            }
        }
        [
            ("device", &self.device, &other.device),
            ("dtype", &self.dtype, &other.dtype),
        ]
        .into_iter()
        .find(|(_, a, b)| !a.is_empty() && !b.is_empty() && a != b)
        .map(|(what, a, b)| (what.to_string(), a.clone(), b.clone()))
    }
}

/// The first 12 hex digits of a fingerprint, enough to tell two apart in a message.
fn short(fp: &str) -> String {
    format!("sha256 {}…", &fp[..12.min(fp.len())])
}

impl Manifest {
    /// Reads a run folder's manifest (empty when there is none yet).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                Error::file(
                    &path,
                    format!(
                        "not a valid run manifest ({e}); delete it to make the run's images again"
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Msg(e.to_string()))?;
        crate::output::write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes(), true)
    }

    /// Every model id this manifest names, repeats included: its models, the answers' keys
    /// and the fingerprinted ids.
    fn ids(&self) -> impl Iterator<Item = &String> {
        [
            Some(&self.model),
            Some(&self.probe_clip),
            self.guide_clip.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(self.items.values().flat_map(|e| e.probes.keys()))
        .chain(self.made_with.fingerprints.keys())
    }

    /// Renames every model id of this manifest (its models and the answers' keys) to the
    /// spelling `target` gives for the recipe spec it was resolved from: one recipe run from
    /// another path (a resumed run, a shard made elsewhere) spells each local model
    /// differently, and answers under two spellings would count as two models. An id names
    /// its spec when it is the spec or ends with it (`recipes/../sd` for `../sd`), the longest
    /// such spec winning. An id that is an existing folder other than its target, or a hub
    /// model where the target is a folder (or the reverse), is refused as `(spec, recorded,
    /// target)`, and nothing is changed; unless `weighed` says the caller compares the
    /// recorded fingerprints with the loaded models' (and this manifest has them), which
    /// tells what paths only guess. Two spellings with different fingerprints that would
    /// become one id are refused too.
    pub fn adopt(
        &mut self,
        specs: &[String],
        target: &BTreeMap<String, String>,
        hub: &crate::models::hub::HubOptions,
        weighed: bool,
    ) -> std::result::Result<(), (String, String, String)> {
        use crate::models::hub::{is_cached_repo, looks_like_repo_id, same_id};
        let folder = |id: &str| Path::new(id).exists();
        let fingerprinted = weighed && !self.made_with.fingerprints.is_empty();
        let new_of = |id: &str| -> std::result::Result<Option<String>, (String, String, String)> {
            let Some(spec) = spec_of(id, specs) else {
                return Ok(None);
            };
            let Some(new) = target.get(spec) else {
                return Ok(None);
            };
            // Both existing and different: two models. A folder missing here (a moved run, a
            // shard made on another machine) cannot be told apart from its target.
            // A hub model recorded (in the cache, no such folder here) and a folder now, or
            // a folder recorded and a hub model now: two models.
            let hub_now = looks_like_repo_id(new) && !folder(new);
            let swapped =
                (is_cached_repo(id, hub) && folder(new)) || (folder(id) && hub_now && id != new);
            let other_folder = id != new && folder(id) && folder(new) && !same_id(id, new);
            if !fingerprinted && (swapped || other_folder) {
                return Err((spec.clone(), id.to_string(), new.clone()));
            }
            Ok(Some(new.clone()))
        };
        let mut renames: HashMap<String, String> = HashMap::new();
        for id in self.ids() {
            if !renames.contains_key(id) {
                if let Some(new) = new_of(id)? {
                    renames.insert(id.clone(), new);
                }
            }
        }
        let mut weights: HashMap<&str, (&str, &str)> = HashMap::new();
        for (id, fp) in &self.made_with.fingerprints {
            let new = renames.get(id).unwrap_or(id);
            if let Some((other, _)) = weights.insert(new, (id, fp)).filter(|(_, f)| f != fp) {
                let spec = spec_of(id, specs).cloned().unwrap_or_default();
                return Err((spec, other.to_string(), id.clone()));
            }
        }
        let rename = |id: &mut String| {
            if let Some(new) = renames.get(id.as_str()) {
                id.clone_from(new);
            }
        };
        rename(&mut self.model);
        rename(&mut self.probe_clip);
        if let Some(g) = self.guide_clip.as_mut() {
            rename(g);
        }
        for (mut id, fp) in std::mem::take(&mut self.made_with.fingerprints) {
            rename(&mut id);
            self.made_with.fingerprints.entry(id).or_insert(fp);
        }
        for e in self.items.values_mut() {
            let old = std::mem::take(&mut e.probes);
            for (mut k, v) in old {
                rename(&mut k);
                // Two spellings of one model: the answers are the same model's; keep one.
                e.probes.entry(k).or_insert(v);
            }
        }
        Ok(())
    }
}

/// The spec of `specs` that model id `id` was resolved from: `id` itself, or the longest
/// spec `id` ends with, compared by path components (`./` ignored).
fn spec_of<'a>(id: &str, specs: &'a [String]) -> Option<&'a String> {
    let parts = |p: &str| -> Vec<String> {
        Path::new(p)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    };
    let id_parts = parts(id);
    specs
        .iter()
        .filter_map(|s| {
            let sp = parts(s);
            (s == id || (!sp.is_empty() && id_parts.ends_with(&sp))).then_some((sp.len(), s))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s)
}

/// The spelling of each spec in `ids` (a run's models as one process resolved them).
fn spellings(specs: &[String], ids: &[&str]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for id in ids {
        if let Some(spec) = spec_of(id, specs) {
            m.entry(spec.clone()).or_insert_with(|| id.to_string());
        }
    }
    m
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// `(i, n)`: only plan items with index % n == i.
    pub shard: Option<(usize, usize)>,
    /// Reuse a folder that holds a run of a different recipe.
    pub force: bool,
    /// Largest image read (style, init), in pixels.
    pub max_pixels: u64,
}

/// The image path of an item, relative to the run folder.
pub fn image_rel(item_id: &str) -> String {
    format!("images/{item_id}.png")
}

/// What claiming a run folder for a recipe will do, decided before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The folder already holds this recipe's run: resume it.
    Resume,
    /// A new (or empty, or with `force` a foreign) folder: write the recipe copy.
    Start,
    /// With `force`, a folder holding another recipe's run: replace its recipe, manifest and
    /// results.
    Replace,
}

/// Checks, without writing anything, that `out` can hold this recipe's run, and says how.
pub fn check_folder(recipe: &LoadedRecipe, out: &Path, force: bool) -> Result<Claim> {
    crate::output::check_output_dir(out)?;
    let copy = out.join(RECIPE_FILE);
    match std::fs::read_to_string(&copy) {
        Ok(old) if recipe.is_copy(&old) => Ok(Claim::Resume),
        Ok(_) if !force => Err(Error::file(
            out,
            "holds a run of a different recipe; choose another --out or pass --force",
        )),
        Ok(_) => Ok(Claim::Replace),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let nonempty = match std::fs::read_dir(out) {
                Ok(mut entries) => entries.next().is_some(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(Error::io(out, e)),
            };
            if nonempty && !force {
                return Err(Error::file(
                    out,
                    "is not empty and holds no artguide run; choose another --out or pass --force",
                ));
            }
            Ok(Claim::Start)
        }
        Err(e) => Err(Error::io(&copy, e)),
    }
}

/// Claims `out` for this recipe as `check_folder` decided: creates it, writes the recipe
/// copy and removes temporaries a killed run left.
fn claim_folder(recipe: &LoadedRecipe, out: &Path, claim: Claim) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let copy = out.join(RECIPE_FILE);
    match claim {
        Claim::Resume => {}
        Claim::Start => crate::output::write_atomic(&copy, recipe.text.as_bytes(), true)?,
        Claim::Replace => {
            crate::output::write_atomic(&copy, recipe.text.as_bytes(), true)?;
            // The old run's images and what was made from them (compare's summary and report,
            // probeset's sheet) would otherwise sit beside the new run as if they were its
            // own. annotation.csv stays: it may hold a person's answers.
            for f in [MANIFEST_FILE, RESULTS_FILE]
                .into_iter()
                .chain(DERIVED_FILES)
            {
                let _ = std::fs::remove_file(out.join(f));
            }
            for d in ["images", crate::probeset::SHEET_DIR] {
                let d = out.join(d);
                // remove_dir_all does not follow symbolic links; a link itself is removed.
                match std::fs::symlink_metadata(&d) {
                    Ok(m) if m.is_dir() => {
                        std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?
                    }
                    Ok(_) => std::fs::remove_file(&d).map_err(|e| Error::io(&d, e))?,
                    Err(_) => {}
                }
            }
        }
    }
    remove_stale_temporaries(out)
}

/// Claims `out` for this recipe: creates it, refuses a folder holding another recipe's run
/// (unless `force`), writes the recipe copy and removes temporaries a killed run left.
pub fn prepare(recipe: &LoadedRecipe, out: &Path, force: bool) -> Result<()> {
    let claim = check_folder(recipe, out, force)?;
    claim_folder(recipe, out, claim)
}

/// Deletes hidden `*.tmp` files (a killed writer's temporaries) under `dir`, never following
/// symbolic links.
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(_) => return Ok(()),
    };
    for e in entries {
        let e = e.map_err(|err| Error::io(dir, err))?;
        let ft = e.file_type().map_err(|err| Error::io(e.path(), err))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if ft.is_dir() {
            remove_stale_temporaries(&e.path())?;
        } else if ft.is_file() && name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Refuses to write under `dir` when a folder between the run folder `out` and `dir` is a
/// symbolic link, which could lead the run's writes out of its folder.
fn refuse_symlinks(out: &Path, dir: &Path) -> Result<()> {
    let Ok(rel) = dir.strip_prefix(out) else {
        return Err(Error::file(dir, "is outside the run folder"));
    };
    let mut p = out.to_path_buf();
    for c in rel.components() {
        p.push(c);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::file(
                &p,
                "is a symbolic link inside the run folder; refusing to write through it",
            ));
        }
    }
    Ok(())
}

/// What happened to an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    /// Already in the manifest with a matching image.
    Skipped,
    /// Generated now.
    Made,
}

/// Whether an item is finished in `out`: in the manifest, with its PNG present and matching.
fn is_done(out: &Path, manifest: &Manifest, id: &str) -> bool {
    manifest
        .items
        .get(id)
        .is_some_and(|entry| image_matches(out, id, entry))
}

/// Whether the PNG of item `id` in `out` is the one `entry` records.
fn image_matches(out: &Path, id: &str, entry: &ManifestEntry) -> bool {
    // The sidecar belongs to the item too: without it the item is made again (a merge of
    // the folder would otherwise fail on the missing file).
    crate::output::sha256_file(&out.join(image_rel(id))).is_ok_and(|h| h == entry.sha256)
        && out.join(format!("images/{id}.json")).is_file()
}

/// The scheduler a recipe's generation settings give for a loaded model.
fn scheduler_kind(g: &crate::recipe::Generation, sd: &SdModel) -> Result<SchedulerKind> {
    Ok(g.scheduler
        .parse::<SchedulerChoice>()?
        .resolve(&sd.scheduler_config)
        .kind)
}

/// Writes `results.json` into a run folder (atomically).
fn write_results(out: &Path, results: &RunResults) -> Result<()> {
    let text = serde_json::to_string_pretty(results).map_err(|e| Error::Msg(e.to_string()))?;
    crate::output::write_atomic(&out.join(RESULTS_FILE), text.as_bytes(), true)
}

/// Loaded models shared by every item.
struct Models {
    sd: SdModel,
    hashes: BTreeMap<String, String>,
    probers: Vec<Prober>,
    guide_clips: HashMap<String, (GuideClip, ClipTokenizer)>,
    decoders: HashMap<String, GuidanceDecoder>,
    init_image: Option<candle_core::Tensor>,
    made_with: MadeWith,
}

/// One fingerprint of an SD model from its files' SHA-256s (relative name -> hash).
fn sd_fingerprint(hashes: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (rel, sha) in hashes {
        h.update(format!("{rel} {sha}\n"));
    }
    format!("{:x}", h.finalize())
}

/// The CLIPs that guide some arm of the plan.
fn guide_specs(plan: &[&PlanItem]) -> Vec<String> {
    let mut v: Vec<String> = plan
        .iter()
        .filter_map(|i| i.guidance.as_ref().and_then(|g| g.clip.clone()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Runs the plan's items (those of the shard, if any) that are not finished yet; then writes
/// `results.json` for them. `on_item` hears about each item as it is finished or skipped.
pub fn execute(
    recipe: &LoadedRecipe,
    plan: &Plan,
    suite: &Suite,
    load: &LoadOptions,
    opts: &RunOptions,
    progress: &Progress,
    mut on_item: impl FnMut(&PlanItem, ItemStatus),
) -> Result<RunResults> {
    let out = &opts.out;
    // Nothing is written until the folder, the models and the generation settings have been
    // checked, so a bad recipe leaves no half-made run folder behind.
    let claim = check_folder(recipe, out, opts.force)?;
    let items: Vec<&PlanItem> = match opts.shard {
        Some((i, n)) => plan.shard(i, n),
        None => plan.items.iter().collect(),
    };
    let mut manifest = match claim {
        Claim::Replace => Manifest::default(),
        Claim::Resume | Claim::Start => Manifest::load(out)?,
    };
    // From the whole plan, not the shard: every shard probes with the same CLIPs, so shards
    // merge into exactly the unsharded run.
    let all: Vec<&PlanItem> = plan.items.iter().collect();
    // Each finished PNG is hashed once, here: what is done decides what to make, what to
    // skip and, for a shard, which other items results.json keeps.
    let done: std::collections::HashSet<&str> = match opts.shard {
        Some(_) => &all,
        None => &items,
    }
    .iter()
    .filter(|it| is_done(out, &manifest, &it.id))
    .map(|it| it.id.as_str())
    .collect();
    let todo: Vec<&PlanItem> = items
        .iter()
        .copied()
        .filter(|it| !done.contains(it.id.as_str()))
        .collect();
    // A shard folder begun by a build that split shards by item holds another shard's
    // items than this build's `--shard I/N`: finishing it here would mix the two splits.
    if opts.shard.is_some()
        && !todo.is_empty()
        && !manifest.items.is_empty()
        && manifest.shard_split != SHARD_SPLIT
    {
        return Err(Error::NotResumable {
            path: out.join(MANIFEST_FILE),
            message: "was begun by an older artguide, whose --shard split by item (this one \
                      splits by grid cell): finish it with that build, resume it without \
                      --shard, or choose another --out"
                .into(),
        });
    }
    manifest.shard_split = SHARD_SPLIT.to_string();
    // The models are loaded (and the recorded fingerprints checked against them) only when
    // there is something to make.
    let loading = !todo.is_empty() || manifest.probe_clip.is_empty();
    // Answers recorded under another spelling of the recipe's models (the recipe run from
    // another path) take this run's, even when nothing is left to make.
    manifest
        .adopt(
            &recipe.model_specs(),
            &recipe.resolved_specs(),
            &crate::models::hub::HubOptions::from_env(),
            loading,
        )
        .map_err(|(spec, made, now)| Error::NotResumable {
            path: out.join(MANIFEST_FILE),
            message: format!(
                "was made with `{spec}` at {made}, but the recipe now finds it at {now}, \
                 another model; choose another --out, or remove {} to make the run again",
                out.display()
            ),
        })?;
    let r = &recipe.recipe;
    let probe_spec = recipe.resolve_model("probe_clip", &r.probe_clip)?;
    let guides = guide_specs(&all);
    let mut models: Option<Models> = None;
    if loading {
        models = Some(load_models(
            recipe,
            suite,
            load,
            &items,
            &probe_spec,
            &guides,
            opts,
        )?);
    }
    if let Some(m) = &models {
        // Whatever the paths say, items made with other weights (or on another device, in
        // another dtype) are not finished with these.
        if !manifest.items.is_empty() {
            // Every model this run loads was recorded (ids were respelled by `adopt`): one
            // that was not is a model the items were not made with.
            let recorded = &manifest.made_with.fingerprints;
            let unrecorded = m
                .made_with
                .fingerprints
                .keys()
                .find(|id| !recorded.contains_key(*id));
            if let Some(id) = unrecorded.filter(|_| !recorded.is_empty()) {
                return Err(Error::NotResumable {
                    path: out.join(MANIFEST_FILE),
                    message: format!(
                        "records no fingerprint for {id}, which this run loads: the items were \
                         made with other models; choose another --out, or remove {} to make \
                         the run again",
                        out.display()
                    ),
                });
            }
            if let Some((what, then, now)) = manifest.made_with.conflict(&m.made_with) {
                return Err(Error::NotResumable {
                    path: out.join(MANIFEST_FILE),
                    message: format!(
                        "was made with {what} {then}, but this run has {now}; resume with \
                         the same models, input files, --device and --dtype, or choose \
                         another --out"
                    ),
                });
            }
        }
        // Items of one arm share their settings (size, steps, strength, guidance: its images,
        // decoder and cutouts, so its memory need): the first item of each arm still to make
        // is checked, so a bad later arm fails before the first image, not after it.
        // Guidance prompts are filled per cell ({subject}, {target}), so each item's own
        // guidance settings are checked too (cheap: no model runs).
        for it in &todo {
            if let Some(g) = &it.guidance {
                g.validate()
                    .map_err(|e| Error::Msg(format!("item {}: guidance: {e}", it.id)))?;
            }
        }
        // Prompts longer than the text encoder reads are cut, as diffusers does: say so once
        // per prompt.
        let mut seen = std::collections::HashSet::new();
        for it in todo.iter().filter(|it| seen.insert(it.prompt.as_str())) {
            if let Some((tokens, room)) = m.sd.prompt_overflow(&it.prompt)? {
                progress.warn(
                    &format!(
                        "item {}: the prompt is {tokens} tokens; the text encoder reads the first {room}, the rest is ignored",
                        it.id
                    ),
                    serde_json::json!({"event": "truncated", "item": it.id, "tokens": tokens, "kept": room}),
                );
            }
        }
        let mut arms = std::collections::HashSet::new();
        for it in todo
            .iter()
            .filter(|it| arms.insert((it.experiment.as_str(), it.arm.as_str())))
        {
            let gopts = item_options(recipe, m, it, opts)?;
            generate::validate(&m.sd, &gopts).map_err(|e| recipe.generation_error(e))?;
            crate::resources::check(&m.sd, &gopts)?;
        }
        // A resumed run must finish with the scheduler it started with: `auto` resolves from
        // the model folder, and a different artguide may resolve it differently.
        let kind = scheduler_kind(&r.generation, &m.sd)?;
        // A named scheduler other than DDIM is refused with an eta at load; `auto` is known
        // only now.
        if r.generation.eta != 0.0 && kind != SchedulerKind::Ddim {
            progress.warn(
                &format!(
                    "generation.eta {} is ignored: it applies to DDIM only, and `auto` chose {} for this model",
                    r.generation.eta,
                    kind.cli_name()
                ),
                serde_json::json!({"event": "ignored", "option": "eta", "scheduler": kind.cli_name()}),
            );
        }
        if !manifest.items.is_empty()
            && !manifest.scheduler.is_empty()
            && manifest.scheduler != kind.cli_name()
        {
            return Err(Error::NotResumable {
                path: out.join(MANIFEST_FILE),
                message: format!(
                    "was made with scheduler {}, but generation.scheduler `{}` now gives {}; \
                     choose another --out, or remove {} to make the run again",
                    manifest.scheduler,
                    r.generation.scheduler,
                    kind.cli_name(),
                    out.display()
                ),
            });
        }
        // Items made before fingerprints were recorded keep none: this run's would be a
        // claim about them.
        if manifest.items.is_empty() || !manifest.made_with.is_empty() {
            manifest.made_with = m.made_with.clone();
        }
        manifest.scheduler = kind.cli_name().to_string();
        manifest.model = m.sd.id.clone();
        manifest.probe_clip = m.probers[0].encoder.id.clone();
        // The guide CLIPs' probers follow the probe CLIP's (see load_models).
        manifest.guide_clip = m.probers.get(1).map(|p| p.encoder.id.clone());
    }
    claim_folder(recipe, out, claim)?;
    for it in items.iter().filter(|it| done.contains(it.id.as_str())) {
        on_item(it, ItemStatus::Skipped);
        for _ in 0..recipe.recipe.generation.denoising_steps()? {
            progress.tick("done before");
        }
    }
    for item in todo {
        let m = models.as_ref().expect("loaded when there is work");
        progress.set_context(&item.id);
        let entry = make_item(recipe, m, item, opts, progress)?;
        manifest.items.insert(item.id.clone(), entry);
        manifest.save(out)?;
        on_item(item, ItemStatus::Made);
    }
    progress.set_context("");
    // results.json holds every plan item finished in this folder: for a shard folder its own
    // items, and a shard run into a folder holding more (the whole run, or other shards)
    // keeps those too rather than cutting them to the shard.
    let finished: Vec<&PlanItem> = match opts.shard {
        Some((i, n)) => all
            .iter()
            .copied()
            .filter(|it| it.in_shard(i, n) || done.contains(it.id.as_str()))
            .collect(),
        None => items,
    };
    let results = assemble(recipe, suite, &manifest, &finished)?;
    write_results(out, &results)?;
    Ok(results)
}

fn load_models(
    recipe: &LoadedRecipe,
    suite: &Suite,
    load: &LoadOptions,
    items: &[&PlanItem],
    probe_spec: &str,
    guides: &[String],
    opts: &RunOptions,
) -> Result<Models> {
    let r = &recipe.recipe;
    let sd = SdModel::load(&recipe.resolve_model("model", &r.model)?, load)?;
    let hashes = crate::models::file_hash::HashCache::default().sha256_files(&sd.files)?;
    let mut probers = vec![Prober::new(
        ClipEncoder::load(probe_spec, &load.hub, load.dtype, &load.device)?,
        suite.clone(),
    )?];
    // The recipe's guide CLIP judges every image, as the README says, even when no arm is
    // guided (a baseline-only recipe, whose images are compared with guided runs' later).
    let mut judges = guides.to_vec();
    if let Some(g) = &r.guide_clip {
        let g = recipe.resolve_model("guide_clip", g)?;
        if !judges.contains(&g) {
            judges.push(g);
        }
    }
    for g in &judges {
        probers.push(Prober::new(
            ClipEncoder::load(g, &load.hub, load.dtype, &load.device)?,
            suite.clone(),
        )?);
    }
    let mut guide_clips = HashMap::new();
    for g in guides {
        guide_clips.insert(
            g.clone(),
            GuideClip::load(g, &load.hub, load.dtype, &load.device)?,
        );
    }
    let mut decoders = HashMap::new();
    for it in items {
        if let Some(g) = it.guidance.as_ref().filter(|g| g.is_active()) {
            let key = format!("{}:{}", g.decoder, g.taesd);
            if let std::collections::hash_map::Entry::Vacant(slot) = decoders.entry(key) {
                slot.insert(GuidanceDecoder::load(g.decoder, &g.taesd, &sd, &load.hub)?);
            }
        }
    }
    let init_image = match &r.generation.init_image {
        Some(p) => Some(generate::load_init_image(
            &recipe.resolve(p),
            opts.max_pixels,
        )?),
        None => None,
    };
    let mut fingerprints = BTreeMap::from([(sd.id.clone(), sd_fingerprint(&hashes))]);
    for p in &probers {
        fingerprints.insert(p.encoder.id.clone(), p.encoder.fingerprint()?.to_string());
    }
    let mut files = BTreeMap::new();
    for (written, path) in recipe.input_files() {
        files.insert(written, crate::output::sha256_file(&path)?);
    }
    let made_with = MadeWith {
        fingerprints,
        files,
        device: crate::models::device_kind(&load.device).into(),
        dtype: generate::dtype_name(load.dtype).into(),
    };
    Ok(Models {
        sd,
        hashes,
        probers,
        guide_clips,
        decoders,
        init_image,
        made_with,
    })
}

/// The generation settings of one plan item.
fn item_options(
    recipe: &LoadedRecipe,
    m: &Models,
    item: &PlanItem,
    opts: &RunOptions,
) -> Result<GenerateOptions> {
    let g = &recipe.recipe.generation;
    let (iw, ih) = match &m.init_image {
        Some(t) => (Some(t.dim(3)?), Some(t.dim(2)?)),
        None => (None, None),
    };
    let guide = match item.guidance.as_ref().filter(|c| c.is_active()) {
        Some(c) => {
            let clip = c.clip.as_ref().and_then(|s| m.guide_clips.get(s));
            let decoder = m.decoders[&format!("{}:{}", c.decoder, c.taesd)].clone();
            Some(std::sync::Arc::new(Guide::with_clip(
                c.clone(),
                &m.sd,
                clip,
                decoder,
                opts.max_pixels,
            )?))
        }
        None => None,
    };
    Ok(GenerateOptions {
        prompt: item.prompt.clone(),
        negative_prompt: g.negative_prompt.clone(),
        steps: g.steps,
        guidance_scale: g.guidance_scale,
        scheduler: scheduler_kind(g, &m.sd)?,
        eta: g.eta,
        seed: item.seed,
        width: g.width.or(iw).unwrap_or_else(|| m.sd.default_size()),
        height: g.height.or(ih).unwrap_or_else(|| m.sd.default_size()),
        num_images: 1,
        init_image: m.init_image.clone(),
        strength: g.strength(),
        latents: None,
        guide,
    })
}

fn make_item(
    recipe: &LoadedRecipe,
    m: &Models,
    item: &PlanItem,
    opts: &RunOptions,
    progress: &Progress,
) -> Result<ManifestEntry> {
    let g = &recipe.recipe.generation;
    let gopts = item_options(recipe, m, item, opts)?;
    let mut entry = None;
    generate::generate(&m.sd, &gopts, progress, |gen| {
        let mut params = generate::generation_params(
            &m.sd,
            &gopts,
            &gen,
            generate::model_hash(&m.hashes),
            g.init_image.as_ref().map(|p| p.display().to_string()),
        );
        let init_image = g.init_image.as_ref().map(|p| recipe.resolve(p));
        generate::record_input_files(&mut params, &gopts, init_image.as_deref())?;
        params
            .extra
            .insert("run_item".into(), item.id.clone().into());
        let (rgb, w, h) = crate::output::tensor_to_rgb8(&gen.image)?;
        let mut probes = BTreeMap::new();
        for p in &m.probers {
            probes.insert(
                p.encoder.id.clone(),
                p.answer_rgb(&rgb, w as usize, h as usize)?,
            );
        }
        let sidecar = crate::output::Sidecar::new(params, m.hashes.clone(), gen.timings.clone());
        let rel = image_rel(&item.id);
        let png = opts.out.join(&rel);
        let dir = png.parent().unwrap_or(&opts.out).to_path_buf();
        refuse_symlinks(&opts.out, &dir)?;
        let set = crate::output::OutputSet::at(&dir, &item.arm, true)?;
        let saved = set.save_generation(&sidecar, &rgb, w, h, None)?;
        entry = Some(ManifestEntry {
            sha256: crate::output::sha256_file(&saved.png)?,
            probes,
        });
        Ok(())
    })?;
    entry.ok_or_else(|| Error::Msg(format!("{}: no image was generated", item.id)))
}

/// `results.json` from the manifest, for `items` in plan order (all must be finished).
pub fn assemble(
    recipe: &LoadedRecipe,
    suite: &Suite,
    manifest: &Manifest,
    items: &[&PlanItem],
) -> Result<RunResults> {
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        let e = manifest.items.get(&it.id).ok_or_else(|| {
            Error::Msg(format!(
                "item {} is not finished; run the recipe again to resume",
                it.id
            ))
        })?;
        out.push(RunItem {
            id: it.id.clone(),
            experiment: it.experiment.clone(),
            cell: it.cell.clone(),
            subject: it.subject.clone(),
            target: it.target.clone(),
            seed: it.seed,
            arm: it.arm.clone(),
            baseline: it.baseline,
            guide_clip: it
                .guidance
                .as_ref()
                .filter(|g| g.has_clip_terms() || g.has_style_terms())
                .and_then(|g| g.clip.clone()),
            prompt: it.prompt.clone(),
            image: image_rel(&it.id),
            sha256: e.sha256.clone(),
            probes: e.probes.clone(),
        });
    }
    Ok(RunResults {
        tool: "artguide".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        recipe: recipe.recipe.name.clone(),
        model: manifest.model.clone(),
        probe_clip: manifest.probe_clip.clone(),
        guide_clip: manifest.guide_clip.clone(),
        item_guides: true,
        made_with: manifest.made_with.clone(),
        suite: suite
            .probes
            .iter()
            .map(|p| SuiteProbe {
                name: p.name.clone(),
                labels: p.labels.iter().map(|l| l.name().to_string()).collect(),
            })
            .collect(),
        items: out,
    })
}

/// Joins shard folders into `out`: copies their images and sidecars, unions their manifests
/// and writes `results.json` for the whole plan, identical to an unsharded run's.
pub fn merge(
    recipe: &LoadedRecipe,
    plan: &Plan,
    suite: &Suite,
    shards: &[PathBuf],
    out: &Path,
    force: bool,
) -> Result<RunResults> {
    let mut manifest = Manifest {
        shard_split: SHARD_SPLIT.to_string(),
        ..Manifest::default()
    };
    // What the shards with items were made with, checked to agree; unknown (left empty)
    // when a shard with items predates the record.
    let mut made_with = MadeWith::default();
    let mut unknown = false;
    let mut sources: HashMap<String, PathBuf> = HashMap::new();
    let mut target: BTreeMap<String, String> = BTreeMap::new();
    let hub = crate::models::hub::HubOptions::from_env();
    let specs = recipe.model_specs();
    let mut seen: Vec<((u64, u64, PathBuf), &Path)> = Vec::new();
    for dir in shards {
        if !dir.is_dir() {
            return Err(Error::file(dir, "no such shard folder"));
        }
        // A shard given twice (or by two paths) would count its items twice.
        let id = crate::output::file_identity(dir);
        if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
            return Err(Error::file(
                dir,
                format!("is the shard {} again", first.display()),
            ));
        }
        seen.push((id, dir.as_path()));
        let copy = dir.join(RECIPE_FILE);
        let text = std::fs::read_to_string(&copy).map_err(|e| Error::io(&copy, e))?;
        if !recipe.is_copy(&text) {
            return Err(Error::file(
                &copy,
                "is a different recipe from the one being merged",
            ));
        }
        let mut m = Manifest::load(dir)?;
        // Each model in this process's spelling of the recipe (the plan's guide ids are in
        // it too), else in the first shard's: shards started from the recipe at other paths
        // name the same folders differently.
        if target.is_empty() {
            let first: Vec<&str> = m.ids().map(String::as_str).collect();
            target = spellings(&specs, &first);
            target.extend(recipe.resolved_specs());
        }
        m.adopt(&specs, &target, &hub, false).map_err(|(spec, made, now)| {
            Error::file(
                dir.join(MANIFEST_FILE),
                format!("was made with `{spec}` at {made}, but the recipe here finds it at {now}, another model"),
            )
        })?;
        if manifest.probe_clip.is_empty() {
            manifest.model = m.model.clone();
            manifest.probe_clip = m.probe_clip.clone();
            manifest.guide_clip = m.guide_clip.clone();
            manifest.scheduler = m.scheduler.clone();
        } else {
            if (m.model.as_str(), m.probe_clip.as_str())
                != (manifest.model.as_str(), manifest.probe_clip.as_str())
                && !m.items.is_empty()
            {
                return Err(Error::file(
                    dir.join(MANIFEST_FILE),
                    format!(
                        "was made with models {} and {}, the other shards with {} and {}",
                        m.model, m.probe_clip, manifest.model, manifest.probe_clip
                    ),
                ));
            }
            if m.scheduler != manifest.scheduler
                && !m.scheduler.is_empty()
                && !manifest.scheduler.is_empty()
                && !m.items.is_empty()
            {
                return Err(Error::file(
                    dir.join(MANIFEST_FILE),
                    format!(
                        "was made with scheduler {}, the other shards with {}",
                        m.scheduler, manifest.scheduler
                    ),
                ));
            }
        }
        if !m.items.is_empty() {
            unknown |= m.made_with.is_empty();
            if let Some((what, here, there)) = made_with.conflict(&m.made_with) {
                return Err(Error::file(
                    dir.join(MANIFEST_FILE),
                    format!("was made with {what} {there}, the other shards with {here}"),
                ));
            }
            let fps = std::mem::take(&mut m.made_with.fingerprints);
            made_with.fingerprints.extend(fps);
            made_with.files.append(&mut m.made_with.files);
            for (mine, theirs) in [
                (&mut made_with.device, &m.made_with.device),
                (&mut made_with.dtype, &m.made_with.dtype),
            ] {
                if mine.is_empty() {
                    mine.clone_from(theirs);
                }
            }
        }
        for (id, e) in m.items {
            if image_matches(dir, &id, &e) {
                sources.insert(id.clone(), dir.clone());
                manifest.items.insert(id, e);
            }
        }
    }
    let missing: Vec<&str> = plan
        .items
        .iter()
        .filter(|i| !manifest.items.contains_key(&i.id))
        .map(|i| i.id.as_str())
        .collect();
    if let Some(first) = missing.first() {
        return Err(Error::Msg(format!(
            "{} of {} items are in no shard (first: {first}); finish every shard before \
             merging (with the artguide that started it: older builds split shards by item, \
             not by grid cell)",
            missing.len(),
            plan.items.len()
        )));
    }
    if !unknown {
        manifest.made_with = made_with;
    }
    prepare(recipe, out, force)?;
    for it in &plan.items {
        let src = &sources[&it.id];
        if src == out {
            continue;
        }
        for ext in ["png", "json"] {
            let rel = format!("images/{}.{ext}", it.id);
            let from = src.join(&rel);
            let to = out.join(&rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            crate::output::write_atomic(&to, &bytes, true)?;
        }
    }
    manifest.save(out)?;
    let items: Vec<&PlanItem> = plan.items.iter().collect();
    let results = assemble(recipe, suite, &manifest, &items)?;
    write_results(out, &results)?;
    Ok(results)
}

/// A dry run's time estimate, from one measured step of each kind on this device.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// Seconds of one sampling step (UNet, with CFG when the recipe uses it).
    pub step_s: f64,
    /// Seconds of one guidance gradient (first guided arm's settings), if any arm is guided.
    pub guidance_s: Option<f64>,
    pub steps: usize,
    pub guided_steps: usize,
    /// Estimated seconds for the items given.
    pub total_s: f64,
}

/// Loads the model (and the first guided arm's guide) and times one step of each kind at the
/// recipe's size to estimate how long `items` take.
pub fn estimate(
    recipe: &LoadedRecipe,
    items: &[&PlanItem],
    load: &LoadOptions,
    max_pixels: u64,
) -> Result<Estimate> {
    use crate::noise::{NoiseGen, Stream};
    let r = &recipe.recipe;
    let g = &r.generation;
    let sd = SdModel::load(&recipe.resolve_model("model", &r.model)?, load)?;
    let (w, h) = (
        g.width.unwrap_or_else(|| sd.default_size()),
        g.height.unwrap_or_else(|| sd.default_size()),
    );
    let (c, lh, lw) = sd
        .latent_shape(w, h)
        .map_err(|e| recipe.generation_error(e))?;
    // The run's own memory check first: a size that cannot fit would exhaust the memory in
    // the timing steps below (a dry run is how one finds out whether a recipe fits).
    let unguided = generate::GenerateOptions {
        prompt: String::new(),
        negative_prompt: String::new(),
        steps: g.steps,
        guidance_scale: g.guidance_scale,
        scheduler: crate::schedulers::SchedulerKind::Ddim,
        eta: g.eta,
        seed: 0,
        width: w,
        height: h,
        num_images: 1,
        init_image: None,
        strength: g.strength(),
        latents: None,
        guide: None,
    };
    crate::resources::check(&sd, &unguided).map_err(|e| recipe.generation_error(e))?;
    let batch = if g.guidance_scale > 1.0 { 2 } else { 1 };
    let x = NoiseGen::new(0, Stream::InitialLatents)
        .randn(&[batch, c, lh, lw])?
        .to_dtype(sd.dtype)?
        .to_device(&sd.device)?;
    let one = sd.encode_prompt("")?;
    let ctx = crate::models::stable_diffusion::Conditioning::cat(&vec![&one; batch])?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        let t = std::time::Instant::now();
        f()?;
        sd.device.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let step_s = time(&mut || {
        sd.predict(&x, 500.0, &ctx)?;
        Ok(())
    })?;
    let steps_per_item = g.denoising_steps()?;
    let mut guided_steps = 0;
    let mut first_guided = None;
    for it in items {
        if let Some(gc) = it.guidance.as_ref().filter(|gc| gc.is_active()) {
            guided_steps += gc
                .guided_steps(steps_per_item)
                .iter()
                .filter(|&&b| b)
                .count();
            first_guided.get_or_insert(gc.clone());
        }
    }
    let guidance_s = match first_guided {
        Some(gc) => {
            let guide = Guide::load(gc, &sd, &load.hub, max_pixels)?;
            let x0 = NoiseGen::new(1, Stream::InitialLatents)
                .randn(&[1, c, lh, lw])?
                .to_device(&sd.device)?;
            let mut rng = crate::noise::NoiseGen::new(0, Stream::Guidance);
            let content = None;
            Some(time(&mut || {
                guide.gradient(&sd, &x0, &mut rng, content, 0)?;
                Ok(())
            })?)
        }
        None => None,
    };
    let steps = items.len() * steps_per_item;
    let total_s = steps as f64 * step_s + guided_steps as f64 * guidance_s.unwrap_or(0.0);
    Ok(Estimate {
        step_s,
        guidance_s,
        steps,
        guided_steps,
        total_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(probe: &str) -> Vec<ProbeAnswer> {
        vec![ProbeAnswer {
            probe: probe.into(),
            labels: vec!["a".into(), "b".into()],
            probs: vec![0.25, 0.75],
            top: "b".into(),
            entropy: 0.56,
        }]
    }

    /// A manifest made with `model`, `probe` and `guide`, one item answered by both CLIPs.
    fn manifest(model: &str, probe: &str, guide: &str) -> Manifest {
        let probes = BTreeMap::from([(probe.into(), answer("p")), (guide.into(), answer("g"))]);
        Manifest {
            model: model.into(),
            probe_clip: probe.into(),
            guide_clip: Some(guide.into()),
            scheduler: "ddim".into(),
            made_with: MadeWith::default(),
            shard_split: SHARD_SPLIT.into(),
            items: BTreeMap::from([(
                "e/c/a".into(),
                ManifestEntry {
                    sha256: "00".into(),
                    probes,
                },
            )]),
        }
    }

    #[test]
    fn adopting_respells_by_recipe_spec_and_refuses_other_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().display().to_string();
        for d in [
            "a/recipes",
            "a/models/sd",
            "a/models/clip",
            "a/models/guide",
            "b/recipes",
            "b/models/sd",
        ] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let hub = crate::models::hub::HubOptions {
            cache_dir: tmp.path().join("hf"),
            offline: true,
            revision: "main".into(),
        };
        let specs: Vec<String> = [
            "../models/sd",
            "../models/clip",
            "../models/guide",
            "org/other",
        ]
        .map(String::from)
        .to_vec();
        let made = |d: &str, m: &str| format!("{root}/{d}/recipes/../models/{m}");
        // Resumed as <tmp>/a/recipes/./../recipes/r.yaml.
        // A manifest made from <tmp>/a/recipes/r.yaml, its item also answered by a hub CLIP.
        let made_in_a = || {
            let mut m = manifest(&made("a", "sd"), &made("a", "clip"), &made("a", "guide"));
            m.items
                .get_mut("e/c/a")
                .unwrap()
                .probes
                .insert("org/other".into(), answer("o"));
            m
        };
        let mut m = made_in_a();
        let again = |name: &str| format!("{root}/a/recipes/./../recipes/../models/{name}");
        let now: Vec<String> = ["sd", "clip", "guide"].map(again).to_vec();
        let mut ids: Vec<&str> = now.iter().map(String::as_str).collect();
        ids.push("org/other");
        m.adopt(&specs, &spellings(&specs, &ids), &hub, true)
            .unwrap();
        assert_eq!(
            (m.model.as_str(), m.probe_clip.as_str()),
            (now[0].as_str(), now[1].as_str())
        );
        assert_eq!(m.guide_clip.as_deref(), Some(now[2].as_str()));
        let probes = &m.items["e/c/a"].probes;
        assert_eq!(probes.len(), 3, "{:?}", probes.keys());
        assert_eq!(probes[&now[1]][0].probe, "p");
        assert_eq!(probes[&now[2]][0].probe, "g");
        assert_eq!(probes["org/other"][0].probe, "o");
        // A run moved away from folders that are gone here takes the new spelling of each
        // spec (guide CLIPs included, whatever their order).
        let gone = |name: &str| format!("/gone/recipes/../models/{name}");
        let mut m = manifest(&gone("sd"), &gone("clip"), &gone("guide"));
        m.adopt(&specs, &spellings(&specs, &ids), &hub, true)
            .unwrap();
        let keys: Vec<&String> = m.items["e/c/a"].probes.keys().collect();
        assert_eq!(keys, [&now[1], &now[2]]);
        // Made with <tmp>/b's copy, which exists: another model, refused, nothing changed.
        let mut m = manifest(&made("b", "sd"), &made("a", "clip"), &made("a", "guide"));
        let before = m.clone();
        let err = m
            .adopt(&specs, &spellings(&specs, &ids), &hub, true)
            .unwrap_err();
        assert_eq!(
            err,
            ("../models/sd".into(), made("b", "sd"), now[0].clone())
        );
        assert_eq!(m, before, "a refused adoption changed the manifest");
        // With fingerprints recorded, paths only rename (the weights are compared once
        // loaded), and the fingerprints follow their ids.
        let mut m = before.clone();
        m.made_with.fingerprints = BTreeMap::from([(made("b", "sd"), "f".to_string())]);
        m.adopt(&specs, &spellings(&specs, &ids), &hub, true)
            .unwrap();
        assert_eq!(m.model, now[0]);
        assert_eq!(
            m.made_with.fingerprints,
            BTreeMap::from([(now[0].clone(), "f".to_string())])
        );
        // Unless nothing will be loaded to compare them (merge, a finished resume).
        let mut m = before.clone();
        m.made_with.fingerprints = BTreeMap::from([(made("b", "sd"), "f".to_string())]);
        let err = m.adopt(&specs, &spellings(&specs, &ids), &hub, false);
        assert_eq!(err.unwrap_err().1, made("b", "sd"));
        // Two spellings of one spec recorded with different weights: not one model.
        let mut m = manifest(&gone("sd"), &gone("clip"), &gone("guide"));
        m.made_with.fingerprints = BTreeMap::from([
            (gone("sd"), "f".to_string()),
            ("/other/recipes/../models/sd".to_string(), "g".to_string()),
        ]);
        let before = m.clone();
        let err = m.adopt(&specs, &spellings(&specs, &ids), &hub, true);
        assert_eq!(err.unwrap_err().0, "../models/sd");
        assert_eq!(m, before);
        // A hub model recorded (in the cache) where the recipe now finds a folder, and the
        // reverse: another model.
        std::fs::create_dir_all(tmp.path().join("hf/models--org--other")).unwrap();
        let mut to_folder = spellings(&specs, &ids);
        to_folder.insert("org/other".into(), now[0].clone());
        let mut m = made_in_a();
        assert_eq!(
            m.adopt(&specs, &to_folder, &hub, true).unwrap_err().0,
            "org/other"
        );
        let mut m = manifest(&format!("{root}/a/models/sd"), "p", "g");
        let to_hub = BTreeMap::from([("sd".to_string(), "org/sd".to_string())]);
        let err = m
            .adopt(&["sd".to_string()], &to_hub, &hub, true)
            .unwrap_err();
        assert_eq!(
            err,
            ("sd".into(), format!("{root}/a/models/sd"), "org/sd".into())
        );
        // The longest spec an id ends with wins; ids of no spec are left alone.
        let specs2: Vec<String> = ["sd", "../models/sd"].map(String::from).to_vec();
        assert_eq!(spec_of("x/../models/sd", &specs2).unwrap(), "../models/sd");
        assert_eq!(spec_of("./sd", &specs2).unwrap(), "sd");
        assert!(spec_of("x/other", &specs2).is_none());
    }
}
