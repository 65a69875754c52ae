//! Paired comparisons of guided arms against their unguided baseline, from runs'
//! `results.json`: per experiment, arm, probe model and probe, the shift of the target label's
//! probability (bootstrap interval, sign and Wilcoxon tests, Holm-adjusted over the report,
//! rank-biserial effect size), the rate at which the top label flips to the target, the KL
//! divergence of the label distributions, and side effects on the probes the target does not
//! name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::models::hub::{canonical_id, same_id};
use crate::probe::agree::bootstrap_mean;
use crate::probe::runner::ProbeAnswer;
use crate::run::results::{RunItem, RunResults, SuiteProbe};
use crate::{Error, Result};

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub resamples: usize,
    pub seed: u64,
    /// Confidence level of the bootstrap interval.
    pub level: f64,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            resamples: 2000,
            seed: 0,
            level: 0.95,
        }
    }
}

/// One (experiment, arm, probe model, probe) comparison.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompareRow {
    pub experiment: String,
    pub arm: String,
    /// Probe model id.
    pub model: String,
    /// `probe` (the held-out judge), `guide` (the CLIP that guided) or `other`.
    pub role: String,
    pub probe: String,
    /// Whether the target names this probe (else the row measures a side effect).
    pub targeted: bool,
    /// Pairs compared.
    pub n: usize,
    /// Target rows: mean of P_arm(target) - P_baseline(target), its bootstrap interval, the
    /// two-sided sign-test and Wilcoxon signed-rank p-values, the Wilcoxon p adjusted by
    /// Holm's method over every tested row of the comparison, the matched-pairs
    /// rank-biserial correlation, and the flip rate.
    pub mean_shift: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub sign_p: Option<f64>,
    pub wilcoxon_p: Option<f64>,
    pub wilcoxon_p_holm: Option<f64>,
    pub rank_biserial: Option<f64>,
    pub flip_rate: Option<f64>,
    /// Mean KL(P_arm || P_baseline), nats.
    pub mean_kl: f64,
    /// Fraction of pairs whose top label differs.
    pub top_change_rate: f64,
}

/// One targeted row restricted to the pairs aimed at one label: which targets moved, and
/// what the probe saw instead.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetRow {
    /// The target label of these pairs.
    pub label: String,
    /// The statistics over these pairs (`wilcoxon_p_holm` adjusted over all target rows).
    #[serde(flatten)]
    pub row: CompareRow,
    /// How often each label was the probe's top label: guided images, then their baselines.
    pub arm_top: BTreeMap<String, usize>,
    pub baseline_top: BTreeMap<String, usize>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub tool: String,
    pub version: String,
    pub runs: Vec<PathBuf>,
    pub recipes: Vec<String>,
    pub probe_clip: String,
    pub guide_clip: Option<String>,
    pub items: usize,
    /// Guided items with no baseline partner in their cell.
    pub unpaired: usize,
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
    pub rows: Vec<CompareRow>,
    /// The targeted rows broken down by target label.
    pub targets: Vec<TargetRow>,
}

/// Runs loaded for comparison: items of all runs, with the folder each came from.
pub struct Loaded {
    pub runs: Vec<(PathBuf, RunResults)>,
}

impl Loaded {
    /// Reads `results.json` of each folder; suites must agree and item ids be unique.
    pub fn load(dirs: &[PathBuf]) -> Result<Self> {
        let mut runs: Vec<(PathBuf, RunResults)> = Vec::new();
        let mut ids = HashMap::new();
        for d in dirs {
            let r = RunResults::load(d)?;
            if let Some((_, first)) = runs.first() {
                if first.suite != r.suite {
                    return Err(Error::file(
                        d.join(crate::run::results::RESULTS_FILE),
                        "was probed with a different suite from the first run",
                    ));
                }
            }
            for it in &r.items {
                if let Some(other) = ids.insert(it.id.clone(), d.clone()) {
                    return Err(Error::file(
                        d.join(crate::run::results::RESULTS_FILE),
                        format!("item {} is also in {}", it.id, other.display()),
                    ));
                }
            }
            runs.push((d.clone(), r));
        }
        if runs.len() > 1 {
            // Runs started from recipes in different folders name the same local model by
            // different relative paths: one name per folder, so their answers and pairs meet.
            for (_, r) in &mut runs {
                canonical_ids(r);
            }
        }
        Ok(Loaded { runs })
    }

    fn suite(&self) -> &[SuiteProbe] {
        self.runs
            .first()
            .map(|r| r.1.suite.as_slice())
            .unwrap_or(&[])
    }
}

/// Every model id of `r` (SD model, CLIPs, the keys of each item's answers) made canonical.
fn canonical_ids(r: &mut RunResults) {
    r.model = canonical_id(&r.model);
    r.probe_clip = canonical_id(&r.probe_clip);
    r.guide_clip = r.guide_clip.as_deref().map(canonical_id);
    r.made_with.fingerprints = std::mem::take(&mut r.made_with.fingerprints)
        .into_iter()
        .map(|(k, v)| (canonical_id(&k), v))
        .collect();
    for it in &mut r.items {
        it.guide_clip = it.guide_clip.as_deref().map(canonical_id);
        it.probes = std::mem::take(&mut it.probes)
            .into_iter()
            .map(|(k, v)| (canonical_id(&k), v))
            .collect();
    }
}

/// KL(p || q) in nats, with q floored at 1e-12.
pub fn kl(p: &[f32], q: &[f32]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| a as f64 * (a as f64 / (b as f64).max(1e-12)).ln())
        .sum::<f64>()
        // Never below 0: probabilities that sum to 1 only within rounding gave -1e-9.
        .max(0.0)
}

/// Two-sided exact sign test of the differences (zeros dropped): P(|K - n/2| >= |k - n/2|).
pub fn sign_test(d: &[f64]) -> f64 {
    let pos = d.iter().filter(|&&x| x > 0.0).count();
    let n = d.iter().filter(|&&x| x != 0.0).count();
    if n == 0 {
        return 1.0;
    }
    let k = pos.min(n - pos);
    // 2 * P(K <= k) for K ~ Binomial(n, 1/2), capped at 1 (scipy.stats.binomtest).
    let mut p = 0.0;
    let mut c = 1.0f64; // C(n, 0)
    for i in 0..=k {
        if i > 0 {
            c = c * (n - i + 1) as f64 / i as f64;
        }
        p += c;
    }
    (2.0 * p / 2f64.powi(n as i32)).min(1.0)
}

/// Two-sided Wilcoxon signed-rank p-value, zeros dropped: exact for n <= 50 (over the actual,
/// possibly tied, ranks), else the normal approximation with the tie correction and no
/// continuity correction. Equal to scipy.stats.wilcoxon 1.17 without ties or zeros; with them
/// SciPy's "auto" permutes only up to 13 pairs and approximates above, where this stays exact.
pub fn wilcoxon(d: &[f64]) -> f64 {
    let d: Vec<f64> = d.iter().copied().filter(|&x| x != 0.0).collect();
    let n = d.len();
    if n == 0 {
        return 1.0;
    }
    let abs: Vec<f64> = d.iter().map(|x| x.abs()).collect();
    let ranks = crate::probe::average_ranks(&abs);
    let r_plus: f64 = d
        .iter()
        .zip(&ranks)
        .filter(|(x, _)| **x > 0.0)
        .map(|(_, r)| r)
        .sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let r_minus = total - r_plus;
    if n <= 50 {
        // Exact null distribution of R+ under random signs: count subsets of the ranks by
        // their sum. Average ranks are multiples of 1/2, so doubled ranks are integers.
        let w: Vec<usize> = ranks.iter().map(|r| (2.0 * r).round() as usize).collect();
        let max: usize = w.iter().sum();
        let mut counts = vec![0f64; max + 1];
        counts[0] = 1.0;
        for &k in &w {
            for s in (k..=max).rev() {
                counts[s] += counts[s - k];
            }
        }
        let all = 2f64.powi(n as i32);
        let t = (2.0 * r_plus.min(r_minus)).round() as usize;
        let below: f64 = counts[..=t].iter().sum();
        return (2.0 * below / all).min(1.0);
    }
    let t = r_plus.min(r_minus);
    let mean = total / 2.0;
    let mut var = (n * (n + 1) * (2 * n + 1)) as f64 / 24.0;
    // Tie correction: sum over groups of tied |d| of (t^3 - t) / 48.
    let mut sorted = abs.clone();
    sorted.sort_by(f64::total_cmp);
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[i] {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        var -= (t * t * t - t) / 48.0;
        i = j + 1;
    }
    if var <= 0.0 {
        return 1.0;
    }
    let z = (t - mean) / var.sqrt();
    (2.0 * normal_cdf(z)).min(1.0)
}

/// Matched-pairs rank-biserial correlation of the differences, zeros dropped as in
/// [`wilcoxon`]: (R+ - R-) / (R+ + R-), from -1 (every pair fell) to 1 (every pair rose); 0
/// when no difference is non-zero. The effect size that goes with the signed-rank test
/// (Kerby 2014), comparable across rows with different n where p-values are not.
pub fn rank_biserial(d: &[f64]) -> f64 {
    let d: Vec<f64> = d.iter().copied().filter(|&x| x != 0.0).collect();
    if d.is_empty() {
        return 0.0;
    }
    let abs: Vec<f64> = d.iter().map(|x| x.abs()).collect();
    let ranks = crate::probe::average_ranks(&abs);
    let signed: f64 = d.iter().zip(&ranks).map(|(x, r)| x.signum() * r).sum();
    signed / ranks.iter().sum::<f64>()
}

/// Holm's step-down adjustment of a family of p-values, in their order: the i-th smallest
/// becomes the running maximum of (m - i) * p over the sorted list, capped at 1. Controls
/// the family-wise error rate as Bonferroni does, and rejects at least as much.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![0.0; m];
    let mut running = 0.0f64;
    for (i, &k) in order.iter().enumerate() {
        running = running.max(((m - i) as f64 * p[k]).min(1.0));
        out[k] = running;
    }
    out
}

/// Standard normal CDF (erfc via a rational approximation accurate to ~1e-7).
fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    // Numerical Recipes' erfc (Chebyshev), relative error < 1.2e-7.
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// A guided item and its baseline.
type Pair<'a> = (&'a RunItem, &'a RunItem);

/// The items of one grid cell, each with the run folder it came from.
pub type Cell<'a> = (String, Vec<(&'a Path, &'a RunItem)>);

fn answer<'a>(it: &'a RunItem, model: &str, probe: &str) -> Option<&'a ProbeAnswer> {
    it.probes.get(model)?.iter().find(|a| a.probe == probe)
}

/// Refuses to pair a guided item with a baseline of another plan: same experiment and cell
/// names, but a different subject, target, seed or prompt, or other probe labels. (Runs of
/// other models or settings are refused as a whole by [`compare`].)
fn check_pair((d, it): (&Path, &RunItem), (bd, base): (&Path, &RunItem)) -> Result<()> {
    let target = |i: &RunItem| i.target.as_ref().map(|t| format!("{:?}", t.labels));
    let differs = [
        ("subject", it.subject.clone(), base.subject.clone()),
        ("seed", it.seed.to_string(), base.seed.to_string()),
        ("prompt", it.prompt.clone(), base.prompt.clone()),
        (
            "target",
            target(it).unwrap_or_default(),
            target(base).unwrap_or_default(),
        ),
    ]
    .into_iter()
    .find(|(_, a, b)| a != b)
    .map(|(field, a, b)| (field.to_string(), a, b, "of the same recipe"))
    // A suite edited between the two (a resumed or another run) gives other label lists,
    // and probabilities would be compared label by label across them.
    .or_else(|| {
        it.probes.iter().find_map(|(model, answers)| {
            answers.iter().find_map(|a| {
                let b = answer(base, model, &a.probe)?;
                (a.labels != b.labels).then(|| {
                    (
                        format!("the labels of probe {} by {model}", a.probe),
                        a.labels.join(", "),
                        b.labels.join(", "),
                        "probed with the same suite",
                    )
                })
            })
        })
    });
    match differs {
        None => Ok(()),
        Some((field, a, b, advice)) => Err(Error::file(
            d.join(crate::run::results::RESULTS_FILE),
            format!(
                "item {} and its baseline {} (in {}) differ in {field} (`{a}` vs `{b}`): \
                 compare runs {advice}",
                it.id,
                base.id,
                bd.display()
            ),
        )),
    }
}

/// The `generation` settings of the recipe copy in a run folder; None when the copy is
/// missing or unreadable (then only the items are checked).
fn generation(dir: &Path) -> Option<crate::recipe::Generation> {
    let text = std::fs::read_to_string(dir.join(crate::run::RECIPE_FILE)).ok()?;
    let recipe: crate::recipe::Recipe = serde_yaml::from_str(&text).ok()?;
    Some(recipe.generation)
}

/// The first generation setting in which `a` and `b` surely differ, as (field, a, b). What
/// the copies leave to the model (size, `auto` scheduler) or write relative to their own
/// recipe (the init image's path) is not compared; a default is compared as its value.
fn generation_difference(
    a: &crate::recipe::Generation,
    b: &crate::recipe::Generation,
) -> Option<(&'static str, String, String)> {
    let opt = |v: Option<usize>| v.map(|x| x.to_string());
    let img2img = |g: &crate::recipe::Generation| g.init_image.is_some();
    let mut fields = vec![
        (
            "steps",
            Some(a.steps.to_string()),
            Some(b.steps.to_string()),
        ),
        (
            "guidance_scale",
            Some(a.guidance_scale.to_string()),
            Some(b.guidance_scale.to_string()),
        ),
        ("eta", Some(a.eta.to_string()), Some(b.eta.to_string())),
        (
            "negative_prompt",
            Some(a.negative_prompt.clone()),
            Some(b.negative_prompt.clone()),
        ),
        (
            "init_image",
            Some(if img2img(a) { "set" } else { "unset" }.to_string()),
            Some(if img2img(b) { "set" } else { "unset" }.to_string()),
        ),
        ("width", opt(a.width), opt(b.width)),
        ("height", opt(a.height), opt(b.height)),
        (
            "scheduler",
            Some(a.scheduler.clone()).filter(|s| s != "auto"),
            Some(b.scheduler.clone()).filter(|s| s != "auto"),
        ),
    ];
    if img2img(a) && img2img(b) {
        fields.push((
            "strength",
            Some(a.strength().to_string()),
            Some(b.strength().to_string()),
        ));
    }
    fields.into_iter().find_map(|(k, x, y)| match (x, y) {
        (Some(x), Some(y)) if x != y => Some((k, x, y)),
        _ => None,
    })
}

/// The statistics of one row over `pairs` (None when no pair has answers for this probe);
/// the caller fills in experiment, arm, model and role.
fn compare_pairs(
    pairs: &[&Pair],
    model: &str,
    probe: &str,
    targeted: bool,
    opts: &CompareOptions,
) -> Option<CompareRow> {
    let mut shifts = Vec::new();
    let mut flips = 0usize;
    let mut kls = Vec::new();
    let mut changes = 0usize;
    for (a, b) in pairs {
        let (Some(pa), Some(pb)) = (answer(a, model, probe), answer(b, model, probe)) else {
            continue;
        };
        kls.push(kl(&pa.probs, &pb.probs));
        changes += usize::from(pa.top != pb.top);
        if let Some(label) = a.target.as_ref().and_then(|t| t.labels.get(probe)) {
            if let Some(k) = pa.labels.iter().position(|l| l == label) {
                shifts.push(pa.probs[k] as f64 - pb.probs[k] as f64);
                flips += usize::from(&pa.top == label && &pb.top != label);
            }
        }
    }
    if kls.is_empty() {
        return None;
    }
    let n = kls.len();
    let shifted = targeted && !shifts.is_empty();
    let ci = shifted.then(|| bootstrap_mean(&shifts, opts.resamples, opts.seed, opts.level));
    let of_shifts = |f: &dyn Fn(&[f64]) -> f64| shifted.then(|| f(&shifts));
    Some(CompareRow {
        experiment: String::new(),
        arm: String::new(),
        model: String::new(),
        role: String::new(),
        probe: probe.to_string(),
        targeted,
        n,
        mean_shift: of_shifts(&|d| d.iter().sum::<f64>() / d.len() as f64),
        ci_low: ci.map(|c| c.0),
        ci_high: ci.map(|c| c.1),
        sign_p: of_shifts(&sign_test),
        wilcoxon_p: of_shifts(&wilcoxon),
        // Filled in once every row is known: the family is the whole comparison.
        wilcoxon_p_holm: None,
        rank_biserial: of_shifts(&rank_biserial),
        flip_rate: of_shifts(&|d| flips as f64 / d.len() as f64),
        mean_kl: kls.iter().sum::<f64>() / n as f64,
        top_change_rate: changes as f64 / n as f64,
    })
}

/// Counts of the probe's top label over `pairs`: in the guided images, then in their baselines.
fn top_labels(
    pairs: &[&Pair],
    model: &str,
    probe: &str,
) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let (mut arm, mut base) = (BTreeMap::new(), BTreeMap::new());
    for (a, b) in pairs {
        if let (Some(pa), Some(pb)) = (answer(a, model, probe), answer(b, model, probe)) {
            *arm.entry(pa.top.clone()).or_insert(0) += 1;
            *base.entry(pb.top.clone()).or_insert(0) += 1;
        }
    }
    (arm, base)
}

/// Sets `wilcoxon_p_holm` of every row with a Wilcoxon p, adjusted over all of them.
fn adjust_holm<'a>(rows: impl Iterator<Item = &'a mut CompareRow>) {
    let mut tested: Vec<&mut CompareRow> = rows.filter(|r| r.wilcoxon_p.is_some()).collect();
    let adjusted = holm(
        &tested
            .iter()
            .filter_map(|r| r.wilcoxon_p)
            .collect::<Vec<_>>(),
    );
    for (r, p) in tested.iter_mut().zip(adjusted) {
        r.wilcoxon_p_holm = Some(p);
    }
}

/// Compares every guided arm with its baseline.
pub fn compare(loaded: &Loaded, opts: &CompareOptions) -> Result<Summary> {
    if opts.resamples == 0 {
        return Err(Error::value("resamples", "0 (at least 1 is needed)"));
    }
    let items: Vec<&RunItem> = loaded.runs.iter().flat_map(|r| &r.1.items).collect();
    let first = loaded
        .runs
        .first()
        .map(|r| &r.1)
        .ok_or_else(|| Error::value("runs", "no run folder given"))?;
    // Every item with the run it came from: pairs may span runs (a baseline run and a guided
    // one), so a pair is checked to be the same cell of the same plan, not only the same name.
    let located: Vec<(&Path, &RunItem)> = loaded
        .runs
        .iter()
        .flat_map(|(d, r)| r.items.iter().map(move |it| (d.as_path(), it)))
        .collect();
    let generations: HashMap<&Path, Option<crate::recipe::Generation>> = loaded
        .runs
        .iter()
        .map(|(d, _)| (d.as_path(), generation(d)))
        .collect();
    // Rows pool the pairs of every run given, so runs of another SD model, other weights or
    // other generation settings would be averaged in as if they were one plan (checking
    // pairs alone misses it when each run holds its own baselines).
    let (fd, fr) = (loaded.runs[0].0.as_path(), &loaded.runs[0].1);
    for (d, r) in &loaded.runs[1..] {
        let differs = (r.model != fr.model)
            .then(|| ("the model".to_string(), r.model.clone(), fr.model.clone()))
            .or_else(|| r.made_with.conflict(&fr.made_with))
            .or_else(|| match (&generations[d.as_path()], &generations[fd]) {
                (Some(a), Some(b)) => {
                    generation_difference(a, b).map(|(k, x, y)| (format!("generation.{k}"), x, y))
                }
                _ => None,
            });
        if let Some((what, here, there)) = differs {
            return Err(Error::file(
                d.join(crate::run::results::RESULTS_FILE),
                format!(
                    "was made with {what} `{here}`, but {} with `{there}`: compare pools the \
                     pairs of every run given, so give runs of one recipe, models and settings",
                    fd.display()
                ),
            ));
        }
    }
    let mut baselines: HashMap<(&str, &str), (&Path, &RunItem)> = HashMap::new();
    for &(d, it) in located.iter().filter(|l| l.1.baseline) {
        if let Some((od, other)) =
            baselines.insert((it.experiment.as_str(), it.cell.as_str()), (d, it))
        {
            return Err(Error::file(
                d.join(crate::run::results::RESULTS_FILE),
                format!(
                    "item {} is a second baseline of cell {}/{} (the first is {} in {})",
                    it.id,
                    it.experiment,
                    it.cell,
                    other.id,
                    od.display()
                ),
            ));
        }
    }
    // (experiment, arm) in first-seen order -> pairs.
    let mut groups: Vec<((String, String), Vec<Pair>)> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut unpaired = 0;
    for &(d, it) in located.iter().filter(|l| !l.1.baseline) {
        let Some(&(bd, base)) = baselines.get(&(it.experiment.as_str(), it.cell.as_str())) else {
            unpaired += 1;
            continue;
        };
        check_pair((d, it), (bd, base))?;
        let key = (it.experiment.clone(), it.arm.clone());
        let k = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[k].1.push((it, base));
    }
    // In item order, whatever order the runs were given in or split into (shards or the
    // merged run): the bootstrap resamples by position, so its interval depends on it.
    for (_, pairs) in &mut groups {
        pairs.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    }
    if groups.is_empty() {
        return Err(Error::Msg(if unpaired > 0 {
            format!(
                "none of the {unpaired} guided images has a baseline in its cell among these \
                 runs; give the run folders that hold the baselines too (a shard may hold \
                 only some arms)"
            )
        } else {
            "these runs hold no guided images, only baselines: nothing to compare".into()
        }));
    }
    let mut models: Vec<String> = items
        .iter()
        .flat_map(|i| i.probes.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // The held-out judge first.
    models.sort_by_key(|m| (m != &first.probe_clip, m.clone()));
    let item_guides = loaded.runs.iter().all(|(_, r)| r.item_guides);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for ((experiment, arm), pairs) in &groups {
        // The CLIP that guided this arm: none for an arm without CLIP terms (TV only), the
        // run's for results that do not record it per image.
        let guide = pairs
            .iter()
            .find_map(|(a, _)| a.guide_clip.as_deref())
            .or(first.guide_clip.as_deref().filter(|_| !item_guides));
        // A model is this arm's judge only if it did not guide it: an arm guided by the probe
        // CLIP has no held-out judge, and is labelled `guide` there.
        // Ids are compared as folders too: the recipe path a run was resumed or merged from
        // spells the same local model differently from the one its answers were made with.
        let role = |m: &str| {
            if guide.is_some_and(|g| same_id(g, m)) {
                "guide"
            } else if same_id(m, &first.probe_clip) {
                "probe"
            } else {
                "other"
            }
        };
        for model in &models {
            for probe in loaded.suite() {
                // Pairs whose target names this probe measure the intended shift; the others
                // (an experiment may target several probes) measure a side effect, reported
                // in their own row so `n` and every figure of a row cover the same pairs.
                let (aimed, side): (Vec<&Pair>, Vec<&Pair>) = pairs.iter().partition(|(a, _)| {
                    a.target
                        .as_ref()
                        .is_some_and(|t| t.labels.contains_key(&probe.name))
                });
                let named = |row: CompareRow| CompareRow {
                    experiment: experiment.clone(),
                    arm: arm.clone(),
                    model: model.clone(),
                    role: role(model).into(),
                    ..row
                };
                for (targeted, group) in [(true, &aimed), (false, &side)] {
                    if let Some(row) = compare_pairs(group, model, &probe.name, targeted, opts) {
                        rows.push(named(row));
                    }
                }
                let mut by_label: BTreeMap<&str, Vec<&Pair>> = BTreeMap::new();
                for &pair in &aimed {
                    if let Some(label) = pair
                        .0
                        .target
                        .as_ref()
                        .and_then(|t| t.labels.get(&probe.name))
                    {
                        by_label.entry(label).or_default().push(pair);
                    }
                }
                for (label, group) in by_label {
                    if let Some(row) = compare_pairs(&group, model, &probe.name, true, opts) {
                        let (arm_top, baseline_top) = top_labels(&group, model, &probe.name);
                        targets.push(TargetRow {
                            label: label.to_string(),
                            row: named(row),
                            arm_top,
                            baseline_top,
                        });
                    }
                }
            }
        }
    }
    // One family: every tested row of this comparison (all experiments, arms, probe models),
    // so a row reported as significant survives the number of rows the report shows. The
    // breakdown by target is a second family.
    adjust_holm(rows.iter_mut());
    adjust_holm(targets.iter_mut().map(|t| &mut t.row));
    Ok(Summary {
        tool: "artguide".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        runs: loaded.runs.iter().map(|r| r.0.clone()).collect(),
        recipes: loaded.runs.iter().map(|r| r.1.recipe.clone()).collect(),
        probe_clip: first.probe_clip.clone(),
        guide_clip: first.guide_clip.clone(),
        items: items.len(),
        unpaired,
        resamples: opts.resamples,
        seed: opts.seed,
        level: opts.level,
        rows,
        targets,
    })
}

/// The CSV columns of a [`CompareRow`].
const ROW_COLUMNS: [&str; 17] = [
    "experiment",
    "arm",
    "model",
    "role",
    "probe",
    "targeted",
    "n",
    "mean_shift",
    "ci_low",
    "ci_high",
    "sign_p",
    "wilcoxon_p",
    "wilcoxon_p_holm",
    "rank_biserial",
    "flip_rate",
    "mean_kl",
    "top_change_rate",
];

/// A [`CompareRow`]'s CSV cells, in [`ROW_COLUMNS`] order (empty where a metric does not apply).
fn row_cells(r: &CompareRow) -> Vec<String> {
    let o = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    vec![
        r.experiment.clone(),
        r.arm.clone(),
        r.model.clone(),
        r.role.clone(),
        r.probe.clone(),
        r.targeted.to_string(),
        r.n.to_string(),
        o(r.mean_shift),
        o(r.ci_low),
        o(r.ci_high),
        o(r.sign_p),
        o(r.wilcoxon_p),
        o(r.wilcoxon_p_holm),
        o(r.rank_biserial),
        o(r.flip_rate),
        format!("{}", r.mean_kl),
        format!("{}", r.top_change_rate),
    ]
}

/// Label counts, most frequent first (ties by name).
pub fn by_count(counts: &BTreeMap<String, usize>) -> Vec<(&str, usize)> {
    let mut v: Vec<(&str, usize)> = counts.iter().map(|(l, &c)| (l.as_str(), c)).collect();
    v.sort_by_key(|&(l, c)| (std::cmp::Reverse(c), l));
    v
}

/// Label counts as `label:count` joined by `;`, most frequent first.
fn counts_text(counts: &BTreeMap<String, usize>) -> String {
    by_count(counts)
        .iter()
        .map(|(l, c)| format!("{l}:{c}"))
        .collect::<Vec<_>>()
        .join(";")
}

impl Summary {
    /// The CSV header and rows (one per comparison; empty cells where a metric does not apply).
    pub fn csv(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        (
            ROW_COLUMNS.to_vec(),
            self.rows.iter().map(row_cells).collect(),
        )
    }

    /// The breakdown by target label as CSV: a row's columns, then the label and the top-label
    /// counts of the guided images and of their baselines.
    pub fn targets_csv(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let mut header = ROW_COLUMNS.to_vec();
        header.extend(["label", "arm_top", "baseline_top"]);
        let rows = self
            .targets
            .iter()
            .map(|t| {
                let mut cells = row_cells(&t.row);
                cells.extend([
                    t.label.clone(),
                    counts_text(&t.arm_top),
                    counts_text(&t.baseline_top),
                ]);
                cells
            })
            .collect();
        (header, rows)
    }
}

/// Writes summary.json, summary.csv, targets.csv and report.html into `out`; returns their
/// paths.
pub fn write_outputs(loaded: &Loaded, summary: &Summary, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let json = serde_json::to_string_pretty(summary).map_err(|e| Error::Msg(e.to_string()))?;
    let mut paths = Vec::new();
    let p = out.join("summary.json");
    crate::output::write_atomic(&p, json.as_bytes(), true)?;
    paths.push(p);
    for (name, (header, rows)) in [
        ("summary.csv", summary.csv()),
        ("targets.csv", summary.targets_csv()),
    ] {
        let p = out.join(name);
        crate::probe::table::write_csv(&p, &header, &rows)?;
        paths.push(p);
    }
    let p = out.join("report.html");
    let html = crate::report::html(loaded, summary, out)?;
    crate::output::write_atomic(&p, html.as_bytes(), true)?;
    paths.push(p);
    Ok(paths)
}

/// Groups of items per experiment and cell, arms in first-seen order (for image grids).
pub fn cells(loaded: &Loaded) -> BTreeMap<String, Vec<Cell<'_>>> {
    let mut out: BTreeMap<String, Vec<Cell<'_>>> = BTreeMap::new();
    for (dir, r) in &loaded.runs {
        for it in &r.items {
            let exp = out.entry(it.experiment.clone()).or_default();
            match exp.iter_mut().find(|(c, _)| c == &it.cell) {
                Some((_, v)) => v.push((dir.as_path(), it)),
                None => exp.push((it.cell.clone(), vec![(dir.as_path(), it)])),
            }
        }
    }
    for cells in out.values_mut() {
        for (_, v) in cells.iter_mut() {
            // Baseline first, then arms by name.
            v.sort_by_key(|(_, it)| (!it.baseline, it.arm.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_test_matches_scipy_binomtest() {
        // scipy.stats.binomtest(k, n, 0.5).pvalue for k positives of n.
        // binomtest(8, 10) = 0.109375; binomtest(1, 6) = 0.21875; binomtest(5, 5) = 0.0625
        let d = |pos: usize, neg: usize| {
            let mut v = vec![0.3; pos];
            v.extend(vec![-0.2; neg]);
            v.push(0.0); // zeros are dropped
            v
        };
        assert!((sign_test(&d(8, 2)) - 0.109375).abs() < 1e-12);
        assert!((sign_test(&d(1, 5)) - 0.21875).abs() < 1e-12);
        assert!((sign_test(&d(5, 0)) - 0.0625).abs() < 1e-12);
    }

    #[test]
    fn wilcoxon_matches_scipy() {
        // scipy 1.17.1: scipy.stats.wilcoxon(d).pvalue
        let exact = [0.5, -0.2, 0.9, 0.35, 0.7, -0.05, 1.1, 0.6];
        // wilcoxon([0.5,-0.2,0.9,0.35,0.7,-0.05,1.1,0.6]).pvalue -> 0.0390625
        assert!(
            (wilcoxon(&exact) - 0.0390625).abs() < 1e-12,
            "{}",
            wilcoxon(&exact)
        );
        // Tied ranks, still exact in scipy 1.17:
        // wilcoxon([0.5,-0.5,0.5,0.25,0.25,-0.1,0.8,0.5,0.3]).pvalue -> 0.0859375
        let ties = [0.5, -0.5, 0.5, 0.25, 0.25, -0.1, 0.8, 0.5, 0.3];
        assert!(
            (wilcoxon(&ties) - 0.0859375).abs() < 1e-12,
            "{}",
            wilcoxon(&ties)
        );
        // n > 50: normal approximation.
        // d = [(-1)**(i%3==0) * (i+1)*0.01 for i in range(60)]; wilcoxon(d).pvalue -> WILCOXON_60
        let d60: Vec<f64> = (0..60)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 } * (i + 1) as f64 * 0.01)
            .collect();
        assert!(
            (wilcoxon(&d60) - WILCOXON_60).abs() < 1e-6,
            "{}",
            wilcoxon(&d60)
        );
    }

    const WILCOXON_60: f64 = 0.016733071607703435;

    #[test]
    fn rank_biserial_matches_pingouin() {
        // pingouin 0.7.0: pingouin.wilcoxon(np.array(d))["RBC"] (zeros dropped)
        // [0.5,-0.2,0.9,0.35,0.7,-0.05,1.1,0.6] -> 0.833333 (= 30/36)
        let exact = [0.5, -0.2, 0.9, 0.35, 0.7, -0.05, 1.1, 0.6];
        assert!((rank_biserial(&exact) - 30.0 / 36.0).abs() < 1e-12);
        // [0.5,-0.5,0.5,0.25,0.25,-0.1,0.8,0.5,0.3,0.0] -> 0.666667 (= 30/45)
        let ties = [0.5, -0.5, 0.5, 0.25, 0.25, -0.1, 0.8, 0.5, 0.3, 0.0];
        assert!((rank_biserial(&ties) - 30.0 / 45.0).abs() < 1e-12);
        let fell: Vec<f64> = exact.iter().map(|x| -x).collect();
        assert!((rank_biserial(&fell) + 30.0 / 36.0).abs() < 1e-12);
        assert_eq!(rank_biserial(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn holm_matches_statsmodels() {
        // statsmodels 0.15.0: multipletests(p, method="holm")[1]
        let p = [0.01, 0.04, 0.03, 0.04, 0.005, 0.5, 0.2];
        let want = [0.06, 0.16, 0.15, 0.16, 0.035, 0.5, 0.4];
        for (got, want) in holm(&p).iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{:?}", holm(&p));
        }
        // Capped at 1: [0.5, 0.6, 0.01] -> [1.0, 1.0, 0.03]
        let got = holm(&[0.5, 0.6, 0.01]);
        assert_eq!(got[..2], [1.0, 1.0]);
        assert!((got[2] - 0.03).abs() < 1e-12);
        assert!(holm(&[]).is_empty());
    }

    /// An item of cell `cell` with target `target` (probe, label), answered by each model in
    /// `models` with P(first label) = `p` for every probe.
    fn item(cell: &str, arm: &str, target: (&str, &str), guide: Option<&str>, p: f32) -> RunItem {
        let answer = |probe: &str, labels: [&str; 2]| ProbeAnswer {
            probe: probe.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            probs: vec![p, 1.0 - p],
            top: if p >= 0.5 { labels[0] } else { labels[1] }.into(),
            entropy: 0.0,
        };
        let answers = vec![answer("style", ["A", "B"]), answer("period", ["X", "Y"])];
        RunItem {
            id: format!("e/{cell}/{arm}"),
            experiment: "e".into(),
            cell: cell.into(),
            subject: "a harbour".into(),
            target: Some(crate::run::results::Target {
                text: target.1.into(),
                labels: [(target.0.to_string(), target.1.to_string())].into(),
            }),
            seed: 0,
            arm: arm.into(),
            baseline: arm == "baseline",
            guide_clip: guide.map(String::from),
            prompt: "a photo".into(),
            image: format!("images/e/{cell}/{arm}.png"),
            sha256: String::new(),
            probes: ["probe", "a"]
                .iter()
                .map(|m| (m.to_string(), answers.clone()))
                .collect(),
        }
    }

    fn run(model: &str, items: Vec<RunItem>) -> RunResults {
        RunResults {
            tool: "artguide".into(),
            version: "0".into(),
            recipe: "r".into(),
            model: model.into(),
            probe_clip: "probe".into(),
            guide_clip: Some("a".into()),
            item_guides: true,
            made_with: Default::default(),
            suite: vec![
                SuiteProbe {
                    name: "style".into(),
                    labels: vec!["A".into(), "B".into()],
                },
                SuiteProbe {
                    name: "period".into(),
                    labels: vec!["X".into(), "Y".into()],
                },
            ],
            items,
        }
    }

    fn loaded(runs: Vec<RunResults>) -> Loaded {
        Loaded {
            runs: runs
                .into_iter()
                .enumerate()
                .map(|(i, r)| (PathBuf::from(format!("run{i}")), r))
                .collect(),
        }
    }

    /// Cells aiming at different probes: each row's `n` and figures cover the same pairs, and
    /// the pairs aimed elsewhere give their own side-effect row.
    #[test]
    fn rows_split_pairs_by_what_their_target_names() {
        let mut items = Vec::new();
        for c in 0..5 {
            let cell = format!("s{c}");
            items.push(item(&cell, "baseline", ("style", "A"), None, 0.2));
            items.push(item(&cell, "g", ("style", "A"), Some("a"), 0.6));
        }
        for c in 0..3 {
            let cell = format!("p{c}");
            items.push(item(&cell, "baseline", ("period", "X"), None, 0.3));
            items.push(item(&cell, "g", ("period", "X"), Some("a"), 0.4));
        }
        let s = compare(&loaded(vec![run("sd", items)]), &CompareOptions::default()).unwrap();
        let row = |probe: &str, targeted: bool| {
            s.rows
                .iter()
                .find(|r| r.model == "probe" && r.probe == probe && r.targeted == targeted)
                .unwrap_or_else(|| panic!("no {probe} {targeted} row: {:?}", s.rows))
        };
        let style = row("style", true);
        assert_eq!(style.n, 5);
        assert!((style.mean_shift.unwrap() - 0.4).abs() < 1e-6);
        assert!((style.flip_rate.unwrap() - 1.0).abs() < 1e-12);
        assert!((style.top_change_rate - 1.0).abs() < 1e-12);
        // The period cells' effect on the style probe: 3 pairs, no top change (0.3 -> 0.4).
        let side = row("style", false);
        assert_eq!((side.n, side.mean_shift), (3, None));
        assert_eq!(side.top_change_rate, 0.0);
        assert_eq!(row("period", true).n, 3);
        assert_eq!(row("period", false).n, 5);
        // Every pair rose: exact Wilcoxon p 2/2^5 (style) and 2/2^3 (period), r = 1. Holm's
        // family is the four tested rows (two probes, two probe models), not each row alone.
        assert_eq!(style.wilcoxon_p, Some(0.0625));
        assert_eq!(style.rank_biserial, Some(1.0));
        assert_eq!(side.wilcoxon_p_holm, None);
        let tested: Vec<_> = s.rows.iter().filter(|r| r.wilcoxon_p.is_some()).collect();
        assert_eq!(tested.len(), 4);
        for r in tested {
            let want = if r.probe == "style" { 0.25 } else { 0.5 };
            assert_eq!(r.wilcoxon_p_holm, Some(want), "{r:?}");
        }
    }

    /// Guided images without their baselines (a shard of guided arms) compare nothing: an
    /// error that says where the baselines are, not an empty report.
    #[test]
    fn no_pairs_is_an_error() {
        let items = vec![
            item("s0", "g", ("style", "A"), Some("a"), 0.6),
            item("s1", "g", ("style", "A"), Some("a"), 0.6),
        ];
        let err = compare(&loaded(vec![run("sd", items)]), &CompareOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("none of the 2 guided images has a baseline"),
            "{err}"
        );
        let items = vec![item("s0", "baseline", ("style", "A"), None, 0.6)];
        let err = compare(&loaded(vec![run("sd", items)]), &CompareOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no guided images"), "{err}");
    }

    /// Two style targets in one experiment: the pooled row mixes them, the breakdown tells
    /// them apart (a target that moved, one that fell) with what the probe saw instead.
    #[test]
    fn targets_break_the_targeted_rows_down() {
        let mut items = Vec::new();
        for c in 0..4 {
            let cell = format!("a{c}");
            items.push(item(&cell, "baseline", ("style", "A"), None, 0.2));
            items.push(item(&cell, "g", ("style", "A"), Some("a"), 0.6));
        }
        for c in 0..3 {
            // Aimed at B, but P(B) falls from 0.7 to 0.6.
            let cell = format!("b{c}");
            items.push(item(&cell, "baseline", ("style", "B"), None, 0.3));
            items.push(item(&cell, "g", ("style", "B"), Some("a"), 0.4));
        }
        let s = compare(&loaded(vec![run("sd", items)]), &CompareOptions::default()).unwrap();
        let pooled = s
            .rows
            .iter()
            .find(|r| r.model == "probe" && r.probe == "style" && r.targeted)
            .unwrap();
        assert_eq!(pooled.n, 7);
        assert_eq!(s.targets.len(), 4, "two labels x two probe models");
        let t = |label: &str| {
            s.targets
                .iter()
                .find(|t| t.row.model == "probe" && t.label == label)
                .unwrap()
        };
        let (a, b) = (t("A"), t("B"));
        assert_eq!((a.row.n, b.row.n), (4, 3));
        assert!((a.row.mean_shift.unwrap() - 0.4).abs() < 1e-6);
        assert!((b.row.mean_shift.unwrap() + 0.1).abs() < 1e-6);
        assert_eq!(
            (a.row.rank_biserial, b.row.rank_biserial),
            (Some(1.0), Some(-1.0))
        );
        assert_eq!((a.row.flip_rate, b.row.flip_rate), (Some(1.0), Some(0.0)));
        assert_eq!(a.arm_top, [("A".to_string(), 4)].into());
        assert_eq!(a.baseline_top, [("B".to_string(), 4)].into());
        assert_eq!(b.arm_top, [("B".to_string(), 3)].into());
        // Exact p 2/2^4 (A) and 2/2^3 (B) twice each (two models); Holm over these four.
        assert_eq!(a.row.wilcoxon_p, Some(0.125));
        assert_eq!(
            (a.row.wilcoxon_p_holm, b.row.wilcoxon_p_holm),
            (Some(0.5), Some(0.5))
        );
        let (header, rows) = s.targets_csv();
        assert_eq!(header.len(), rows[0].len());
        let a_csv = rows
            .iter()
            .find(|r| r[2] == "probe" && r[17] == "A")
            .unwrap();
        assert_eq!((a_csv[18].as_str(), a_csv[19].as_str()), ("A:4", "B:4"));
    }

    /// An arm that names its own guide CLIP is judged by the others: the probe CLIP that
    /// guided it is its `guide`, not its held-out judge.
    #[test]
    fn roles_follow_each_arms_guide() {
        let items = vec![
            item("s0", "baseline", ("style", "A"), None, 0.2),
            item("s0", "by-a", ("style", "A"), Some("a"), 0.6),
            item("s0", "by-judge", ("style", "A"), Some("probe"), 0.6),
        ];
        let s = compare(&loaded(vec![run("sd", items)]), &CompareOptions::default()).unwrap();
        let role = |arm: &str, model: &str| {
            s.rows
                .iter()
                .find(|r| r.arm == arm && r.model == model)
                .unwrap()
                .role
                .clone()
        };
        assert_eq!(role("by-a", "probe"), "probe");
        assert_eq!(role("by-a", "a"), "guide");
        assert_eq!(role("by-judge", "probe"), "guide");
        assert_eq!(role("by-judge", "a"), "other");
        // An arm no CLIP guided (TV only) has no guide; results that do not record guides
        // per image fall back to the run's guide CLIP.
        let items = vec![
            item("s0", "baseline", ("style", "A"), None, 0.2),
            item("s0", "tv-only", ("style", "A"), None, 0.6),
        ];
        let mut r = run("sd", items);
        let s = compare(&loaded(vec![r.clone()]), &CompareOptions::default()).unwrap();
        assert!(s.rows.iter().all(|r| r.role != "guide"), "{:?}", s.rows);
        r.item_guides = false;
        let s = compare(&loaded(vec![r]), &CompareOptions::default()).unwrap();
        assert!(s.rows.iter().any(|r| r.model == "a" && r.role == "guide"));
    }

    /// Runs whose recipe copies generate differently do not pair; the same settings do.
    #[test]
    fn pairs_across_runs_need_the_same_generation_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let text = include_str!("../recipes/smoke/compare.yaml");
        let write = |name: &str, text: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(crate::run::RECIPE_FILE), text).unwrap();
            d
        };
        let (a, same, other) = (
            write("a", text),
            write("same", text),
            write("other", &text.replace("  steps: 4\n", "  steps: 6\n")),
        );
        let base = run(
            "sd",
            vec![item("s0", "baseline", ("style", "A"), None, 0.2)],
        );
        let guided = run("sd", vec![item("s0", "g", ("style", "A"), Some("a"), 0.6)]);
        let opts = CompareOptions::default();
        let two = |d: &Path| Loaded {
            runs: vec![(a.clone(), base.clone()), (d.to_path_buf(), guided.clone())],
        };
        assert_eq!(compare(&two(&same), &opts).unwrap().rows[0].n, 1);
        let err = compare(&two(&other), &opts).unwrap_err().to_string();
        assert!(
            err.contains("other")
                && err.contains("generation.steps `6`, but")
                && err.contains("with `4`"),
            "{err}"
        );
        // What the copies leave to the model, or state as the default, is no difference.
        let g = |text: &str| -> crate::recipe::Generation { serde_yaml::from_str(text).unwrap() };
        let plain = g("steps: 30");
        assert_eq!(generation_difference(&plain, &g("width: 128")), None);
        assert_eq!(generation_difference(&plain, &g("scheduler: ddim")), None);
        let (a, b) = (
            g("init_image: x.png"),
            g("init_image: ../y.png\nstrength: 0.75"),
        );
        assert_eq!(generation_difference(&a, &b), None);
        let c = g("init_image: x.png\nstrength: 0.5");
        assert_eq!(
            generation_difference(&a, &c),
            Some(("strength", "0.75".into(), "0.5".into()))
        );
        assert_eq!(
            generation_difference(&g("width: 64"), &g("width: 128")),
            Some(("width", "64".into(), "128".into()))
        );
        assert_eq!(
            generation_difference(&plain, &a).map(|d| d.0),
            Some("init_image")
        );
    }

    /// Two runs naming the same local model folders by different relative paths pair, and
    /// their answers meet under one name.
    #[test]
    fn runs_naming_one_folder_by_two_paths_pair() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, c) = (tmp.path().join("sd"), tmp.path().join("clip"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::create_dir_all(&c).unwrap();
        let name = |p: &Path, via: &str| {
            format!(
                "{}/{via}/../{}",
                tmp.path().display(),
                p.file_name().unwrap().to_string_lossy()
            )
        };
        let rename = |mut r: RunResults, via: &str| {
            r.model = name(&m, via);
            r.probe_clip = name(&c, via);
            for it in &mut r.items {
                let a = it.probes.remove("probe").unwrap();
                it.probes.insert(name(&c, via), a);
            }
            r
        };
        let write = |name: &str, r: &RunResults| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let text = serde_json::to_string(r).unwrap();
            std::fs::write(d.join(crate::run::results::RESULTS_FILE), text).unwrap();
            d
        };
        let base = rename(
            run(
                "sd",
                vec![item("s0", "baseline", ("style", "A"), None, 0.2)],
            ),
            "sd",
        );
        let guided = rename(
            run("sd", vec![item("s0", "g", ("style", "A"), Some("a"), 0.6)]),
            "clip",
        );
        let dirs = [write("base", &base), write("guided", &guided)];
        let s = compare(&Loaded::load(&dirs).unwrap(), &CompareOptions::default()).unwrap();
        let judge = std::fs::canonicalize(&c).unwrap().display().to_string();
        let row = s
            .rows
            .iter()
            .find(|r| r.model == judge && r.targeted)
            .unwrap();
        assert_eq!((row.n, row.role.as_str()), (1, "probe"));
    }

    /// Runs joined for a comparison pair only the same cell of the same plan.
    #[test]
    fn pairs_across_runs_must_be_the_same_cell() {
        let opts = CompareOptions::default();
        let base = || vec![item("s0", "baseline", ("style", "A"), None, 0.2)];
        let guided = || item("s0", "g", ("style", "A"), Some("a"), 0.6);
        let ok = compare(
            &loaded(vec![run("sd", base()), run("sd", vec![guided()])]),
            &opts,
        )
        .unwrap();
        assert_eq!((ok.unpaired, ok.rows[0].n), (0, 1));
        let refused = |runs| compare(&loaded(runs), &opts).unwrap_err().to_string();
        let mut other = guided();
        other.subject = "a village".into();
        let err = refused(vec![run("sd", base()), run("sd", vec![other])]);
        assert!(
            err.contains("run1") && err.contains("differ in subject"),
            "{err}"
        );
        let err = refused(vec![run("sd", base()), run("sdxl", vec![guided()])]);
        assert!(
            err.contains("was made with the model `sdxl`, but") && err.contains("with `sd`"),
            "{err}"
        );
        // The same ids made with other weights, or in another dtype: refused as well.
        let made = |fp: &str, dtype: &str| {
            let mut r = run("sd", vec![guided()]);
            r.made_with = crate::run::MadeWith {
                fingerprints: BTreeMap::from([("sd".into(), fp.into())]),
                device: "cpu".into(),
                dtype: dtype.into(),
                ..Default::default()
            };
            r
        };
        let mut b = run("sd", base());
        b.made_with = made("aaaaaaaaaaaaaaaa", "f32").made_with;
        let ok = compare(
            &loaded(vec![b.clone(), made("aaaaaaaaaaaaaaaa", "f32")]),
            &opts,
        );
        assert_eq!(ok.unwrap().rows[0].n, 1);
        let err = refused(vec![b.clone(), made("bbbbbbbbbbbbbbbb", "f32")]);
        assert!(
            err.contains("the weights of sd `sha256 bbbbbbbbbbbb…`, but")
                && err.contains("with `sha256 aaaaaaaaaaaa…`"),
            "{err}"
        );
        let err = refused(vec![b, made("aaaaaaaaaaaaaaaa", "f16")]);
        assert!(
            err.contains("dtype `f16`, but") && err.contains("with `f32`"),
            "{err}"
        );
        // Runs that each hold their own baselines are refused too: rows pool every run.
        let err = refused(vec![
            run("sd", [base(), vec![guided()]].concat()),
            run("sdxl", [base(), vec![guided()]].concat()),
        ]);
        assert!(err.contains("was made with the model `sdxl`"), "{err}");
        // A probe whose labels changed between the items of a pair (an edited suite).
        let mut relabelled = guided();
        for answers in relabelled.probes.values_mut() {
            answers[0].labels[0] = "Renamed".into();
        }
        let err = refused(vec![run("sd", [base(), vec![relabelled]].concat())]);
        assert!(
            err.contains("differ in the labels of probe") && err.contains("Renamed"),
            "{err}"
        );
        let mut second = item("s0", "plain", ("style", "A"), None, 0.2);
        second.baseline = true;
        let err = refused(vec![run("sd", base()), run("sd", vec![second, guided()])]);
        assert!(err.contains("second baseline of cell e/s0"), "{err}");
    }

    /// The same pairs give the same figures however the runs split them (shards or the
    /// merged run) or order them: the bootstrap interval depended on the pair order.
    #[test]
    fn figures_do_not_depend_on_how_runs_split_the_pairs() {
        let cells: Vec<(String, f32)> = (0..9)
            .map(|i| (format!("s{i}"), 0.3 + 0.07 * ((i * 5) % 9) as f32))
            .collect();
        let pair = |(c, p): &(String, f32)| {
            vec![
                item(c, "baseline", ("style", "A"), None, 0.2),
                item(c, "g", ("style", "A"), Some("a"), *p),
            ]
        };
        let whole = run("sd", cells.iter().flat_map(pair).collect());
        let (a, b) = cells.split_at(4);
        let shards = vec![
            run("sd", b.iter().flat_map(pair).collect()),
            run("sd", a.iter().rev().flat_map(pair).collect()),
        ];
        let opts = CompareOptions::default();
        let one = compare(&loaded(vec![whole]), &opts).unwrap();
        let split = compare(&loaded(shards), &opts).unwrap();
        assert_eq!(
            serde_json::to_value(&one.rows).unwrap(),
            serde_json::to_value(&split.rows).unwrap()
        );
    }

    #[test]
    fn kl_and_bootstrap() {
        assert!(kl(&[0.5, 0.5], &[0.5, 0.5]).abs() < 1e-12);
        let k = kl(&[0.9, 0.1], &[0.5, 0.5]);
        assert!((k - (0.9f64 * (1.8f64).ln() + 0.1 * (0.2f64).ln())).abs() < 1e-6);
        let d = [0.1, 0.2, 0.3, 0.15, 0.25];
        let (lo, hi) = bootstrap_mean(&d, 2000, 3, 0.95);
        assert!(lo < 0.2 && hi > 0.2 && lo >= 0.1 && hi <= 0.3, "{lo} {hi}");
        assert_eq!((lo, hi), bootstrap_mean(&d, 2000, 3, 0.95));
    }
}
