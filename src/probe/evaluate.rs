//! Scoring probe answers against true labels: accuracy, top-k, per-class recall and the
//! confusion matrix per probe.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::runner::ProbeResults;
use super::table::Table;
use crate::{Error, Result};

/// One probe's scores against the true labels.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeScore {
    pub probe: String,
    /// Images with a true label for this probe.
    pub n: usize,
    pub accuracy: f64,
    pub k: usize,
    pub top_k_accuracy: f64,
    /// Label -> recall (None when the label never occurs as a true label).
    pub recall: BTreeMap<String, Option<f64>>,
    /// Labels in suite order; `confusion[t][p]` counts true label t predicted as p.
    pub labels: Vec<String>,
    pub confusion: Vec<Vec<usize>>,
}

/// Per probe while counting: labels, confusion counts, images, top-k hits.
type Tally = (Vec<String>, Vec<Vec<usize>>, usize, usize);

/// Scores of every probe that has true labels, plus label rows that matched no image.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub labels_file: String,
    pub probes: Vec<ProbeScore>,
    pub unmatched_rows: usize,
}

/// Reads `image,probe,label` rows (an image is matched by its path as probed or by file name)
/// and scores the answers. A label or probe the suite does not have is an error naming the
/// file and line.
pub fn evaluate(results: &ProbeResults, labels_csv: &Path, k: usize) -> Result<Evaluation> {
    let table = Table::read(labels_csv)?;
    let (ci, cp, cl) = (
        table.column_index("image")?,
        table.column_index("probe")?,
        table.column_index("label")?,
    );
    let mut scores: BTreeMap<String, Tally> = BTreeMap::new();
    let mut unmatched = 0;
    for (r, row) in table.rows.iter().enumerate() {
        let line = table.lines.get(r).copied().unwrap_or(r + 2);
        let (image, probe, label) = (&row[ci], &row[cp], &row[cl]);
        let img = results.images.iter().find(|i| {
            i.path.to_string_lossy() == image.as_str()
                || i.path
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy() == image.as_str())
        });
        let Some(img) = img else {
            unmatched += 1;
            continue;
        };
        let Some(ans) = img.probes.iter().find(|a| &a.probe == probe) else {
            return Err(Error::field(
                labels_csv,
                format!("line {line}: probe"),
                format!("`{probe}` is not a probe of the suite"),
            ));
        };
        let Some(t) = ans.labels.iter().position(|l| l == label) else {
            return Err(Error::field(
                labels_csv,
                format!("line {line}: label"),
                format!(
                    "`{label}` is not a label of probe `{probe}` (labels: {})",
                    ans.labels.join(", ")
                ),
            ));
        };
        let mut order: Vec<usize> = (0..ans.probs.len()).collect();
        order.sort_by(|&a, &b| ans.probs[b].total_cmp(&ans.probs[a]));
        let entry = scores.entry(probe.clone()).or_insert_with(|| {
            let n = ans.labels.len();
            (ans.labels.clone(), vec![vec![0; n]; n], 0, 0)
        });
        entry.1[t][order[0]] += 1;
        entry.2 += 1;
        if order.iter().take(k).any(|&p| p == t) {
            entry.3 += 1;
        }
    }
    let probes = scores
        .into_iter()
        .map(|(probe, (labels, confusion, n, topk))| {
            let correct: usize = (0..labels.len()).map(|i| confusion[i][i]).sum();
            let recall = labels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let total: usize = confusion[i].iter().sum();
                    (
                        l.clone(),
                        (total > 0).then(|| confusion[i][i] as f64 / total as f64),
                    )
                })
                .collect();
            ProbeScore {
                probe,
                n,
                accuracy: correct as f64 / n as f64,
                k,
                top_k_accuracy: topk as f64 / n as f64,
                recall,
                labels,
                confusion,
            }
        })
        .collect();
    Ok(Evaluation {
        labels_file: labels_csv.display().to_string(),
        probes,
        unmatched_rows: unmatched,
    })
}
