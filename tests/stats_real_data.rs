//! The figures quoted in the README, on the full AI-Pastiche / NGA embeddings. Ignored by
//! default (the data are not in the repository):
//!
//! ```text
//! ARTGUIDE_AI_PASTICHE_DIR=/path/to/ai-pastiche-nga [ARTGUIDE_STATS_OUT=/tmp/out] \
//!     cargo test --test stats_real_data -- --ignored --nocapture
//! ```
//!
//! Class A = AI-Pastiche (ai_pastiche_vitl14_336.npy), class B = NGA (nga_vitl14_336.npy);
//! 5 stratified folds, seed 0, C = 1. The agreement is that of the out-of-fold P(AI) of the
//! AI images with their `authenticity` and `defects` ratings (ai_pastiche.csv, key `row`),
//! 1000 bootstrap resamples, seed 0. With ARTGUIDE_STATS_OUT set, the folds, the scores CSV
//! and the results are written there (for tests/reference/compare_real_data.py).

use std::path::PathBuf;

use artguide::probe::agree::{agree_files, AgreeOptions};
use artguide::probe::linear::{separate_files, stratified_folds, SeparateOptions};

#[test]
#[ignore = "needs ARTGUIDE_AI_PASTICHE_DIR (the full AI-Pastiche / NGA embeddings)"]
fn real_data_figures() {
    let Some(dir) = std::env::var_os("ARTGUIDE_AI_PASTICHE_DIR").map(PathBuf::from) else {
        eprintln!("ARTGUIDE_AI_PASTICHE_DIR is not set: nothing to do");
        return;
    };
    let out = std::env::var_os("ARTGUIDE_STATS_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let out = out.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out).unwrap();

    let opts = SeparateOptions::default();
    let t = std::time::Instant::now();
    let s = separate_files(
        dir.join("ai_pastiche_vitl14_336.npy"),
        dir.join("nga_vitl14_336.npy"),
        &opts,
    )
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!("separate: {}", serde_json::to_string_pretty(&s).unwrap());
    println!("separate took {secs:.1} s");
    let folds = stratified_folds(s.n_a, s.n_b, opts.folds, opts.seed).unwrap();
    std::fs::write(
        out.join("folds.json"),
        serde_json::json!({ "k": opts.folds, "seed": opts.seed, "folds": folds }).to_string(),
    )
    .unwrap();
    let scores = out.join("scores.csv");
    s.write_scores_csv(&scores, "ai", "human").unwrap();

    let mut results = serde_json::json!({ "separate": s });
    for col in ["authenticity", "defects", "adherence"] {
        let mut o = AgreeOptions::new("p_a", col);
        o.filter = Some(("class".into(), "ai".into()));
        let a = agree_files(&scores, dir.join("ai_pastiche.csv"), &o).unwrap();
        println!(
            "agree p_a ~ {col}: {}",
            serde_json::to_string_pretty(&a).unwrap()
        );
        results[format!("agree_{col}")] = serde_json::to_value(&a).unwrap();
    }
    std::fs::write(out.join("rust_results.json"), results.to_string()).unwrap();
}
