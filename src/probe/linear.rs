//! Linear probes: L2-regularised logistic regression separating class A from class B,
//! cross-validated.
//!
//! The model is scikit-learn's `make_pipeline(StandardScaler(), LogisticRegression(C=C))`:
//! features are standardised with the mean and population standard deviation of the
//! training rows only (a feature that is constant there keeps scale 1), then the weights `w`
//! and the intercept `b` minimise
//!
//! ```text
//! 0.5 * ||w||^2 + C * sum_i logloss(y_i, w . x_i + b)
//! ```
//!
//! with the intercept not penalised. This objective is strictly convex; it is minimised by
//! Newton's method with a backtracking line search until the largest gradient component,
//! divided by `C * n` (the scale of scikit-learn's own `gtol`), is at most `tol` (1e-10 by
//! default), so the optimum matches scikit-learn's lbfgs solver run to a tight tolerance.
//! Class A is the positive class: probabilities are P(class A).

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{average_ranks, shuffle, Matrix};
use crate::{Error, Result};

/// Options of one logistic-regression fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LogisticOptions {
    /// Inverse regularisation strength, as scikit-learn's `C` (default 1.0).
    pub c: f64,
    /// Convergence tolerance on `max |gradient| / (C * n)` (default 1e-10).
    pub tol: f64,
    /// Most Newton iterations (default 100; a fit typically needs fewer than 15).
    pub max_iter: usize,
    /// Standardise features with the training rows' statistics (default true).
    pub standardize: bool,
}

impl Default for LogisticOptions {
    fn default() -> Self {
        LogisticOptions {
            c: 1.0,
            tol: 1e-10,
            max_iter: 100,
            standardize: true,
        }
    }
}

/// A fitted logistic-regression model (standardisation included).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogisticModel {
    /// Per-feature means subtracted before scaling (zeros without standardisation).
    pub mean: Vec<f64>,
    /// Per-feature divisors (population standard deviations; ones without standardisation).
    pub scale: Vec<f64>,
    /// Weights on the standardised features.
    pub weights: Vec<f64>,
    /// Intercept.
    pub intercept: f64,
    /// Newton iterations used.
    pub iterations: usize,
    /// Final `max |gradient| / (C * n)`.
    pub gradient: f64,
}

impl LogisticModel {
    /// Fits the model to the rows of `x` with labels `y` (`true` = positive class).
    ///
    /// Both labels must occur; `x` must be finite.
    pub fn fit(x: &Matrix, y: &[bool], opts: &LogisticOptions) -> Result<LogisticModel> {
        let rows: Vec<usize> = (0..x.rows).collect();
        fit_rows(x, &rows, y, opts)
    }

    /// The decision function `w . standardise(x) + b` of each row.
    pub fn decision_function(&self, x: &Matrix) -> Result<Vec<f64>> {
        if x.cols != self.weights.len() {
            return Err(Error::value(
                "features",
                format!(
                    "the model was fitted on {} columns but the data have {}",
                    self.weights.len(),
                    x.cols
                ),
            ));
        }
        Ok((0..x.rows).map(|r| self.decision_row(x.row(r))).collect())
    }

    fn decision_row(&self, row: &[f32]) -> f64 {
        let mut z = self.intercept;
        for (((&v, w), m), s) in row
            .iter()
            .zip(&self.weights)
            .zip(&self.mean)
            .zip(&self.scale)
        {
            z += w * ((v as f64 - m) / s);
        }
        z
    }

    /// P(positive class) of each row.
    pub fn predict_proba(&self, x: &Matrix) -> Result<Vec<f64>> {
        Ok(self
            .decision_function(x)?
            .into_iter()
            .map(sigmoid)
            .collect())
    }

    /// Predicted labels: positive where the decision function is > 0 (as scikit-learn).
    pub fn predict(&self, x: &Matrix) -> Result<Vec<bool>> {
        Ok(self
            .decision_function(x)?
            .into_iter()
            .map(|z| z > 0.0)
            .collect())
    }
}

/// The logistic function, computed without overflow.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + exp(-t))` without overflow.
fn log1pexp_neg(t: f64) -> f64 {
    if t > 0.0 {
        (-t).exp().ln_1p()
    } else {
        -t + t.exp().ln_1p()
    }
}

/// Standardisation statistics of the given rows: mean and population standard deviation
/// per column, with scale 1 for columns that are constant (as scikit-learn's StandardScaler).
pub fn standardizer(x: &Matrix, rows: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let d = x.cols;
    let n = rows.len() as f64;
    let mut mean = vec![0.0f64; d];
    for &r in rows {
        for (m, &v) in mean.iter_mut().zip(x.row(r)) {
            *m += v as f64;
        }
    }
    for m in &mut mean {
        *m /= n;
    }
    let mut var = vec![0.0f64; d];
    for &r in rows {
        for ((s, &v), &m) in var.iter_mut().zip(x.row(r)).zip(&mean) {
            let c = v as f64 - m;
            *s += c * c;
        }
    }
    let eps = f64::EPSILON;
    let scale = var
        .iter()
        .zip(&mean)
        .map(|(&s, &m)| {
            let v = s / n;
            let constant = v <= n * eps * v + (n * m * eps).powi(2);
            let sd = v.sqrt();
            if constant || sd < 10.0 * eps {
                1.0
            } else {
                sd
            }
        })
        .collect();
    (mean, scale)
}

/// Fits on the rows `rows` of `x`; `y[i]` is the label of `rows[i]`.
pub fn fit_rows(
    x: &Matrix,
    rows: &[usize],
    y: &[bool],
    opts: &LogisticOptions,
) -> Result<LogisticModel> {
    if rows.len() != y.len() {
        return Err(Error::value(
            "labels",
            format!("{} labels for {} rows", y.len(), rows.len()),
        ));
    }
    if !(opts.c > 0.0 && opts.c.is_finite()) {
        return Err(Error::value("C", format!("{} (must be positive)", opts.c)));
    }
    if opts.tol.is_nan() || opts.tol <= 0.0 {
        return Err(Error::value(
            "tol",
            format!("{} (must be positive)", opts.tol),
        ));
    }
    let n_pos = y.iter().filter(|&&v| v).count();
    if n_pos == 0 || n_pos == y.len() {
        return Err(Error::value(
            "labels",
            format!(
                "both classes are needed to fit; got {n_pos} positive and {} negative rows",
                y.len() - n_pos
            ),
        ));
    }
    let d = x.cols;
    let n = rows.len();
    let (mean, scale) = if opts.standardize {
        standardizer(x, rows)
    } else {
        (vec![0.0; d], vec![1.0; d])
    };
    // Standardised design matrix, row-major, f64.
    let mut xs = Vec::with_capacity(n * d);
    for &r in rows {
        for ((&v, &m), &s) in x.row(r).iter().zip(&mean).zip(&scale) {
            let t = (v as f64 - m) / s;
            if !t.is_finite() {
                return Err(Error::value(
                    "features",
                    format!("row {r} has a value that is not finite"),
                ));
            }
            xs.push(t);
        }
    }
    let yv: Vec<f64> = y.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
    let c = opts.c;
    let norm = c * n as f64;
    let p1 = d + 1; // parameters: d weights, then the intercept

    let objective = |beta: &[f64], z: &mut [f64]| -> f64 {
        let (w, b) = (&beta[..d], beta[d]);
        let mut loss = 0.0;
        for i in 0..n {
            let row = &xs[i * d..(i + 1) * d];
            let zi = dot(row, w) + b;
            z[i] = zi;
            let t = if yv[i] > 0.5 { zi } else { -zi };
            loss += log1pexp_neg(t);
        }
        0.5 * dot(w, w) + c * loss
    };

    let mut beta = vec![0.0f64; p1];
    let mut z = vec![0.0f64; n];
    let mut f = objective(&beta, &mut z);
    let mut iterations = 0;
    let mut grad_rel;
    loop {
        // Gradient.
        let p: Vec<f64> = z.iter().map(|&zi| sigmoid(zi)).collect();
        let mut g = vec![0.0f64; p1];
        g[..d].copy_from_slice(&beta[..d]);
        for i in 0..n {
            let r = c * (p[i] - yv[i]);
            let row = &xs[i * d..(i + 1) * d];
            for (gj, &xj) in g[..d].iter_mut().zip(row) {
                *gj += r * xj;
            }
            g[d] += r;
        }
        grad_rel = g.iter().fold(0.0f64, |m, v| m.max(v.abs())) / norm;
        if grad_rel <= opts.tol {
            break;
        }
        if iterations >= opts.max_iter {
            return Err(Error::value(
                "logistic regression",
                format!(
                    "did not converge in {} Newton iterations (gradient {grad_rel:.3e}, \
                     tolerance {:.1e})",
                    opts.max_iter, opts.tol
                ),
            ));
        }
        iterations += 1;
        // Hessian: diag(1,..,1,0) + C * A^T D A, A = [X 1], D = p(1-p).
        let mut a = Vec::with_capacity(n * p1);
        for i in 0..n {
            let s = (c * p[i] * (1.0 - p[i])).sqrt();
            a.extend(xs[i * d..(i + 1) * d].iter().map(|&v| v * s));
            a.push(s);
        }
        let at = Tensor::from_vec(a, (n, p1), &Device::Cpu)?;
        let mut h = at.t()?.matmul(&at)?.flatten_all()?.to_vec1::<f64>()?;
        for j in 0..d {
            h[j * p1 + j] += 1.0;
        }
        let neg_g: Vec<f64> = g.iter().map(|v| -v).collect();
        let step = solve_spd(&mut h, p1, &neg_g)?;
        // Backtracking (Armijo) line search.
        let slope = dot(&g, &step);
        let mut t = 1.0;
        let mut trial = vec![0.0f64; p1];
        let mut z_trial = vec![0.0f64; n];
        let mut accepted = false;
        for _ in 0..60 {
            for j in 0..p1 {
                trial[j] = beta[j] + t * step[j];
            }
            let f_trial = objective(&trial, &mut z_trial);
            if f_trial <= f + 1e-4 * t * slope {
                beta.copy_from_slice(&trial);
                std::mem::swap(&mut z, &mut z_trial);
                f = f_trial;
                accepted = true;
                break;
            }
            t *= 0.5;
        }
        if !accepted {
            // No decrease representable in floating point: we are at the optimum to
            // machine precision. Accept when the gradient is already tiny.
            if grad_rel <= opts.tol.max(1e-8) {
                break;
            }
            return Err(Error::value(
                "logistic regression",
                format!("line search failed (gradient {grad_rel:.3e})"),
            ));
        }
    }
    let intercept = beta[d];
    beta.truncate(d);
    Ok(LogisticModel {
        mean,
        scale,
        weights: beta,
        intercept,
        iterations,
        gradient: grad_rel,
    })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `H x = b` for a symmetric positive-definite `H` (row-major, `n x n`, overwritten by
/// its Cholesky factor). A tiny ridge is added if rounding makes `H` look indefinite.
fn solve_spd(h: &mut [f64], n: usize, b: &[f64]) -> Result<Vec<f64>> {
    let orig = h.to_vec();
    let mut jitter = 0.0;
    loop {
        if jitter > 0.0 {
            h.copy_from_slice(&orig);
            for i in 0..n {
                h[i * n + i] += jitter;
            }
        }
        if cholesky(h, n)? {
            break;
        }
        let max_diag = (0..n).map(|i| orig[i * n + i].abs()).fold(1e-300, f64::max);
        jitter = if jitter == 0.0 {
            max_diag * 1e-14
        } else {
            jitter * 10.0
        };
    }
    // Forward: L y = b.
    let mut y = b.to_vec();
    for i in 0..n {
        let row = &h[i * n..i * n + i];
        let s: f64 = row.iter().zip(&y[..i]).map(|(l, v)| l * v).sum();
        y[i] = (y[i] - s) / h[i * n + i];
    }
    // Backward: L^T x = y.
    let mut x = y;
    for i in (0..n).rev() {
        let mut s = x[i];
        for k in i + 1..n {
            s -= h[k * n + i] * x[k];
        }
        x[i] = s / h[i * n + i];
    }
    Ok(x)
}

/// Block size of [`cholesky`].
const BLOCK: usize = 64;

/// In-place Cholesky factorisation of a symmetric `n x n` matrix (row-major, full): its lower
/// triangle becomes L with `H = L L^T`. False if `H` is not positive definite.
///
/// Right-looking blocked algorithm: the diagonal blocks are factored here, the panel solves
/// and the trailing updates (nearly all the work) are matrix products done by candle.
fn cholesky(h: &mut [f64], n: usize) -> Result<bool> {
    if n <= 2 * BLOCK {
        return Ok(cholesky_unblocked(h, n));
    }
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + BLOCK).min(n);
        let b = k1 - k0;
        let mut d = vec![0.0f64; b * b];
        for i in 0..b {
            d[i * b..(i + 1) * b].copy_from_slice(&h[(k0 + i) * n + k0..(k0 + i) * n + k1]);
        }
        if !cholesky_unblocked(&mut d, b) {
            return Ok(false);
        }
        for i in 0..b {
            h[(k0 + i) * n + k0..(k0 + i) * n + k0 + i + 1]
                .copy_from_slice(&d[i * b..i * b + i + 1]);
        }
        if k1 == n {
            break;
        }
        let m = n - k1;
        // L21 = A21 L11^-T, then A22 -= L21 L21^T.
        let linv = invert_lower(&d, b);
        let mut a21 = Vec::with_capacity(m * b);
        for i in k1..n {
            a21.extend_from_slice(&h[i * n + k0..i * n + k1]);
        }
        let a21 = Tensor::from_vec(a21, (m, b), &Device::Cpu)?;
        let linv = Tensor::from_vec(linv, (b, b), &Device::Cpu)?;
        let l21 = a21.matmul(&linv.t()?)?;
        let update = l21.matmul(&l21.t()?)?.flatten_all()?.to_vec1::<f64>()?;
        let l21 = l21.flatten_all()?.to_vec1::<f64>()?;
        for i in 0..m {
            let row = &mut h[(k1 + i) * n..(k1 + i + 1) * n];
            row[k0..k1].copy_from_slice(&l21[i * b..(i + 1) * b]);
            for (r, u) in row[k1..].iter_mut().zip(&update[i * m..(i + 1) * m]) {
                *r -= u;
            }
        }
        k0 = k1;
    }
    Ok(true)
}

/// The inverse of a lower-triangular `b x b` matrix (row-major; the upper triangle of `l`
/// is ignored), itself lower triangular.
fn invert_lower(l: &[f64], b: usize) -> Vec<f64> {
    let mut x = vec![0.0f64; b * b];
    for j in 0..b {
        x[j * b + j] = 1.0 / l[j * b + j];
        for i in j + 1..b {
            let mut s = 0.0;
            for k in j..i {
                s += l[i * b + k] * x[k * b + j];
            }
            x[i * b + j] = -s / l[i * b + i];
        }
    }
    x
}

/// Unblocked in-place Cholesky factorisation (lower triangle of `h` becomes L). False if not PD.
fn cholesky_unblocked(h: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let row_j = &mut h[j * n..(j + 1) * n];
        let s: f64 = row_j[..j].iter().map(|v| v * v).sum();
        let djj = row_j[j] - s;
        if djj.is_nan() || djj <= 0.0 || !djj.is_finite() {
            return false;
        }
        let ljj = djj.sqrt();
        row_j[j] = ljj;
        let lj = row_j[..j].to_vec();
        for i in j + 1..n {
            let row_i = &mut h[i * n..i * n + n];
            let s: f64 = row_i[..j].iter().zip(&lj).map(|(a, b)| a * b).sum();
            row_i[j] = (row_i[j] - s) / ljj;
        }
    }
    true
}

/// The area under the ROC curve of `scores` for `labels` (`true` = positive), with ties
/// counted as half (the Mann-Whitney statistic, as scikit-learn's `roc_auc_score`).
/// NaN when either class is absent.
pub fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let n_pos = labels.iter().filter(|&&l| l).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    let ranks = average_ranks(scores);
    let r_pos: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(r, _)| r)
        .sum();
    (r_pos - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos as f64 * n_neg as f64)
}

/// Options of [`separate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeparateOptions {
    /// Number of cross-validation folds (default 5).
    pub folds: usize,
    /// Seed of the fold shuffle (default 0).
    pub seed: u64,
    /// The logistic regression of each fold.
    pub logistic: LogisticOptions,
}

impl Default for SeparateOptions {
    fn default() -> Self {
        SeparateOptions {
            folds: 5,
            seed: 0,
            logistic: LogisticOptions::default(),
        }
    }
}

/// One cross-validation fold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoldResult {
    /// Fold number, from 0.
    pub fold: usize,
    /// Training rows (both classes).
    pub n_train: usize,
    /// Test rows (both classes).
    pub n_test: usize,
    /// Fraction of test rows classified correctly (P(A) > 0.5 means A).
    pub accuracy: f64,
    /// ROC AUC on the test rows.
    pub auc: f64,
    /// Newton iterations of the fit.
    pub iterations: usize,
}

/// Which class a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Class {
    /// Class A (the positive class).
    A,
    /// Class B.
    B,
}

/// The out-of-fold score of one input row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RowScore {
    /// The class (input file) of the row.
    pub class: Class,
    /// Row index within its class's matrix.
    pub row: usize,
    /// The fold in which the row was a test row.
    pub fold: usize,
    /// Out-of-fold P(class A) from the model fitted without this row's fold.
    pub p_a: f64,
}

/// The result of a cross-validated linear probe of class A vs class B.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Separation {
    /// Rows of class A.
    pub n_a: usize,
    /// Rows of class B.
    pub n_b: usize,
    /// Embedding dimensions.
    pub dims: usize,
    /// Number of folds.
    pub folds: usize,
    /// Seed of the fold shuffle (`None` when folds were given explicitly).
    pub seed: Option<u64>,
    /// The logistic regression options.
    pub logistic: LogisticOptions,
    /// Mean of the per-fold accuracies.
    pub accuracy: f64,
    /// Population standard deviation (ddof = 0, numpy's default) of the per-fold accuracies.
    pub accuracy_std: f64,
    /// ROC AUC of the pooled out-of-fold P(A) over all rows.
    pub auc: f64,
    /// Mean of the per-fold AUCs.
    pub auc_mean: f64,
    /// Population standard deviation (ddof = 0) of the per-fold AUCs.
    pub auc_std: f64,
    /// Per-fold results.
    pub fold_results: Vec<FoldResult>,
    /// Out-of-fold scores: the rows of class A in order, then those of class B.
    /// Not serialised (use [`Separation::write_scores_csv`]).
    #[serde(skip)]
    pub scores: Vec<RowScore>,
}

impl Separation {
    /// Out-of-fold P(A) of the rows of class A, in row order.
    pub fn p_a_class_a(&self) -> Vec<f64> {
        self.scores[..self.n_a].iter().map(|s| s.p_a).collect()
    }

    /// Out-of-fold P(A) of the rows of class B, in row order.
    pub fn p_a_class_b(&self) -> Vec<f64> {
        self.scores[self.n_a..].iter().map(|s| s.p_a).collect()
    }

    /// The scores as CSV columns `class,row,fold,p_a` (class = `label_a` or `label_b`;
    /// `p_a` printed as the shortest decimal that reads back to the same `f64`).
    pub fn scores_table(&self, label_a: &str, label_b: &str) -> (Vec<String>, Vec<Vec<String>>) {
        let headers = ["class", "row", "fold", "p_a"].map(String::from).to_vec();
        let rows = self
            .scores
            .iter()
            .map(|s| {
                vec![
                    match s.class {
                        Class::A => label_a.to_string(),
                        Class::B => label_b.to_string(),
                    },
                    s.row.to_string(),
                    s.fold.to_string(),
                    s.p_a.to_string(),
                ]
            })
            .collect();
        (headers, rows)
    }

    /// Writes [`Separation::scores_table`] to a CSV file, atomically.
    pub fn write_scores_csv(
        &self,
        path: impl AsRef<Path>,
        label_a: &str,
        label_b: &str,
    ) -> Result<()> {
        let (h, r) = self.scores_table(label_a, label_b);
        super::table::write_csv(path, &h, &r)
    }
}

/// Stratified, shuffled fold assignment: the rows of class A then those of class B get a fold
/// in `0..k`. Each class is shuffled with a ChaCha8 generator seeded by `seed` (A first, then
/// B, from the same stream) and dealt round-robin, B continuing where A stopped, so every fold
/// has within one row of the same number of each class and of the total.
pub fn stratified_folds(n_a: usize, n_b: usize, k: usize, seed: u64) -> Result<Vec<usize>> {
    if k < 2 {
        return Err(Error::value(
            "folds",
            format!("{k} (at least 2 are needed)"),
        ));
    }
    for (name, n) in [("class A", n_a), ("class B", n_b)] {
        if n < k {
            return Err(Error::value(
                "folds",
                format!("{k} folds need at least {k} rows of each class, but {name} has {n}"),
            ));
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut folds = vec![0usize; n_a + n_b];
    let mut a: Vec<usize> = (0..n_a).collect();
    shuffle(&mut rng, &mut a);
    for (pos, &r) in a.iter().enumerate() {
        folds[r] = pos % k;
    }
    let mut b: Vec<usize> = (0..n_b).collect();
    shuffle(&mut rng, &mut b);
    for (pos, &r) in b.iter().enumerate() {
        folds[n_a + r] = (n_a + pos) % k;
    }
    Ok(folds)
}

/// Cross-validated linear probe of class A (positive) vs class B with stratified folds from
/// [`stratified_folds`]`(a.rows, b.rows, opts.folds, opts.seed)`.
pub fn separate(a: &Matrix, b: &Matrix, opts: &SeparateOptions) -> Result<Separation> {
    let folds = stratified_folds(a.rows, b.rows, opts.folds, opts.seed)?;
    let mut s = separate_with_folds(a, b, &folds, &opts.logistic)?;
    s.seed = Some(opts.seed);
    Ok(s)
}

/// [`separate`] on two `.npy` files, with errors naming the files (widths that differ,
/// non-finite values).
pub fn separate_files(
    a_path: impl AsRef<Path>,
    b_path: impl AsRef<Path>,
    opts: &SeparateOptions,
) -> Result<Separation> {
    let (a_path, b_path) = (a_path.as_ref(), b_path.as_ref());
    let a = super::npy::read_npy(a_path)?;
    let b = super::npy::read_npy(b_path)?;
    if a.cols != b.cols {
        return Err(Error::file(
            b_path,
            format!(
                "embeddings have {} dimensions but those of {} have {}",
                b.cols,
                a_path.display(),
                a.cols
            ),
        ));
    }
    for (p, m) in [(a_path, &a), (b_path, &b)] {
        if let Some((r, c)) = m.first_non_finite() {
            return Err(Error::file(
                p,
                format!("row {r}, column {c} is not a finite number"),
            ));
        }
    }
    separate(&a, &b, opts)
}

/// Cross-validation on explicit folds: `folds[i]` is the fold of row `i` of class A for
/// `i < a.rows`, and of row `i - a.rows` of class B after that. Folds are numbered `0..k`;
/// each must be non-empty and leave both classes in its training rows.
pub fn separate_with_folds(
    a: &Matrix,
    b: &Matrix,
    folds: &[usize],
    opts: &LogisticOptions,
) -> Result<Separation> {
    if a.cols != b.cols {
        return Err(Error::value(
            "embeddings",
            format!(
                "class A has {} dimensions but class B has {}",
                a.cols, b.cols
            ),
        ));
    }
    let n = a.rows + b.rows;
    if folds.len() != n {
        return Err(Error::value(
            "folds",
            format!("{} fold assignments for {} rows", folds.len(), n),
        ));
    }
    for (name, m) in [("class A", a), ("class B", b)] {
        if let Some((r, c)) = m.first_non_finite() {
            return Err(Error::value(
                name,
                format!("row {r}, column {c} is not a finite number"),
            ));
        }
    }
    // Settings are checked once here, so an error does not read as a fold's.
    if !(opts.c > 0.0 && opts.c.is_finite()) {
        return Err(Error::value(
            "--c",
            format!("{}: expected a positive number", opts.c),
        ));
    }
    let k = folds.iter().max().map_or(0, |m| m + 1);
    // One matrix with all rows: A then B.
    let mut data = Vec::with_capacity(n * a.cols);
    data.extend_from_slice(&a.data);
    data.extend_from_slice(&b.data);
    let x = Matrix {
        rows: n,
        cols: a.cols,
        data,
    };
    let labels: Vec<bool> = (0..n).map(|i| i < a.rows).collect();
    let mut p_a = vec![f64::NAN; n];
    let mut fold_results = Vec::with_capacity(k);
    for f in 0..k {
        let train: Vec<usize> = (0..n).filter(|&i| folds[i] != f).collect();
        let test: Vec<usize> = (0..n).filter(|&i| folds[i] == f).collect();
        if test.is_empty() {
            return Err(Error::value("folds", format!("fold {f} has no rows")));
        }
        let y: Vec<bool> = train.iter().map(|&i| labels[i]).collect();
        let model = fit_rows(&x, &train, &y, opts).map_err(|e| match e {
            Error::Value { name, message } => Error::value(name, format!("fold {f}: {message}")),
            e => e,
        })?;
        let mut correct = 0usize;
        let mut fold_p = Vec::with_capacity(test.len());
        let mut fold_y = Vec::with_capacity(test.len());
        for &i in &test {
            let z = model.decision_row(x.row(i));
            let p = sigmoid(z);
            p_a[i] = p;
            if (z > 0.0) == labels[i] {
                correct += 1;
            }
            fold_p.push(p);
            fold_y.push(labels[i]);
        }
        fold_results.push(FoldResult {
            fold: f,
            n_train: train.len(),
            n_test: test.len(),
            accuracy: correct as f64 / test.len() as f64,
            auc: auc(&fold_p, &fold_y),
            iterations: model.iterations,
        });
    }
    let (accuracy, accuracy_std) = mean_std(fold_results.iter().map(|f| f.accuracy));
    let (auc_mean, auc_std) = mean_std(fold_results.iter().map(|f| f.auc));
    let scores = (0..n)
        .map(|i| RowScore {
            class: if i < a.rows { Class::A } else { Class::B },
            row: if i < a.rows { i } else { i - a.rows },
            fold: folds[i],
            p_a: p_a[i],
        })
        .collect();
    Ok(Separation {
        n_a: a.rows,
        n_b: b.rows,
        dims: a.cols,
        folds: k,
        seed: None,
        logistic: *opts,
        accuracy,
        accuracy_std,
        auc: auc(&p_a, &labels),
        auc_mean,
        auc_std,
        fold_results,
        scores,
    })
}

/// Mean and population standard deviation (ddof = 0).
fn mean_std(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = v.clone().count() as f64;
    let mean = v.clone().sum::<f64>() / n;
    let var = v.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stratified_and_seeded() {
        let f = stratified_folds(23, 17, 5, 7).unwrap();
        assert_eq!(f, stratified_folds(23, 17, 5, 7).unwrap());
        assert_ne!(f, stratified_folds(23, 17, 5, 8).unwrap());
        for k in 0..5 {
            let na = f[..23].iter().filter(|&&v| v == k).count();
            let nb = f[23..].iter().filter(|&&v| v == k).count();
            assert!((4..=5).contains(&na) && (3..=4).contains(&nb), "{na} {nb}");
            assert_eq!(na + nb, 8);
        }
        assert!(stratified_folds(3, 10, 5, 0).is_err());
        assert!(stratified_folds(10, 10, 1, 0).is_err());
    }

    #[test]
    fn blocked_cholesky_solves() {
        // A random SPD matrix larger than two blocks: B^T B + I.
        let n = 200;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let bm: Vec<f64> = (0..n * n)
            .map(|_| super::super::uniform_below(&mut rng, 1000) as f64 / 1000.0 - 0.5)
            .collect();
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n).map(|k| bm[k * n + i] * bm[k * n + j]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let x_true: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let rhs: Vec<f64> = (0..n)
            .map(|i| dot(&h[i * n..(i + 1) * n], &x_true))
            .collect();
        let mut f = h.clone();
        let x = solve_spd(&mut f, n, &rhs).unwrap();
        let err = x
            .iter()
            .zip(&x_true)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-10, "{err}");
        // And the unblocked path agrees on the factor.
        let mut g = h.clone();
        assert!(cholesky_unblocked(&mut g, n));
        let mut f2 = h.clone();
        assert!(cholesky(&mut f2, n).unwrap());
        for i in 0..n {
            for j in 0..=i {
                assert!((f2[i * n + j] - g[i * n + j]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn auc_with_ties() {
        assert_eq!(auc(&[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]), 1.0);
        assert_eq!(auc(&[0.5, 0.5], &[true, false]), 0.5);
        assert!((auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]) - 0.75).abs() < 1e-15);
    }

    #[test]
    fn fit_reaches_the_optimum() {
        // Small problem: check the gradient of the objective vanishes.
        let x = Matrix::new(
            6,
            2,
            vec![0.0, 1.0, 1.0, 0.5, 2.0, 2.0, 3.0, 0.0, 0.5, 3.0, 2.5, 1.5],
        )
        .unwrap();
        let y = [false, false, true, true, false, true];
        let opts = LogisticOptions {
            standardize: false,
            ..Default::default()
        };
        let m = LogisticModel::fit(&x, &y, &opts).unwrap();
        let p = m.predict_proba(&x).unwrap();
        let mut g = [m.weights[0], m.weights[1], 0.0];
        for i in 0..6 {
            let r = p[i] - if y[i] { 1.0 } else { 0.0 };
            g[0] += r * x.row(i)[0] as f64;
            g[1] += r * x.row(i)[1] as f64;
            g[2] += r;
        }
        assert!(g.iter().all(|v| v.abs() < 1e-9), "{g:?}");
    }

    #[test]
    fn separable_classes() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..20 {
            let t = i as f32 / 20.0;
            a.push(vec![1.0 + t, t, -t]);
            b.push(vec![-1.0 - t, t, t * 0.5]);
        }
        let a = Matrix::from_rows(&a).unwrap();
        let b = Matrix::from_rows(&b).unwrap();
        let s = separate(&a, &b, &SeparateOptions::default()).unwrap();
        assert_eq!(s.accuracy, 1.0);
        assert_eq!(s.accuracy_std, 0.0);
        assert_eq!(s.auc, 1.0);
        assert!(s.p_a_class_a().iter().all(|&p| p > 0.5));
        assert_eq!(s.scores.len(), 40);
        let s2 = separate(&a, &b, &SeparateOptions::default()).unwrap();
        assert_eq!(s, s2);
    }
}
