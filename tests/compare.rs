//! `compare` end to end: a smoke comparison recipe on the tiny models, then the summary
//! checked against an independent computation from results.json, and the report parsed for
//! references to files that do not exist.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_artguide"));
    c.env("HF_HUB_OFFLINE", "1");
    // Caches (model hashes, embeddings) under target/, not the user's home.
    c.env(
        "XDG_CACHE_HOME",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"),
    );
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/smoke/compare.yaml")
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn compare_summary_matches_results_and_report_is_self_contained() {
    let tmp = tempfile::tempdir().unwrap();
    // A folder name a browser would misread unencoded (`#` starts a fragment, `%` an escape).
    let run = tmp.path().join("run #1 100%");
    let o = bin()
        .args(["--quiet", "run"])
        .arg(recipe())
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let report_dir = tmp.path().join("report");
    let o = bin()
        .args(["--json", "compare"])
        .arg(&run)
        .arg("--out")
        .arg(&report_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The table is the result: --quiet keeps it (on stdout) and drops only the file list.
    let o = bin()
        .args(["--quiet", "compare"])
        .arg(&run)
        .arg("--out")
        .arg(tmp.path().join("quiet"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
    assert!(
        table.contains("| style | clip-text | style | probe | 6 |"),
        "{table}"
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary, on_disk);

    // Independent computation from results.json.
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    let items = r["items"].as_array().unwrap();
    // Each guided image records the CLIP that guided it; baselines record none.
    for it in items {
        let expected = if it["baseline"] == true {
            serde_json::Value::Null
        } else {
            r["guide_clip"].clone()
        };
        assert_eq!(
            it.get("guide_clip").cloned().unwrap_or_default(),
            expected,
            "{it}"
        );
    }
    let rows = summary["rows"].as_array().unwrap();
    let models = [
        r["probe_clip"].as_str().unwrap(),
        r["guide_clip"].as_str().unwrap(),
    ];
    let mut checked = 0;
    for model in models {
        for probe in ["style", "period"] {
            let (mut shifts, mut flips, mut kls, mut changes) = (vec![], 0, vec![], 0);
            for a in items.iter().filter(|i| i["arm"] == "clip-text") {
                let b = items
                    .iter()
                    .find(|i| i["baseline"] == true && i["cell"] == a["cell"])
                    .unwrap();
                let ans = |it: &serde_json::Value| {
                    it["probes"][model]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|x| x["probe"] == probe)
                        .unwrap()
                        .clone()
                };
                let (pa, pb) = (ans(a), ans(b));
                let probs = |x: &serde_json::Value| -> Vec<f64> {
                    x["probs"].as_array().unwrap().iter().map(f).collect()
                };
                let (qa, qb) = (probs(&pa), probs(&pb));
                kls.push(
                    qa.iter()
                        .zip(&qb)
                        .filter(|(p, _)| **p > 0.0)
                        .map(|(p, q)| p * (p / q.max(1e-12)).ln())
                        .sum::<f64>(),
                );
                changes += usize::from(pa["top"] != pb["top"]);
                if probe == "style" {
                    let k = pa["labels"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .position(|l| l == "Impressionism")
                        .unwrap();
                    shifts.push(qa[k] - qb[k]);
                    flips +=
                        usize::from(pa["top"] == "Impressionism" && pb["top"] != "Impressionism");
                }
            }
            let row = rows
                .iter()
                .find(|x| x["model"] == model && x["probe"] == probe && x["arm"] == "clip-text")
                .unwrap();
            assert_eq!(row["n"], 6);
            assert!(
                (f(&row["mean_kl"]) - kls.iter().sum::<f64>() / 6.0).abs() < 1e-6,
                "{row}"
            );
            assert!((f(&row["top_change_rate"]) - changes as f64 / 6.0).abs() < 1e-12);
            if probe == "style" {
                assert_eq!(row["targeted"], true);
                let mean = shifts.iter().sum::<f64>() / 6.0;
                assert!((f(&row["mean_shift"]) - mean).abs() < 1e-6, "{row}");
                assert!(f(&row["ci_low"]) <= mean + 1e-9 && mean <= f(&row["ci_high"]) + 1e-9);
                assert!((f(&row["flip_rate"]) - flips as f64 / 6.0).abs() < 1e-12);
                assert!(f(&row["wilcoxon_p"]) > 0.0 && f(&row["wilcoxon_p"]) <= 1.0);
                // Holm over the whole report never lowers a p-value.
                assert!(f(&row["wilcoxon_p_holm"]) >= f(&row["wilcoxon_p"]));
                // Rank-biserial: average ranks of |d| (zeros dropped), signed, over their sum.
                let d: Vec<f64> = shifts.iter().copied().filter(|x| *x != 0.0).collect();
                let rank = |x: f64| {
                    let below = d.iter().filter(|y| y.abs() < x.abs()).count() as f64;
                    let tied = d.iter().filter(|y| y.abs() == x.abs()).count() as f64;
                    below + (tied + 1.0) / 2.0
                };
                let total: f64 = d.iter().map(|&x| rank(x)).sum();
                let rbc = d.iter().map(|&x| x.signum() * rank(x)).sum::<f64>() / total;
                assert!((f(&row["rank_biserial"]) - rbc).abs() < 1e-9, "{row}");
            } else {
                assert_eq!(row["targeted"], false);
                assert!(row["mean_shift"].is_null());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
    let csv = std::fs::read_to_string(report_dir.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + rows.len());
    // One target: its breakdown row is the pooled targeted row with the top labels added.
    let targets = summary["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "one per probe model");
    for t in targets {
        assert_eq!(t["label"], "Impressionism");
        let pooled = rows
            .iter()
            .find(|r| r["model"] == t["model"] && r["targeted"] == true && r["probe"] == "style")
            .unwrap();
        for k in [
            "n",
            "mean_shift",
            "wilcoxon_p",
            "rank_biserial",
            "flip_rate",
        ] {
            assert_eq!(t[k], pooled[k], "{k}");
        }
        let count = |m: &serde_json::Value| {
            m.as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>()
        };
        assert_eq!((count(&t["arm_top"]), count(&t["baseline_top"])), (6, 6));
    }
    let csv = std::fs::read_to_string(report_dir.join("targets.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + targets.len());

    // The report: no network, every referenced file exists.
    let html = std::fs::read_to_string(report_dir.join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "network reference"
    );
    assert!(!html.contains("<script"), "scripts are not needed");
    let mut refs = 0;
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().unwrap();
            let path = percent_decode(target);
            assert!(
                report_dir.join(&path).is_file(),
                "{target} ({path}) does not exist"
            );
            refs += 1;
        }
    }
    assert_eq!(refs, items.len(), "one image per item");
    assert!(html.matches("<svg").count() >= 1);
}

/// A URL path back to the file path, refusing any character a URL path must encode.
fn percent_decode(url: &str) -> String {
    let b = url.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            assert!(
                b[i].is_ascii_alphanumeric() || b"-._~/".contains(&b[i]),
                "{url}: unencoded {:?}",
                b[i] as char
            );
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn compare_bad_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let o = bin().arg("compare").arg(tmp.path()).output().unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("results.json"), "{err}");
    std::fs::write(
        tmp.path().join("results.json"),
        r#"{"tool": "artguide", "colour": 1}"#,
    )
    .unwrap();
    let o = bin().arg("compare").arg(tmp.path()).output().unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(
        err.contains("results.json") && err.contains("colour"),
        "{err}"
    );
}

/// Runs without targets have no intended shift to measure: compare prints how far each
/// probe's answers moved instead of an empty shift table, with the summary's figures.
#[test]
fn compare_without_targets_prints_how_far_answers_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(recipe())
        .unwrap()
        .replace(
            "    targets:\n      - text: an impressionist painting\n        labels: {style: Impressionism}\n",
            "",
        )
        .replace("\"{target}\"", "\"an oil painting\"")
        .replace("count: 3", "count: 1");
    assert!(!text.contains("targets:"), "{text}");
    // Beside the smoke recipe, so its relative paths resolve.
    let path = recipe().with_file_name(".test-compare-no-targets.yaml");
    std::fs::write(&path, &text).unwrap();
    let run = tmp.path().join("run");
    let o = bin()
        .args(["--quiet", "run"])
        .arg(&path)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bin()
        .args(["--quiet", "compare"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("mean KL (nats)"), "{table}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let rows = summary["rows"].as_array().unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let line = format!(
            "| {} | {} | {} | {} | {} | {:.4} | {:.2} |",
            r["experiment"].as_str().unwrap(),
            r["arm"].as_str().unwrap(),
            r["probe"].as_str().unwrap(),
            r["role"].as_str().unwrap(),
            r["n"],
            f(&r["mean_kl"]),
            f(&r["top_change_rate"])
        );
        assert!(table.contains(&line), "`{line}` missing from:\n{table}");
    }
}
