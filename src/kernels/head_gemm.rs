//! Attention's two products on the `(batch, tokens, heads*dim)` layout as strided batched
//! GEMMs that read and write each head at its column offset, so no head-major copy of Q, K,
//! V or the output is made, and the scale rides in the first GEMM's `alpha` instead of a pass
//! over Q. On an H100 the head copies were 12% of a CLIP ViT-L/14 batch (BENCHMARKS.md,
//! "Where the time goes").
//!
//! The plans are plain data so that the CPU tests can run them through a reference of
//! cuBLAS's column-major semantics (below); `kernels::cuda` hands them to cuBLAS.

/// The sizes of one attention call: `q: (b, n, heads*d)`, `k, v: (b, m, heads*d)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Images in the batch.
    pub b: usize,
    /// Query tokens.
    pub n: usize,
    /// Key/value tokens.
    pub m: usize,
    /// Heads.
    pub heads: usize,
    /// Width of a head.
    pub d: usize,
}

/// One column-major strided batched GEMM, `C_i = alpha op(A_i) op(B_i)` for `i < batch`
/// (cuBLAS's `cublasGemmStridedBatchedEx` with `beta = 0`), issued `calls` times with the
/// three operands moved on by `call_stride` each time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StridedGemm {
    /// `op(A) = A^T` (A stored `k x m`), else A stored `m x k`.
    pub trans_a: bool,
    /// `op(B) = B^T` (B stored `n x k`), else B stored `k x n`.
    pub trans_b: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// Leading dimensions (column strides) of A, B and C.
    pub ld: [usize; 3],
    /// Scale of the product.
    pub alpha: f32,
    /// GEMMs in one call.
    pub batch: usize,
    /// Elements between the batch's GEMMs, for A, B and C.
    pub stride: [usize; 3],
    /// Calls.
    pub calls: usize,
    /// Elements between calls, for A, B and C.
    pub call_stride: [usize; 3],
}

impl StridedGemm {
    /// One past the largest element index each operand (A, B, C) is read or written at:
    /// the buffers must hold at least this many.
    pub fn extents(&self) -> [usize; 3] {
        let stored = [
            if self.trans_a {
                (self.k, self.m)
            } else {
                (self.m, self.k)
            },
            if self.trans_b {
                (self.n, self.k)
            } else {
                (self.k, self.n)
            },
            (self.m, self.n),
        ];
        let mut out = [0; 3];
        for (i, (rows, cols)) in stored.into_iter().enumerate() {
            if rows == 0 || cols == 0 || self.batch == 0 || self.calls == 0 {
                continue;
            }
            out[i] = (rows - 1)
                + (cols - 1) * self.ld[i]
                + (self.batch - 1) * self.stride[i]
                + (self.calls - 1) * self.call_stride[i]
                + 1;
        }
        out
    }
}

/// How one GEMM per (image, head) pair is issued, given each operand's element strides
/// between heads and between images: `(batch, stride, calls, call_stride)`, batched over the
/// larger of the two counts with one call per member of the smaller (cuBLAS's strided batch
/// takes one stride, and heads and images lie at unrelated strides).
fn over_heads_and_images(
    s: &AttentionShape,
    head: [usize; 3],
    image: [usize; 3],
) -> (usize, [usize; 3], usize, [usize; 3]) {
    if s.b <= s.heads {
        (s.heads, head, s.b, image)
    } else {
        (s.b, image, s.heads, head)
    }
}

/// `scale Q_h K_h^T` for every image and head into scores `(b*heads, n, m)`, contiguous.
///
/// Row-major `S = Q K^T` (n x m) is column-major `S^T = K Q^T` (m x n): A is K, whose
/// row-major `(m, d)` block at a head's column offset is a column-major `d x m` matrix with
/// leading dimension `heads*d`, used transposed; B is Q the same way, untransposed.
pub fn scores_plan(s: &AttentionShape, scale: f32) -> StridedGemm {
    let hd = s.heads * s.d;
    let (batch, stride, calls, call_stride) = over_heads_and_images(
        s,
        [s.d, s.d, s.n * s.m],
        [s.m * hd, s.n * hd, s.heads * s.n * s.m],
    );
    StridedGemm {
        trans_a: true,
        trans_b: false,
        m: s.m,
        n: s.n,
        k: s.d,
        ld: [hd, hd, s.m],
        alpha: scale,
        batch,
        stride,
        calls,
        call_stride,
    }
}

/// `P_h V_h` for probabilities `(b*heads, n, m)` into the output `(b, n, heads*d)`, each head
/// written at its column offset.
///
/// Row-major `O_h = P V_h` (n x d, leading dimension `heads*d`) is column-major
/// `O_h^T = V_h^T P^T` (d x n): A is V's head block (column-major `d x m`), B is P
/// (column-major `m x n`), both untransposed.
pub fn context_plan(s: &AttentionShape) -> StridedGemm {
    let hd = s.heads * s.d;
    let (batch, stride, calls, call_stride) = over_heads_and_images(
        s,
        [s.d, s.n * s.m, s.d],
        [s.m * hd, s.heads * s.n * s.m, s.n * hd],
    );
    StridedGemm {
        trans_a: false,
        trans_b: false,
        m: s.d,
        n: s.n,
        k: s.m,
        ld: [hd, s.m, hd],
        alpha: 1.0,
        batch,
        stride,
        calls,
        call_stride,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::kernels::testing::randn;

    /// cuBLAS's column-major strided batched GEMM with `beta = 0`, by the definition.
    fn reference(g: &StridedGemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for call in 0..g.calls {
            for i in 0..g.batch {
                let off = |o: usize| call * g.call_stride[o] + i * g.stride[o];
                let (oa, ob, oc) = (off(0), off(1), off(2));
                for col in 0..g.n {
                    for row in 0..g.m {
                        let mut acc = 0f64;
                        for p in 0..g.k {
                            let x = if g.trans_a {
                                a[oa + p + row * g.ld[0]]
                            } else {
                                a[oa + row + p * g.ld[0]]
                            };
                            let y = if g.trans_b {
                                b[ob + col + p * g.ld[1]]
                            } else {
                                b[ob + p + col * g.ld[1]]
                            };
                            acc += x as f64 * y as f64;
                        }
                        c[oc + row + col * g.ld[2]] = (g.alpha as f64 * acc) as f32;
                    }
                }
            }
        }
    }

    fn data(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Both plans, run by the reference with a row softmax between them, give
    /// `attention::composed` (head-major copies and candle's batched matmuls), whether the
    /// GEMMs are batched over heads (b <= heads) or over images, for cross-attention (m != n)
    /// and one head; and each plan touches exactly its tensors' elements.
    #[test]
    fn plans_give_the_composed_attention() {
        for (i, &(b, n, m, heads, d)) in [
            (1, 5, 7, 3, 4),
            (2, 9, 3, 3, 5),
            (4, 6, 6, 2, 3),
            (3, 4, 11, 1, 8),
            (2, 3, 3, 2, 1),
        ]
        .iter()
        .enumerate()
        {
            let s = AttentionShape { b, n, m, heads, d };
            let seed = 100 + 10 * i as u64;
            let q = randn(&[b, n, heads * d], 1.0, seed);
            let k = randn(&[b, m, heads * d], 1.0, seed + 1);
            let v = randn(&[b, m, heads * d], 1.0, seed + 2);
            let scale = 0.7f32;

            let sp = scores_plan(&s, scale);
            assert_eq!(
                sp.extents(),
                [k.elem_count(), q.elem_count(), b * heads * n * m],
                "case {i}: scores extents"
            );
            let mut scores = vec![f32::NAN; b * heads * n * m];
            reference(&sp, &data(&k), &data(&q), &mut scores);
            for row in scores.chunks_mut(m) {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= sum);
            }

            let cp = context_plan(&s);
            assert_eq!(
                cp.extents(),
                [v.elem_count(), scores.len(), q.elem_count()],
                "case {i}: context extents"
            );
            let mut out = vec![f32::NAN; q.elem_count()];
            reference(&cp, &data(&v), &scores, &mut out);

            let want =
                crate::kernels::attention::composed(&q, &k, &v, heads, scale as f64).unwrap();
            let got = Tensor::from_vec(out, (b, n, heads * d), &Device::Cpu).unwrap();
            let err = crate::kernels::testing::rel_err_vs_f64(&got, &want);
            assert!(err < 1e-5, "case {i} {s:?}: relative error {err}");
        }
    }

    #[test]
    fn the_smaller_count_is_looped_over() {
        let s = |b, heads| AttentionShape {
            b,
            n: 4,
            m: 4,
            heads,
            d: 2,
        };
        let p = scores_plan(&s(2, 8), 1.0);
        assert_eq!((p.batch, p.calls), (8, 2));
        let p = context_plan(&s(64, 16));
        assert_eq!((p.batch, p.calls), (64, 16));
    }
}
