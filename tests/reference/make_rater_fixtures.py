"""Reference values for `artguide agree` with several raters' ratings files.

Writes tests/fixtures/raters/: a scores file (a CLIP score per sheet_id), four raters' 1-5
ratings files as the annotation form saves them (some rows left blank, one rater skipping a
third of the sheet, rows in a different order per rater), and expected.json with
  - the correlations of the score with the mean rating (scipy.stats spearmanr, kendalltau,
    pearsonr over rows with a score and at least one rating),
  - Krippendorff's alpha, interval metric (the `krippendorff` package),
  - per rater: Spearman of the rater with the mean of the others, and of the score with that
    same mean (scipy), on rows the rater and at least one other rater rated;
and, for `agree --nominal`, a label per row (the score's `top_style`, each rater's
`perceived_style`) with the share of agreeing labels, Cohen's kappa per rater (scikit-learn),
Krippendorff's nominal alpha and each rater and the score against the other raters' labels.
Seeded numpy; no downloads. Run with the packages of requirements-raters.txt:

    python3 -m venv /tmp/venv-raters
    /tmp/venv-raters/bin/pip install -r tests/reference/requirements-raters.txt
    /tmp/venv-raters/bin/python tests/reference/make_rater_fixtures.py
"""

import csv
import json
from pathlib import Path

import krippendorff
import numpy as np
from scipy import stats
from sklearn.metrics import cohen_kappa_score

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "raters"
N, RATERS = 36, 4


def main():
    rng = np.random.default_rng(20261124)
    truth = rng.normal(size=N)
    keys = [f"{i + 1:04d}" for i in range(N)]
    # The score sees the truth through noise; one row has no score.
    # The values as the CSV holds them.
    score = np.array([float(f"{s:.6f}") for s in truth + rng.normal(scale=0.8, size=N)])
    scores = [f"{s:.6f}" for s in score]
    scores[5] = ""
    ratings = np.full((RATERS, N), np.nan)
    for r in range(RATERS):
        noisy = truth + rng.normal(scale=0.6 + 0.3 * r, size=N)
        ratings[r] = np.clip(np.round(3 + 1.2 * noisy), 1, 5)
        # Blank answers: a few per rater, and rater 3 stops after two thirds of the sheet.
        ratings[r, rng.choice(N, size=3, replace=False)] = np.nan
    ratings[3, 24:] = np.nan
    # Row 9 nobody rated: it is skipped like a blank single rating.
    ratings[:, 9] = np.nan

    # Labels: each row has a true style; CLIP and each rater see it or pick another, and
    # some raters leave the question blank (rater 3 also where they stopped).
    styles = ["Baroque", "Cubism", "Impressionism", "Rococo"]
    true_style = rng.integers(0, 4, size=N)

    def pick(p_right):
        right = rng.random(N) < p_right
        other = (true_style + rng.integers(1, 4, size=N)) % 4
        return [styles[t if ok else o] for t, ok, o in zip(true_style, right, other)]

    top = pick(0.6)
    top[7] = ""
    chosen = [pick(0.75 - 0.1 * r) for r in range(RATERS)]
    for r in range(RATERS):
        for i in rng.choice(N, size=2, replace=False):
            chosen[r][i] = ""
    for i in range(24, N):
        chosen[3][i] = ""

    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "scores.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["sheet_id", "p_intended_style", "top_style"])
        w.writerows(zip(keys, scores, top))
    for r in range(RATERS):
        order = rng.permutation(N)
        with open(OUT / f"annotation-rater{r + 1}.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["sheet_id", "perceived_style", "adherence", "notes"])
            for i in order:
                v = ratings[r, i]
                w.writerow([keys[i], chosen[r][i], "" if np.isnan(v) else str(int(v)), ""])

    has_score = np.array([s != "" for s in scores])
    rated = ~np.all(np.isnan(ratings), axis=0)
    keep = has_score & rated
    x = score[keep]
    mean = np.nanmean(ratings[:, keep], axis=0)
    kept = ratings[:, keep]
    per_rater = []
    for r in range(RATERS):
        others = np.delete(kept, r, axis=0)
        ok = ~np.isnan(kept[r]) & ~np.all(np.isnan(others), axis=0)
        om = np.nanmean(others[:, ok], axis=0)
        per_rater.append(
            {
                "file": f"annotation-rater{r + 1}.csv",
                "n": int(ok.sum()),
                "loo_spearman": float(stats.spearmanr(kept[r, ok], om).statistic),
                "score_spearman": float(stats.spearmanr(x[ok], om).statistic),
            }
        )
    nominal = label_expected(keys, top, chosen)
    expected = {
        "nominal": nominal,
        "n": int(keep.sum()),
        "skipped": int((~keep).sum()),
        "spearman": float(stats.spearmanr(x, mean).statistic),
        "kendall": float(stats.kendalltau(x, mean).statistic),
        "pearson": float(stats.pearsonr(x, mean).statistic),
        "krippendorff_alpha": float(
            krippendorff.alpha(reliability_data=kept, level_of_measurement="interval")
        ),
        "units": int((np.sum(~np.isnan(kept), axis=0) >= 2).sum()),
        "raters": per_rater,
        # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the 4-observer,
        # 12-unit example with missing values (interval alpha 0.849 in the paper).
        "paper_example": {
            "data": [
                [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
                [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
                [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
                [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
            ],
        },
    }
    ex = np.array(
        [[np.nan if v is None else v for v in row] for row in expected["paper_example"]["data"]],
        dtype=float,
    )
    expected["paper_example"]["interval_alpha"] = float(
        krippendorff.alpha(reliability_data=ex, level_of_measurement="interval")
    )
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for p in sorted(OUT.iterdir()):
        print(p.relative_to(OUT.parents[1]), p.stat().st_size)


def label_expected(keys, top, chosen):
    rows = [i for i in range(N) if top[i] and any(c[i] for c in chosen)]
    shares = []
    for i in rows:
        given = [c[i] for c in chosen if c[i]]
        shares.append(sum(g == top[i] for g in given) / len(given))
    raters = []
    for r in range(RATERS):
        mine = [i for i in rows if chosen[r][i]]
        own, score = [], []
        for i in mine:
            others = [chosen[k][i] for k in range(RATERS) if k != r and chosen[k][i]]
            if others:
                own.append(sum(o == chosen[r][i] for o in others) / len(others))
                score.append(sum(o == top[i] for o in others) / len(others))
        raters.append(
            {
                "file": f"annotation-rater{r + 1}.csv",
                "n": len(mine),
                "agreement": float(np.mean([top[i] == chosen[r][i] for i in mine])),
                "cohen_kappa": float(
                    cohen_kappa_score([top[i] for i in mine], [chosen[r][i] for i in mine])
                ),
                "n_others": len(own),
                "rater_vs_others": float(np.mean(own)),
                "score_vs_others": float(np.mean(score)),
            }
        )
    styles = sorted({c[i] for c in chosen for i in rows if c[i]})
    data = np.array(
        [[styles.index(c[i]) if c[i] else np.nan for i in rows] for c in chosen], dtype=float
    )
    return {
        "n": len(rows),
        "skipped": N - len(rows),
        "agreement": float(np.mean(shares)),
        "krippendorff_alpha": float(
            krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
        ),
        "raters": raters,
    }


if __name__ == "__main__":
    main()
