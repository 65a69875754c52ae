//! Paired comparisons of guided arms against their unguided baseline, from runs'
//! `results.json`: per experiment, arm, probe model and probe, the shift of the target label's
//! probability (bootstrap interval, sign and Wilcoxon tests), the rate at which the top label
//! flips to the target, the KL divergence of the label distributions, and side effects on the
//! probes the target does not name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::probe::agree::quantile;
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
    /// two-sided sign-test and Wilcoxon signed-rank p-values, and the flip rate.
    pub mean_shift: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub sign_p: Option<f64>,
    pub wilcoxon_p: Option<f64>,
    pub flip_rate: Option<f64>,
    /// Mean KL(P_arm || P_baseline), nats.
    pub mean_kl: f64,
    /// Fraction of pairs whose top label differs.
    pub top_change_rate: f64,
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
        Ok(Loaded { runs })
    }

    fn suite(&self) -> &[SuiteProbe] {
        self.runs
            .first()
            .map(|r| r.1.suite.as_slice())
            .unwrap_or(&[])
    }
}

/// KL(p || q) in nats, with q floored at 1e-12.
pub fn kl(p: &[f32], q: &[f32]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| a as f64 * (a as f64 / (b as f64).max(1e-12)).ln())
        .sum()
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

/// Two-sided Wilcoxon signed-rank p-value as scipy.stats.wilcoxon 1.17 (zero_method "wilcox",
/// method "auto"): exact for n <= 50 (over the actual, possibly tied, ranks), else the normal
/// approximation with the tie correction and no continuity correction.
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

/// Percentile bootstrap interval of the mean of `d`.
pub fn bootstrap_mean(d: &[f64], resamples: usize, seed: u64, level: f64) -> (f64, f64) {
    if d.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = d.len();
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            (0..n)
                .map(|_| d[crate::probe::uniform_below(&mut rng, n)])
                .sum::<f64>()
                / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    (
        quantile(&means, (1.0 - level) / 2.0),
        quantile(&means, (1.0 + level) / 2.0),
    )
}

/// A guided item and its baseline.
type Pair<'a> = (&'a RunItem, &'a RunItem);

/// The items of one grid cell, each with the run folder it came from.
pub type Cell<'a> = (String, Vec<(&'a Path, &'a RunItem)>);

fn answer<'a>(it: &'a RunItem, model: &str, probe: &str) -> Option<&'a ProbeAnswer> {
    it.probes.get(model)?.iter().find(|a| a.probe == probe)
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
    let mut baselines: HashMap<(&str, &str), &RunItem> = HashMap::new();
    for it in items.iter().filter(|i| i.baseline) {
        baselines.insert((it.experiment.as_str(), it.cell.as_str()), it);
    }
    // (experiment, arm) in first-seen order -> pairs.
    let mut groups: Vec<((String, String), Vec<Pair>)> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut unpaired = 0;
    for it in items.iter().filter(|i| !i.baseline) {
        let Some(base) = baselines.get(&(it.experiment.as_str(), it.cell.as_str())) else {
            unpaired += 1;
            continue;
        };
        let key = (it.experiment.clone(), it.arm.clone());
        let k = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[k].1.push((it, base));
    }
    let mut models: Vec<String> = items
        .iter()
        .flat_map(|i| i.probes.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // The held-out judge first.
    models.sort_by_key(|m| (m != &first.probe_clip, m.clone()));
    let role = |m: &str| {
        if m == first.probe_clip {
            "probe"
        } else if first.guide_clip.as_deref() == Some(m) {
            "guide"
        } else {
            "other"
        }
    };
    let mut rows = Vec::new();
    for ((experiment, arm), pairs) in &groups {
        for model in &models {
            for probe in loaded.suite() {
                let mut shifts = Vec::new();
                let mut flips = 0usize;
                let mut kls = Vec::new();
                let mut changes = 0usize;
                let mut targeted = false;
                for (a, b) in pairs {
                    let (Some(pa), Some(pb)) =
                        (answer(a, model, &probe.name), answer(b, model, &probe.name))
                    else {
                        continue;
                    };
                    kls.push(kl(&pa.probs, &pb.probs));
                    changes += usize::from(pa.top != pb.top);
                    if let Some(label) = a.target.as_ref().and_then(|t| t.labels.get(&probe.name)) {
                        targeted = true;
                        if let Some(k) = pa.labels.iter().position(|l| l == label) {
                            shifts.push(pa.probs[k] as f64 - pb.probs[k] as f64);
                            flips += usize::from(&pa.top == label && &pb.top != label);
                        }
                    }
                }
                if kls.is_empty() {
                    continue;
                }
                let n = kls.len();
                let (mean_shift, ci, sign_p, wilcoxon_p, flip_rate) =
                    if targeted && !shifts.is_empty() {
                        let m = shifts.iter().sum::<f64>() / shifts.len() as f64;
                        let ci = bootstrap_mean(&shifts, opts.resamples, opts.seed, opts.level);
                        (
                            Some(m),
                            Some(ci),
                            Some(sign_test(&shifts)),
                            Some(wilcoxon(&shifts)),
                            Some(flips as f64 / shifts.len() as f64),
                        )
                    } else {
                        (None, None, None, None, None)
                    };
                rows.push(CompareRow {
                    experiment: experiment.clone(),
                    arm: arm.clone(),
                    model: model.clone(),
                    role: role(model).into(),
                    probe: probe.name.clone(),
                    targeted,
                    n,
                    mean_shift,
                    ci_low: ci.map(|c| c.0),
                    ci_high: ci.map(|c| c.1),
                    sign_p,
                    wilcoxon_p,
                    flip_rate,
                    mean_kl: kls.iter().sum::<f64>() / n as f64,
                    top_change_rate: changes as f64 / n as f64,
                });
            }
        }
    }
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
    })
}

impl Summary {
    /// The CSV header and rows (one per comparison; empty cells where a metric does not apply).
    pub fn csv(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let header = vec![
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
            "flip_rate",
            "mean_kl",
            "top_change_rate",
        ];
        let o = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
        let rows = self
            .rows
            .iter()
            .map(|r| {
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
                    o(r.flip_rate),
                    format!("{}", r.mean_kl),
                    format!("{}", r.top_change_rate),
                ]
            })
            .collect();
        (header, rows)
    }
}

/// Writes summary.json, summary.csv and report.html into `out`; returns their paths.
pub fn write_outputs(loaded: &Loaded, summary: &Summary, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let json = serde_json::to_string_pretty(summary).map_err(|e| Error::Msg(e.to_string()))?;
    let (header, rows) = summary.csv();
    let mut paths = Vec::new();
    let p = out.join("summary.json");
    crate::output::write_atomic(&p, json.as_bytes(), true)?;
    paths.push(p);
    let p = out.join("summary.csv");
    crate::probe::table::write_csv(&p, &header, &rows)?;
    paths.push(p);
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
