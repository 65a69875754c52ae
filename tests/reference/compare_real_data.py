#!/usr/bin/env python3
"""Recompute the README's real-data figures with scikit-learn and scipy on the same folds as
artguide, and compare. Run by developers, not by CI.

First run the Rust side, which writes folds.json, scores.csv and rust_results.json:

  ARTGUIDE_AI_PASTICHE_DIR=DATA ARTGUIDE_STATS_OUT=OUT \\
      cargo test --test stats_real_data -- --ignored --nocapture

then:  python tests/reference/compare_real_data.py --data DATA --out OUT

Model: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="lbfgs", tol=1e-10,
max_iter=100000)) per fold on float64 copies of the float16 embeddings, AI = class 1.
Correlations: scipy.stats spearmanr / kendalltau / pearsonr of the out-of-fold P(AI) of the
1464 AI images against their ratings; 95% intervals by a numpy percentile bootstrap of the
pairs (numpy.random.default_rng(0), 1000 resamples: not the same draws as artguide's).
Versions: tests/reference/requirements-stats.txt.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def corr(x, y):
    return (stats.spearmanr(x, y).statistic, stats.kendalltau(x, y).statistic,
            stats.pearsonr(x, y).statistic)


def bootstrap(x, y, resamples=1000, seed=0):
    rng = np.random.default_rng(seed)
    n = len(x)
    draws = np.array([corr(x[i], y[i]) for i in (rng.integers(0, n, n) for _ in range(resamples))])
    return np.percentile(draws, 2.5, axis=0), np.percentile(draws, 97.5, axis=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    ai = np.load(data / "ai_pastiche_vitl14_336.npy").astype(np.float64)
    nga = np.load(data / "nga_vitl14_336.npy").astype(np.float64)
    x = np.vstack([ai, nga])
    y = np.r_[np.ones(len(ai), int), np.zeros(len(nga), int)]
    f = json.loads((out / "folds.json").read_text())
    folds, k = np.array(f["folds"]), f["k"]
    p = np.full(len(y), np.nan)
    acc, auc = [], []
    t = time.time()
    for fold in range(k):
        tr, te = folds != fold, folds == fold
        m = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="lbfgs", tol=1e-10,
                                                               max_iter=100000)).fit(x[tr], y[tr])
        p[te] = m.predict_proba(x[te])[:, 1]
        acc.append(accuracy_score(y[te], m.predict(x[te])))
        auc.append(roc_auc_score(y[te], p[te]))
        print(f"fold {fold}: accuracy {acc[-1]:.6f} auc {auc[-1]:.6f} "
              f"lbfgs iterations {m[-1].n_iter_[0]}")
    acc = np.array(acc)
    print(f"sklearn: accuracy {acc.mean():.6f} +- {acc.std():.6f} (ddof=0), pooled AUC "
          f"{roc_auc_score(y, p):.6f}, mean fold AUC {np.mean(auc):.6f} ({time.time() - t:.0f} s)")

    s = pd.read_csv(out / "scores.csv")
    p_rust = s["p_a"].to_numpy()
    print(f"max |P_rust - P_sklearn| = {np.max(np.abs(p_rust - p)):.3e}")
    rust = json.loads((out / "rust_results.json").read_text())["separate"]
    print(f"artguide: accuracy {rust['accuracy']:.6f} +- {rust['accuracy_std']:.6f}, pooled AUC "
          f"{rust['auc']:.6f}")

    meta = pd.read_csv(data / "ai_pastiche.csv")
    p_ai = p[: len(ai)]
    p_ai_rust = p_rust[: len(ai)]
    for col in ["authenticity", "defects", "adherence"]:
        r = meta[col].to_numpy()
        est = corr(p_ai, r)
        lo, hi = bootstrap(p_ai, r)
        est_rust_p = corr(p_ai_rust, r)
        print(f"{col}: n={len(r)}")
        for i, name in enumerate(["spearman", "kendall", "pearson"]):
            ours = json.loads((out / "rust_results.json").read_text())[f"agree_{col}"]
            c = ours["correlations"][name]
            print(f"  {name:8s} sklearn P: {est[i]:+.10f} [{lo[i]:+.4f}, {hi[i]:+.4f}]   "
                  f"scipy on artguide P: {est_rust_p[i]:+.10f}   artguide: {c['estimate']:+.10f} "
                  f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]")


if __name__ == "__main__":
    main()
