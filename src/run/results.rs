//! `results.json` of a run: one record per generated image with the grid coordinates that
//! pair it with its baseline and every probe model's answers. `compare`, reports and probe
//! sets read only this file (and the images it names), so they work on merged shards and on
//! runs made elsewhere.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::probe::runner::ProbeAnswer;
use crate::{Error, Result};

/// File name of the results inside a run folder.
pub const RESULTS_FILE: &str = "results.json";

/// A target of an experiment: the intended label of one or more probes (e.g. style
/// Impressionism; or style Baroque and period 17th for a probe set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The text used for `{target}` in prompts and guidance prompts.
    pub text: String,
    /// Probe name -> intended label of that probe.
    pub labels: BTreeMap<String, String>,
}

/// One generated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunItem {
    /// Unique id, `experiment/cell/arm`; also the image path stem under `images/`.
    pub id: String,
    pub experiment: String,
    /// The grid cell (`subject index, target index, seed`) shared by every arm: all arms of
    /// a cell start from the same initial latents, so they pair.
    pub cell: String,
    pub subject: String,
    /// None for experiments without targets (e.g. plain probe sets).
    pub target: Option<Target>,
    pub seed: u64,
    pub arm: String,
    /// Whether this arm is the experiment's unguided baseline.
    pub baseline: bool,
    /// The CLIP that guided this image (the key of its answers in `probes`), when a CLIP
    /// term guided it: an arm may name its own, so the run's `guide_clip` need not be it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guide_clip: Option<String>,
    /// The prompt the image was generated from.
    pub prompt: String,
    /// The image, relative to the run folder (`images/<id>.png`).
    pub image: String,
    /// SHA-256 of the PNG.
    pub sha256: String,
    /// Answers per probe model id (the probe CLIP, and the guide CLIP when there is one), in
    /// suite order.
    pub probes: BTreeMap<String, Vec<ProbeAnswer>>,
}

/// Everything a run produced, in plan order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunResults {
    pub tool: String,
    pub version: String,
    /// The recipe's name.
    pub recipe: String,
    /// The SD model id.
    pub model: String,
    /// The probe CLIP id (the held-out judge).
    pub probe_clip: String,
    /// The guide CLIP id, when guidance is used.
    pub guide_clip: Option<String>,
    /// Whether each item records the CLIP that guided it (`RunItem::guide_clip`, absent for
    /// an image no CLIP guided); results without it know only the run's `guide_clip`.
    #[serde(default)]
    pub item_guides: bool,
    /// The models' fingerprints, the device kind and dtype the items were made with (absent
    /// from results of older versions).
    #[serde(default, skip_serializing_if = "crate::run::MadeWith::is_empty")]
    pub made_with: crate::run::MadeWith,
    /// Probe names and their labels, in suite order.
    pub suite: Vec<SuiteProbe>,
    pub items: Vec<RunItem>,
}

/// A probe of the suite as results name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteProbe {
    pub name: String,
    pub labels: Vec<String>,
}

impl RunResults {
    /// Reads `results.json` from a run folder.
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(RESULTS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A run folder whose run has not finished: say what to do about it.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && run_dir.join(crate::run::RECIPE_FILE).is_file() =>
            {
                return Err(Error::file(
                    &path,
                    "missing: the run in this folder has not finished; run the same recipe \
                     with --out naming this folder to resume it",
                ))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("not a valid artguide results file: {e}")))
    }
}
