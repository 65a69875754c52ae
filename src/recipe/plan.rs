//! A recipe expanded into the images to make, in a fixed order: experiment, subject, target,
//! seed, arm. Every arm of a cell gets the cell's seed, so arms start from the same latents.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Experiment, LoadedRecipe};
use crate::guidance::GuidanceConfig;
use crate::probe::suite::Suite;
use crate::run::results::Target;
use crate::{Error, Result};

/// One image to make.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanItem {
    /// Position in the plan.
    pub index: usize,
    /// Position of the item's grid cell in the plan (over all experiments): shards split by
    /// it, so a cell's baseline and arms stay together.
    pub cell_index: usize,
    /// `experiment/cell/arm`.
    pub id: String,
    pub experiment: String,
    /// `sNN-tNN-seedS`: subject and target indices and the seed.
    pub cell: String,
    pub subject: String,
    pub target: Option<Target>,
    pub seed: u64,
    pub arm: String,
    pub baseline: bool,
    pub prompt: String,
    /// Guidance with prompts filled in, the guide CLIP and every path resolved.
    pub guidance: Option<GuidanceConfig>,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub items: Vec<PlanItem>,
}

fn fill(template: &str, subject: &str, target: Option<&Target>) -> String {
    template
        .replace("{subject}", subject)
        .replace("{target}", target.map(|t| t.text.as_str()).unwrap_or(""))
}

/// The targets of an experiment: explicit, from a grid (product in probe-name order), or none.
fn targets(e: &Experiment) -> Vec<Option<Target>> {
    if let Some(grid) = &e.target_grid {
        let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for (probe, labels) in &grid.labels {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    labels.iter().map(move |l| {
                        let mut c = c.clone();
                        c.insert(probe.clone(), l.clone());
                        c
                    })
                })
                .collect();
        }
        return combos
            .into_iter()
            .map(|labels| {
                let mut text = grid.text.clone();
                for (p, l) in &labels {
                    text = text.replace(&format!("{{{p}}}"), l);
                }
                Some(Target { text, labels })
            })
            .collect();
    }
    if e.targets.is_empty() {
        return vec![None];
    }
    e.targets
        .iter()
        .map(|t| {
            Some(Target {
                text: t.text.clone(),
                labels: t.labels.clone(),
            })
        })
        .collect()
}

impl Plan {
    /// Expands a checked recipe; target labels are checked against the suite.
    pub fn new(r: &LoadedRecipe, suite: &Suite) -> Result<Self> {
        let mut items = Vec::new();
        let mut cells = 0;
        for (i, e) in r.recipe.experiments.iter().enumerate() {
            let ts = targets(e);
            for (j, t) in ts.iter().enumerate() {
                let Some(t) = t else { continue };
                for (probe, label) in &t.labels {
                    let field =
                        format!("experiments[{i}] ({}).targets[{j}].labels.{probe}", e.name);
                    let spec = suite
                        .probes
                        .iter()
                        .find(|p| &p.name == probe)
                        .ok_or_else(|| {
                            Error::field(
                                &r.path,
                                &field,
                                format!(
                                    "the suite {} has no probe `{probe}`",
                                    suite.path.display()
                                ),
                            )
                        })?;
                    if !spec.labels.iter().any(|l| l.name() == label) {
                        return Err(Error::field(
                            &r.path,
                            &field,
                            format!("probe `{probe}` has no label `{label}`"),
                        ));
                    }
                }
            }
            for (si, subject) in e.subjects.iter().enumerate() {
                for (ti, target) in ts.iter().enumerate() {
                    for seed in e.seeds.values() {
                        let cell = format!("s{si:02}-t{ti:02}-seed{seed}");
                        let cell_index = cells;
                        cells += 1;
                        for arm in &e.arms {
                            let guidance = arm
                                .guidance
                                .as_ref()
                                .map(|g| resolve_guidance(r, g, subject, target.as_ref()))
                                .transpose()?;
                            items.push(PlanItem {
                                index: items.len(),
                                cell_index,
                                id: format!("{}/{cell}/{}", e.name, arm.name),
                                experiment: e.name.clone(),
                                cell: cell.clone(),
                                subject: subject.clone(),
                                target: target.clone(),
                                seed,
                                arm: arm.name.clone(),
                                baseline: arm.guidance.is_none(),
                                prompt: fill(&e.prompt, subject, target.as_ref()),
                                guidance,
                            });
                        }
                    }
                }
            }
        }
        Ok(Plan { items })
    }

    /// The items of shard `i` of `n`: whole grid cells, by cell position modulo n, so every
    /// shard pairs its guided images with their baselines and gets a like share of the
    /// (slower) guided work.
    pub fn shard(&self, i: usize, n: usize) -> Vec<&PlanItem> {
        self.items.iter().filter(|it| it.in_shard(i, n)).collect()
    }
}

impl PlanItem {
    /// Whether the item belongs to shard `i` of `n`.
    pub fn in_shard(&self, i: usize, n: usize) -> bool {
        self.cell_index % n == i
    }
}

fn resolve_guidance(
    r: &LoadedRecipe,
    g: &GuidanceConfig,
    subject: &str,
    target: Option<&Target>,
) -> Result<GuidanceConfig> {
    let mut g = g.clone();
    if g.clip.is_none() {
        g.clip = r.recipe.guide_clip.clone();
    }
    if let Some(c) = &g.clip {
        g.clip = Some(r.resolve_model("guide_clip", c)?);
    }
    for p in &mut g.prompts {
        p.text = fill(&p.text, subject, target);
    }
    if let Some(p) = &g.image {
        g.image = Some(r.resolve(p));
    }
    if let Some(s) = &mut g.style {
        s.image = r.resolve(&s.image);
    }
    if g.decoder == crate::guidance::DecoderKind::Taesd && g.taesd != crate::guidance::DEFAULT_TAESD
    {
        g.taesd = r.resolve_model("guidance.taesd", &g.taesd)?;
    }
    Ok(g)
}
