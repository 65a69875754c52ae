//! `report.html` of a comparison: self-contained (inline CSS and SVG, no scripts, no network),
//! with image grids that link the runs' PNGs by relative path, bar charts of the target shift
//! with its interval per arm and probe model, and the tables of every metric.

mod svg;

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::compare::{cells, Loaded, Summary};
use crate::{Error, Result};

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A relative path as a URL path: every byte outside RFC 3986's unreserved characters and
/// `/` percent-encoded (UTF-8), so folder names with `#`, `%`, `?` or spaces still link to
/// their images (a browser reads `#` as a fragment and `%` as an escape).
pub fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `to` relative to the folder `from` (both made absolute first), with `/` separators.
pub fn relative(from: &Path, to: &Path) -> Result<String> {
    let abs = |p: &Path| -> Result<PathBuf> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io(p, e))?
                .join(p)
        };
        // Lexical normalisation (the files may not all exist yet).
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other),
            }
        }
        Ok(out)
    };
    let (from, to) = (abs(from)?, abs(to)?);
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); f.len() - common];
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    Ok(parts.join("/"))
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_default()
}

/// Fewer pairs than this and the report warns that the bootstrap interval is unreliable.
const SMALL_N: usize = 10;

/// The report for `summary`, to be written into the folder `out`.
pub fn html(loaded: &Loaded, summary: &Summary, out: &Path) -> Result<String> {
    let mut h = String::new();
    let title = format!("artguide comparison: {}", summary.recipes.join(", "));
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 1em auto; max-width: 80em; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: .5em 0 1.5em; font-size: .85em; }}\n\
         th, td {{ border: 1px solid #ccc; padding: .2em .5em; text-align: right; }}\n\
         th:first-child, td:first-child {{ text-align: left; }}\n\
         .grid img {{ width: 160px; height: auto; display: block; }}\n\
         .grid td {{ text-align: center; vertical-align: top; }}\n\
         .note {{ color: #555; font-size: .9em; }}\n</style></head><body>\n<h1>{}</h1>",
        escape(&title),
        escape(&title)
    );
    let _ = writeln!(
        h,
        "<p class=\"note\">Held-out probe CLIP: <code>{}</code>; guide CLIP: <code>{}</code> (rows marked <i>guide</i> are scored by the CLIP that guided that arm; an arm may name its own). {}, {} without a baseline partner. Intervals: {:.0}% percentile bootstrap over pairs ({} resamples, seed {}). Sign test: exact binomial; Wilcoxon: exact signed-rank distribution (normal approximation above 50 pairs).</p>",
        escape(&summary.probe_clip),
        escape(summary.guide_clip.as_deref().unwrap_or("none")),
        crate::progress::count(summary.items, "image"),
        crate::progress::count(summary.unpaired, "guided image"),
        summary.level * 100.0,
        summary.resamples,
        summary.seed
    );
    let tests = summary
        .rows
        .iter()
        .filter(|r| r.wilcoxon_p.is_some())
        .count();
    if tests > 1 {
        let _ = writeln!(
            h,
            "<p class=\"note\">Holm p: the Wilcoxon p adjusted by Holm's step-down method over the {tests} tested rows of this report (all experiments, arms and probe models), so a row with Holm p &lt; 0.05 stays significant at 5% family-wise; the sign and Wilcoxon p-values are per row. r: matched-pairs rank-biserial correlation, from -1 (every pair fell) to 1 (every pair rose).</p>"
        );
    }
    let grids = cells(loaded);
    // Experiments in first-seen order, each once (rows of several runs may interleave).
    let mut experiments: Vec<&str> = Vec::new();
    for exp in summary
        .rows
        .iter()
        .map(|r| r.experiment.as_str())
        .chain(grids.keys().map(String::as_str))
    {
        if !experiments.contains(&exp) {
            experiments.push(exp);
        }
    }
    for exp in experiments {
        let _ = writeln!(h, "<h2>Experiment {}</h2>", escape(exp));
        let rows: Vec<_> = summary
            .rows
            .iter()
            .filter(|r| r.experiment == exp)
            .collect();
        let targeted: Vec<_> = rows
            .iter()
            .filter(|r| r.targeted && r.mean_shift.is_some())
            .collect();
        if !targeted.is_empty() {
            h.push_str("<h3>Shift of the target label's probability (arm - baseline)</h3>\n");
            let bars: Vec<svg::Bar> = targeted
                .iter()
                .map(|r| svg::Bar {
                    label: format!("{} · {} · {}", r.arm, r.probe, r.role),
                    value: r.mean_shift.unwrap_or(0.0),
                    low: r.ci_low.unwrap_or(0.0),
                    high: r.ci_high.unwrap_or(0.0),
                    guide: r.role == "guide",
                })
                .collect();
            h.push_str(&svg::bar_chart(&bars));
            h.push_str("<table><tr><th>arm</th><th>probe</th><th>model</th><th>n</th><th>mean shift</th><th>95% CI</th><th>flip rate</th><th>sign p</th><th>Wilcoxon p</th><th>Holm p</th><th>r</th><th>KL</th></tr>\n");
            for r in &targeted {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>[{}, {}]</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
                    escape(&r.arm), escape(&r.probe), escape(&r.model), escape(&r.role), r.n,
                    fmt(r.mean_shift, 4), fmt(r.ci_low, 4), fmt(r.ci_high, 4), fmt(r.flip_rate, 3),
                    fmt(r.sign_p, 4), fmt(r.wilcoxon_p, 4), fmt(r.wilcoxon_p_holm, 4),
                    fmt(r.rank_biserial, 3), r.mean_kl
                );
            }
            h.push_str("</table>\n");
            if targeted.iter().any(|r| r.n < SMALL_N) {
                let _ = writeln!(
                    h,
                    "<p class=\"note\">Rows with n &lt; {SMALL_N} pairs: a percentile bootstrap interval over so few pairs is too narrow (with 2 pairs it spans only their values); read the exact sign and Wilcoxon p-values instead.</p>"
                );
            }
        }
        let by_target: Vec<_> = summary
            .targets
            .iter()
            .filter(|t| t.row.experiment == exp)
            .collect();
        let labels: std::collections::BTreeSet<&str> =
            by_target.iter().map(|t| t.label.as_str()).collect();
        // With one target the breakdown repeats the table above.
        if labels.len() > 1 {
            h.push_str("<h3>By target: which targets moved, and what the probe saw</h3>\n<table><tr><th>arm</th><th>probe</th><th>model</th><th>target</th><th>n</th><th>mean shift</th><th>95% CI</th><th>flip rate</th><th>Wilcoxon p</th><th>Holm p</th><th>top labels, guided</th><th>top labels, baseline</th></tr>\n");
            for t in by_target {
                let r = &t.row;
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{} ({})</td><td>{}</td><td>{}</td><td>{}</td><td>[{}, {}]</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&r.arm), escape(&r.probe), escape(&r.model), escape(&r.role),
                    escape(&t.label), r.n, fmt(r.mean_shift, 4), fmt(r.ci_low, 4),
                    fmt(r.ci_high, 4), fmt(r.flip_rate, 3), fmt(r.wilcoxon_p, 4),
                    fmt(r.wilcoxon_p_holm, 4), escape(&top_text(&t.arm_top)),
                    escape(&top_text(&t.baseline_top))
                );
            }
            h.push_str("</table>\n<p class=\"note\">Holm p here is adjusted over every row of this breakdown (a second family, apart from the pooled rows above). Top labels: how many images had each top label, most frequent first.</p>\n");
        }
        let side: Vec<_> = rows.iter().filter(|r| !r.targeted).collect();
        if !side.is_empty() {
            h.push_str("<h3>Side effects: probes the target does not name</h3>\n<table><tr><th>arm</th><th>probe</th><th>model</th><th>n</th><th>mean KL (nats)</th><th>top label changed</th></tr>\n");
            for r in side {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{} ({})</td><td>{}</td><td>{:.4}</td><td>{:.3}</td></tr>",
                    escape(&r.arm), escape(&r.probe), escape(&r.model), escape(&r.role), r.n,
                    r.mean_kl, r.top_change_rate
                );
            }
            h.push_str("</table>\n");
        }
        if let Some(cells) = grids.get(exp) {
            h.push_str("<h3>Images: baseline and arms per cell</h3>\n<table class=\"grid\">\n");
            for (cell, items) in cells {
                let _ = write!(h, "<tr><td>{}</td>", escape(cell));
                for (dir, it) in items {
                    let src = relative(out, &dir.join(&it.image))?;
                    let _ = write!(
                        h,
                        "<td><img src=\"{}\" alt=\"{}\">{}<br><span class=\"note\">{}</span></td>",
                        escape(&url_path(&src)),
                        escape(&it.id),
                        escape(&it.arm),
                        escape(&it.prompt)
                    );
                }
                h.push_str("</tr>\n");
            }
            h.push_str("</table>\n");
        }
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// Top-label counts for a table cell: `Cubism 5, Baroque 1`.
fn top_text(counts: &std::collections::BTreeMap<String, usize>) -> String {
    crate::compare::by_count(counts)
        .iter()
        .map(|(l, c)| format!("{l} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::CompareRow;

    fn row(experiment: &str, n: usize) -> CompareRow {
        CompareRow {
            experiment: experiment.into(),
            arm: "g".into(),
            model: "m".into(),
            role: "probe".into(),
            probe: "style".into(),
            targeted: true,
            n,
            mean_shift: Some(0.1),
            ci_low: Some(0.05),
            ci_high: Some(0.15),
            sign_p: Some(0.5),
            wilcoxon_p: Some(0.5),
            wilcoxon_p_holm: Some(1.0),
            rank_biserial: Some(0.2),
            flip_rate: Some(0.0),
            mean_kl: 0.0,
            top_change_rate: 0.0,
        }
    }

    fn summary(rows: Vec<CompareRow>) -> Summary {
        Summary {
            tool: "artguide".into(),
            version: "0".into(),
            runs: vec![],
            recipes: vec!["r".into()],
            probe_clip: "m".into(),
            guide_clip: None,
            items: 0,
            unpaired: 0,
            resamples: 10,
            seed: 0,
            level: 0.95,
            rows,
            targets: vec![],
        }
    }

    /// Interleaved experiments (rows of several runs) get one section each; few pairs and
    /// many tests are pointed out.
    #[test]
    fn sections_once_and_cautions_where_due() {
        let none = Loaded { runs: vec![] };
        let s = summary(vec![row("e1", 20), row("e2", 20), row("e1", 20)]);
        let h = html(&none, &s, Path::new("/tmp")).unwrap();
        assert_eq!(h.matches("<h2>Experiment e1</h2>").count(), 1, "{h}");
        assert_eq!(h.matches("<h2>Experiment e2</h2>").count(), 1);
        assert!(
            h.contains("3 tested rows") && h.contains("<th>Holm p</th>"),
            "{h}"
        );
        assert!(!h.contains("Rows with n &lt;"));
        let h = html(&none, &summary(vec![row("e1", 2)]), Path::new("/tmp")).unwrap();
        assert!(
            h.contains("Rows with n &lt; 10 pairs") && !h.contains("tested rows"),
            "{h}"
        );
    }

    /// The breakdown by target shows only where an experiment has several targets, with the
    /// top labels most frequent first.
    #[test]
    fn breakdown_by_target_where_targets_differ() {
        let none = Loaded { runs: vec![] };
        let target = |label: &str| crate::compare::TargetRow {
            label: label.into(),
            row: row("e1", 20),
            arm_top: [("Cubism".to_string(), 2), ("Baroque".to_string(), 5)].into(),
            baseline_top: [("Baroque".to_string(), 7)].into(),
        };
        let mut s = summary(vec![row("e1", 20)]);
        s.targets = vec![target("Cubism")];
        let h = html(&none, &s, Path::new("/tmp")).unwrap();
        assert!(!h.contains("By target"), "{h}");
        s.targets.push(target("Baroque"));
        let h = html(&none, &s, Path::new("/tmp")).unwrap();
        assert!(h.contains("<h3>By target"), "{h}");
        assert!(
            h.contains("<td>Baroque 5, Cubism 2</td><td>Baroque 7</td>"),
            "{h}"
        );
    }

    #[test]
    fn url_paths_encode_what_a_browser_would_misread() {
        assert_eq!(
            url_path("../run/images/x-1_a.png"),
            "../run/images/x-1_a.png"
        );
        assert_eq!(
            url_path("../runs #2/100%?/Café x.png"),
            "../runs%20%232/100%25%3F/Caf%C3%A9%20x.png"
        );
    }

    #[test]
    fn relative_paths_walk_up_and_down() {
        assert_eq!(
            relative(Path::new("/a/b/out"), Path::new("/a/b/run/images/x.png")).unwrap(),
            "../run/images/x.png"
        );
        assert_eq!(
            relative(Path::new("/a/run"), Path::new("/a/run/images/x.png")).unwrap(),
            "images/x.png"
        );
        assert_eq!(
            escape("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
    }
}
