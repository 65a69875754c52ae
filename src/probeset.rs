//! AI-art probe sets for human annotation: from a finished run, `labels.csv` (what each image
//! was meant to show), `clip_scores.csv` (what the probe CLIP saw) and a blinded annotation
//! sheet (`annotation.csv` and a self-contained `annotation.html` form that saves the same CSV,
//! showing copies of the images under neutral ids in a shuffled order), so `artguide agree`
//! can measure CLIP-human agreement on the returned ratings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::run::results::{RunItem, RunResults};
use crate::{Error, Result};

/// Folder (inside the run folder) of the images as raters see them: `<sheet_id>.png`.
pub const SHEET_DIR: &str = "sheet";

/// Column joining the sheet to `labels.csv` and `clip_scores.csv` (`agree --key sheet_id`).
pub const KEY: &str = "sheet_id";

/// Column of the sheet holding the intended target the adherence question was asked against.
pub const INTENDED: &str = "intended";

/// Rating columns of the annotation sheet: (column, question shown to the rater).
pub const RATINGS: [(&str, &str); 4] = [
    (
        "adherence",
        "How well does the image show the intended target? (1-5)",
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

/// The sheet's order and ids: for each item (plan order) its neutral id, and the item
/// indices in the order raters see them.
struct Sheet {
    ids: Vec<String>,
    order: Vec<usize>,
}

/// Shuffles the items with a ChaCha8 generator seeded from the recipe name and the item ids
/// (so the same recipe gives the same bytes) and numbers them in that order: arms of a cell
/// no longer sit side by side predictably, and ids say nothing about the condition.
fn sheet_order(results: &RunResults) -> Sheet {
    let mut h = Sha256::new();
    h.update(results.recipe.as_bytes());
    for it in &results.items {
        h.update(b"\n");
        h.update(it.id.as_bytes());
    }
    let digest = h.finalize();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    let mut order: Vec<usize> = (0..results.items.len()).collect();
    crate::probe::shuffle(
        &mut ChaCha8Rng::seed_from_u64(u64::from_le_bytes(seed)),
        &mut order,
    );
    let width = order.len().to_string().len().max(4);
    let mut ids = vec![String::new(); order.len()];
    for (pos, &k) in order.iter().enumerate() {
        ids[k] = format!("{:0width$}", pos + 1);
    }
    Sheet { ids, order }
}

/// The item's intended target as the rater reads it (`style Baroque; period 17th`, suite
/// order), empty for an item without one.
fn intended_text(results: &RunResults, it: &RunItem) -> String {
    let Some(t) = &it.target else {
        return String::new();
    };
    let mut names: Vec<&String> = results
        .suite
        .iter()
        .map(|s| &s.name)
        .filter(|n| t.labels.contains_key(*n))
        .collect();
    let rest: Vec<&String> = t.labels.keys().filter(|k| !names.contains(k)).collect();
    names.extend(rest);
    names
        .iter()
        .map(|n| format!("{n} {}", t.labels[*n]))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The item's image inside `run_dir`; results naming a path that leaves it are refused.
fn image_path(run_dir: &Path, it: &RunItem) -> Result<PathBuf> {
    let rel = Path::new(&it.image);
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::file(
            run_dir.join(crate::run::results::RESULTS_FILE),
            format!(
                "image `{}` of {} is not a path inside the run folder",
                it.image, it.id
            ),
        ));
    }
    Ok(run_dir.join(rel))
}

/// Writes each image as `sheet/<id>.png` (atomically, in sheet order), re-encoded without its `parameters`
/// text, which names the arm and the prompt; the run's own images stay as they are. Other
/// PNGs left in `sheet/` by an earlier probe set are removed so the folder matches the form.
fn write_sheet_images(run_dir: &Path, results: &RunResults, sheet: &Sheet) -> Result<PathBuf> {
    let dir = run_dir.join(SHEET_DIR);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::file(
            &dir,
            "is a symbolic link inside the run folder; refusing to write through it",
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut names = BTreeSet::new();
    // In sheet order: files written in plan order would give the arms away to anyone who
    // sorts the folder by date (or by inode).
    for &k in &sheet.order {
        let (it, id) = (&results.items[k], &sheet.ids[k]);
        let src = image_path(run_dir, it)?;
        // Raters must see the image whose CLIP scores and labels the key joins them to.
        if crate::output::sha256_file(&src)? != it.sha256 {
            return Err(Error::file(
                &src,
                "differs from the image results.json recorded (sha256): raters would rate \
                 another image than the one scored",
            ));
        }
        let png = crate::output::read_png(&src)?;
        let bytes = crate::output::encode_png(&png.rgb, png.width, png.height, "")?;
        let name = format!("{id}.png");
        crate::output::write_atomic(&dir.join(&name), &bytes, true)?;
        names.insert(name);
    }
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let e = e.map_err(|err| Error::io(&dir, err))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e
            .file_type()
            .map_err(|err| Error::io(e.path(), err))?
            .is_file();
        if is_file && name.ends_with(".png") && !names.contains(&name) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(dir)
}

/// Columns of `annotation.csv` and of the CSV the form saves.
fn sheet_columns(probes: &[String]) -> Vec<String> {
    std::iter::once(KEY.to_string())
        .chain(probes.iter().map(|p| format!("perceived_{p}")))
        .chain(std::iter::once(INTENDED.to_string()))
        .chain(RATINGS.iter().map(|(c, _)| c.to_string()))
        .chain(std::iter::once("notes".to_string()))
        .collect()
}

/// Writes `labels.csv`, `clip_scores.csv` (both in plan order, with each image's `sheet_id`),
/// `annotation.csv` (in sheet order) and `annotation.html`, and the `sheet/` images, into
/// `run_dir` (atomically) and returns their paths.
pub fn write(run_dir: &Path, results: &RunResults) -> Result<Vec<PathBuf>> {
    let probes = target_probes(results);
    let layout = sheet_order(results);
    let (ids, order) = (&layout.ids[..], &layout.order[..]);
    let mut labels = vec![{
        let mut h: Vec<String> = ["image", KEY, "experiment", "subject"]
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
        let mut h = vec!["image".to_string(), KEY.to_string()];
        for p in &probes {
            h.push(format!("p_intended_{p}"));
            h.push(format!("top_{p}"));
        }
        h
    }];
    for (it, id) in results.items.iter().zip(ids) {
        let intended = |p: &str| {
            it.target
                .as_ref()
                .and_then(|t| t.labels.get(p).cloned())
                .unwrap_or_default()
        };
        let mut row = vec![
            it.image.clone(),
            id.clone(),
            it.experiment.clone(),
            it.subject.clone(),
        ];
        row.extend(probes.iter().map(|p| intended(p)));
        row.extend([
            it.seed.to_string(),
            it.arm.clone(),
            results.model.clone(),
            it.prompt.clone(),
        ]);
        labels.push(row);

        let answers = it.probes.get(&results.probe_clip);
        let mut row = vec![it.image.clone(), id.clone()];
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
    }
    let columns = sheet_columns(&probes);
    let mut sheet = vec![columns.clone()];
    for &k in order {
        let mut row: BTreeMap<&str, String> = BTreeMap::new();
        row.insert(KEY, ids[k].clone());
        row.insert(INTENDED, intended_text(results, &results.items[k]));
        sheet.push(
            columns
                .iter()
                .map(|c| row.get(c.as_str()).cloned().unwrap_or_default())
                .collect(),
        );
    }
    // Images first: a form never names a sheet image that is not there yet.
    let sheet_dir = write_sheet_images(run_dir, results, &layout)?;
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
    let html = annotation_html(results, &probes, ids, order);
    crate::output::write_atomic(&p, html.as_bytes(), true)?;
    paths.push(p);
    paths.push(sheet_dir);
    Ok(paths)
}

/// A self-contained form (no network) in sheet order: each image (`sheet/<id>.png`, under its
/// id only) with a select per target probe and the rating questions; the adherence question
/// shows the intended target, folded so it does not prime the perceived-label answers, and is
/// left out for an image without a target. Answers are kept in the browser's local storage as
/// they are given, under a key made from the sheet's ids and image hashes ("Start over" clears
/// them for the next rater); "Save CSV" asks for the rater's name and downloads `annotation.csv`'s
/// columns as `annotation-<name>.csv`, one file per rater for `agree --ratings`.
fn annotation_html(
    results: &RunResults,
    probes: &[String],
    ids: &[String],
    order: &[usize],
) -> String {
    let esc = crate::report::escape;
    let mut body = String::new();
    for &k in order {
        let id = esc(&ids[k]);
        body.push_str(&format!(
            "<section class=\"item\" data-key=\"{id}\"><img src=\"{SHEET_DIR}/{id}.png\" alt=\"image {id}\" loading=\"lazy\"><div class=\"q\"><p class=\"id\">{id}</p>"
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
                p = esc(p)
            ));
            for l in labels {
                body.push_str(&format!("<option>{}</option>", esc(&l)));
            }
            body.push_str("</select></label>");
        }
        let number = |col: &str, q: &str| {
            format!(
                "<label>{q} <input type=\"number\" min=\"1\" max=\"5\" step=\"1\" data-col=\"{col}\"></label>",
                q = esc(q)
            )
        };
        for (col, q) in RATINGS.iter().filter(|(c, _)| *c != "adherence") {
            body.push_str(&number(col, q));
        }
        let intended = intended_text(results, &results.items[k]);
        let adherence = RATINGS.iter().find(|(c, _)| *c == "adherence");
        if let (false, Some((col, q))) = (intended.is_empty(), adherence) {
            body.push_str(&format!(
                "<details class=\"adherence\"><summary>Intended target (open after answering the questions above)</summary><p class=\"intended\">Intended: {i}</p>{q}<input type=\"hidden\" data-col=\"{INTENDED}\" value=\"{i}\"></details>",
                i = esc(&intended),
                q = number(col, q)
            ));
        }
        body.push_str(
            "<label>Notes <input type=\"text\" data-col=\"notes\"></label></div></section>\n",
        );
    }
    let columns = sheet_columns(probes);
    let columns_js = serde_json::to_string(&columns).unwrap_or_else(|_| "[]".into());
    // Stored answers belong to these images: a sheet re-made from other images (a new model,
    // same recipe and ids) must not show the old answers.
    let mut h = Sha256::new();
    for &k in order {
        h.update(ids[k].as_bytes());
        h.update(b" ");
        h.update(results.items[k].sha256.as_bytes());
        h.update(b"\n");
    }
    let sheet_hash = &format!("{:x}", h.finalize())[..16];
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Annotation: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em auto; max-width: 70em; }}
.item {{ display: flex; gap: 1em; border-bottom: 1px solid #ccc; padding: 1em 0; }}
.item img {{ width: 256px; height: auto; image-rendering: auto; }}
.q label {{ display: block; margin: .3em 0; }}
.id {{ color: #666; font-size: .8em; }}
.q details {{ margin: .6em 0; }}
.intended {{ font-weight: bold; }}
button {{ font-size: 1.1em; padding: .4em 1em; }}
</style></head><body>
<h1>Annotation: {title}</h1>
<p>Look at each image and answer; images are numbered in a random order. Answer the
questions above <i>Intended target</i> before opening it. Leave a question empty if unsure. Answers are kept in this
browser as you go, so the page can be closed and reopened. When done, press <b>Save CSV</b> and send the downloaded
<code>annotation-&lt;your name&gt;.csv</code> back. Nothing leaves this page otherwise.</p>
<p><label>Your name or initials <input type="text" id="rater" autocomplete="off"></label>
<button id="reset" type="button">Start over (new rater)</button></p>
{body}
<p><button id="save">Save CSV</button></p>
<script>
const columns = {columns_js};
// Answers survive a closed tab: kept per sheet (its title and ids) in this browser.
const store = 'artguide-annotation:{sheet_hash}';
function field(v) {{ v = String(v); return /[",\n\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }}
function saved() {{ try {{ return JSON.parse(localStorage.getItem(store)) || {{}}; }} catch (e) {{ return {{}}; }} }}
function keep() {{
  const all = {{ rater: document.getElementById('rater').value, items: {{}} }};
  for (const s of document.querySelectorAll('section.item')) {{
    const row = all.items[s.dataset.key] = {{}};
    for (const el of s.querySelectorAll('[data-col]')) if (el.type !== 'hidden') row[el.dataset.col] = el.value;
  }}
  try {{ localStorage.setItem(store, JSON.stringify(all)); }} catch (e) {{}}
}}
const before = saved();
document.getElementById('rater').value = before.rater || '';
for (const s of document.querySelectorAll('section.item')) {{
  const row = (before.items || {{}})[s.dataset.key] || {{}};
  for (const el of s.querySelectorAll('[data-col]')) if (el.type !== 'hidden' && row[el.dataset.col] !== undefined) el.value = row[el.dataset.col];
}}
document.addEventListener('input', keep);
document.addEventListener('change', keep);
document.getElementById('reset').addEventListener('click', () => {{
  if (!confirm('Clear the name and every answer on this page?')) return;
  try {{ localStorage.removeItem(store); }} catch (e) {{}}
  document.getElementById('rater').value = '';
  for (const el of document.querySelectorAll('section.item [data-col]')) if (el.type !== 'hidden') el.value = '';
}});
document.getElementById('save').addEventListener('click', () => {{
  const rater = document.getElementById('rater').value.trim();
  if (!rater) {{ alert('Please type your name or initials first: each rater\'s file must have its own name.'); document.getElementById('rater').focus(); return; }}
  const rows = [columns.map(field).join(',')];
  for (const s of document.querySelectorAll('section.item')) {{
    const row = {{ {KEY}: s.dataset.key }};
    for (const el of s.querySelectorAll('[data-col]')) row[el.dataset.col] = el.value;
    rows.push(columns.map(c => field(row[c] ?? '')).join(','));
  }}
  const blob = new Blob([rows.join('\n') + '\n'], {{ type: 'text/csv' }});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  const name = rater.replace(/[^\p{{L}}\p{{N}}_-]+/gu, '_').replace(/^_+|_+$/g, '');
  a.download = 'annotation-' + (name || 'rater') + '.csv';
  a.click();
}});
</script>
</body></html>
"#,
        title = crate::report::escape(&results.recipe),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results of `n` items over two arms, with `style`/`period` targets (none for item 0).
    fn results(n: usize) -> RunResults {
        let items: Vec<serde_json::Value> = (0..n)
            .map(|k| {
                let arm = if k % 2 == 0 { "baseline" } else { "guided" };
                let id = format!("e/s00-t00-seed{}/{arm}", k / 2);
                serde_json::json!({
                    "id": id, "experiment": "e", "cell": format!("s00-t00-seed{}", k / 2),
                    "subject": "a harbour",
                    "target": (k > 0).then(|| serde_json::json!({
                        "text": "t", "labels": {"style": "Baroque", "period": "17th"}
                    })),
                    "seed": k / 2, "arm": arm, "baseline": k % 2 == 0, "prompt": "p",
                    "image": format!("images/{id}.png"), "sha256": "", "probes": {}
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "tool": "artguide", "version": "0", "recipe": "r", "model": "m", "probe_clip": "c",
            "guide_clip": null, "items": items,
            "suite": [{"name": "style", "labels": ["Baroque"]},
                      {"name": "period", "labels": ["17th"]}]
        }))
        .unwrap()
    }

    #[test]
    fn the_sheet_order_is_a_seeded_shuffle_with_neutral_ids() {
        let r = results(40);
        let Sheet { ids, order } = sheet_order(&r);
        let again = sheet_order(&r);
        assert_eq!((&again.ids, &again.order), (&ids, &order));
        assert_ne!(order, (0..40).collect::<Vec<_>>());
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
        for (pos, &k) in order.iter().enumerate() {
            assert_eq!(ids[k], format!("{:04}", pos + 1));
        }
    }

    #[test]
    fn the_intended_target_is_in_suite_order_and_empty_without_one() {
        let r = results(2);
        assert_eq!(intended_text(&r, &r.items[0]), "");
        assert_eq!(intended_text(&r, &r.items[1]), "style Baroque; period 17th");
    }

    #[test]
    fn the_form_names_no_arm_or_path_and_asks_adherence_only_with_a_target() {
        let r = results(4);
        let probes = target_probes(&r);
        let Sheet { ids, order } = sheet_order(&r);
        let html = annotation_html(&r, &probes, &ids, &order);
        for leak in ["baseline", "guided", "images/", "seed0", "e/s00"] {
            assert!(!html.contains(leak), "{leak}");
        }
        assert_eq!(html.matches("data-col=\"adherence\"").count(), 3);
        assert_eq!(
            html.matches("Intended: style Baroque; period 17th").count(),
            3
        );
        // Answers kept in the browser belong to these images: other pixels under the same
        // recipe and ids get another storage key.
        let key = |html: &str| {
            html.split("const store = '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .map(String::from)
                .unwrap()
        };
        let mut other = r.clone();
        other.items[2].sha256 = "ff".into();
        let html2 = annotation_html(&other, &probes, &ids, &order);
        assert_ne!(key(&html), key(&html2));
        assert_eq!(key(&html), key(&annotation_html(&r, &probes, &ids, &order)));
        assert!(html.contains("id=\"rater\"") && html.contains("id=\"reset\""));
    }

    /// Sheet files are written in sheet order: sorted by modification time they list the
    /// sheet ids in order, not the plan's arms.
    #[test]
    fn sheet_files_are_written_in_sheet_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = results(12);
        for (k, it) in r.items.iter_mut().enumerate() {
            let p = tmp.path().join(&it.image);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let rgb = vec![k as u8; 2 * 2 * 3];
            let png = crate::output::encode_png(&rgb, 2, 2, "arm text").unwrap();
            std::fs::write(&p, png).unwrap();
            it.sha256 = crate::output::sha256_file(&p).unwrap();
        }
        let layout = sheet_order(&r);
        let dir = write_sheet_images(tmp.path(), &r, &layout).unwrap();
        let mut files: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let t = e.metadata().unwrap().modified().unwrap();
                (t, e.file_name().to_string_lossy().into_owned())
            })
            .collect();
        files.sort();
        let by_time: Vec<&str> = files.iter().map(|f| f.1.as_str()).collect();
        let by_name: Vec<String> = (1..=12).map(|i| format!("{i:04}.png")).collect();
        assert_eq!(by_time, by_name);
    }

    #[test]
    fn images_outside_the_run_folder_are_refused() {
        let mut r = results(1);
        for bad in ["../x.png", "/etc/x.png", "images/../../x.png", ""] {
            r.items[0].image = bad.into();
            assert!(image_path(Path::new("run"), &r.items[0]).is_err(), "{bad}");
        }
        r.items[0].image = "images/a/b.png".into();
        assert!(image_path(Path::new("run"), &r.items[0]).is_ok());
    }
}
