//! Agreement between a score and human ratings: Spearman's rho, Kendall's tau-b and
//! Pearson's r over rows matched by a key column, each with a bootstrap percentile interval.
//!
//! - Spearman: Pearson's r of average ranks (ties share the mean rank), as
//!   `scipy.stats.spearmanr`.
//! - Kendall: tau-b, `(P - Q) / sqrt((n0 - n1) (n0 - n2))` with ties in either variable
//!   neither concordant nor discordant, as `scipy.stats.kendalltau` by default; O(n log n).
//! - Pearson: as `scipy.stats.pearsonr`.
//!
//! A correlation of a constant variable is undefined and given as NaN (`null` in JSON).
//!
//! The interval resamples the matched (score, rating) pairs with replacement
//! (`resamples` times, 1000 by default), with a ChaCha8 generator seeded by `seed`, computes
//! the three statistics on each resample, and takes the `(1 - level) / 2` and
//! `(1 + level) / 2` quantiles (linear interpolation, as numpy's default `percentile`) of the
//! resamples where the statistic is defined.
//!
//! Several ratings files (one per rater, as the annotation form saves them) are joined on the
//! key: a row's rating is the mean of the raters who gave a number. Their agreement is then
//! measured on the same rows: Krippendorff's alpha (interval metric, missing ratings allowed,
//! as the `krippendorff` package's `alpha(..., level_of_measurement="interval")`) and, for
//! each rater, Spearman's rho with the mean of the others beside the score's rho with that
//! same mean. The latter pair is the fair comparison: a rater is compared with n-1 others, and
//! so is the score, whereas the score's main correlation uses the mean of all n.

use std::collections::HashMap;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::table::Table;
use super::{average_ranks, uniform_below};
use crate::{Error, Result};

/// Options of [`agree_files`] / [`agree_tables`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgreeOptions {
    /// The column of the scores table holding the score.
    pub score_column: String,
    /// The column of the ratings table holding the rating.
    pub rating_column: String,
    /// The column matching rows of the two tables; by default the first column of the
    /// scores table (in its order) that the ratings table also has, other than the score
    /// and rating columns.
    pub key: Option<String>,
    /// Keep only the rows of the scores table whose column `.0` equals `.1` (for instance
    /// `("class", "a")` to keep the class-A rows of a `separate` scores file).
    pub filter: Option<(String, String)>,
    /// Bootstrap resamples (default 1000).
    pub resamples: usize,
    /// Seed of the bootstrap (default 0).
    pub seed: u64,
    /// Confidence level of the interval (default 0.95).
    pub level: f64,
    /// A column of the ratings files naming the rater: each file then holds several raters'
    /// rows (long format), split into one rater per value.
    pub rater_column: Option<String>,
}

impl AgreeOptions {
    /// Options with the default key, resamples, seed and level.
    pub fn new(score_column: impl Into<String>, rating_column: impl Into<String>) -> Self {
        AgreeOptions {
            score_column: score_column.into(),
            rating_column: rating_column.into(),
            key: None,
            filter: None,
            resamples: 1000,
            seed: 0,
            level: 0.95,
            rater_column: None,
        }
    }
}

/// A correlation with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Correlation {
    /// The statistic on all matched pairs.
    pub estimate: f64,
    /// Lower end of the bootstrap percentile interval.
    pub ci_low: f64,
    /// Upper end of the bootstrap percentile interval.
    pub ci_high: f64,
    /// Resamples on which the statistic was undefined (a constant variable) and that were
    /// left out of the interval.
    pub undefined_resamples: usize,
}

/// The three correlations of one pair of variables.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Correlations {
    /// Number of pairs.
    pub n: usize,
    /// Spearman's rho.
    pub spearman: Correlation,
    /// Kendall's tau-b.
    pub kendall: Correlation,
    /// Pearson's r.
    pub pearson: Correlation,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Bootstrap seed.
    pub seed: u64,
    /// Confidence level.
    pub level: f64,
}

/// How the rows of a scores table met the ratings tables: files, columns and what was left out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Matching {
    /// The scores file.
    pub scores_file: String,
    /// The ratings file (several joined by ` + `; the rating is their mean).
    pub ratings_file: String,
    /// The key column used.
    pub key: String,
    /// The score column.
    pub score_column: String,
    /// The rating column.
    pub rating_column: String,
    /// Rows of the scores table left out by the filter.
    pub filtered_out: usize,
    /// Rows of the scores table whose key is not in the ratings table.
    pub unmatched_scores: usize,
    /// Rows of the ratings table whose key is not in the (filtered) scores table.
    pub unmatched_ratings: usize,
    /// Matched rows skipped because the score, the rating or the key is missing or not a
    /// finite number.
    pub skipped: usize,
    /// The keys of the first (at most 10) skipped rows, with the reason.
    pub skipped_examples: Vec<String>,
}

impl Matching {
    /// The first line of a report: columns, key, pairs kept, rows skipped, and the rows of
    /// either file that found no partner (a key spelled differently in one file shows here).
    pub fn summary(&self, n: usize) -> String {
        let mut s = format!(
            "{} vs {} on key `{}`: n = {n} ({} skipped",
            self.score_column, self.rating_column, self.key, self.skipped
        );
        if self.unmatched_scores > 0 {
            s += &format!(", {} score rows without a rating", self.unmatched_scores);
        }
        if self.unmatched_ratings > 0 {
            s += &format!(", {} rating rows without a score", self.unmatched_ratings);
        }
        if self.filtered_out > 0 {
            s += &format!(", {} score rows left out by --where", self.filtered_out);
        }
        s + ")"
    }
}

/// The result of matching a scores table with a ratings table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    /// Files, columns and rows left out.
    #[serde(flatten)]
    pub matching: Matching,
    /// The correlations over the `correlations.n` matched rows that were kept.
    pub correlations: Correlations,
    /// With several ratings files: the raters' agreement among themselves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raters: Option<RaterAgreement>,
}

/// Reads both CSV files and runs [`agree_tables`].
pub fn agree_files(
    scores: impl AsRef<Path>,
    ratings: impl AsRef<Path>,
    opts: &AgreeOptions,
) -> Result<Agreement> {
    agree_raters(scores, &[ratings], opts)
}

/// Reads the scores file and one ratings file per rater, and runs [`agree_tables`].
pub fn agree_raters<P: AsRef<Path>>(
    scores: impl AsRef<Path>,
    ratings: &[P],
    opts: &AgreeOptions,
) -> Result<Agreement> {
    let s = Table::read(scores)?;
    agree_tables(&s, &read_raters(ratings, opts)?, opts)
}

/// Reads the ratings files, one rater each, or with `rater_column` one rater per value of
/// that column (named `FILE[RATER]`, in order of first appearance; rows with an empty rater
/// are an error naming the line).
fn read_raters<P: AsRef<Path>>(ratings: &[P], opts: &AgreeOptions) -> Result<Vec<Table>> {
    let mut out = Vec::new();
    for path in ratings {
        let t = Table::read(path)?;
        let Some(col) = &opts.rater_column else {
            out.push(t);
            continue;
        };
        let c = t.column_index(col)?;
        let mut split: Vec<(String, Table)> = Vec::new();
        for (row, &line) in t.rows.iter().zip(&t.lines) {
            let rater = row[c].trim();
            if rater.is_empty() {
                return Err(Error::field(
                    &t.path,
                    col,
                    format!("line {line} names no rater"),
                ));
            }
            let k = match split.iter().position(|(r, _)| r == rater) {
                Some(k) => k,
                None => {
                    split.push((
                        rater.to_string(),
                        Table {
                            path: format!("{}[{rater}]", t.path.display()).into(),
                            headers: t.headers.clone(),
                            rows: Vec::new(),
                            lines: Vec::new(),
                        },
                    ));
                    split.len() - 1
                }
            };
            split[k].1.rows.push(row.clone());
            split[k].1.lines.push(line);
        }
        out.extend(split.into_iter().map(|(_, t)| t));
    }
    Ok(out)
}

/// Parses a cell as a finite number; `None` for empty, non-numeric or non-finite cells.
fn number(cell: &str) -> Option<f64> {
    cell.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Agreement among several raters over the rows the score was correlated on, and the score's
/// agreement measured the same way, so the two can be set side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaterAgreement {
    /// Krippendorff's alpha with the interval metric over the rows at least two raters rated.
    pub krippendorff_alpha: f64,
    /// Rows at least two raters rated (alpha's units).
    pub units: usize,
    /// Each rater against the mean of the others.
    pub raters: Vec<RaterStat>,
    /// Mean of `loo_spearman` (how well one person predicts the others) over the raters
    /// where both it and `score_spearman` are defined.
    pub mean_loo_spearman: f64,
    /// Mean of `score_spearman` (the score against the same means) over the same raters.
    pub mean_score_spearman: f64,
}

/// One rater against the mean rating of the other raters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaterStat {
    /// The ratings file.
    pub file: String,
    /// Rows this rater rated and at least one other rater rated too.
    pub n: usize,
    /// Spearman's rho of this rater's ratings with the others' mean on those rows.
    pub loo_spearman: f64,
    /// Spearman's rho of the score with the others' mean on the same rows.
    pub score_spearman: f64,
}

/// Krippendorff's alpha, interval metric, of units each holding the values raters gave it
/// (missing ratings left out); units with fewer than two values carry no pair and are left
/// out. NaN when the pooled values do not vary or fewer than two units pair.
pub fn krippendorff_alpha_interval(units: &[Vec<f64>]) -> f64 {
    // Sum over ordered pairs i != j of (v_i - v_j)^2 is 2 m sum (v - mean)^2; written with
    // the mean taken out first, because 2 (m sum v^2 - (sum v)^2) cancels catastrophically
    // (ratings near 1e6 that differ by 1e-3 gave alpha > 1).
    let pair_sq = |v: &[f64]| {
        let m = v.len() as f64;
        let mean = v.iter().sum::<f64>() / m;
        2.0 * m * v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>()
    };
    let pairable: Vec<&Vec<f64>> = units.iter().filter(|u| u.len() >= 2).collect();
    let pooled: Vec<f64> = pairable.iter().flat_map(|u| u.iter().copied()).collect();
    let n = pooled.len() as f64;
    // Constant values are tested exactly: rounding leaves a tiny expected disagreement that
    // would give any alpha at all.
    if pairable.len() < 2 || is_constant(&pooled) {
        return f64::NAN;
    }
    let observed = pairable
        .iter()
        .map(|u| pair_sq(u) / (u.len() - 1) as f64)
        .sum::<f64>()
        / n;
    let expected = pair_sq(&pooled) / (n * (n - 1.0));
    if expected <= 0.0 {
        return f64::NAN;
    }
    1.0 - observed / expected
}

/// Each rater's ratings against the others' mean, and the score against the same means, on
/// the kept rows (`ratings[row][rater]`), with alpha over them.
fn rater_agreement(
    files: &[String],
    scores: &[f64],
    ratings: &[Vec<Option<f64>>],
) -> RaterAgreement {
    let mut stats = Vec::new();
    for (r, file) in files.iter().enumerate() {
        let (mut own, mut others, mut score) = (Vec::new(), Vec::new(), Vec::new());
        for (row, &s) in ratings.iter().zip(scores) {
            let rest: Vec<f64> = row
                .iter()
                .enumerate()
                .filter(|&(k, _)| k != r)
                .filter_map(|(_, v)| *v)
                .collect();
            if let (Some(v), false) = (row[r], rest.is_empty()) {
                own.push(v);
                others.push(rest.iter().sum::<f64>() / rest.len() as f64);
                score.push(s);
            }
        }
        let defined = own.len() >= 3;
        stats.push(RaterStat {
            file: file.clone(),
            n: own.len(),
            loo_spearman: if defined {
                spearman(&own, &others)
            } else {
                f64::NAN
            },
            score_spearman: if defined {
                spearman(&score, &others)
            } else {
                f64::NAN
            },
        });
    }
    // Both means over the same raters: those where both correlations are defined.
    let both: Vec<&RaterStat> = stats
        .iter()
        .filter(|s| !s.loo_spearman.is_nan() && !s.score_spearman.is_nan())
        .collect();
    let mean = |f: fn(&RaterStat) -> f64| {
        if both.is_empty() {
            f64::NAN
        } else {
            both.iter().map(|s| f(s)).sum::<f64>() / both.len() as f64
        }
    };
    let units: Vec<Vec<f64>> = ratings
        .iter()
        .map(|row| row.iter().filter_map(|v| *v).collect())
        .collect();
    RaterAgreement {
        krippendorff_alpha: krippendorff_alpha_interval(&units),
        units: units.iter().filter(|u| u.len() >= 2).count(),
        mean_loo_spearman: mean(|s| s.loo_spearman),
        mean_score_spearman: mean(|s| s.score_spearman),
        raters: stats,
    }
}

/// The rows of a scores table matched with the ratings tables on the key column.
struct Matched<'a> {
    matching: Matching,
    /// Each ratings file, one per rater.
    files: Vec<String>,
    /// Kept rows: the score cell and each rater's cell (`None`: no row, or not a value).
    rows: Vec<(&'a str, Vec<Option<&'a str>>)>,
}

/// Matches the rows of `scores` with the ratings tables (one per rater) on the key column,
/// keeping those whose score and at least one rating are values (`is_value`, described as
/// `kind` in errors). Errors name the file and column at fault: an unknown column (listing
/// the available ones), no shared key column, a key repeated in a table, fewer than 3 rows.
fn match_rows<'a>(
    scores: &'a Table,
    raters: &'a [Table],
    opts: &AgreeOptions,
    is_value: fn(&str) -> bool,
    kind: &str,
) -> Result<Matched<'a>> {
    let Some(ratings) = raters.first() else {
        return Err(Error::value("ratings", "no ratings file given"));
    };
    // One file given twice would count as two raters in perfect agreement.
    let mut given = HashMap::new();
    for t in raters {
        if let Some(first) = given.insert(crate::output::file_identity(&t.path), &t.path) {
            return Err(Error::file(
                &t.path,
                format!(
                    "is given twice as --ratings (also as {}); give each rater's file once",
                    first.display()
                ),
            ));
        }
    }
    let score_col = scores.column_index(&opts.score_column)?;
    let rating_cols = raters
        .iter()
        .map(|t| t.column_index(&opts.rating_column))
        .collect::<Result<Vec<_>>>()?;
    let key = match &opts.key {
        Some(k) => k.clone(),
        None => scores
            .headers
            .iter()
            .find(|h| {
                **h != opts.score_column && **h != opts.rating_column && ratings.headers.contains(h)
            })
            .cloned()
            .ok_or_else(|| {
                Error::file(
                    &scores.path,
                    format!(
                        "no column shared with {} to match rows on (give the key column \
                         explicitly); columns here: {}; columns there: {}",
                        ratings.path.display(),
                        scores.headers.join(", "),
                        ratings.headers.join(", ")
                    ),
                )
            })?,
    };
    let skey = scores.column_index(&key)?;
    let filter = match &opts.filter {
        Some((col, value)) => Some((scores.column_index(col)?, value.as_str())),
        None => None,
    };

    // Index each ratings file by key.
    let mut rating_of: Vec<HashMap<&str, usize>> = Vec::with_capacity(raters.len());
    for table in raters {
        let rkey = table.column_index(&key)?;
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, row) in table.rows.iter().enumerate() {
            let k = row[rkey].trim();
            if k.is_empty() {
                continue;
            }
            if let Some(&j) = index.get(k) {
                return Err(Error::field(
                    &table.path,
                    &key,
                    format!(
                        "key `{k}` appears on lines {} and {}; keys must be unique",
                        table.lines[j], table.lines[i]
                    ),
                ));
            }
            index.insert(k, i);
        }
        rating_of.push(index);
    }
    let files: Vec<String> = raters
        .iter()
        .map(|t| t.path.display().to_string())
        .collect();

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let (mut filtered_out, mut unmatched_scores, mut skipped) = (0, 0, 0);
    let mut skipped_examples = Vec::new();
    let mut rows = Vec::new();
    for (i, row) in scores.rows.iter().enumerate() {
        if let Some((c, v)) = filter {
            if row[c].trim() != v {
                filtered_out += 1;
                continue;
            }
        }
        let k = row[skey].trim();
        if k.is_empty() {
            skipped += 1;
            if skipped_examples.len() < 10 {
                skipped_examples.push(format!("line {}: empty key", scores.lines[i]));
            }
            continue;
        }
        if let Some(&j) = seen.get(k) {
            return Err(Error::field(
                &scores.path,
                &key,
                format!(
                    "key `{k}` appears on lines {} and {}; keys must be unique{}",
                    scores.lines[j],
                    scores.lines[i],
                    if filter.is_none() {
                        " (keep one class of a scores file with a filter such as class=a)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        seen.insert(k, i);
        let cells: Vec<Option<&str>> = raters
            .iter()
            .zip(&rating_of)
            .zip(&rating_cols)
            .map(|((t, index), &c)| index.get(k).map(|&j| t.rows[j][c].as_str()))
            .collect();
        if cells.iter().all(Option::is_none) {
            unmatched_scores += 1;
            continue;
        }
        let score = row[score_col].as_str();
        let values: Vec<Option<&str>> = cells.iter().map(|c| c.filter(|c| is_value(c))).collect();
        if is_value(score) && values.iter().any(Option::is_some) {
            rows.push((score, values));
            continue;
        }
        skipped += 1;
        if skipped_examples.len() < 10 {
            skipped_examples.push(match (is_value(score), &cells[..]) {
                (false, _) => format!("{key} `{k}`: {} is `{score}`", opts.score_column),
                (_, [Some(cell)]) => format!("{key} `{k}`: {} is `{cell}`", opts.rating_column),
                _ => format!(
                    "{key} `{k}`: no ratings file has a {kind} {}",
                    opts.rating_column
                ),
            });
        }
    }
    let unmatched_ratings = rating_of
        .iter()
        .flat_map(|index| index.keys())
        .filter(|k| !seen.contains_key(*k))
        .collect::<std::collections::HashSet<_>>()
        .len();
    if let (Some((c, v)), true) = (filter, filtered_out == scores.rows.len()) {
        let values: std::collections::BTreeSet<&str> =
            scores.rows.iter().map(|r| r[c].trim()).take(1000).collect();
        let shown: Vec<&str> = values.iter().take(8).copied().collect();
        return Err(Error::value(
            "where",
            format!(
                "`{}={v}` matches no row of {} (values there: {}{})",
                scores.headers[c],
                scores.path.display(),
                shown.join(", "),
                if values.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    if raters.len() > 1 && rows.len() >= 3 {
        for (r, t) in raters.iter().enumerate() {
            if rows.iter().all(|(_, v)| v[r].is_none()) {
                return Err(Error::file(
                    &t.path,
                    format!(
                        "has no {kind} `{}` on any of the {} rows matched (an unanswered sheet, \
                         or the answers in another column?)",
                        opts.rating_column,
                        rows.len()
                    ),
                ));
            }
        }
    }
    if rows.len() < 3 {
        return Err(Error::value(
            "matched rows",
            format!(
                "only {} rows of {} and {} have a {kind} `{}` and `{}` under the same `{key}` \
                 (at least 3 are needed; {unmatched_scores} score rows unmatched, {skipped} \
                 skipped)",
                rows.len(),
                scores.path.display(),
                files.join(" + "),
                opts.score_column,
                opts.rating_column
            ),
        ));
    }
    Ok(Matched {
        matching: Matching {
            scores_file: scores.path.display().to_string(),
            ratings_file: files.join(" + "),
            key,
            score_column: opts.score_column.clone(),
            rating_column: opts.rating_column.clone(),
            filtered_out,
            unmatched_scores,
            unmatched_ratings,
            skipped,
            skipped_examples,
        },
        files,
        rows,
    })
}

/// Whether most score cells and most rating cells of the rows are not numbers.
fn holds_labels(m: &Matched) -> bool {
    let share =
        |cells: &[&str]| cells.iter().filter(|c| number(c).is_none()).count() * 2 > cells.len();
    let scores: Vec<&str> = m.rows.iter().map(|r| r.0).collect();
    let ratings: Vec<&str> = m
        .rows
        .iter()
        .flat_map(|r| r.1.iter().flatten().copied())
        .collect();
    share(&scores) && share(&ratings)
}

/// Matches the rows of `scores` and the ratings tables (one per rater) on the key column and
/// correlates the score with the rating, averaged over the raters who gave one; with several
/// raters, also measures their agreement ([`RaterAgreement`]). Errors as `match_rows`'s.
pub fn agree_tables(scores: &Table, raters: &[Table], opts: &AgreeOptions) -> Result<Agreement> {
    let m = match_rows(scores, raters, opts, |c| number(c).is_some(), "numeric").map_err(|e| {
        // Columns of labels (CLIP's top label, the style a rater chose) fail here as rows
        // without numbers: say how to compare them.
        match match_rows(scores, raters, opts, |c| !c.trim().is_empty(), "non-empty") {
            Ok(m) if matches!(e, Error::Value { .. }) && holds_labels(&m) => Error::Msg(format!(
                "{e}; the columns hold labels: compare them with --nominal"
            )),
            _ => e,
        }
    })?;
    let xs: Vec<f64> = m.rows.iter().filter_map(|r| number(r.0)).collect();
    let per_rater: Vec<Vec<Option<f64>>> = m
        .rows
        .iter()
        .map(|r| r.1.iter().map(|c| c.and_then(number)).collect())
        .collect();
    let ys: Vec<f64> = per_rater
        .iter()
        .map(|v| {
            let given: Vec<f64> = v.iter().filter_map(|x| *x).collect();
            given.iter().sum::<f64>() / given.len() as f64
        })
        .collect();
    let correlations = correlate(&xs, &ys, opts.resamples, opts.seed, opts.level)?;
    Ok(Agreement {
        raters: (raters.len() > 1).then(|| rater_agreement(&m.files, &xs, &per_rater)),
        matching: m.matching,
        correlations,
    })
}

/// A share with its bootstrap percentile interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Share {
    /// The share on all rows.
    pub estimate: f64,
    /// Lower end of the bootstrap percentile interval.
    pub ci_low: f64,
    /// Upper end of the bootstrap percentile interval.
    pub ci_high: f64,
}

/// One rater's labels against the score's label and against the other raters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelRater {
    /// The ratings file.
    pub file: String,
    /// Rows this rater labelled.
    pub n: usize,
    /// Share of those rows where the score's label is this rater's.
    pub agreement: f64,
    /// Cohen's kappa of the score's labels with this rater's (as scikit-learn's
    /// `cohen_kappa_score`); NaN when chance agreement is 1.
    pub cohen_kappa: f64,
    /// Rows this rater and at least one other rater labelled.
    pub n_others: usize,
    /// Mean over those rows of the share of the other raters' labels equal to this rater's:
    /// how well one person predicts the others.
    pub rater_vs_others: f64,
    /// The same share for the score's label on the same rows.
    pub score_vs_others: f64,
}

/// Agreement of a label (say CLIP's top style) with the labels raters chose.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelAgreement {
    /// Files, columns and rows left out.
    #[serde(flatten)]
    pub matching: Matching,
    /// Rows with a score label and at least one rater's label.
    pub n: usize,
    /// Per row, the share of its raters' labels equal to the score's label, averaged over
    /// rows (with one rater: the share of rows where they agree), with a bootstrap interval
    /// that resamples rows.
    pub agreement: Share,
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
    /// Each rater, in the order the files were given.
    pub raters: Vec<LabelRater>,
    /// Krippendorff's alpha with the nominal metric among the raters (several raters only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub krippendorff_alpha: Option<f64>,
    /// The most frequent disagreements over every (row, rater) answer: score label, rater
    /// label and count, most frequent first (at most 10).
    pub confusions: Vec<(String, String, usize)>,
}

/// Krippendorff's alpha, nominal metric, of units each holding the labels raters gave it
/// (missing ones left out); units with fewer than two labels are left out. NaN when the
/// pooled labels are all one or fewer than two units pair.
pub fn krippendorff_alpha_nominal<S: AsRef<str>>(units: &[Vec<S>]) -> f64 {
    // Ordered pairs of differing labels among m values with counts n_c: m^2 - sum n_c^2.
    fn differing<'a>(labels: impl Iterator<Item = &'a str>) -> (f64, f64) {
        let mut counts: HashMap<&str, f64> = HashMap::new();
        let mut m = 0.0;
        for l in labels {
            *counts.entry(l).or_default() += 1.0;
            m += 1.0;
        }
        (m, m * m - counts.values().map(|c| c * c).sum::<f64>())
    }
    let pairable: Vec<&Vec<S>> = units.iter().filter(|u| u.len() >= 2).collect();
    if pairable.len() < 2 {
        return f64::NAN;
    }
    let mut observed = 0.0;
    for u in &pairable {
        let (m, d) = differing(u.iter().map(|l| l.as_ref()));
        observed += d / (m - 1.0);
    }
    let (n, d) = differing(pairable.iter().flat_map(|u| u.iter().map(|l| l.as_ref())));
    let expected = d / (n * (n - 1.0));
    if expected <= 0.0 {
        return f64::NAN;
    }
    1.0 - (observed / n) / expected
}

/// Cohen's kappa of paired labels; NaN when chance agreement is 1.
pub fn cohen_kappa(a: &[&str], b: &[&str]) -> f64 {
    let n = a.len() as f64;
    let observed = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n;
    let mut ca: HashMap<&str, f64> = HashMap::new();
    let mut cb: HashMap<&str, f64> = HashMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *ca.entry(x).or_default() += 1.0;
        *cb.entry(y).or_default() += 1.0;
    }
    let chance: f64 = ca
        .iter()
        .map(|(l, c)| c * cb.get(l).copied().unwrap_or(0.0))
        .sum::<f64>()
        / (n * n);
    if chance >= 1.0 {
        return f64::NAN;
    }
    (observed - chance) / (1.0 - chance)
}

/// Reads the scores file and the ratings files and runs [`agree_labels`].
pub fn agree_label_files<P: AsRef<Path>>(
    scores: impl AsRef<Path>,
    ratings: &[P],
    opts: &AgreeOptions,
) -> Result<LabelAgreement> {
    let s = Table::read(scores)?;
    agree_labels(&s, &read_raters(ratings, opts)?, opts)
}

/// Matches the rows as [`agree_tables`] does, but compares labels (non-empty cells, trimmed,
/// compared exactly): the score's label with each rater's, Cohen's kappa per rater, and with
/// several raters, their nominal alpha and each rater and the score against the others.
pub fn agree_labels(
    scores: &Table,
    raters: &[Table],
    opts: &AgreeOptions,
) -> Result<LabelAgreement> {
    check_bootstrap(opts.resamples, opts.level)?;
    let m = match_rows(scores, raters, opts, |c| !c.trim().is_empty(), "non-empty")?;
    let rows: Vec<(&str, Vec<Option<&str>>)> = m
        .rows
        .iter()
        .map(|(s, v)| (s.trim(), v.iter().map(|c| c.map(str::trim)).collect()))
        .collect();
    // Per row, the share of its raters' labels equal to the score's.
    let shares: Vec<f64> = rows
        .iter()
        .map(|(s, v)| {
            let given: Vec<&str> = v.iter().flatten().copied().collect();
            given.iter().filter(|l| *l == s).count() as f64 / given.len() as f64
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let n = shares.len();
    let (ci_low, ci_high) = bootstrap_mean(&shares, opts.resamples, opts.seed, opts.level);
    let agreement = Share {
        estimate: mean(&shares),
        ci_low,
        ci_high,
    };
    let mut per_rater = Vec::new();
    for (r, file) in m.files.iter().enumerate() {
        let (mut sl, mut rl) = (Vec::new(), Vec::new());
        let (mut own, mut score) = (Vec::new(), Vec::new());
        for (s, v) in &rows {
            let Some(mine) = v[r] else { continue };
            sl.push(*s);
            rl.push(mine);
            let others: Vec<&str> = v
                .iter()
                .enumerate()
                .filter(|&(k, _)| k != r)
                .filter_map(|(_, l)| *l)
                .collect();
            if !others.is_empty() {
                let share = |x: &str| others.iter().filter(|o| **o == x).count() as f64;
                own.push(share(mine) / others.len() as f64);
                score.push(share(s) / others.len() as f64);
            }
        }
        let agree = sl.iter().zip(&rl).filter(|(a, b)| a == b).count() as f64;
        per_rater.push(LabelRater {
            file: file.clone(),
            n: sl.len(),
            agreement: if sl.is_empty() {
                f64::NAN
            } else {
                agree / sl.len() as f64
            },
            cohen_kappa: if sl.is_empty() {
                f64::NAN
            } else {
                cohen_kappa(&sl, &rl)
            },
            n_others: own.len(),
            rater_vs_others: if own.is_empty() { f64::NAN } else { mean(&own) },
            score_vs_others: if score.is_empty() {
                f64::NAN
            } else {
                mean(&score)
            },
        });
    }
    let mut confused: HashMap<(&str, &str), usize> = HashMap::new();
    for (s, v) in &rows {
        for l in v.iter().flatten().filter(|l| *l != s) {
            *confused.entry((s, l)).or_default() += 1;
        }
    }
    let mut confusions: Vec<(String, String, usize)> = confused
        .into_iter()
        .map(|((a, b), c)| (a.to_string(), b.to_string(), c))
        .collect();
    confusions.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
    confusions.truncate(10);
    let units: Vec<Vec<&str>> = rows
        .iter()
        .map(|(_, v)| v.iter().flatten().copied().collect())
        .collect();
    Ok(LabelAgreement {
        matching: m.matching,
        n,
        agreement,
        resamples: opts.resamples,
        seed: opts.seed,
        level: opts.level,
        raters: per_rater,
        krippendorff_alpha: (raters.len() > 1).then(|| krippendorff_alpha_nominal(&units)),
        confusions,
    })
}

/// Spearman, Kendall tau-b and Pearson correlations of paired values with bootstrap
/// percentile intervals (see the module documentation).
pub fn correlate(
    x: &[f64],
    y: &[f64],
    resamples: usize,
    seed: u64,
    level: f64,
) -> Result<Correlations> {
    if x.len() != y.len() {
        return Err(Error::value(
            "pairs",
            format!("{} scores but {} ratings", x.len(), y.len()),
        ));
    }
    if x.len() < 3 {
        return Err(Error::value(
            "pairs",
            format!("{} (at least 3 are needed)", x.len()),
        ));
    }
    if x.iter().chain(y).any(|v| !v.is_finite()) {
        return Err(Error::value("pairs", "values must be finite numbers"));
    }
    check_bootstrap(resamples, level)?;
    let n = x.len();
    let stats = |x: &[f64], y: &[f64]| [spearman(x, y), kendall_tau_b(x, y), pearson(x, y)];
    let point = stats(x, y);
    let mut boot: [Vec<f64>; 3] = Default::default();
    let mut undefined = [0usize; 3];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut bx = vec![0.0; n];
    let mut by = vec![0.0; n];
    for _ in 0..resamples {
        for i in 0..n {
            let j = uniform_below(&mut rng, n);
            bx[i] = x[j];
            by[i] = y[j];
        }
        for (k, v) in stats(&bx, &by).into_iter().enumerate() {
            if v.is_nan() {
                undefined[k] += 1;
            } else {
                boot[k].push(v);
            }
        }
    }
    let lo_q = (1.0 - level) / 2.0;
    let hi_q = (1.0 + level) / 2.0;
    let make = |k: usize| {
        let mut v = boot[k].clone();
        v.sort_by(f64::total_cmp);
        Correlation {
            estimate: point[k],
            ci_low: quantile(&v, lo_q),
            ci_high: quantile(&v, hi_q),
            undefined_resamples: undefined[k],
        }
    };
    Ok(Correlations {
        n,
        spearman: make(0),
        kendall: make(1),
        pearson: make(2),
        resamples,
        seed,
        level,
    })
}

/// Refuses a bootstrap of no resamples or a confidence level outside (0, 1).
fn check_bootstrap(resamples: usize, level: f64) -> Result<()> {
    if !(level > 0.0 && level < 1.0) {
        return Err(Error::value(
            "level",
            format!("{level} (must be in (0, 1))"),
        ));
    }
    if resamples == 0 {
        return Err(Error::value("resamples", "0 (at least 1 is needed)"));
    }
    Ok(())
}

/// Percentile bootstrap interval of the mean of `d`.
pub fn bootstrap_mean(d: &[f64], resamples: usize, seed: u64, level: f64) -> (f64, f64) {
    if d.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = d.len();
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| d[uniform_below(&mut rng, n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    (
        quantile(&means, (1.0 - level) / 2.0),
        quantile(&means, (1.0 + level) / 2.0),
    )
}

/// The `q` quantile of sorted values, interpolating linearly (numpy's default); NaN if empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Pearson's correlation coefficient; NaN when either variable is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    // Exactly as scipy's test: with a mean that rounds, the deviations of a constant column
    // are not all zero, and their noise would give a correlation.
    if is_constant(x) || is_constant(y) {
        return f64::NAN;
    }
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (da, db) = (a - mx, b - my);
        sxy += da * db;
        sxx += da * da;
        syy += db * db;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// True when every value equals the first (and for no values).
fn is_constant(v: &[f64]) -> bool {
    v.iter().all(|&x| x == v[0])
}

/// Spearman's rank correlation (average ranks for ties); NaN when either variable is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Sum of t(t-1)/2 over runs of equal values in a sorted sequence.
fn tie_pairs<T: PartialEq>(sorted: impl Iterator<Item = T>) -> u64 {
    let mut total = 0u64;
    let mut prev: Option<T> = None;
    let mut run = 0u64;
    for v in sorted {
        if prev.as_ref() == Some(&v) {
            run += 1;
        } else {
            total += run * (run.saturating_sub(1)) / 2;
            run = 1;
            prev = Some(v);
        }
    }
    total + run * run.saturating_sub(1) / 2
}

/// Counts pairs i < j with v[i] > v[j] (strictly), sorting `v`.
fn count_inversions(v: &mut [f64], buf: &mut [f64]) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut inv = count_inversions(&mut v[..mid], &mut buf[..mid]);
    inv += count_inversions(&mut v[mid..], &mut buf[mid..]);
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if v[i] <= v[j] {
            buf[k] = v[i];
            i += 1;
        } else {
            buf[k] = v[j];
            inv += (mid - i) as u64;
            j += 1;
        }
        k += 1;
    }
    while i < mid {
        buf[k] = v[i];
        i += 1;
        k += 1;
    }
    while j < n {
        buf[k] = v[j];
        j += 1;
        k += 1;
    }
    v.copy_from_slice(&buf[..n]);
    inv
}

/// Kendall's tau-b (ties handled as `scipy.stats.kendalltau`'s default); NaN when either
/// variable is constant.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(y[a].total_cmp(&y[b])));
    let joint = tie_pairs(idx.iter().map(|&i| (x[i], y[i])));
    let xtie = tie_pairs(idx.iter().map(|&i| x[i]));
    let mut ys: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
    let mut buf = vec![0.0; n];
    // Sorted by x then y: pairs tied in x are in ascending y, so only pairs with x_i < x_j
    // and y_i > y_j count as inversions, i.e. the discordant pairs.
    let dis = count_inversions(&mut ys, &mut buf);
    let ytie = tie_pairs(ys.iter().copied()); // ys is now sorted
    let tot = (n as u64) * (n as u64 - 1) / 2;
    if xtie == tot || ytie == tot {
        return f64::NAN;
    }
    let con_minus_dis = tot as f64 - xtie as f64 - ytie as f64 + joint as f64 - 2.0 * dis as f64;
    let tau = con_minus_dis / ((tot - xtie) as f64).sqrt() / ((tot - ytie) as f64).sqrt();
    tau.clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report's first line says which rows found no partner, not only those skipped.
    #[test]
    fn the_summary_counts_unmatched_and_filtered_rows() {
        let mut m = Matching {
            scores_file: "s.csv".into(),
            ratings_file: "r.csv".into(),
            key: "image".into(),
            score_column: "p".into(),
            rating_column: "rating".into(),
            filtered_out: 0,
            unmatched_scores: 0,
            unmatched_ratings: 0,
            skipped: 1,
            skipped_examples: Vec::new(),
        };
        assert_eq!(
            m.summary(9),
            "p vs rating on key `image`: n = 9 (1 skipped)"
        );
        (m.unmatched_scores, m.unmatched_ratings, m.filtered_out) = (2, 3, 4);
        assert_eq!(
            m.summary(9),
            "p vs rating on key `image`: n = 9 (1 skipped, 2 score rows without a rating, \
             3 rating rows without a score, 4 score rows left out by --where)"
        );
    }

    /// Brute-force tau-b for checking.
    fn tau_b_naive(x: &[f64], y: &[f64]) -> f64 {
        let (mut c, mut d, mut tx, mut ty) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for i in 0..x.len() {
            for j in i + 1..x.len() {
                let a = (x[i] - x[j]).signum() * if x[i] == x[j] { 0.0 } else { 1.0 };
                let b = (y[i] - y[j]).signum() * if y[i] == y[j] { 0.0 } else { 1.0 };
                if a == 0.0 && b == 0.0 {
                } else if a == 0.0 {
                    tx += 1.0;
                } else if b == 0.0 {
                    ty += 1.0;
                } else if a == b {
                    c += 1.0;
                } else {
                    d += 1.0;
                }
            }
        }
        (c - d) / ((c + d + tx) * (c + d + ty)).sqrt()
    }

    #[test]
    fn kendall_matches_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for trial in 0..50 {
            let n = 3 + trial;
            let x: Vec<f64> = (0..n).map(|_| uniform_below(&mut rng, 5) as f64).collect();
            let y: Vec<f64> = (0..n)
                .map(|_| uniform_below(&mut rng, 4) as f64 * 0.5)
                .collect();
            let (a, b) = (kendall_tau_b(&x, &y), tau_b_naive(&x, &y));
            assert!(
                (a - b).abs() < 1e-12 || (a.is_nan() && b.is_nan()),
                "{a} {b}"
            );
        }
    }

    #[test]
    fn known_values() {
        // scipy.stats: spearmanr([1,2,3,4,5],[5,6,7,8,7]) = 0.8207826816681233,
        // kendalltau(...) = 0.7378647873726218, pearsonr([1,2,3,4,5],[2,4,5,4,5]) ~ 0.7745966692414834.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [5.0, 6.0, 7.0, 8.0, 7.0];
        assert!((spearman(&x, &y) - 0.8207826816681233).abs() < 1e-12);
        assert!((kendall_tau_b(&x, &y) - 0.7378647873726218).abs() < 1e-12);
        assert!((pearson(&x, &[2.0, 4.0, 5.0, 4.0, 5.0]) - 0.7745966692414834).abs() < 1e-12);
        assert!(pearson(&x, &[1.0; 5]).is_nan());
        assert!(kendall_tau_b(&[1.0; 5], &x).is_nan());
    }

    #[test]
    fn constant_columns_are_nan_despite_rounding() {
        // The mean of seven 0.1s is not 0.1 in f64; the deviations' noise gave r = 1.9e-16.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        assert!(pearson(&[0.1; 7], &x).is_nan());
        assert!(pearson(&x, &[0.1; 7]).is_nan());
        let units = vec![vec![0.3; 3]; 5];
        assert!(krippendorff_alpha_interval(&units).is_nan());
        let units = vec![vec![0.0714285714285714; 3]; 11];
        assert!(krippendorff_alpha_interval(&units).is_nan());
    }

    #[test]
    fn interval_alpha_does_not_depend_on_an_offset() {
        // Alpha depends on differences only; the sum-of-squares formula lost them at 1e6.
        let units: Vec<Vec<f64>> = (0..6)
            .map(|u| {
                (0..3)
                    .map(|r| ((u * 7 + r * 3) % 5) as f64 * 1e-3)
                    .collect()
            })
            .collect();
        let shifted: Vec<Vec<f64>> = units
            .iter()
            .map(|u| u.iter().map(|v| v + 1e6).collect())
            .collect();
        let (a, b) = (
            krippendorff_alpha_interval(&units),
            krippendorff_alpha_interval(&shifted),
        );
        assert!(a.is_finite() && a <= 1.0, "{a}");
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn quantiles_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert_eq!(quantile(&v, 0.025), 1.075);
        assert_eq!(quantile(&v, 1.0), 4.0);
    }
}
