//! AI-art probe sets for human annotation: from a finished run, `labels.csv` (what each image
//! was meant to show), `clip_scores.csv` (what the probe CLIP saw) and an annotation sheet
//! (`annotation.csv` and a self-contained `annotation.html` form that saves the same CSV), so
//! `artguide agree` can measure CLIP-human agreement on the returned ratings.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::run::results::RunResults;
use crate::Result;

/// Rating columns of the annotation sheet: (column, question shown to the rater).
pub const RATINGS: [(&str, &str); 4] = [
    (
        "adherence",
        "How well does the image show the intended style and period? (1-5)",
    ),
    (
        "authenticity",
        "How much does it look made by a human artist? (1-5)",
    ),
    (
        "defects",
        "How visible are deformations and artifacts? (1 none - 5 severe)",
    ),
    ("quality", "Overall aesthetic quality (1-5)"),
];

/// The probes named by the runs' targets, in name order (`style`, `period`, ...).
fn target_probes(results: &RunResults) -> Vec<String> {
    let set: BTreeSet<String> = results
        .items
        .iter()
        .filter_map(|i| i.target.as_ref())
        .flat_map(|t| t.labels.keys().cloned())
        .collect();
    set.into_iter().collect()
}

/// Writes `labels.csv`, `clip_scores.csv`, `annotation.csv` and `annotation.html` into
/// `run_dir` (atomically) and returns their paths.
pub fn write(run_dir: &Path, results: &RunResults) -> Result<Vec<PathBuf>> {
    let probes = target_probes(results);
    let mut labels = vec![{
        let mut h: Vec<String> = ["image", "experiment", "subject"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        h.extend(probes.iter().map(|p| format!("intended_{p}")));
        h.extend(
            ["seed", "arm", "model", "prompt"]
                .iter()
                .map(|s| s.to_string()),
        );
        h
    }];
    let mut scores = vec![{
        let mut h = vec!["image".to_string()];
        for p in &probes {
            h.push(format!("p_intended_{p}"));
            h.push(format!("top_{p}"));
        }
        h
    }];
    let mut sheet = vec![{
        let mut h = vec!["image".to_string()];
        h.extend(probes.iter().map(|p| format!("perceived_{p}")));
        h.extend(RATINGS.iter().map(|(c, _)| c.to_string()));
        h.push("notes".into());
        h
    }];
    for it in &results.items {
        let intended = |p: &str| {
            it.target
                .as_ref()
                .and_then(|t| t.labels.get(p).cloned())
                .unwrap_or_default()
        };
        let mut row = vec![it.image.clone(), it.experiment.clone(), it.subject.clone()];
        row.extend(probes.iter().map(|p| intended(p)));
        row.extend([
            it.seed.to_string(),
            it.arm.clone(),
            results.model.clone(),
            it.prompt.clone(),
        ]);
        labels.push(row);

        let answers = it.probes.get(&results.probe_clip);
        let mut row = vec![it.image.clone()];
        for p in &probes {
            let a = answers.and_then(|v| v.iter().find(|a| &a.probe == p));
            let want = intended(p);
            let prob = a
                .and_then(|a| {
                    a.labels
                        .iter()
                        .position(|l| *l == want)
                        .map(|k| a.probs[k].to_string())
                })
                .unwrap_or_default();
            row.push(prob);
            row.push(a.map(|a| a.top.clone()).unwrap_or_default());
        }
        scores.push(row);

        let mut row = vec![it.image.clone()];
        row.extend(std::iter::repeat_n(
            String::new(),
            probes.len() + RATINGS.len() + 1,
        ));
        sheet.push(row);
    }
    let mut paths = Vec::new();
    for (name, mut table) in [
        ("labels.csv", labels),
        ("clip_scores.csv", scores),
        ("annotation.csv", sheet),
    ] {
        let header = table.remove(0);
        let p = run_dir.join(name);
        crate::probe::table::write_csv(&p, &header, &table)?;
        paths.push(p);
    }
    let p = run_dir.join("annotation.html");
    crate::output::write_atomic(&p, annotation_html(results, &probes).as_bytes(), true)?;
    paths.push(p);
    Ok(paths)
}

/// A self-contained form (no network): each image with a select per target probe and the
/// rating questions; "Save CSV" downloads the answers in `annotation.csv`'s columns.
fn annotation_html(results: &RunResults, probes: &[String]) -> String {
    let mut body = String::new();
    for (i, it) in results.items.iter().enumerate() {
        body.push_str(&format!(
            "<section class=\"item\" data-image=\"{img}\"><img src=\"{img}\" alt=\"image {n}\" loading=\"lazy\"><div class=\"q\"><p class=\"id\">{n}. {img}</p>",
            img = crate::report::escape(&it.image),
            n = i + 1
        ));
        for p in probes {
            let labels = results
                .suite
                .iter()
                .find(|s| &s.name == p)
                .map(|s| s.labels.clone())
                .unwrap_or_default();
            body.push_str(&format!(
                "<label>Which {p} does it look like? <select data-col=\"perceived_{p}\"><option value=\"\"></option>",
                p = crate::report::escape(p)
            ));
            for l in labels {
                body.push_str(&format!("<option>{}</option>", crate::report::escape(&l)));
            }
            body.push_str("</select></label>");
        }
        for (col, q) in RATINGS {
            body.push_str(&format!(
                "<label>{q} <input type=\"number\" min=\"1\" max=\"5\" step=\"1\" data-col=\"{col}\"></label>",
                q = crate::report::escape(q)
            ));
        }
        body.push_str(
            "<label>Notes <input type=\"text\" data-col=\"notes\"></label></div></section>\n",
        );
    }
    let columns: Vec<String> = std::iter::once("image".to_string())
        .chain(probes.iter().map(|p| format!("perceived_{p}")))
        .chain(RATINGS.iter().map(|(c, _)| c.to_string()))
        .chain(std::iter::once("notes".to_string()))
        .collect();
    let columns_js = serde_json::to_string(&columns).unwrap_or_else(|_| "[]".into());
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Annotation: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em auto; max-width: 70em; }}
.item {{ display: flex; gap: 1em; border-bottom: 1px solid #ccc; padding: 1em 0; }}
.item img {{ width: 256px; height: auto; image-rendering: auto; }}
.q label {{ display: block; margin: .3em 0; }}
.id {{ color: #666; font-size: .8em; }}
button {{ font-size: 1.1em; padding: .4em 1em; }}
</style></head><body>
<h1>Annotation: {title}</h1>
<p>Look at each image and answer without reading its file name. Leave a question empty if
unsure. When done, press <b>Save CSV</b> and send the downloaded <code>annotation.csv</code>
back. Nothing leaves this page otherwise.</p>
{body}
<p><button id="save">Save CSV</button></p>
<script>
const columns = {columns_js};
function field(v) {{ v = String(v); return /[",\n\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }}
document.getElementById('save').addEventListener('click', () => {{
  const rows = [columns.map(field).join(',')];
  for (const s of document.querySelectorAll('section.item')) {{
    const row = {{ image: s.dataset.image }};
    for (const el of s.querySelectorAll('[data-col]')) row[el.dataset.col] = el.value;
    rows.push(columns.map(c => field(row[c] ?? '')).join(','));
  }}
  const blob = new Blob([rows.join('\n') + '\n'], {{ type: 'text/csv' }});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = 'annotation.csv';
  a.click();
}});
</script>
</body></html>
"#,
        title = crate::report::escape(&results.recipe),
    )
}
