//! Embedding-only analyses: linear probes that separate two sets of CLIP image embeddings,
//! and agreement between a per-image score and human ratings.
//!
//! Everything here works on embeddings already computed (`.npy` matrices) and on CSV tables,
//! so it needs no model weights:
//!
//! - [`npy`]: read `.npy` matrices (float16/32/64, little-endian, C order) and write f32 ones.
//! - [`table`]: a small CSV reader and writer.
//! - [`linear`]: L2-regularised logistic regression, cross-validated class A vs class B.
//! - [`agree`]: Spearman, Kendall tau-b and Pearson correlations with bootstrap intervals.
//! - [`zeroshot`]: CLIP zero-shot classification from prompt-ensembled text embeddings.

pub mod agree;
pub mod embed;
pub mod evaluate;
pub mod linear;
pub mod npy;
pub mod runner;
pub mod suite;
pub mod table;
pub mod zeroshot;

/// A dense row-major matrix of `f32`: `rows` embeddings of `cols` dimensions each.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of rows (embeddings).
    pub rows: usize,
    /// Number of columns (embedding dimensions).
    pub cols: usize,
    /// `rows * cols` values, row after row.
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix from row-major data; `data.len()` must be `rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> crate::Result<Self> {
        match rows.checked_mul(cols) {
            Some(n) if n == data.len() => Ok(Matrix { rows, cols, data }),
            _ => Err(crate::Error::value(
                "matrix",
                format!(
                    "{} values cannot fill {} rows x {} columns",
                    data.len(),
                    rows,
                    cols
                ),
            )),
        }
    }

    /// A matrix whose rows are the given slices, which must all have the same length.
    pub fn from_rows<R: AsRef<[f32]>>(rows: &[R]) -> crate::Result<Self> {
        let cols = rows.first().map_or(0, |r| r.as_ref().len());
        let mut data = Vec::with_capacity(rows.len() * cols);
        for (i, r) in rows.iter().enumerate() {
            let r = r.as_ref();
            if r.len() != cols {
                return Err(crate::Error::value(
                    "matrix",
                    format!("row {i} has {} values but row 0 has {cols}", r.len()),
                ));
            }
            data.extend_from_slice(r);
        }
        Ok(Matrix {
            rows: rows.len(),
            cols,
            data,
        })
    }

    /// Row `i` as a slice. Panics when `i >= rows`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// A new matrix made of the given rows, in that order.
    pub fn select_rows(&self, rows: &[usize]) -> Matrix {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for &r in rows {
            data.extend_from_slice(self.row(r));
        }
        Matrix {
            rows: rows.len(),
            cols: self.cols,
            data,
        }
    }

    /// The first `cols` columns of every row (all of them when `cols >= self.cols`).
    pub fn leading_columns(&self, cols: usize) -> Matrix {
        let cols = cols.min(self.cols);
        let mut data = Vec::with_capacity(self.rows * cols);
        for r in 0..self.rows {
            data.extend_from_slice(&self.row(r)[..cols]);
        }
        Matrix {
            rows: self.rows,
            cols,
            data,
        }
    }

    /// The position `(row, column)` of the first NaN or infinite value, if any.
    pub fn first_non_finite(&self) -> Option<(usize, usize)> {
        self.data
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| (i / self.cols.max(1), i % self.cols.max(1)))
    }
}

/// A uniform integer in `0..n` (n > 0) from the raw 64-bit output of `rng`, by rejection
/// sampling, so that a seed gives the same draws whatever the version of `rand`.
pub(crate) fn uniform_below(rng: &mut impl rand::RngCore, n: usize) -> usize {
    debug_assert!(n > 0);
    let n = n as u64;
    let zone = (u64::MAX / n) * n;
    loop {
        let v = rng.next_u64();
        if v < zone {
            return (v % n) as usize;
        }
    }
}

/// Shuffles `v` in place (Fisher-Yates with [`uniform_below`]).
pub(crate) fn shuffle<T>(rng: &mut impl rand::RngCore, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = uniform_below(rng, i + 1);
        v.swap(i, j);
    }
}

/// Average ranks (1-based; tied values share the mean of their ranks), as
/// `scipy.stats.rankdata(method="average")`. Values must not be NaN.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}
