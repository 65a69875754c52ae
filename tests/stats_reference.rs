//! Reference tests of the embedding analyses (`artguide::probe`) against scikit-learn and
//! scipy, on the committed sample in tests/fixtures/embeddings/ (made by
//! tests/reference/make_stats_fixtures.py).

use std::path::{Path, PathBuf};

use artguide::probe::agree::{agree_files, correlate, AgreeOptions};
use artguide::probe::linear::{
    fit_rows, separate, separate_files, separate_with_folds, stratified_folds, LogisticModel,
    LogisticOptions, SeparateOptions,
};
use artguide::probe::npy::{read_npy, read_npy_header, write_npy, Dtype};
use artguide::probe::Matrix;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn folds() -> Vec<usize> {
    let text = std::fs::read_to_string(fixtures().join("folds.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["folds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn sample() -> (Matrix, Matrix) {
    (
        read_npy(fixtures().join("a.npy")).unwrap(),
        read_npy(fixtures().join("b.npy")).unwrap(),
    )
}

#[test]
fn npy_versions_and_dtypes_agree() {
    let (a, b) = sample();
    assert_eq!((a.rows, a.cols), (60, 64));
    assert_eq!((b.rows, b.cols), (60, 64));
    assert_eq!(
        read_npy_header(fixtures().join("a.npy")).unwrap().dtype,
        Dtype::F16
    );
    let a8 = fixtures().join("a_f8_v2.npy");
    let b4 = fixtures().join("b_f4_v3.npy");
    assert_eq!(read_npy_header(&a8).unwrap().version, (2, 0));
    assert_eq!(read_npy_header(&a8).unwrap().dtype, Dtype::F64);
    assert_eq!(read_npy_header(&b4).unwrap().version, (3, 0));
    // float16 values are exact in float32/float64.
    assert_eq!(read_npy(&a8).unwrap(), a);
    assert_eq!(read_npy(&b4).unwrap(), b);
    // Unit-norm CLIP embeddings truncated to 64 dims: values are small and not all zero.
    assert!(a.data.iter().all(|v| v.abs() < 1.0) && a.data.iter().any(|&v| v != 0.0));
}

#[test]
fn cross_validation_matches_scikit_learn() {
    let e = expected();
    let (a, b) = sample();
    let s = separate_with_folds(&a, &b, &folds(), &LogisticOptions::default()).unwrap();
    let p = s.scores.iter().map(|r| r.p_a).collect::<Vec<_>>();
    let lbfgs = floats(&e["p_a"]);
    let newton = floats(&e["p_a_newton_cholesky"]);
    let gap = |q: &[f64]| {
        p.iter()
            .zip(q)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    assert!(
        gap(&lbfgs) < 1e-4,
        "max |p - sklearn lbfgs| = {}",
        gap(&lbfgs)
    );
    assert!(
        gap(&newton) < 1e-6,
        "max |p - sklearn newton-cholesky| = {}",
        gap(&newton)
    );
    let acc = floats(&e["fold_accuracy"]);
    for (f, want) in s.fold_results.iter().zip(&acc) {
        assert!(
            (f.accuracy - want).abs() < 1e-12,
            "fold {}: {} vs {want}",
            f.fold,
            f.accuracy
        );
    }
    for (f, want) in s.fold_results.iter().zip(floats(&e["fold_auc"])) {
        assert!(
            (f.auc - want).abs() < 1e-12,
            "fold {} auc: {} vs {want}",
            f.fold,
            f.auc
        );
    }
    assert!((s.accuracy - e["accuracy"].as_f64().unwrap()).abs() < 1e-12);
    assert!((s.accuracy_std - e["accuracy_std"].as_f64().unwrap()).abs() < 1e-12);
    assert!((s.auc - e["auc"].as_f64().unwrap()).abs() < 1e-12);
    assert_eq!((s.n_a, s.n_b, s.dims, s.folds), (60, 60, 64, 5));
    assert_eq!(s.seed, None);
}

#[test]
fn fit_predict_on_an_explicit_split() {
    let e = expected();
    let (a, b) = sample();
    let folds = folds();
    let x = Matrix::from_rows(
        &(0..120)
            .map(|i| {
                if i < 60 {
                    a.row(i).to_vec()
                } else {
                    b.row(i - 60).to_vec()
                }
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let want = floats(&e["p_a_newton_cholesky"]);
    for f in 0..5 {
        let train: Vec<usize> = (0..120).filter(|&i| folds[i] != f).collect();
        let test: Vec<usize> = (0..120).filter(|&i| folds[i] == f).collect();
        let y: Vec<bool> = train.iter().map(|&i| i < 60).collect();
        let opts = LogisticOptions::default();
        let m = fit_rows(&x, &train, &y, &opts).unwrap();
        // The same through the matrix API.
        let m2 = LogisticModel::fit(&x.select_rows(&train), &y, &opts).unwrap();
        assert_eq!(m.weights, m2.weights);
        let p = m.predict_proba(&x.select_rows(&test)).unwrap();
        for (&i, p) in test.iter().zip(p) {
            assert!((p - want[i]).abs() < 1e-6, "row {i}: {p} vs {}", want[i]);
        }
        assert!(m.gradient <= opts.tol);
    }
}

fn agree_opts(rating: &str) -> AgreeOptions {
    let mut o = AgreeOptions::new("p_ai", rating);
    o.filter = Some(("class".into(), "ai".into()));
    o
}

#[test]
fn correlations_match_scipy() {
    let e = expected();
    let scores = fixtures().join("scores.csv");
    let ratings = fixtures().join("ratings.csv");
    for col in ["authenticity", "defects"] {
        let want = &e["correlations"][format!("p_ai~{col}")];
        let r = agree_files(&scores, &ratings, &agree_opts(col)).unwrap();
        assert_eq!(r.matching.key, "row");
        let c = &r.correlations;
        assert_eq!(c.n as u64, want["n"].as_u64().unwrap());
        assert_eq!(r.matching.skipped as u64, want["skipped"].as_u64().unwrap());
        assert_eq!(
            r.matching.filtered_out as u64,
            want["filtered_out"].as_u64().unwrap()
        );
        assert_eq!(
            r.matching.unmatched_scores as u64,
            want["unmatched_scores"].as_u64().unwrap()
        );
        assert_eq!(
            r.matching.unmatched_ratings as u64,
            want["unmatched_ratings"].as_u64().unwrap()
        );
        for (name, got) in [
            ("spearman", c.spearman.estimate),
            ("kendall", c.kendall.estimate),
            ("pearson", c.pearson.estimate),
        ] {
            let w = want[name].as_f64().unwrap();
            assert!((got - w).abs() < 1e-9, "{col} {name}: {got} vs scipy {w}");
        }
    }
    // Two heavily tied rating columns of the same file (ties in both variables).
    let want = &e["correlations"]["authenticity~defects"];
    let r = agree_files(
        &ratings,
        &ratings,
        &AgreeOptions::new("authenticity", "defects"),
    )
    .unwrap();
    assert_eq!(r.matching.key, "row");
    assert_eq!(r.matching.skipped as u64, want["skipped"].as_u64().unwrap());
    assert_eq!(r.correlations.n as u64, want["n"].as_u64().unwrap());
    for (name, got) in [
        ("spearman", r.correlations.spearman.estimate),
        ("kendall", r.correlations.kendall.estimate),
        ("pearson", r.correlations.pearson.estimate),
    ] {
        let w = want[name].as_f64().unwrap();
        assert!(
            (got - w).abs() < 1e-9,
            "authenticity~defects {name}: {got} vs scipy {w}"
        );
    }
}

#[test]
fn bootstrap_intervals_are_seeded_and_contain_the_estimate() {
    let scores = fixtures().join("scores.csv");
    let ratings = fixtures().join("ratings.csv");
    let o = agree_opts("authenticity");
    let r1 = agree_files(&scores, &ratings, &o).unwrap();
    let r2 = agree_files(&scores, &ratings, &o).unwrap();
    assert_eq!(r1, r2);
    let c = r1.correlations;
    assert_eq!((c.resamples, c.seed, c.level), (1000, 0, 0.95));
    for k in [c.spearman, c.kendall, c.pearson] {
        assert!(k.ci_low < k.estimate && k.estimate < k.ci_high, "{k:?}");
        assert!(
            k.ci_high - k.ci_low > 0.05 && k.ci_high - k.ci_low < 1.0,
            "{k:?}"
        );
        assert_eq!(k.undefined_resamples, 0);
    }
    let mut o3 = o.clone();
    o3.seed = 1;
    let r3 = agree_files(&scores, &ratings, &o3).unwrap();
    assert_eq!(r3.correlations.spearman.estimate, c.spearman.estimate);
    assert_ne!(r3.correlations.spearman.ci_low, c.spearman.ci_low);
    // The in-memory entry point gives the same numbers as the table one for the same pairs.
    let x = [0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.2];
    let y = [1.0, 2.0, 2.0, 4.0, 3.0, 3.0, 0.0];
    let a = correlate(&x, &y, 200, 5, 0.9).unwrap();
    assert_eq!(a, correlate(&x, &y, 200, 5, 0.9).unwrap());
}

#[test]
fn errors_name_files_and_columns() {
    let scores = fixtures().join("scores.csv");
    let ratings = fixtures().join("ratings.csv");
    // Unknown rating column: names the ratings file and the column, lists the columns.
    let e = agree_files(&scores, &ratings, &agree_opts("beauty"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ratings.csv") && e.contains("beauty"), "{e}");
    assert!(
        e.contains("`authenticity`") && e.contains("`defects`") && e.contains("`row`"),
        "{e}"
    );
    // Unknown score column.
    let e = agree_files(&scores, &ratings, &AgreeOptions::new("p_x", "defects")).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("scores.csv") && e.contains("p_x") && e.contains("`p_ai`"),
        "{e}"
    );
    // Unknown explicit key.
    let mut o = agree_opts("defects");
    o.key = Some("image".into());
    let e = agree_files(&scores, &ratings, &o).unwrap_err().to_string();
    assert!(
        e.contains("image") && e.contains("available columns"),
        "{e}"
    );
    // Without the class filter, `row` repeats in scores.csv.
    let e = agree_files(&scores, &ratings, &AgreeOptions::new("p_ai", "defects"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scores.csv") && e.contains("appears on lines"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    // Mismatched embedding widths.
    let (a, _) = sample();
    let narrow = dir.path().join("narrow.npy");
    write_npy(&narrow, &a.leading_columns(32)).unwrap();
    let e = separate_files(
        fixtures().join("a.npy"),
        &narrow,
        &SeparateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("narrow.npy") && e.contains("32") && e.contains("64"),
        "{e}"
    );
    // A truncated .npy.
    let bytes = std::fs::read(fixtures().join("a.npy")).unwrap();
    let cut = dir.path().join("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = read_npy(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.npy") && e.contains("truncated"), "{e}");
    // A header cut short.
    std::fs::write(&cut, &bytes[..40]).unwrap();
    let e = read_npy(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.npy") && e.contains("truncated"), "{e}");
    // Fortran order and an unsupported dtype.
    let patch = |from: &str, to: &str| {
        assert_eq!(from.len(), to.len());
        let mut b = bytes.clone();
        let at = b[..128]
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap();
        b[at..at + to.len()].copy_from_slice(to.as_bytes());
        b
    };
    let fortran = dir.path().join("fortran.npy");
    std::fs::write(
        &fortran,
        patch("'fortran_order': False", "'fortran_order': True "),
    )
    .unwrap();
    let e = read_npy(&fortran).unwrap_err().to_string();
    assert!(e.contains("fortran.npy") && e.contains("Fortran"), "{e}");
    let ints = dir.path().join("ints.npy");
    std::fs::write(&ints, patch("'<f2'", "'<i2'")).unwrap();
    let e = read_npy(&ints).unwrap_err().to_string();
    assert!(e.contains("ints.npy") && e.contains("<i2"), "{e}");
    // Not a .npy file at all.
    let e = read_npy(&scores).unwrap_err().to_string();
    assert!(e.contains("scores.csv") && e.contains("magic"), "{e}");
    // A missing file.
    let e = read_npy(dir.path().join("absent.npy"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.npy"), "{e}");
}

#[test]
fn seeded_separation_is_reproducible() {
    let (a, b) = sample();
    let opts = SeparateOptions {
        folds: 5,
        seed: 3,
        ..Default::default()
    };
    let s1 = separate(&a, &b, &opts).unwrap();
    let s2 = separate(&a, &b, &opts).unwrap();
    assert_eq!(s1, s2);
    assert_eq!(s1.seed, Some(3));
    let f = stratified_folds(60, 60, 5, 3).unwrap();
    assert!(s1.scores.iter().enumerate().all(|(i, r)| r.fold == f[i]));
    for fr in &s1.fold_results {
        assert_eq!(fr.n_test, 24);
    }
    let accs: Vec<f64> = s1.fold_results.iter().map(|f| f.accuracy).collect();
    let mean = accs.iter().sum::<f64>() / 5.0;
    let std = (accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
    assert!((s1.accuracy - mean).abs() < 1e-15 && (s1.accuracy_std - std).abs() < 1e-15);
    assert!(s1.accuracy > 0.7, "{}", s1.accuracy);
    let other = separate(&a, &b, &SeparateOptions { seed: 4, ..opts }).unwrap();
    assert_ne!(other.scores, s1.scores);
    // The scores CSV round-trips through the agreement reader.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.csv");
    s1.write_scores_csv(&out, "ai", "human").unwrap();
    let t = artguide::probe::table::Table::read(&out).unwrap();
    assert_eq!(t.headers, ["class", "row", "fold", "p_a"]);
    assert_eq!(t.rows.len(), 120);
    let p: f64 = t.rows[0][3].parse().unwrap();
    assert_eq!(p, s1.scores[0].p_a);
    // JSON has the summary, not the per-row scores.
    let j = serde_json::to_value(&s1).unwrap();
    assert!(j.get("scores").is_none() && j["accuracy_std"].is_number());
}

/// Several raters' sheets against scipy and the `krippendorff` package
/// (tests/reference/make_rater_fixtures.py): the score against the mean rating, alpha, and
/// each rater and the score against the mean of the other raters.
#[test]
fn several_raters_match_scipy_and_krippendorff() {
    use artguide::probe::agree::{agree_raters, krippendorff_alpha_interval};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/raters");
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let files: Vec<PathBuf> = (1..=4)
        .map(|r| dir.join(format!("annotation-rater{r}.csv")))
        .collect();
    let o = AgreeOptions::new("p_intended_style", "adherence");
    let a = agree_raters(dir.join("scores.csv"), &files, &o).unwrap();
    let close = |x: f64, y: &Value, what: &str| {
        let y = y.as_f64().unwrap();
        assert!((x - y).abs() < 1e-9, "{what}: {x} vs {y}");
    };
    assert_eq!(a.matching.key, "sheet_id");
    assert_eq!(a.correlations.n as u64, e["n"].as_u64().unwrap());
    assert_eq!(a.matching.skipped as u64, e["skipped"].as_u64().unwrap());
    close(a.correlations.spearman.estimate, &e["spearman"], "spearman");
    close(a.correlations.kendall.estimate, &e["kendall"], "kendall");
    close(a.correlations.pearson.estimate, &e["pearson"], "pearson");
    let r = a.raters.as_ref().expect("rater agreement with four files");
    close(r.krippendorff_alpha, &e["krippendorff_alpha"], "alpha");
    assert_eq!(r.units as u64, e["units"].as_u64().unwrap());
    assert_eq!(r.raters.len(), 4);
    for (got, want) in r.raters.iter().zip(e["raters"].as_array().unwrap()) {
        assert!(got.file.ends_with(want["file"].as_str().unwrap()));
        assert_eq!(got.n as u64, want["n"].as_u64().unwrap(), "{}", got.file);
        close(got.loo_spearman, &want["loo_spearman"], &got.file);
        close(got.score_spearman, &want["score_spearman"], &got.file);
    }
    // The worked example of Krippendorff (2011), interval alpha 0.849.
    let ex = &e["paper_example"];
    let data = ex["data"].as_array().unwrap();
    let units: Vec<Vec<f64>> = (0..data[0].as_array().unwrap().len())
        .map(|u| data.iter().filter_map(|row| row[u].as_f64()).collect())
        .collect();
    close(
        krippendorff_alpha_interval(&units),
        &ex["interval_alpha"],
        "paper",
    );
    // One file gives the single-rater result, with no rater agreement.
    let one = agree_raters(dir.join("scores.csv"), &files[..1], &o).unwrap();
    assert!(one.raters.is_none());
    assert!(one.matching.ratings_file.ends_with("annotation-rater1.csv"));
    // A key repeated in one rater's file is refused naming that file.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("annotation-rater5.csv");
    let text = std::fs::read_to_string(&files[1]).unwrap();
    let dup = text.lines().nth(1).unwrap().to_string();
    std::fs::write(&bad, format!("{text}{dup}\n")).unwrap();
    let err = agree_raters(dir.join("scores.csv"), &[files[0].clone(), bad], &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("annotation-rater5.csv") && err.contains("sheet_id"),
        "{err}"
    );
    // One file given twice is not two raters in perfect agreement.
    let again = dir.join("../raters/annotation-rater1.csv");
    let err = agree_raters(dir.join("scores.csv"), &[files[0].clone(), again], &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("twice") && err.contains("annotation-rater1.csv"),
        "{err}"
    );
    let (copy, hard) = (
        tmp.path().join("copy.csv"),
        tmp.path().join("hard-link.csv"),
    );
    std::fs::copy(&files[0], &copy).unwrap();
    if std::fs::hard_link(&copy, &hard).is_ok() {
        let err = agree_raters(dir.join("scores.csv"), &[copy, hard], &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("twice") && err.contains("hard-link.csv"),
            "{err}"
        );
    }
    // A rater's sheet with no answer in the column is named, not averaged in as nothing.
    let blank = tmp.path().join("annotation-blank.csv");
    let text: String = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(|l| {
            let mut c: Vec<&str> = l.split(',').collect();
            if c[0] != "sheet_id" {
                c[2] = "";
            }
            c.join(",") + "\n"
        })
        .collect();
    std::fs::write(&blank, text).unwrap();
    let err = agree_raters(
        dir.join("scores.csv"),
        &[files[0].clone(), blank.clone()],
        &o,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("annotation-blank.csv") && err.contains("adherence"),
        "{err}"
    );
    // Numbers with a few `n/a` are not labels: no --nominal hint for a short sheet of them.
    let na = tmp.path().join("annotation-na.csv");
    std::fs::write(&na, "sheet_id,adherence\n0001,3\n0002,n/a\n0003,n/a\n").unwrap();
    let err = agree_raters(dir.join("scores.csv"), &[na], &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only 1 rows") && !err.contains("--nominal"),
        "{err}"
    );
}

/// Labels (`agree --nominal`) against scikit-learn's Cohen's kappa and the `krippendorff`
/// package's nominal alpha (tests/reference/make_rater_fixtures.py).
#[test]
fn rater_labels_match_scikit_learn_and_krippendorff() {
    use artguide::probe::agree::{agree_label_files, agree_raters};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/raters");
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let e = &e["nominal"];
    let files: Vec<PathBuf> = (1..=4)
        .map(|r| dir.join(format!("annotation-rater{r}.csv")))
        .collect();
    let o = AgreeOptions::new("top_style", "perceived_style");
    let a = agree_label_files(dir.join("scores.csv"), &files, &o).unwrap();
    let close = |x: f64, y: &Value, what: &str| {
        let y = y.as_f64().unwrap();
        assert!((x - y).abs() < 1e-9, "{what}: {x} vs {y}");
    };
    assert_eq!(a.n as u64, e["n"].as_u64().unwrap());
    assert_eq!(a.matching.skipped as u64, e["skipped"].as_u64().unwrap());
    close(a.agreement.estimate, &e["agreement"], "agreement");
    assert!(
        a.agreement.ci_low <= a.agreement.estimate && a.agreement.estimate <= a.agreement.ci_high
    );
    close(
        a.krippendorff_alpha.unwrap(),
        &e["krippendorff_alpha"],
        "alpha",
    );
    for (got, want) in a.raters.iter().zip(e["raters"].as_array().unwrap()) {
        assert!(got.file.ends_with(want["file"].as_str().unwrap()));
        assert_eq!(got.n as u64, want["n"].as_u64().unwrap(), "{}", got.file);
        assert_eq!(got.n_others as u64, want["n_others"].as_u64().unwrap());
        close(got.agreement, &want["agreement"], &got.file);
        close(got.cohen_kappa, &want["cohen_kappa"], &got.file);
        close(got.rater_vs_others, &want["rater_vs_others"], &got.file);
        close(got.score_vs_others, &want["score_vs_others"], &got.file);
    }
    let total: usize = a.confusions.iter().map(|c| c.2).sum();
    assert!(a.confusions.windows(2).all(|w| w[0].2 >= w[1].2) && total > 0);
    assert!(a.confusions.iter().all(|(s, r, _)| s != r));
    // Label columns given as numbers say how to compare them.
    let err = agree_raters(dir.join("scores.csv"), &files, &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--nominal") && err.contains("top_style"),
        "{err}"
    );
}

/// One long-format file with a rater column gives what one file per rater gives.
#[test]
fn a_rater_column_splits_one_file_into_raters() {
    use artguide::probe::agree::{agree_label_files, agree_raters};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/raters");
    let files: Vec<PathBuf> = (1..=4)
        .map(|r| dir.join(format!("annotation-rater{r}.csv")))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let long = tmp.path().join("long.csv");
    let mut text = String::new();
    for (r, f) in files.iter().enumerate() {
        for (i, line) in std::fs::read_to_string(f).unwrap().lines().enumerate() {
            match (i, r) {
                (0, 0) => text.push_str(&format!("who,{line}\n")),
                (0, _) => {}
                _ => text.push_str(&format!("r{},{line}\n", r + 1)),
            }
        }
    }
    std::fs::write(&long, &text).unwrap();
    let scores = dir.join("scores.csv");
    let mut o = AgreeOptions::new("p_intended_style", "adherence");
    let by_file = agree_raters(&scores, &files, &o).unwrap();
    o.rater_column = Some("who".into());
    let by_column = agree_raters(&scores, &[&long], &o).unwrap();
    assert_eq!(by_column.correlations, by_file.correlations);
    let (a, b) = (by_column.raters.unwrap(), by_file.raters.unwrap());
    assert_eq!(a.krippendorff_alpha, b.krippendorff_alpha);
    assert_eq!(a.raters.len(), 4);
    for (k, (x, y)) in a.raters.iter().zip(&b.raters).enumerate() {
        assert!(
            x.file.ends_with(&format!("long.csv[r{}]", k + 1)),
            "{}",
            x.file
        );
        assert_eq!(
            (x.n, x.loo_spearman, x.score_spearman),
            (y.n, y.loo_spearman, y.score_spearman)
        );
    }
    let mut lo = AgreeOptions::new("top_style", "perceived_style");
    let labels_by_file = agree_label_files(&scores, &files, &lo).unwrap();
    lo.rater_column = Some("who".into());
    let labels = agree_label_files(&scores, &[&long], &lo).unwrap();
    assert_eq!(labels.agreement, labels_by_file.agreement);
    assert_eq!(labels.krippendorff_alpha, labels_by_file.krippendorff_alpha);
    // A row naming no rater is an error naming the file, column and line.
    std::fs::write(&long, text.replacen("\nr2,", "\n,", 1)).unwrap();
    let err = agree_raters(&scores, &[&long], &o).unwrap_err().to_string();
    assert!(
        err.contains("long.csv") && err.contains("who") && err.contains("line"),
        "{err}"
    );
}
