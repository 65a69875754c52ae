#!/usr/bin/env python3
"""Generate the embedding-analysis reference fixtures for artguide's Rust tests
(tests/stats_reference.rs). Run by developers, not by CI.

Source: the AI-Pastiche / National Gallery of Art CLIP ViT-L/14@336px embeddings
(ai_pastiche_vitl14_336.npy, nga_vitl14_336.npy: 1464 x 768 float16, and ai_pastiche.csv
with human ratings), in the folder given by --data (default $ARTGUIDE_AI_PASTICHE_DIR).

Writes (and only writes) these files under tests/fixtures/embeddings/:
  a.npy            class A = AI-Pastiche: rows 0, 24, ..., 1416 (60 rows), first 64 dims, float16
  b.npy            class B = NGA: the same rows and dims, float16
  a_f8_v2.npy      a.npy as float64 in .npy format version 2.0
  b_f4_v3.npy      b.npy as float32 in .npy format version 3.0
  folds.json       explicit fold of each row (A rows then B rows), from StratifiedKFold
  scores.csv       class,row,fold,p_ai: scikit-learn's out-of-fold P(AI) of every row
  ratings.csv      row,subject,note,authenticity,defects of the sampled AI rows, shuffled,
                   with edits that exercise the matching (see below)
  expected.json    scikit-learn and scipy results on these files

Model: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="lbfgs",
tol=1e-10, max_iter=100000)) on float64 copies of the float16 values, class A labelled 1,
fitted per fold on the other folds; cross-checked against solver="newton-cholesky".
The newton-cholesky probabilities (tol=1e-12) are stored too, as a tighter reference.
Correlations: scipy.stats spearmanr, kendalltau (tau-b), pearsonr on the rows of scores.csv
with class == "ai" matched to ratings.csv on `row`, rows with a missing or non-numeric value
dropped.

Usage:  /work/venv-stats/bin/python tests/reference/make_stats_fixtures.py --data DIR
Versions: tests/reference/requirements-stats.txt.
"""

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy
import sklearn
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "embeddings"
ROWS = np.arange(60) * 24
DIMS = 64
FOLDS = 5
C = 1.0


def check_versions():
    want = {}
    for line in (ROOT / "tests" / "reference" / "requirements-stats.txt").read_text().splitlines():
        if "==" in line:
            name, ver = line.strip().split("==")
            want[name.lower()] = ver
    have = {"numpy": np.__version__, "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__, "pandas": pd.__version__}
    for name, ver in have.items():
        if want.get(name) != ver:
            print(f"warning: {name} {ver} is not the pinned {want.get(name)}", file=sys.stderr)
    return have


def pipeline(solver):
    kw = dict(C=C, solver=solver, max_iter=100000)
    kw["tol"] = 1e-10 if solver == "lbfgs" else 1e-12
    return make_pipeline(StandardScaler(), LogisticRegression(**kw))


def cross_validate(x, y, folds, solver):
    p = np.full(len(y), np.nan)
    acc, auc = [], []
    for f in range(FOLDS):
        train, test = folds != f, folds == f
        model = pipeline(solver).fit(x[train], y[train])
        p[test] = model.predict_proba(x[test])[:, 1]
        acc.append(accuracy_score(y[test], model.predict(x[test])))
        auc.append(roc_auc_score(y[test], p[test]))
    return p, np.array(acc), np.array(auc)


def correlations(x, y):
    return {
        "n": int(len(x)),
        "spearman": float(stats.spearmanr(x, y).statistic),
        "kendall": float(stats.kendalltau(x, y).statistic),
        "pearson": float(stats.pearsonr(x, y).statistic),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("ARTGUIDE_AI_PASTICHE_DIR"),
                    help="folder with ai_pastiche_vitl14_336.npy, nga_vitl14_336.npy, ai_pastiche.csv")
    args = ap.parse_args()
    if not args.data:
        sys.exit("give --data DIR or set ARTGUIDE_AI_PASTICHE_DIR")
    data = Path(args.data)
    versions = check_versions()
    OUT.mkdir(parents=True, exist_ok=True)

    ai = np.load(data / "ai_pastiche_vitl14_336.npy")
    nga = np.load(data / "nga_vitl14_336.npy")
    assert ai.dtype == np.float16 and nga.dtype == np.float16
    a = np.ascontiguousarray(ai[ROWS, :DIMS])
    b = np.ascontiguousarray(nga[ROWS, :DIMS])
    np.save(OUT / "a.npy", a)
    np.save(OUT / "b.npy", b)
    with open(OUT / "a_f8_v2.npy", "wb") as f:
        np.lib.format.write_array(f, a.astype("<f8"), version=(2, 0))
    with open(OUT / "b_f4_v3.npy", "wb") as f:
        np.lib.format.write_array(f, b.astype("<f4"), version=(3, 0))

    x = np.vstack([a, b]).astype(np.float64)
    y = np.r_[np.ones(len(a), int), np.zeros(len(b), int)]
    folds = np.empty(len(y), int)
    for f, (_, test) in enumerate(StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(x, y)):
        folds[test] = f
    (OUT / "folds.json").write_text(json.dumps({"k": FOLDS, "folds": folds.tolist()}) + "\n")

    p, acc, auc = cross_validate(x, y, folds, "lbfgs")
    p_nc, acc_nc, _ = cross_validate(x, y, folds, "newton-cholesky")
    solver_gap = float(np.max(np.abs(p - p_nc)))
    assert solver_gap < 1e-6, f"lbfgs and newton-cholesky differ by {solver_gap}"
    assert (acc == acc_nc).all()

    # scores.csv: both classes, keyed by the row within each class (so `row` repeats and the
    # AI rows must be selected with class == "ai").
    labels = np.r_[np.full(len(a), "ai"), np.full(len(b), "human")]
    src_rows = np.r_[ROWS, ROWS]
    scores = pd.DataFrame({"class": labels, "row": src_rows, "fold": folds,
                           "p_ai": [repr(float(v)) for v in p]})
    scores.to_csv(OUT / "scores.csv", index=False, lineterminator="\n")

    # ratings.csv: the sampled AI rows, shuffled; drop one row (an unmatched score), add a row
    # whose key has no score, blank one authenticity and make one defects non-numeric, and add
    # a text column with commas and doubled quotes.
    meta = pd.read_csv(data / "ai_pastiche.csv", dtype=str, keep_default_na=False)
    assert (meta["row"].astype(int).to_numpy() == np.arange(len(meta))).all()
    r = meta.iloc[ROWS][["row", "subject", "authenticity", "defects"]].copy()
    r.insert(2, "note", "")
    order = np.random.default_rng(0).permutation(len(r))
    r = r.iloc[order].reset_index(drop=True)
    dropped_key = r.loc[0, "row"]
    r = r.iloc[1:].reset_index(drop=True)
    r.loc[3, "authenticity"] = ""
    r.loc[7, "defects"] = "n/a"
    r.loc[5, "note"] = 'said "fine", then "no, wait"'
    extra = pd.DataFrame([{"row": "99999", "subject": "none", "note": "no such image",
                           "authenticity": "0.5", "defects": "0.5"}])
    r = pd.concat([r, extra], ignore_index=True)
    buf = io.StringIO()
    r.to_csv(buf, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    (OUT / "ratings.csv").write_text(buf.getvalue())

    # Expected correlations, computed from the files as written.
    s = pd.read_csv(OUT / "scores.csv", dtype=str, keep_default_na=False)
    rt = pd.read_csv(OUT / "ratings.csv", dtype=str, keep_default_na=False)
    s_ai = s[s["class"] == "ai"]
    m = s_ai.merge(rt, on="row", how="inner")
    expected_corr = {}
    for col in ["authenticity", "defects"]:
        sx = pd.to_numeric(m["p_ai"], errors="coerce")
        ry = pd.to_numeric(m[col], errors="coerce")
        ok = sx.notna() & ry.notna() & np.isfinite(sx) & np.isfinite(ry)
        c = correlations(sx[ok].to_numpy(), ry[ok].to_numpy())
        c.update({"filtered_out": int(len(s) - len(s_ai)),
                  "unmatched_scores": int(len(s_ai) - len(m)),
                  "unmatched_ratings": int(len(rt) - len(m)),
                  "skipped": int((~ok).sum())})
        expected_corr[f"p_ai~{col}"] = c
    ra = pd.to_numeric(rt["authenticity"], errors="coerce")
    rd = pd.to_numeric(rt["defects"], errors="coerce")
    ok = ra.notna() & rd.notna()
    expected_corr["authenticity~defects"] = correlations(ra[ok].to_numpy(), rd[ok].to_numpy())
    expected_corr["authenticity~defects"]["skipped"] = int((~ok).sum())

    expected = {
        "versions": versions,
        "source_rows": ROWS.tolist(),
        "dims": DIMS,
        "model": "make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver='lbfgs', "
                 "tol=1e-10, max_iter=100000)), class A (ai) = 1",
        "C": C,
        "solver_gap_lbfgs_vs_newton_cholesky": solver_gap,
        "p_a": p.tolist(),
        "p_a_newton_cholesky": p_nc.tolist(),
        "fold_accuracy": acc.tolist(),
        "fold_auc": auc.tolist(),
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "auc": float(roc_auc_score(y, p)),
        "dropped_rating_key": str(dropped_key),
        "correlations": expected_corr,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes); accuracy {acc.mean():.4f} +- {acc.std():.4f}, "
          f"lbfgs vs newton-cholesky max |dp| {solver_gap:.2e}")


if __name__ == "__main__":
    main()
